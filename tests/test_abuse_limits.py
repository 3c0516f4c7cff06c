"""Every abuse limit of PROTOCOL.md §14 crossed over a live gRPC biller, each refused with its specific reason.

Each refusal is checked against the store from outside (tests/helpers/db.py): nothing changes except what
the spec says a refusal may write (a wrong enrolment code counts against the account, ENR-3; a negotiation
violation is kept as evidence, NEG-15; a late move expires its thread, NEG-6).

Already covered elsewhere, and not repeated here (tests/test_biller_grpc.py):
`test_open_thread_limits` (TOO_MANY_OPEN_THREADS and one open thread per bill),
`test_a_move_after_the_deadline_expires_the_thread` (NEGOTIATION_DEADLINE_PASSED),
`test_wrong_codes_lock_enrolment_and_codes_expire` and `test_enrolment_binds_once_and_answers_a_retry`
(the enrolment reasons), `test_retention_forgets_old_replay_records_and_disclosures` (the purge count).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import wrappers_pb2

from agent.biller import BillerAgent
from agent.clock import ManualClock
from agent.conformance.peers import PeerRail
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.limits import DEFAULT_LIMITS, PEER_RATE_LIMIT_FACTOR, Limits
from agent.ratelimit import RateLimiter, TokenBuckets, peer_address
from agent.stores.biller_sqlite import SqliteBillerStore
from agent.transport.server import start_biller_server
from agent.transport.status import error_from_rpc
from parley.v1 import account_pb2, biller_service_pb2_grpc, envelope_pb2, negotiation_pb2, payment_pb2
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    EnrolRequest,
    GetKeySetsRequest,
    HelloRequest,
    ListBillsRequest,
    NegotiateRequest,
)
from tests.fixtures import BILL
from tests.helpers.db import Dump, dump
from tests.helpers.peer import (
    BILLER_ID,
    START,
    Biller,
    Consumer,
    SamplePolicy,
    counter_terms,
    new_party,
    outside_options,
)
from tests.test_biller_grpc import reason, refused, run

ACCOUNT, OTHER = "acct-1001", "acct-2002"
SECOND = timedelta(seconds=1)
SMALL_RATE = Limits(rate_limit_per_second=1, rate_limit_burst=2)  # so few requests cross the limits
MICROSECOND = timedelta(microseconds=1)


def changed(before: Dump, after: Dump) -> set[str]:
    """The tables whose rows differ."""
    return {table for table in before.keys() | after.keys() if before.get(table) != after.get(table)}


async def refused_unchanged(biller: Biller, call: Awaitable[object], expected: Reason) -> None:
    """`call` fails with `expected` and the store is exactly as it was."""
    before = dump(biller.db_path)
    assert await reason(call) is expected
    assert dump(biller.db_path) == before, expected


def list_bills(biller: Biller, consumer: Consumer, **header: object) -> Awaitable[object]:
    return biller.stub.ListBills(ListBillsRequest(query=_signed_query(consumer, **header)))


def _signed_query(consumer: Consumer, **header: object) -> envelope_pb2.Envelope:
    """A ListBills query on ACCOUNT with the given header fields (Consumer.query takes none)."""
    query = account_pb2.AccountQuery(header=consumer.header(**header), account_id=ACCOUNT)  # type: ignore[arg-type]
    return consumer.sign(query)


# --- Envelope size: Parley's limit and gRPC's agree (LIM-1, TRN-8) ---------------------------------------


# The key of field 1000, length-delimited (1000 << 3 | 2 as a varint): not an Envelope field, so ignored (ENV-7).
_PADDING_KEY = b"\xc2\x3e"


def padded(envelope: envelope_pb2.Envelope, size: int) -> envelope_pb2.Envelope:
    """`envelope` with an unknown field appended so that its encoding is exactly `size` bytes.

    The unsigned Envelope's unknown fields are ignored but kept and counted, so the
    signature still verifies and only the size changes.
    """
    base = envelope.SerializeToString() + _PADDING_KEY
    for length in range(size - len(base), -1, -1):
        # A BytesValue's encoding less its one-byte key is the length (a varint) and the bytes.
        value = wrappers_pb2.BytesValue(value=bytes(length)).SerializeToString()[1:]
        if len(base) + len(value) == size:
            return envelope_pb2.Envelope.FromString(base + value)
    raise AssertionError(f"no padding makes {size} bytes")


def list_bills_request_of_size(consumer: Consumer, size: int) -> ListBillsRequest:
    """A ListBillsRequest (one field: the envelope) whose encoding is exactly `size` bytes."""
    query = _signed_query(consumer)
    for envelope_size in range(size, 0, -1):
        request = ListBillsRequest(query=padded(query, envelope_size))
        if request.ByteSize() == size:
            return request
    raise AssertionError(f"no request of {size} bytes")


def test_envelope_size_limit_and_the_grpc_receive_limit_agree(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        limits = biller.agent.limits
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        await biller.bill(ACCOUNT)
        # Exactly max_envelope_bytes: accepted, and answered.
        exact = padded(_signed_query(alice), limits.max_envelope_bytes)
        listed = await biller.stub.ListBills(ListBillsRequest(query=exact))
        assert len(listed.bills) == 1
        # One byte more: ENVELOPE_TOO_LARGE from Parley, before anything is verified.
        over = padded(_signed_query(alice), limits.max_envelope_bytes + 1)
        await refused_unchanged(biller, biller.stub.ListBills(ListBillsRequest(query=over)), Reason.ENVELOPE_TOO_LARGE)
        # A mutating call too: a payment intent one byte too large stores nothing.
        intent = padded(alice.intent(ACCOUNT, BILL.bill_id, "big", BILL.amount_due), limits.max_envelope_bytes + 1)
        big_intent = biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
        await refused_unchanged(biller, big_intent, Reason.ENVELOPE_TOO_LARGE)
        # A request of exactly the gRPC receive limit still reaches Parley (which refuses the envelope) ...
        at_limit = list_bills_request_of_size(alice, limits.grpc_max_receive_bytes)
        assert await reason(biller.stub.ListBills(at_limit)) is Reason.ENVELOPE_TOO_LARGE
        # ... and one byte more is cut off by gRPC itself: RESOURCE_EXHAUSTED, without a Parley ErrorInfo.
        before = dump(biller.db_path)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await biller.stub.ListBills(list_bills_request_of_size(alice, limits.grpc_max_receive_bytes + 1))
        assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_from_rpc(failure.value).wire_reason == ""
        assert dump(biller.db_path) == before
        assert limits.grpc_max_receive_bytes == limits.max_envelope_bytes + 1024  # TRN-8

    run(tmp_path, scenario)


# --- Rate limits (LIM-8) ---------------------------------------------------------------------------------


def test_token_buckets_refill_cap_and_forget_the_least_recently_used() -> None:
    buckets = TokenBuckets(rate_per_second=2, burst=3, max_tracked=2)
    assert [buckets.take("a", START) for _ in range(4)] == [True, True, True, False]
    assert not buckets.available("a", START)
    assert buckets.take("a", START + timedelta(milliseconds=500))  # 0.5 s at 2/s: one token
    assert not buckets.take("a", START + timedelta(milliseconds=500))
    # Refilling stops at the burst, however long the wait.
    later = START + timedelta(days=1)
    assert [buckets.take("a", later) for _ in range(4)] == [True, True, True, False]
    # A clock that steps back refills nothing and drains nothing.
    assert not buckets.take("a", later - timedelta(hours=1))
    # The memory is bounded: a third name forgets the least recently used one, which starts full again.
    buckets.take("b", later)
    buckets.take("c", later)
    assert len(buckets) == 2
    assert [buckets.take("a", later) for _ in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError, match="positive"):
        TokenBuckets(rate_per_second=0, burst=1, max_tracked=1)


def test_a_flood_of_names_cannot_grow_the_limiter() -> None:
    limiter = RateLimiter(DEFAULT_LIMITS, max_tracked=100)
    for n in range(1000):
        limiter.admit_peer(f"ipv6:[2001:db8::{n:x}]", START, unsigned=True)
        limiter.admit_signer(f"{n:032x}", START)
    assert (len(limiter.keys), len(limiter.peers)) == (100, 100)


def test_refusals_cost_the_peer_only_before_the_key_was_charged() -> None:
    limiter = RateLimiter(SMALL_RATE)
    peer, key = "ipv4:192.0.2.7", "0" * 32
    peer_burst = SMALL_RATE.rate_limit_burst * PEER_RATE_LIMIT_FACTOR

    def refused_request(*, keyid: str | None) -> None:
        """One request in its own context, as gRPC gives each call its own task; refused in the end."""

        def handle() -> None:
            limiter.admit_peer(peer, START, unsigned=False)
            with contextlib.suppress(RemoteProtocolError):
                if keyid is not None:
                    limiter.admit_signer(keyid, START)  # RATE_LIMITED once the key's bucket is empty
            limiter.refused(peer, START)

        contextvars.copy_context().run(handle)

    for _ in range(SMALL_RATE.rate_limit_burst):
        refused_request(keyid=key)  # admitted, then refused later (say NOT_FOUND): the key paid, not the peer
    assert limiter.peers.available(peer, START)
    for _ in range(peer_burst):
        refused_request(keyid=key)  # over the key's limit: its signature was checked, so the peer pays
    with pytest.raises(RemoteProtocolError) as refusal:
        refused_request(keyid=None)
    assert refusal.value.reason is Reason.RATE_LIMITED


def test_peer_address_drops_the_port_only() -> None:
    assert peer_address("ipv4:10.0.0.7:53211") == "ipv4:10.0.0.7"
    assert peer_address("ipv6:[2001:db8::1]:443") == "ipv6:[2001:db8::1]"
    assert peer_address("unix:/run/parley.sock") == "unix:/run/parley.sock"


def test_rate_per_key_refuses_after_the_burst_and_recovers_as_the_clock_moves(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        limits = biller.agent.limits
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bob = await biller.enrolled(OTHER, "consumer:bob")
        await biller.bill(ACCOUNT)
        for _ in range(limits.rate_limit_burst):  # the enrolment was charged to its key, not to the party (LIM-8)
            await list_bills(biller, alice)
        error = await refused(list_bills(biller, alice))
        assert (error.reason, error.code) == (Reason.RATE_LIMITED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        # A mutating request refused for its rate stores nothing, and is not remembered as refused:
        # the same envelope is applied once a token is back.
        intent = CreatePaymentIntentRequest(intent=alice.intent(ACCOUNT, BILL.bill_id, "pay-1", BILL.amount_due))
        await refused_unchanged(biller, biller.stub.CreatePaymentIntent(intent), Reason.RATE_LIMITED)
        # Another key is unaffected.
        await biller.stub.ListBills(ListBillsRequest(query=bob.query(OTHER)))
        # One token comes back every 1/rate seconds.
        biller.clock.advance(SECOND / limits.rate_limit_per_second)
        answer = await biller.stub.CreatePaymentIntent(intent)
        assert answer.instructions.payload_type == "parley.v1.PaymentInstructions"
        assert await reason(list_bills(biller, alice)) is Reason.RATE_LIMITED
        # A full burst after burst/rate seconds.
        biller.clock.advance(SECOND * limits.rate_limit_burst / limits.rate_limit_per_second)
        for _ in range(limits.rate_limit_burst):
            await list_bills(biller, alice)
        assert await reason(list_bills(biller, alice)) is Reason.RATE_LIMITED

    run(tmp_path, scenario)


def test_rate_limited_requests_are_counted_but_not_logged_one_by_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for _ in range(SMALL_RATE.rate_limit_burst):  # the enrolment was charged to its key, not to the party
            await list_bills(biller, alice)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="parley.transport"):
            for _ in range(5):
                assert await reason(list_bills(biller, alice)) is Reason.RATE_LIMITED
            forged = _signed_query(alice)
            forged.signatures[0].sig = bytes(64)
            assert await reason(biller.stub.ListBills(ListBillsRequest(query=forged))) is Reason.BAD_SIGNATURE
        refusals = [record.getMessage() for record in caplog.records if record.getMessage().startswith("refused")]
        assert len(refusals) == 1
        assert "BAD_SIGNATURE" in refusals[0]
        metrics = biller.agent.metrics
        assert metrics.sample("parley_verification_failures_total", reason="RATE_LIMITED") == 5

    run(tmp_path, scenario, limits=SMALL_RATE)


@asynccontextmanager
async def second_listener(biller: Biller) -> AsyncIterator[biller_service_pb2_grpc.BillerServiceAsyncStub]:
    """The same agent also served on [::1], so calls come from a second peer address."""
    server, port = await start_biller_server(biller.agent, "[::1]:0", insecure=True)
    try:
        async with grpc.aio.insecure_channel(f"ipv6:[::1]:{port}") as channel:
            yield biller_service_pb2_grpc.BillerServiceStub(channel)
    finally:
        await server.stop(None)


def test_forged_requests_exhaust_their_peer_address_never_the_named_key(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        peer_burst = SMALL_RATE.rate_limit_burst * PEER_RATE_LIMIT_FACTOR
        # 127.0.0.1 sends requests in alice's name with bad signatures: refused, charged to the address.
        # (The enrolment above was a success, which costs the address nothing.)
        before = dump(biller.db_path)
        for _ in range(peer_burst):
            forged = _signed_query(alice)
            forged.signatures[0].sig = bytes(64)
            assert await reason(biller.stub.ListBills(ListBillsRequest(query=forged))) is Reason.BAD_SIGNATURE
        # Now the address is refused before verification, even for alice's genuine request and for Hello.
        assert await reason(list_bills(biller, alice)) is Reason.RATE_LIMITED
        assert await reason(biller.stub.Hello(HelloRequest(protocol_versions=[1]))) is Reason.RATE_LIMITED
        assert dump(biller.db_path) == before
        # Alice, from another address, has her party's whole burst (her enrolment was charged to its key):
        # the forgeries never touched her bucket.
        async with second_listener(biller) as elsewhere:
            for _ in range(SMALL_RATE.rate_limit_burst):
                await elsewhere.ListBills(ListBillsRequest(query=_signed_query(alice)))
            assert await reason(elsewhere.ListBills(ListBillsRequest(query=_signed_query(alice)))) is (
                Reason.RATE_LIMITED
            )
            await elsewhere.Hello(HelloRequest(protocol_versions=[1]))

    run(tmp_path, scenario, limits=SMALL_RATE)


def test_unsigned_calls_and_refused_enrolments_are_limited_per_address(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        peer_burst = SMALL_RATE.rate_limit_burst * PEER_RATE_LIMIT_FACTOR
        await biller.agent.create_account(ACCOUNT, "Alice")
        code = await biller.agent.issue_enrolment_code(ACCOUNT)
        for n in range(peer_burst // 2):
            await biller.stub.Hello(HelloRequest(protocol_versions=[1]))
            # A fresh key set each time: an Enrol's key vouches only for itself, so its refusal costs the address.
            stranger = Consumer(f"consumer:guess-{n}", biller.clock)
            wrong = biller.stub.Enrol(EnrolRequest(request=stranger.enrolment(f"no-such-account-{n}", code)))
            assert await reason(wrong) is Reason.ENROLMENT_CODE_INVALID
        assert await reason(biller.stub.GetKeySets(GetKeySetsRequest())) is Reason.RATE_LIMITED
        alice = Consumer("consumer:alice", biller.clock)
        assert await reason(biller.stub.Enrol(EnrolRequest(request=alice.enrolment(ACCOUNT, code)))) is (
            Reason.RATE_LIMITED
        )
        # The address refills at its rate.
        biller.clock.advance(SECOND / (SMALL_RATE.rate_limit_per_second * PEER_RATE_LIMIT_FACTOR))
        await biller.stub.Enrol(EnrolRequest(request=alice.enrolment(ACCOUNT, code)))
        account = await biller.agent.account(ACCOUNT)
        assert account is not None
        assert account.consumer_party_id == alice.party_id

    run(tmp_path, scenario, limits=SMALL_RATE)


# --- Negotiation limits: open threads, rounds, deadlines (LIM-4, LIM-5, LIM-7, NEG-4..NEG-6) ---------------


def test_an_expired_thread_frees_its_place_under_the_open_thread_limit(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        limit = biller.agent.limits.max_open_threads_per_account
        bills = [await biller.bill(ACCOUNT, f"bill-{n}") for n in range(limit + 1)]
        for n, bill in enumerate(bills[:limit]):
            deadline = timedelta(days=1) if n == 0 else timedelta(days=3)
            await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, outside_options(), deadline=deadline)))
        extra = alice.open(bills[limit], outside_options())
        for _ in range(2):  # nothing was recorded, so the retry is judged afresh: refused again
            call = biller.stub.Negotiate(NegotiateRequest(move=extra))
            await refused_unchanged(biller, call, Reason.TOO_MANY_OPEN_THREADS)
        biller.clock.advance(timedelta(days=1))  # exactly at the first thread's deadline: still open (NEG-6)
        call = biller.stub.Negotiate(NegotiateRequest(move=alice.open(bills[limit], outside_options())))
        await refused_unchanged(biller, call, Reason.TOO_MANY_OPEN_THREADS)
        # Once the first thread's deadline has passed it no longer counts (LIM-7).
        biller.clock.advance(MICROSECOND)
        answer = await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bills[limit], outside_options())))
        assert answer.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_OPEN

    run(tmp_path, scenario)


def test_openings_beyond_the_round_and_time_limits_are_refused(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        limits = biller.agent.limits
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        invalid = [
            alice.open(bill, outside_options(), max_rounds=limits.max_rounds + 1),
            alice.open(bill, outside_options(), max_rounds=0),
            alice.open(bill, outside_options(), deadline=limits.max_negotiation_time + MICROSECOND),
            alice.open(bill, outside_options(), deadline=timedelta(0)),
        ]
        for opening in invalid:
            call = biller.stub.Negotiate(NegotiateRequest(move=opening))
            await refused_unchanged(biller, call, Reason.NEGOTIATION_LIMITS_INVALID)
        # The limits themselves are allowed.
        widest = alice.open(bill, outside_options(), max_rounds=limits.max_rounds, deadline=limits.max_negotiation_time)
        assert (await biller.stub.Negotiate(NegotiateRequest(move=widest))).outcome == (
            negotiation_pb2.NEGOTIATION_OUTCOME_OPEN
        )

    run(tmp_path, scenario)


def test_an_offer_beyond_max_rounds_is_a_violation_kept_as_evidence(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        opening = alice.open(bill, outside_options(), max_rounds=2)
        counter = (await biller.stub.Negotiate(NegotiateRequest(move=opening))).reply  # round 2 of 2
        assert counter.payload_type == "parley.v1.Offer"
        thread = [opening, counter]
        third = alice.next(thread, negotiation_pb2.Offer(terms=counter_terms()))
        before = dump(biller.db_path)
        assert await reason(biller.stub.Negotiate(NegotiateRequest(move=third))) is Reason.ROUND_LIMIT_EXCEEDED
        after = dump(biller.db_path)
        # NEG-15 "violation": the offer is recorded as evidence, the thread ends, the answer is remembered.
        assert changed(before, after) == {"messages", "threads", "replay_cache"}
        assert len(after["messages"]) == len(before["messages"]) + 1
        assert len(after["replay_cache"]) == len(before["replay_cache"]) + 1
        # The retry gets the same error and changes nothing more (NEG-18).
        await refused_unchanged(
            biller, biller.stub.Negotiate(NegotiateRequest(move=third)), Reason.ROUND_LIMIT_EXCEEDED
        )
        # Accepting is still what the consumer could have done at the limit; the thread is closed now.
        accept = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(counter)), sequence=3)
        closed = biller.stub.Negotiate(NegotiateRequest(move=accept))
        await refused_unchanged(biller, closed, Reason.THREAD_CLOSED)

    run(tmp_path, scenario)


def test_a_move_exactly_at_the_deadline_is_on_time(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bills = [await biller.bill(ACCOUNT, f"bill-{n}") for n in range(2)]
        threads = []
        for bill in bills:
            opening = alice.open(bill, outside_options(), deadline=timedelta(hours=2))
            threads.append([opening, (await biller.stub.Negotiate(NegotiateRequest(move=opening))).reply])
        biller.clock.advance(timedelta(hours=2))
        on_time = alice.next(threads[0], negotiation_pb2.Accept(offer_digest=digest(threads[0][1])))
        assert (await biller.stub.Negotiate(NegotiateRequest(move=on_time))).outcome == (
            negotiation_pb2.NEGOTIATION_OUTCOME_AGREED
        )
        biller.clock.advance(MICROSECOND)
        late = alice.next(threads[1], negotiation_pb2.Accept(offer_digest=digest(threads[1][1])))
        before = dump(biller.db_path)
        assert await reason(biller.stub.Negotiate(NegotiateRequest(move=late))) is Reason.NEGOTIATION_DEADLINE_PASSED
        # NEG-15 "deadline": the move is not recorded; only the thread's outcome changes, to expired.
        after = dump(biller.db_path)
        assert changed(before, after) == {"threads"}
        assert "expired" in repr(after["threads"])
        assert "expired" not in repr(before["threads"])

    run(tmp_path, scenario)


# --- Message lifetime and clock skew (LIM-2, LIM-3, HDR-5) ------------------------------------------------


def test_lifetime_and_skew_are_enforced_to_the_microsecond(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        limits = biller.agent.limits
        skew, longest = limits.max_clock_skew, limits.max_message_lifetime
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        now = biller.clock.now()
        accepted: list[dict[str, object]] = [
            {"lifetime": longest},
            {"created": now + skew},  # created up to the skew ahead
            {"created": now - skew - timedelta(hours=1), "lifetime": timedelta(hours=1)},  # expired up to skew ago
        ]
        for header in accepted:
            await list_bills(biller, alice, **header)
        refusals: list[tuple[dict[str, object], Reason]] = [
            ({"lifetime": longest + MICROSECOND}, Reason.LIFETIME_TOO_LONG),
            ({"lifetime": timedelta(0)}, Reason.LIFETIME_TOO_LONG),
            ({"created": now + skew + MICROSECOND}, Reason.MESSAGE_NOT_YET_VALID),
            (
                {"created": now - skew - timedelta(hours=1) - MICROSECOND, "lifetime": timedelta(hours=1)},
                Reason.MESSAGE_EXPIRED,
            ),
        ]
        for header, expected in refusals:
            await refused_unchanged(biller, list_bills(biller, alice, **header), expected)
        # The same checks guard mutating requests: an expired payment intent stores nothing.
        stale = alice.intent(ACCOUNT, BILL.bill_id, "late", BILL.amount_due)
        biller.clock.advance(timedelta(hours=1) + skew + MICROSECOND)
        call = biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=stale))
        await refused_unchanged(biller, call, Reason.MESSAGE_EXPIRED)

    run(tmp_path, scenario)


# --- Enrolment codes (ENR-2..ENR-5, LIM-9) -----------------------------------------------------------------


def test_enrolment_refusals_write_only_the_failed_attempt_count(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        attempts = biller.agent.limits.enrolment_max_attempts
        await biller.agent.create_account(ACCOUNT, "Alice")
        code = await biller.agent.issue_enrolment_code(ACCOUNT)
        alice = Consumer("consumer:alice", biller.clock)
        wrong = [code[:-1] + ("0" if code[-1] != "0" else "1"), "0" + code[1:] if code[0] != "0" else "1" + code[1:]]
        for n in range(attempts):
            before = dump(biller.db_path)
            request = alice.enrolment(ACCOUNT, wrong[n % 2])
            assert await reason(biller.stub.Enrol(EnrolRequest(request=request))) is Reason.ENROLMENT_CODE_INVALID
            assert changed(before, dump(biller.db_path)) == {"accounts"}  # the count (ENR-3), nothing else
        # Locked: the right code is refused too, and nothing at all changes any more.
        locked = biller.stub.Enrol(EnrolRequest(request=alice.enrolment(ACCOUNT, code)))
        await refused_unchanged(biller, locked, Reason.ENROLMENT_LOCKED)
        wrong_again = biller.stub.Enrol(EnrolRequest(request=alice.enrolment(ACCOUNT, wrong[0])))
        await refused_unchanged(biller, wrong_again, Reason.ENROLMENT_LOCKED)
        # A new code lifts the lock; it enrols once; its second use is refused; an expired one too.
        fresh = await biller.agent.issue_enrolment_code(ACCOUNT, valid_for=timedelta(hours=1))
        first = alice.enrolment(ACCOUNT, fresh)
        await biller.stub.Enrol(EnrolRequest(request=first))
        bob = Consumer("consumer:bob", biller.clock)
        await refused_unchanged(
            biller, biller.stub.Enrol(EnrolRequest(request=bob.enrolment(ACCOUNT, fresh))), Reason.ENROLMENT_CODE_USED
        )
        expiring = await biller.agent.issue_enrolment_code(ACCOUNT, valid_for=timedelta(hours=1))
        biller.clock.advance(timedelta(hours=1))
        expired = biller.stub.Enrol(EnrolRequest(request=bob.enrolment(ACCOUNT, expiring)))
        await refused_unchanged(biller, expired, Reason.ENROLMENT_CODE_EXPIRED)
        account = await biller.agent.account(ACCOUNT)
        assert account is not None
        assert account.consumer_party_id == alice.party_id

    run(tmp_path, scenario)


def test_enrolment_codes_are_compared_as_salted_hashes_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENR-3, ENR-8: what the comparison sees, whatever code arrives, is two 32-byte hashes, compared with
    hmac.compare_digest, once per stored code, never stopping early: how much of the code was right
    changes neither what is compared nor how many comparisons are made."""
    comparisons: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        comparisons.append((a, b))
        return compare_digest(a, b)

    async def scenario(biller: Biller) -> None:
        await biller.agent.create_account(ACCOUNT, "Alice")
        code = await biller.agent.issue_enrolment_code(ACCOUNT)
        await biller.agent.issue_enrolment_code(ACCOUNT)  # a second live code: both are compared every time
        candidates = {
            "first character wrong": ("0" if code[0] != "0" else "1") + code[1:],
            "last character wrong": code[:-1] + ("0" if code[-1] != "0" else "1"),
            "short": "0",
            "right": code,
        }
        seen: dict[str, list[tuple[bytes, bytes]]] = {}
        for label, candidate in candidates.items():
            comparisons.clear()
            consumer = Consumer(f"consumer:{label.replace(' ', '-')}", biller.clock)
            with pytest.raises(grpc.aio.AioRpcError) if label != "right" else contextlib.nullcontext():
                await biller.stub.Enrol(EnrolRequest(request=consumer.enrolment(ACCOUNT, candidate)))
            seen[label] = list(comparisons)
        for label, pairs in seen.items():
            assert len(pairs) == 2, label
            assert all(len(a) == len(b) == hashlib.sha256().digest_size for a, b in pairs), label
            assert all(code.encode() not in a + b for a, b in pairs), label

    monkeypatch.setattr(hmac, "compare_digest", spy)
    run(tmp_path, scenario)


