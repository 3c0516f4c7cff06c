"""A signed test consumer and a running biller (real gRPC on 127.0.0.1, real SQLite) for the tests.

Both are built from the shared test peers (`agent.conformance.peers`), with the
tests' fixtures: `Consumer` is a `SignedParty` at a `ManualClock`, addressed to
the test biller, with the shorthand the tests use (header fields by keyword,
an opening from a bill envelope, amounts as `Money`); `running_biller` starts a
store, an agent (the fixture bill's `SamplePolicy`, a `PeerRail`) and a server
on a free port, and always shuts them down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from agent.biller import BillerAgent, OfferContext, PaymentRail, Policy
from agent.clock import ManualClock
from agent.conformance.peers import PeerIdentity, PeerPolicy, PeerRail, SignedParty, serve_on_loopback
from agent.protocol.dsse import digest
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DEFAULT_LIMITS, Limits
from agent.protocol.messages import PAYLOAD_TYPES, Verified, open_envelope
from agent.protocol.moves import NEGOTIATION_TYPES
from agent.protocol.terms import Line, LineKind, Money, Terms, TermsKind, build_terms, monthly_dates
from agent.stores import open_biller_store
from agent.transport.server import BillerServicer, start_biller_server
from parley.v1 import biller_service_pb2, biller_service_pb2_grpc, envelope_pb2, header_pb2, negotiation_pb2, terms_pb2
from tests.fixtures import BILL, eur

M = TypeVar("M", bound=Message)

START = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
BILLER_ID = "biller:energy.example"
YEAR = timedelta(days=365)


def new_party(party_id: str, clock: ManualClock) -> tuple[SigningKey, envelope_pb2.Envelope]:
    """A fresh key and the self-signed key set version 1 listing it (valid from a day ago, for a year)."""
    identity = PeerIdentity.create(party_id, clock.now(), validity=YEAR)
    return identity.key, identity.key_set


class Consumer:
    """A consumer party that signs requests to the test biller at the clock's time (a `SignedParty`)."""

    def __init__(self, party_id: str, clock: ManualClock) -> None:
        self._clock = clock
        self.party = SignedParty.create(BILLER_ID, clock=clock.now, party_id=party_id, key_set_lifetime=YEAR)

    def __copy__(self) -> Consumer:
        """The same party, whose key, id or clock can then be changed without changing this one."""
        twin = Consumer.__new__(Consumer)
        twin._clock = self._clock
        twin.party = dataclasses.replace(self.party, key_sets=list(self.party.key_sets))
        return twin

    @property
    def clock(self) -> ManualClock:
        return self._clock

    @clock.setter
    def clock(self, clock: ManualClock) -> None:
        """Sign at another clock's time from now on."""
        self._clock = clock
        self.party.clock = clock.now

    @property
    def party_id(self) -> str:
        return self.party.party_id

    @party_id.setter
    def party_id(self, party_id: str) -> None:
        self.party.party_id = party_id

    @property
    def key(self) -> SigningKey:
        return self.party.key

    @key.setter
    def key(self, key: SigningKey) -> None:
        self.party.key = key

    @property
    def key_set(self) -> envelope_pb2.Envelope:
        return self.party.key_set

    @property
    def chain(self) -> KeyChain:
        return self.party.chain

    def header(
        self,
        *,
        thread_id: bytes | None = None,
        sequence: int = 0,
        previous: bytes = b"",
        created: datetime | None = None,
        lifetime: timedelta = HOUR,
        message_id: bytes | None = None,
    ) -> header_pb2.Header:
        return self.party.header(
            **_header_fields(
                thread_id=thread_id,
                sequence=sequence,
                previous=previous,
                created=created,
                lifetime=lifetime,
                message_id=message_id,
            )
        )

    def sign(self, message: Message) -> envelope_pb2.Envelope:
        return self.party.sign(message)

    def enrolment(self, account_id: str, code: str) -> envelope_pb2.Envelope:
        return self.party.enrolment(account_id, code, header=LIFETIME)

    def query(self, account_id: str, **fields: Any) -> envelope_pb2.Envelope:
        return self.party.query(account_id, header=LIFETIME, **fields)

    def open(
        self,
        bill: envelope_pb2.Envelope,
        terms: terms_pb2.Terms,
        *,
        max_rounds: int = 4,
        deadline: timedelta = timedelta(days=2),
        disclosure: bytes = b"",
    ) -> envelope_pb2.Envelope:
        bill_id = biller_payload(bill).bill_id  # type: ignore[attr-defined]
        return self.party.open(
            bill_id,
            digest(bill),
            terms,
            max_rounds=max_rounds,
            deadline=self.clock.now() + deadline,
            disclosure_digest=hashlib.sha256(disclosure).digest() if disclosure else b"",
            header=LIFETIME,
        )

    def next(self, thread: Sequence[envelope_pb2.Envelope], message: Message, **header: Any) -> envelope_pb2.Envelope:
        """`message` signed as the next message of `thread` (header fields overridable, as for `header`)."""
        first = NEGOTIATION_PAYLOAD[thread[0].payload_type].FromString(thread[0].payload)
        fields: dict[str, Any] = {
            "thread_id": first.header.thread_id,
            "sequence": len(thread),
            "previous": digest(thread[-1]),
            "created": None,
            "lifetime": HOUR,
            "message_id": None,
        }
        fields.update(header)
        return self.party.move(thread, message, header=_header_fields(**fields))

    def intent(
        self,
        account_id: str,
        bill_id: str,
        intent_id: str,
        amount: Money,
        *,
        agreement_digest: bytes = b"",
        instalment_index: int = 0,
    ) -> envelope_pb2.Envelope:
        return self.party.intent(
            account_id,
            bill_id,
            intent_id,
            amount.to_proto(),
            agreement_digest=agreement_digest,
            instalment_index=instalment_index,
            header=LIFETIME,
        )

    def erasure(self, account_id: str) -> envelope_pb2.Envelope:
        return self.party.erasure(account_id, header=LIFETIME)


