"""Key drills over a live biller: revocation, rotation, and the compromised-key drill of docs/SECURITY.md.

tests/test_keysets.py checks the chain rules on their own and
tests/test_biller_grpc.py a plain rotation through PublishKeySet; these tests
play whole drills against a real gRPC biller with a real SQLite file: what the
biller refuses after each step (and that a refusal stores nothing), and what
still verifies offline (KEY-11, KEY-14, KEY-16, KEY-18, KEY-19, BND-5).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from agent.clock import ManualClock
from agent.protocol.agreement import Agreement, Bundle, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, make_key_set
from agent.protocol.terms import Terms
from parley.v1 import account_pb2, envelope_pb2, negotiation_pb2
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    GetThreadRequest,
    ListBillsRequest,
    NegotiateRequest,
    PublishKeySetRequest,
    RequestErasureRequest,
)
from tests.fixtures import eur
from tests.helpers.db import dump
from tests.helpers.peer import (
    BILLER_ID,
    HOUR,
    YEAR,
    Biller,
    Consumer,
    biller_payload,
    inside_options,
    running_biller,
)
from tests.test_biller_grpc import opened, reason

ACCOUNT = "acct-1001"
MINUTE = timedelta(minutes=1)
AGREED = negotiation_pb2.NEGOTIATION_OUTCOME_AGREED


def run(tmp_path: Path, scenario: Callable[[Biller], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_biller(tmp_path) as biller:
            await scenario(biller)

    asyncio.run(main())


@dataclass
class KeyHolder:
    """A consumer and the key set chain it publishes (what it hands to offline verifiers)."""

    consumer: Consumer
    envelopes: list[envelope_pb2.Envelope]

    @property
    def chain(self) -> KeyChain:
        return KeyChain.verify(self.envelopes)

    def next_version(
        self,
        keys: Sequence[SigningKey],
        signer: SigningKey,
        at: datetime,
        revocations: Mapping[str, datetime] | None = None,
        reason: str = "",
    ) -> envelope_pb2.Envelope:
        """Version N + 1 listing `keys` (each valid from a minute before `at` for a year), signed by `signer`."""
        revoked = revocations or {}
        return make_key_set(
            party_id=self.consumer.party_id,
            version=self.chain.latest.version + 1,
            keys=[KeyEntry(key.public_key, at - MINUTE, at + YEAR) for key in keys],
            signer=signer,
            previous=self.chain.latest,
            create_time=at,
            expire_time=at + YEAR,
            revocations=revoked,
            revocation_reasons=dict.fromkeys(revoked, reason),
        )

    async def publish(self, biller: Biller, envelope: envelope_pb2.Envelope) -> None:
        """KEY-17: published to the biller before anything is signed with a key only it lists."""
        answer = await biller.stub.PublishKeySet(PublishKeySetRequest(key_set=envelope))
        self.envelopes.append(envelope)
        assert answer.version == len(self.envelopes)

    def bundle(self, biller: Biller, bill: envelope_pb2.Envelope, thread: Sequence[envelope_pb2.Envelope]) -> Bundle:
        return Bundle({BILLER_ID: biller.chain.envelopes, self.consumer.party_id: list(self.envelopes)}, bill, thread)


async def holder(biller: Biller, party_id: str = "consumer:alice") -> KeyHolder:
    consumer = await biller.enrolled(ACCOUNT, party_id)
    return KeyHolder(consumer, [consumer.key_set])


def signed_by(consumer: Consumer, key: SigningKey, *, created: datetime | None = None) -> Consumer:
    """The same party signing with `key` (its own next key, or a thief's copy of a stolen one).

    With `created`, its messages claim that create_time (a thief backdating, or
    messages signed then and sent now).
    """
    other = copy.copy(consumer)
    other.key = key
    if created is not None:
        other.clock = ManualClock(created)
    return other


async def agree_inside_options(
    biller: Biller, consumer: Consumer, bill: envelope_pb2.Envelope
) -> list[envelope_pb2.Envelope]:
    """Open a thread inside the advertised options: the biller accepts at once (NEG-12). Returns the thread."""
    opening = consumer.open(bill, inside_options())
    answer = await biller.stub.Negotiate(NegotiateRequest(move=opening))
    assert answer.outcome == AGREED
    return [opening, answer.reply]


def thread_query(consumer: Consumer, thread: Sequence[envelope_pb2.Envelope]) -> GetThreadRequest:
    thread_id = biller_payload(thread[0]).header.thread_id  # type: ignore[attr-defined]
    return GetThreadRequest(query=consumer.query(ACCOUNT, thread_id=thread_id))


async def refused_unchanged(biller: Biller, call: Callable[[], Awaitable[object]]) -> Reason:
    """The Parley reason the call `call()` makes is refused with; the store must be exactly as before it."""
    before = dump(biller.db_path)
    refusal = await reason(call())
    assert dump(biller.db_path) == before
    return refusal


def offline_refusal(bundle: Bundle) -> Reason:
    with pytest.raises(RemoteProtocolError) as failure:
        verify_bundle(bundle)
    return failure.value.reason


# --- Revocation ---------------------------------------------------------------------------------------------


def test_a_revoked_key_is_refused_on_every_signed_call_and_the_surviving_key_carries_on(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await holder(biller)
        k1, k2 = alice.consumer.key, SigningKey.generate()
        bill = await biller.bill(ACCOUNT)
        await alice.publish(biller, alice.next_version([k1, k2], k1, biller.clock.now()))  # KEY-16: a second key
        thread = await opened(biller, alice.consumer, bill)  # opened with k1: [opening, the biller's counter]

        biller.clock.advance(5 * MINUTE)
        revoked_at = biller.clock.now()  # the device with k1 was lost here; its owner notices 10 minutes later
        biller.clock.advance(10 * MINUTE)
        drill = alice.next_version([k2], k2, biller.clock.now(), {k1.keyid: revoked_at}, "device lost")
        await alice.publish(biller, drill)

        # Signed with k1 after revoke_time (sent now, inside their validity window): KEY_REVOKED (KEY-11).
        old = signed_by(alice.consumer, k1, created=revoked_at + MINUTE)
        accept = old.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
        intent = old.intent(ACCOUNT, "bill-1", "intent-1", eur("40.00"))
        calls: list[Callable[[], Awaitable[object]]] = [  # made one at a time: a gRPC call starts when made
            lambda: biller.stub.ListBills(ListBillsRequest(query=old.query(ACCOUNT))),
            lambda: biller.stub.GetThread(thread_query(old, thread)),
            lambda: biller.stub.Negotiate(NegotiateRequest(move=accept)),
            lambda: biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent)),
            lambda: biller.stub.RequestErasure(RequestErasureRequest(request=old.erasure(ACCOUNT))),
        ]
        for call in calls:
            assert await refused_unchanged(biller, call) is Reason.KEY_REVOKED
        # Signed after version 3, which no longer lists k1: the key is not in the version in force (KEY-14,
        # checked before revocation in the order of §3.8).
        late = signed_by(alice.consumer, k1).query(ACCOUNT)
        assert await refused_unchanged(biller, lambda: biller.stub.ListBills(ListBillsRequest(query=late))) is (
            Reason.UNKNOWN_KEY
        )

        new = signed_by(alice.consumer, k2)
        accept = new.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
        assert (await biller.stub.Negotiate(NegotiateRequest(move=accept))).outcome == AGREED
        # Opened with k1 before its revoke_time, accepted with k2: the whole thread verifies offline.
        agreement = verify_bundle(alice.bundle(biller, bill, [*thread, accept]))
        assert agreement.accept.digest == digest(accept)

    run(tmp_path, scenario)


# --- Rotation -----------------------------------------------------------------------------------------------


def test_an_agreement_made_before_a_rotation_still_verifies_and_is_served_after_it(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await holder(biller)
        k1, k2 = alice.consumer.key, SigningKey.generate()
        bill = await biller.bill(ACCOUNT)
        thread = await agree_inside_options(biller, alice.consumer, bill)
        before: Agreement = verify_bundle(alice.bundle(biller, bill, thread))

        biller.clock.advance(timedelta(days=30))
        await alice.publish(biller, alice.next_version([k2], k1, biller.clock.now()))  # k1 rotated out, not revoked

        rotated = alice.bundle(biller, bill, thread)  # the same thread, judged with the rotated chain (KEY-14)
        pins = {BILLER_ID: biller.chain.fingerprint, alice.consumer.party_id: alice.chain.fingerprint}
        after = verify_bundle(rotated, pins=pins)
        assert after.terms == before.terms == Terms.from_proto(inside_options())
        assert after.consumer.latest.version == 2

        served = await biller.stub.GetThread(thread_query(signed_by(alice.consumer, k2), thread))
        assert (list(served.messages), served.outcome) == (thread, AGREED)

        # A rotated-out key no longer signs anything new (KEY-14): not in the version in force.
        def stale() -> Awaitable[object]:
            return biller.stub.ListBills(ListBillsRequest(query=alice.consumer.query(ACCOUNT)))

        assert await refused_unchanged(biller, stale) is Reason.UNKNOWN_KEY

    run(tmp_path, scenario)


# --- The compromised-key drill (docs/SECURITY.md, KEY-18) ----------------------------------------------------


def test_compromised_key_drill(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        # Before: k1 signs day to day, k2 is the backup held offline; both listed (KEY-16).
        alice = await holder(biller)
        fingerprint = alice.chain.fingerprint
        k1, k2, k3 = alice.consumer.key, SigningKey.generate(), SigningKey.generate()
        await alice.publish(biller, alice.next_version([k1, k2], k1, biller.clock.now()))
        bill_a, bill_b = await biller.bill(ACCOUNT, "bill-A"), await biller.bill(ACCOUNT, "bill-B")
        biller.clock.advance(10 * MINUTE)
        honest = await agree_inside_options(biller, alice.consumer, bill_a)

        biller.clock.advance(HOUR)
        suspected = biller.clock.now()  # the earliest plausible moment k1 leaked
        biller.clock.advance(HOUR)
        thief = signed_by(alice.consumer, k1)
        stolen = await agree_inside_options(biller, thief, bill_b)  # undetected yet: the biller accepts it

        def thief_at(created: datetime) -> Consumer:
            return signed_by(alice.consumer, k1, created=created)

        def list_bills(query: envelope_pb2.Envelope) -> Callable[[], Awaitable[object]]:
            return lambda: biller.stub.ListBills(ListBillsRequest(query=query))

        # 1. Detect (an agreement the user never made), 2. publish N + 1, signed by the surviving key k2,
        #    dropping k1, revoking it from the suspected time, with a fresh backup k3.
        biller.clock.advance(HOUR)
        drill = alice.next_version([k2, k3], k2, biller.clock.now(), {k1.keyid: suspected}, "compromised")
        await alice.publish(biller, drill)

        # The thief, from now on: messages claiming a time at or after revoke_time are refused — KEY_REVOKED
        # before version 3, UNKNOWN_KEY after it (k1 is not listed). Nothing the thief sends changes the store.
        in_the_gap = thief_at(suspected + 30 * MINUTE).query(ACCOUNT)
        assert await refused_unchanged(biller, list_bills(in_the_gap)) is Reason.KEY_REVOKED
        assert await refused_unchanged(biller, list_bills(thief.query(ACCOUNT))) is Reason.UNKNOWN_KEY
        # Its own version 3 (a takeover, had it been first) needs a signer of version 3: k1 is not one (KEY-9).
        takeover = KeyHolder(thief, alice.envelopes[:2]).next_version([SigningKey.generate()], k1, biller.clock.now())
        takeover_call = PublishKeySetRequest(key_set=takeover)
        assert (
            await refused_unchanged(biller, lambda: biller.stub.PublishKeySet(takeover_call))
            is Reason.KEYSET_WRONG_SIGNER
        )

        # The exposure left: backdated to just before revoke_time, with the longest lifetime a sender may
        # choose, a message is live until revoke_time + that lifetime + the skew (HDR-5), and refused after.
        limits = biller.agent.limits

        def backdated() -> envelope_pb2.Envelope:
            header = thief.header(created=suspected - MINUTE, lifetime=limits.max_message_lifetime)
            return thief.sign(account_pb2.AccountQuery(header=header, account_id=ACCOUNT))

        assert len((await biller.stub.ListBills(ListBillsRequest(query=backdated()))).bills) == 2
        biller.clock.advance(limits.max_message_lifetime + limits.max_clock_skew)
        assert await refused_unchanged(biller, list_bills(backdated())) is Reason.MESSAGE_EXPIRED

        # 3. Re-pin / notify: the identity fingerprint is unchanged, so no pin or enrolment changes; k2 works,
        #    and the biller still serves both threads for the review the notice asks for.
        assert KeyChain.verify(alice.envelopes, pin=fingerprint).latest.version == 3
        owner = signed_by(alice.consumer, k2)
        assert len((await biller.stub.ListBills(ListBillsRequest(query=owner.query(ACCOUNT)))).bills) == 2
        for thread in (honest, stolen):
            served = await biller.stub.GetThread(thread_query(owner, thread))
            assert list(served.messages) == thread

        # 4. What stays valid: what k1 signed before revoke_time; what it signed after is invalid offline
        #    once the verifier holds version 3 (with the stale chain it would still pass: fetch the newest).
        verify_bundle(alice.bundle(biller, bill_a, honest), pins={alice.consumer.party_id: fingerprint})
        assert offline_refusal(alice.bundle(biller, bill_b, stolen)) is Reason.KEY_REVOKED
        stale = Bundle(
            {BILLER_ID: biller.chain.envelopes, alice.consumer.party_id: alice.envelopes[:2]}, bill_b, stolen
        )
        verify_bundle(stale)
        # The biller does not unwind the stolen agreement by itself: that is why step 3 notifies it of every
        # thread with a message signed by the revoked key after revoke_time (docs/SECURITY.md).
        arranged = {record.bill_id for record in await biller.agent.arrangements(ACCOUNT)}
        assert arranged == {"bill-A", "bill-B"}

    run(tmp_path, scenario)