# --- The replay cache: durable across restarts, bounded by expiry (HDR-8, HDR-11, HDR-12, LIM-12) --------


@asynccontextmanager
async def biller_process(
    db_path: Path, key: SigningKey, key_set: envelope_pb2.Envelope, clock: ManualClock
) -> AsyncIterator[tuple[BillerAgent, biller_service_pb2_grpc.BillerServiceAsyncStub]]:
    """One run of a biller process on `db_path`: a new store, agent and server, all shut down on exit."""
    store = await SqliteBillerStore.open(db_path)
    try:
        agent = BillerAgent(
            party_id=BILLER_ID,
            signing_key=key,
            key_sets=[key_set],
            store=store,
            policy=SamplePolicy(),
            rail=PeerRail(),
            clock=clock,
        )
        server, port = await start_biller_server(agent, "127.0.0.1:0", insecure=True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield agent, biller_service_pb2_grpc.BillerServiceStub(channel)
        finally:
            await server.stop(None)
    finally:
        await store.close()


def test_the_replay_cache_survives_a_restart_and_is_purged_only_once_expired(tmp_path: Path) -> None:
    async def main() -> None:
        clock = ManualClock(START)
        key, key_set = new_party(BILLER_ID, clock)
        db_path = tmp_path / "biller.sqlite"
        alice = Consumer("consumer:alice", clock)
        async with biller_process(db_path, key, key_set, clock) as (agent, stub):
            await agent.create_account(ACCOUNT, "Alice")
            code = await agent.issue_enrolment_code(ACCOUNT)
            await stub.Enrol(EnrolRequest(request=alice.enrolment(ACCOUNT, code)))
            await agent.issue_bill(
                ACCOUNT, BILL.amount_due, BILL.due_date, BILL.description, issue_date=BILL.issue_date, bill_id="b1"
            )
            intent = alice.intent(ACCOUNT, "b1", "pay-1", BILL.amount_due)
            paid = await stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
            bill = envelope_pb2.Envelope.FromString((await agent._store.get_bill("b1")).envelope)  # type: ignore[union-attr]
            opening = alice.open(bill, outside_options())
            opened = await stub.Negotiate(NegotiateRequest(move=opening))

        clock.advance(timedelta(minutes=10))  # a fresh answer would now carry other times, so other bytes
        async with biller_process(db_path, key, key_set, clock) as (agent, stub):
            before = dump(db_path)
            again = await stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
            assert again.SerializeToString() == paid.SerializeToString()
            assert (await stub.Negotiate(NegotiateRequest(move=opening))).reply == opened.reply
            assert dump(db_path) == before
            # Another message under a recorded message id is a replay, after the restart too.
            header = payment_pb2.PaymentIntent.FromString(intent.payload).header
            reused = alice.sign(
                payment_pb2.PaymentIntent(
                    header=alice.header(message_id=header.message_id),
                    intent_id="pay-2",
                    account_id=ACCOUNT,
                    bill_id="b1",
                    amount=BILL.amount_due.to_proto(),
                )
            )
            replay = stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=reused))
            assert (await refused(replay)).reason is Reason.REPLAYED_MESSAGE
            assert dump(db_path) == before

            # Bounded: kept until expire_time + skew, dropped after it.
            expire_time = header.expire_time.ToDatetime(tzinfo=UTC)
            forget_at = expire_time + agent.limits.max_clock_skew
            clock.set(forget_at)
            assert (await agent.purge_expired())[0] == 0
            clock.advance(MICROSECOND)
            assert (await agent.purge_expired())[0] == 3  # the Enrol, the intent and the opening
            assert dump(db_path)["replay_cache"] == []
            # The old message comes back: MESSAGE_EXPIRED, never applied a second time.
            before = dump(db_path)
            late = stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
            assert (await refused(late)).reason is Reason.MESSAGE_EXPIRED
            late_opening = stub.Negotiate(NegotiateRequest(move=opening))
            assert (await refused(late_opening)).reason is Reason.MESSAGE_EXPIRED
            assert dump(db_path) == before
            assert len(before["payment_intents"]) == 1

    asyncio.run(main())