LIFETIME = {"lifetime": HOUR}  # the tests' messages live an hour (a ManualClock moves only when told)


def _header_fields(
    *,
    thread_id: bytes | None,
    sequence: int,
    previous: bytes,
    created: datetime | None,
    lifetime: timedelta,
    message_id: bytes | None,
) -> dict[str, Any]:
    """The tests' header keywords as `build_header`'s (created at the party's clock unless given)."""
    fields: dict[str, Any] = {
        "thread_id": thread_id,
        "sequence": sequence,
        "previous_digest": previous,
        "lifetime": lifetime,
        "message_id": message_id,
    }
    if created is not None:
        fields["create_time"] = created
    return fields


NEGOTIATION_PAYLOAD = {cls.DESCRIPTOR.full_name: cls for cls in NEGOTIATION_TYPES}


def biller_payload(envelope: envelope_pb2.Envelope) -> Message:
    """The parsed payload of a message the biller signed (unverified; tests verify separately)."""
    return PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload)


def disclosure(*, hardship: bool = True) -> bytes:
    circumstances = negotiation_pb2.Circumstances(
        purpose=negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=hardship, note="lost my job"
    )
    return negotiation_pb2.Disclosure(salt=secrets.token_bytes(16), circumstances=circumstances).SerializeToString()


# --- Terms for the sample bill (tests.fixtures.BILL: EUR 120.00 due 2026-03-31) ----------------


def outside_options() -> terms_pb2.Terms:
    """8 monthly instalments of EUR 15.00: outside the options (at most 6, each at least EUR 20.00)."""
    return build_terms(TermsKind.INSTALMENT_PLAN, BILL.amount_due, monthly_dates(date(2026, 4, 15), 8)).to_proto()


def counter_terms() -> terms_pb2.Terms:
    """6 monthly instalments of EUR 20.00: the test policy's counter-offer, inside the options."""
    return build_terms(TermsKind.INSTALMENT_PLAN, BILL.amount_due, monthly_dates(date(2026, 4, 15), 6)).to_proto()


def inside_options() -> terms_pb2.Terms:
    """3 monthly instalments of EUR 40.00: inside the options, so accepted at once (NEG-12)."""
    return build_terms(TermsKind.INSTALMENT_PLAN, BILL.amount_due, monthly_dates(date(2026, 4, 15), 3)).to_proto()


def settlement_terms() -> terms_pb2.Terms:
    reduction = (Line(LineKind.SETTLEMENT_REDUCTION, "waiver", eur("30.00")),)
    return build_terms(TermsKind.SETTLEMENT, BILL.amount_due, [date(2026, 3, 31)], reduction).to_proto()


def hardship_terms() -> terms_pb2.Terms:
    """10 monthly instalments of EUR 12.00 under the hardship programme, which requires disclosure."""
    return build_terms(
        TermsKind.INSTALMENT_PLAN,
        BILL.amount_due,
        monthly_dates(date(2026, 4, 15), 10),
        hardship_programme_id="hardship-12",
    ).to_proto()


def _six_monthly_from_mid_april(context: OfferContext) -> Terms:
    return build_terms(TermsKind.INSTALMENT_PLAN, context.bill.outstanding, monthly_dates(date(2026, 4, 15), 6))


class SamplePolicy(PeerPolicy):
    """Advertises the fixture bill's options; rejects settlements; counters with 6 x EUR 20.00 while it can."""

    def __init__(self) -> None:
        super().__init__(
            BILL.options, _six_monthly_from_mid_april, refuse=frozenset({TermsKind.SETTLEMENT}), keep_contexts=True
        )


@dataclass
class Biller:
    """A running biller and what the tests need to reach and inspect it.

    `target` is its "127.0.0.1:port"; `key` its signing key (for tests that play
    a hostile biller re-signing its answers); `servicer` the servicer given to
    `running_biller` (None when the real one serves).
    """

    agent: BillerAgent
    stub: biller_service_pb2_grpc.BillerServiceAsyncStub
    clock: ManualClock
    db_path: Path
    policy: SamplePolicy
    target: str
    key: SigningKey
    servicer: BillerServicer | None

    @property
    def chain(self) -> KeyChain:
        return self.agent.key_chain

    async def enrolled(self, account_id: str, party_id: str) -> Consumer:
        """A new account with a consumer enrolled on it through the Enrol RPC."""
        await self.agent.create_account(account_id, "Alice Example")
        consumer = Consumer(party_id, self.clock)
        code = await self.agent.issue_enrolment_code(account_id)
        await self.stub.Enrol(biller_service_pb2.EnrolRequest(request=consumer.enrolment(account_id, code)))
        return consumer

    async def bill(self, account_id: str, bill_id: str = BILL.bill_id) -> envelope_pb2.Envelope:
        """Issue the fixture bill on the account and return its envelope."""
        await self.agent.issue_bill(
            account_id,
            BILL.amount_due,
            BILL.due_date,
            BILL.description,
            issue_date=BILL.issue_date,
            bill_id=bill_id,
        )
        bill = await self.agent._store.get_bill(bill_id)
        assert bill is not None
        return envelope_pb2.Envelope.FromString(bill.envelope)

    async def bill_envelope(self, bill_id: str = BILL.bill_id) -> envelope_pb2.Envelope:
        """The signed envelope of a bill already issued."""
        bill = await self.agent._store.get_bill(bill_id)
        assert bill is not None
        return envelope_pb2.Envelope.FromString(bill.envelope)

    def verify(self, envelope: envelope_pb2.Envelope, consumer: Consumer, kind: type[M]) -> Verified[M]:
        """Open a biller message of type `kind` as the consumer would (stored answers: no expiry check, PAY-10)."""
        return open_envelope(envelope, (kind,), sender_keys=self.chain, recipient=consumer.party_id, now=None)


@asynccontextmanager
async def running_biller(
    tmp_path: Path,
    *,
    policy: Policy | None = None,
    limits: Limits = DEFAULT_LIMITS,
    servicer: Callable[[BillerAgent], BillerServicer] | None = None,
    store: str | None = None,
    rail: PaymentRail | None = None,
) -> AsyncIterator[Biller]:
    """A biller agent on a real SQLite file, served over gRPC on a free loopback port.

    `servicer` builds the servicer from the agent (default: the real `BillerServicer`,
    served by `start_biller_server`); `store` is another store for `open_biller_store`
    (e.g. a PostgreSQL URL; `db_path` then names no file).
    """
    clock = ManualClock(START)
    key, key_set = new_party(BILLER_ID, clock)
    opened = await open_biller_store(tmp_path / "biller.sqlite" if store is None else store)
    test_policy = SamplePolicy()
    agent = BillerAgent(
        party_id=BILLER_ID,
        signing_key=key,
        key_sets=[key_set],
        store=opened,
        policy=policy or test_policy,
        rail=rail or PeerRail(),
        clock=clock,
        limits=limits,
        watch_poll_interval=timedelta(seconds=0.2),
    )
    try:
        serving = None
        if servicer is None:
            server, port = await start_biller_server(agent, "127.0.0.1:0", insecure=True)
        else:
            serving = servicer(agent)
            server, port = await serve_on_loopback(serving, limits)
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.insecure_channel(target) as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                yield Biller(agent, stub, clock, tmp_path / "biller.sqlite", test_policy, target, key, serving)
        finally:
            await server.stop(None)
    finally:
        await opened.close()
