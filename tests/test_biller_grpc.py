"""The biller agent end to end: real gRPC on 127.0.0.1, a real SQLite file, a signed test consumer."""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.biller import CounterOffer, Decision, OfferContext
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyEntry, make_key_set
from agent.protocol.terms import AdvertisedOptions, Money, Terms, TermsKind
from agent.stores.base import BillStatus
from agent.transport.server import start_biller_server
from agent.transport.status import CallError, error_from_rpc
from parley.v1 import (
    account_pb2,
    bill_pb2,
    biller_service_pb2_grpc,
    enrolment_pb2,
    envelope_pb2,
    event_pb2,
    negotiation_pb2,
    payment_pb2,
)
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    EnrolRequest,
    GetBillRequest,
    GetKeySetsRequest,
    GetReceiptRequest,
    GetThreadRequest,
    HelloRequest,
    ListBillsRequest,
    NegotiateRequest,
    PublishKeySetRequest,
    RequestErasureRequest,
    WatchEventsRequest,
)
from tests.fixtures import BILL, eur
from tests.helpers.db import dump
from tests.helpers.peer import (
    BILLER_ID,
    Biller,
    Consumer,
    SamplePolicy,
    biller_payload,
    counter_terms,
    disclosure,
    hardship_terms,
    inside_options,
    outside_options,
    running_biller,
    settlement_terms,
)

ACCOUNT, OTHER = "acct-1001", "acct-2002"
AGREED = negotiation_pb2.NEGOTIATION_OUTCOME_AGREED
OPEN = negotiation_pb2.NEGOTIATION_OUTCOME_OPEN


def run(tmp_path: Path, scenario: Callable[[Biller], Awaitable[None]], **options: object) -> None:
    async def main() -> None:
        async with running_biller(tmp_path, **options) as biller:  # type: ignore[arg-type]
            await scenario(biller)

    asyncio.run(main())


async def refused(call: Awaitable[object]) -> CallError:
    """The Parley error a call fails with; its gRPC code is the one the reason table gives."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    error = error_from_rpc(failure.value)
    assert failure.value.code() is grpc.StatusCode[error.reason.grpc_code]
    return error


async def reason(call: Awaitable[object]) -> Reason:
    return (await refused(call)).reason


async def opened(biller: Biller, consumer: Consumer, bill: envelope_pb2.Envelope) -> list[envelope_pb2.Envelope]:
    """Open a thread outside the options; the biller counters. Returns [opening, counter]."""
    opening = consumer.open(bill, outside_options())
    answer = await biller.stub.Negotiate(NegotiateRequest(move=opening))
    assert answer.outcome == OPEN
    assert answer.reply.payload_type == "parley.v1.Offer"
    return [opening, answer.reply]


# --- Hello, key sets, enrolment -------------------------------------------------------------------


def test_hello_and_the_billers_own_key_set_chain(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        hello = await biller.stub.Hello(HelloRequest(protocol_versions=[1, 7], client_name="test"))
        assert (hello.protocol_version, hello.biller_party_id) == (1, BILLER_ID)
        assert hello.identity_fingerprint == biller.chain.fingerprint
        assert hello.limits.max_open_threads_per_account == 3
        assert "negotiation" in hello.features
        assert await reason(biller.stub.Hello(HelloRequest(protocol_versions=[2]))) is Reason.UNSUPPORTED_VERSION
        key_sets = await biller.stub.GetKeySets(GetKeySetsRequest())
        assert list(key_sets.key_sets) == list(biller.chain.envelopes)
        assert not (await biller.stub.GetKeySets(GetKeySetsRequest(after_version=1))).key_sets
        assert await reason(biller.stub.GetKeySets(GetKeySetsRequest(party_id="consumer:x"))) is Reason.NOT_FOUND

    run(tmp_path, scenario)


def test_enrolment_binds_once_and_answers_a_retry(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        await biller.agent.create_account(ACCOUNT, "Alice")
        code = await biller.agent.issue_enrolment_code(ACCOUNT)
        assert len(code) == 14
        assert code.count("-") == 2
        alice = Consumer("consumer:alice", biller.clock)
        request = alice.enrolment(ACCOUNT, code.lower().replace("-", " "))  # normalized by the biller (ENR-7)
        answer = await biller.stub.Enrol(EnrolRequest(request=request))
        confirmation = biller.verify(answer.confirmation, alice, enrolment_pb2.EnrolmentConfirmation)
        assert confirmation.header.sequence == 1
        assert confirmation.header.previous_digest == digest(request)
        assert list(answer.biller_key_sets) == list(biller.chain.envelopes)
        account = await biller.agent.account(ACCOUNT)
        assert account is not None
        assert account.consumer_party_id == "consumer:alice"
        # HDR-12: the very request again gets the very confirmation; a new request with the code does not.
        assert await biller.stub.Enrol(EnrolRequest(request=request)) == answer
        used = biller.stub.Enrol(EnrolRequest(request=alice.enrolment(ACCOUNT, code)))
        assert await reason(used) is Reason.ENROLMENT_CODE_USED
        # ENR-6: another chain under the same party id.
        impostor = Consumer("consumer:alice", biller.clock)
        await biller.agent.create_account(OTHER, "Bob")
        other_code = await biller.agent.issue_enrolment_code(OTHER)
        taken = biller.stub.Enrol(EnrolRequest(request=impostor.enrolment(OTHER, other_code)))
        assert await reason(taken) is Reason.PARTY_ID_TAKEN
        # The same chain may enrol a second account.
        await biller.stub.Enrol(EnrolRequest(request=alice.enrolment(OTHER, other_code)))

    run(tmp_path, scenario)


def test_wrong_codes_lock_enrolment_and_codes_expire(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        await biller.agent.create_account(ACCOUNT, "Alice")
        code = await biller.agent.issue_enrolment_code(ACCOUNT)
        alice = Consumer("consumer:alice", biller.clock)
        for _ in range(biller.agent.limits.enrolment_max_attempts):
            wrong = biller.stub.Enrol(EnrolRequest(request=alice.enrolment(ACCOUNT, "0000-0000-0000")))
            assert await reason(wrong) is Reason.ENROLMENT_CODE_INVALID
        locked = biller.stub.Enrol(EnrolRequest(request=alice.enrolment(ACCOUNT, code)))
        assert await reason(locked) is Reason.ENROLMENT_LOCKED
        unknown = biller.stub.Enrol(EnrolRequest(request=alice.enrolment("no-such-account", code)))
        assert await reason(unknown) is Reason.ENROLMENT_CODE_INVALID
        # A new code lifts the lock (ENR-5), and expires after its validity (ENR-4).
        fresh = await biller.agent.issue_enrolment_code(ACCOUNT, valid_for=timedelta(days=1))
        biller.clock.advance(timedelta(days=2))
        late = Consumer("consumer:late", biller.clock)
        expired = biller.stub.Enrol(EnrolRequest(request=late.enrolment(ACCOUNT, fresh)))
        assert await reason(expired) is Reason.ENROLMENT_CODE_EXPIRED

    run(tmp_path, scenario)


def test_key_rotation_through_publish_key_set(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        await biller.bill(ACCOUNT)
        new_key = SigningKey.generate()
        chain = alice.chain
        now = biller.clock.now()
        version_2 = make_key_set(
            party_id=alice.party_id,
            version=2,
            keys=[KeyEntry(new_key.public_key, now - timedelta(minutes=1), now + timedelta(days=300))],
            signer=alice.key,
            previous=chain.latest,
            create_time=now - timedelta(minutes=1),
            expire_time=now + timedelta(days=300),
        )
        published = await biller.stub.PublishKeySet(PublishKeySetRequest(key_set=version_2))
        assert published.version == 2
        assert (await biller.stub.PublishKeySet(PublishKeySetRequest(key_set=version_2))).version == 2
        alice.key = new_key  # requests are now signed with the rotated key
        bills = await biller.stub.ListBills(ListBillsRequest(query=alice.query(ACCOUNT)))
        assert len(bills.bills) == 1

    run(tmp_path, scenario)


# --- Bills ----------------------------------------------------------------------------------------


def test_bills_are_listed_and_signed_for_the_consumer(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        second = await biller.agent.issue_bill(
            ACCOUNT, eur("30.00"), BILL.due_date, "Water", options=AdvertisedOptions()
        )
        listed = await biller.stub.ListBills(ListBillsRequest(query=alice.query(ACCOUNT)))
        assert [biller.verify(b, alice, bill_pb2.Bill).message.bill_id for b in listed.bills] == [
            BILL.bill_id,
            second,
        ]
        fetched = await biller.stub.GetBill(GetBillRequest(query=alice.query(ACCOUNT, bill_id=BILL.bill_id)))
        assert fetched.bill == bill
        missing = biller.stub.GetBill(GetBillRequest(query=alice.query(ACCOUNT, bill_id="nope")))
        assert await reason(missing) is Reason.NOT_FOUND
        shapeless = biller.stub.GetBill(GetBillRequest(query=alice.query(ACCOUNT)))  # AUZ-4: bill_id missing
        assert await reason(shapeless) is Reason.MALFORMED_PAYLOAD
        await biller.agent.create_account(OTHER, "Bob")
        with pytest.raises(ValueError, match="no enrolled consumer"):
            await biller.agent.issue_bill(OTHER, eur("1.00"), BILL.due_date, "x")

    run(tmp_path, scenario)


# --- Negotiation outcomes ---------------------------------------------------------------------------


def test_agreed_after_a_counter_offer_and_the_bundle_verifies_offline(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        thread = await opened(biller, alice, bill)
        counter = biller.verify(thread[1], alice, negotiation_pb2.Offer)
        assert counter.message.terms == counter_terms()
        context = biller.policy.contexts[-1]
        assert (context.round, context.max_rounds, context.account_id) == (1, 4, ACCOUNT)
        accept = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
        answer = await biller.stub.Negotiate(NegotiateRequest(move=accept))
        assert answer.outcome == AGREED
        assert not answer.HasField("reply")
        thread.append(accept)
        stored = await biller.stub.GetThread(GetThreadRequest(query=alice.query(ACCOUNT, thread_id=_thread_id(thread))))
        assert list(stored.messages) == thread
        assert stored.outcome == AGREED
        agreement = verify_bundle(
            Bundle({BILLER_ID: biller.chain.envelopes, alice.party_id: [alice.key_set]}, bill, thread),
            pins={BILLER_ID: biller.chain.fingerprint},
        )
        assert agreement.terms == Terms.from_proto(counter_terms())
        (arrangement,) = await biller.agent.arrangements(ACCOUNT)
        assert arrangement.agreement_digest == digest(accept)
        assert len(arrangement.unpaid_instalments()) == 6
        record = await biller.agent._store.get_bill(BILL.bill_id)
        assert record is not None
        assert record.status is BillStatus.UNDER_ARRANGEMENT
        # NEG-3: no new thread on a bill under an arrangement.
        again = biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, outside_options())))
        assert await reason(again) is Reason.BILL_NOT_NEGOTIABLE
        # EVT-7: until the biller offers renegotiation.
        offered = await biller.agent.offer_renegotiation(BILL.bill_id, message="Let's find a new plan")
        event = biller.verify(offered, alice, event_pb2.Event).message
        assert (event.kind, event.thread_id) == (event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, _thread_id(thread))
        assert not await biller.agent.arrangements(ACCOUNT)
        await opened(biller, alice, bill)

    run(tmp_path, scenario)


def test_an_offer_inside_the_options_is_accepted_at_once(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        opening = alice.open(bill, inside_options())
        answer = await biller.stub.Negotiate(NegotiateRequest(move=opening))
        assert answer.outcome == AGREED
        accept = biller.verify(answer.reply, alice, negotiation_pb2.Accept)
        assert accept.message.offer_digest == digest(opening)
        assert not biller.policy.contexts  # NEG-12: the policy was not asked

    run(tmp_path, scenario)


def test_hardship_disclosure_binds_the_programme_and_is_erasable(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        secret = disclosure()
        mismatched = biller.stub.Negotiate(
            NegotiateRequest(move=alice.open(bill, hardship_terms(), disclosure=secret), disclosure=disclosure())
        )
        assert await reason(mismatched) is Reason.MALFORMED_PAYLOAD
        opening = alice.open(bill, hardship_terms(), disclosure=secret)
        answer = await biller.stub.Negotiate(NegotiateRequest(move=opening, disclosure=secret))
        assert answer.outcome == AGREED  # inside the programme only because hardship was disclosed
        assert _rows(biller.db_path, "disclosures") == 1
        erasure = alice.erasure(ACCOUNT)
        confirmed = await biller.stub.RequestErasure(RequestErasureRequest(request=erasure))
        message = biller.verify(confirmed.confirmation, alice, account_pb2.ErasureConfirmation).message
        assert message.erased_count == 1
        assert _rows(biller.db_path, "disclosures") == 0
        assert secret not in biller.db_path.read_bytes()
        assert await biller.stub.RequestErasure(RequestErasureRequest(request=erasure)) == confirmed
        again = await biller.stub.RequestErasure(RequestErasureRequest(request=alice.erasure(ACCOUNT)))
        assert biller.verify(again.confirmation, alice, account_pb2.ErasureConfirmation).message.erased_count == 0
        # The signed thread is intact.
        thread = await biller.stub.GetThread(
            GetThreadRequest(query=alice.query(ACCOUNT, thread_id=_thread_id([opening])))
        )
        assert list(thread.messages) == [opening, answer.reply]

    run(tmp_path, scenario)


def test_retention_forgets_old_replay_records_and_disclosures(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        secret = disclosure()
        opening = alice.open(bill, hardship_terms(), disclosure=secret)
        await biller.stub.Negotiate(NegotiateRequest(move=opening, disclosure=secret))
        assert await biller.agent.purge_expired() == (0, 0)
        biller.clock.advance(timedelta(days=91))
        assert await biller.agent.purge_expired() == (2, 1)  # the Enrol and the opening; the disclosure (PRV-6)
        assert _rows(biller.db_path, "messages") == 2

    run(tmp_path, scenario)


def test_rejected_by_policy_and_withdrawn_by_the_consumer(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        answer = await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, settlement_terms())))
        assert answer.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_REJECTED
        reject = biller.verify(answer.reply, alice, negotiation_pb2.Reject).message
        assert reject.reason == negotiation_pb2.REJECT_REASON_OUT_OF_POLICY
        thread = await opened(biller, alice, bill)
        withdraw = alice.next(thread, negotiation_pb2.Withdraw(note="never mind"))
        answer = await biller.stub.Negotiate(NegotiateRequest(move=withdraw))
        assert (answer.outcome, answer.HasField("reply")) == (negotiation_pb2.NEGOTIATION_OUTCOME_WITHDRAWN, False)
        closed = biller.stub.Negotiate(
            NegotiateRequest(move=alice.next([*thread, withdraw], negotiation_pb2.Withdraw()))
        )
        assert await reason(closed) is Reason.THREAD_CLOSED

    run(tmp_path, scenario)


def test_a_move_after_the_deadline_expires_the_thread(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        thread = await opened(biller, alice, bill)
        biller.clock.advance(timedelta(days=2, seconds=1))
        late = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
        assert await reason(biller.stub.Negotiate(NegotiateRequest(move=late))) is Reason.NEGOTIATION_DEADLINE_PASSED
        query = alice.query(ACCOUNT, thread_id=_thread_id(thread))
        stored = await biller.stub.GetThread(GetThreadRequest(query=query))
        assert (len(stored.messages), stored.outcome) == (2, negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED)
        # An expired thread no longer blocks the bill (NEG-3).
        await opened(biller, alice, bill)

    run(tmp_path, scenario)


def test_a_stale_accept_is_recorded_as_a_protocol_error(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        thread = await opened(biller, alice, bill)
        stale = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[0])))
        assert await reason(biller.stub.Negotiate(NegotiateRequest(move=stale))) is Reason.ACCEPT_DIGEST_MISMATCH
        # NEG-18: the retry gets the same error; the evidence is in the thread.
        assert await reason(biller.stub.Negotiate(NegotiateRequest(move=stale))) is Reason.ACCEPT_DIGEST_MISMATCH
        stored = await biller.stub.GetThread(GetThreadRequest(query=alice.query(ACCOUNT, thread_id=_thread_id(thread))))
        assert list(stored.messages) == [*thread, stale]
        assert stored.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_PROTOCOL_ERROR

    run(tmp_path, scenario)


def test_a_retried_move_gets_the_same_reply_and_the_current_outcome(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        thread = await opened(biller, alice, bill)
        again = await biller.stub.Negotiate(NegotiateRequest(move=thread[0]))
        assert (again.reply, again.outcome) == (thread[1], OPEN)
        accept = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
        await biller.stub.Negotiate(NegotiateRequest(move=accept))
        assert (await biller.stub.Negotiate(NegotiateRequest(move=thread[0]))).outcome == AGREED

    run(tmp_path, scenario)


def test_open_thread_limits(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bills = [await biller.bill(ACCOUNT, f"bill-{n}") for n in range(4)]
        await opened(biller, alice, bills[0])
        second = biller.stub.Negotiate(NegotiateRequest(move=alice.open(bills[0], outside_options())))
        assert await reason(second) is Reason.BILL_NOT_NEGOTIABLE  # NEG-3: one open thread per bill
        await opened(biller, alice, bills[1])
        await opened(biller, alice, bills[2])
        fourth = biller.stub.Negotiate(NegotiateRequest(move=alice.open(bills[3], outside_options())))
        assert await reason(fourth) is Reason.TOO_MANY_OPEN_THREADS  # LIM-7

    run(tmp_path, scenario)


class _BadPolicy(SamplePolicy):
    """Counters with terms for another amount (PRINCIPAL_MISMATCH), or fails outright."""

    def __init__(self, *, crash: bool) -> None:
        super().__init__()
        self.crash = crash

    def decide(self, context: OfferContext) -> Decision:
        if self.crash:
            raise RuntimeError("database password is hunter2")
        wrong = Terms.from_proto(counter_terms())
        return CounterOffer(
            Terms(TermsKind.PAY_IN_FULL, Money.of(1, "EUR"), (), Money.of(1, "EUR"), wrong.schedule[:1])
        )


def test_a_policy_answer_the_protocol_refuses_becomes_a_reject(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        answer = await biller.stub.Negotiate(
            NegotiateRequest(move=alice.open(await biller.bill(ACCOUNT), outside_options()))
        )
        assert answer.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_REJECTED
        assert (
            biller.verify(answer.reply, alice, negotiation_pb2.Reject).message.reason
            == negotiation_pb2.REJECT_REASON_OUT_OF_POLICY
        )

    run(tmp_path, scenario, policy=_BadPolicy(crash=False))


def test_an_unexpected_failure_is_internal_error_and_leaks_nothing(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        before = dump(biller.db_path)
        error = await refused(biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, outside_options()))))
        assert (error.reason, error.code) == (Reason.INTERNAL_ERROR, grpc.StatusCode.INTERNAL)
        assert "hunter2" not in error.detail
        assert dump(biller.db_path) == before

    run(tmp_path, scenario, policy=_BadPolicy(crash=True))


# --- Payments --------------------------------------------------------------------------------------


def test_payment_intents_instructions_settlement_and_receipt(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        thread = await opened(biller, alice, bill)
        accept = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
        await biller.stub.Negotiate(NegotiateRequest(move=accept))
        agreement = digest(accept)
        twenty = eur("20.00")

        def intent(intent_id: str, amount: Money = twenty, index: int = 0) -> CreatePaymentIntentRequest:
            envelope = alice.intent(
                ACCOUNT, BILL.bill_id, intent_id, amount, agreement_digest=agreement, instalment_index=index
            )
            return CreatePaymentIntentRequest(intent=envelope)

        first = intent("pay-1")
        answer = await biller.stub.CreatePaymentIntent(first)
        instructions = biller.verify(answer.instructions, alice, payment_pb2.PaymentInstructions)
        assert instructions.message.amount == twenty.to_proto()
        assert instructions.header.previous_digest == digest(first.intent)
        # PAY-2: the same envelope, or a new message with the same content, gets the same bytes.
        assert (await biller.stub.CreatePaymentIntent(first)).SerializeToString() == answer.SerializeToString()
        assert await biller.stub.CreatePaymentIntent(intent("pay-1")) == answer
        assert (
            await reason(biller.stub.CreatePaymentIntent(intent("pay-1", eur("19.00")))) is Reason.IDEMPOTENCY_CONFLICT
        )
        assert (
            await reason(biller.stub.CreatePaymentIntent(intent("pay-2", eur("19.00"))))
            is Reason.PAYMENT_AMOUNT_MISMATCH
        )
        assert await reason(biller.stub.CreatePaymentIntent(intent("pay-2", index=6))) is Reason.PAYMENT_AMOUNT_MISMATCH
        whole = CreatePaymentIntentRequest(intent=alice.intent(ACCOUNT, BILL.bill_id, "pay-3", BILL.amount_due))
        assert await reason(biller.stub.CreatePaymentIntent(whole)) is Reason.PAYMENT_AMOUNT_MISMATCH
        unknown = CreatePaymentIntentRequest(
            intent=alice.intent(ACCOUNT, BILL.bill_id, "pay-4", twenty, agreement_digest=b"\x01" * 32)
        )
        assert await reason(biller.stub.CreatePaymentIntent(unknown)) is Reason.NOT_FOUND
        bad_id = CreatePaymentIntentRequest(intent=alice.intent(ACCOUNT, BILL.bill_id, "pay 5!", twenty))
        assert await reason(biller.stub.CreatePaymentIntent(bad_id)) is Reason.MALFORMED_PAYLOAD

        receipt_query = GetReceiptRequest(query=alice.query(ACCOUNT, intent_id="pay-1"))
        assert await reason(biller.stub.GetReceipt(receipt_query)) is Reason.PAYMENT_NOT_SETTLED
        receipt = await biller.agent.record_settlement(ACCOUNT, "pay-1", twenty, "RAIL-1")
        assert await biller.agent.record_settlement(ACCOUNT, "pay-1", twenty, "RAIL-1") == receipt
        with pytest.raises(ValueError, match="another rail reference"):
            await biller.agent.record_settlement(ACCOUNT, "pay-1", twenty, "RAIL-2")
        fetched = await biller.stub.GetReceipt(GetReceiptRequest(query=alice.query(ACCOUNT, intent_id="pay-1")))
        assert fetched.receipt == receipt
        message = biller.verify(receipt, alice, payment_pb2.Receipt)
        assert message.header.previous_digest == digest(answer.instructions)
        assert message.message.remaining_balance == eur("100.00").to_proto()
        # The instalment is paid: a second intent for it owes nothing (PAY-3).
        assert await reason(biller.stub.CreatePaymentIntent(intent("pay-6"))) is Reason.PAYMENT_AMOUNT_MISMATCH
        (arrangement,) = await biller.agent.arrangements(ACCOUNT)
        assert arrangement.paid_instalments == {0}
        # An intent instructed but not settled is no payment of the arrangement; once settled, it is, in order.
        await biller.stub.CreatePaymentIntent(intent("pay-7", index=1))
        (arrangement,) = await biller.agent.arrangements(ACCOUNT)
        assert [payment.intent_id for payment in arrangement.payments] == ["pay-1"]
        await biller.agent.record_settlement(ACCOUNT, "pay-7", twenty, "RAIL-7")
        (arrangement,) = await biller.agent.arrangements(ACCOUNT)
        assert [(p.intent_id, p.instalment_index) for p in arrangement.payments] == [("pay-1", 0), ("pay-7", 1)]
        assert arrangement.paid_instalments == {0, 1}
        assert await biller.agent._store.get_arrangement(ACCOUNT, arrangement.agreement_digest) is not None
        missing = GetReceiptRequest(query=alice.query(ACCOUNT, intent_id="nope"))
        assert await reason(biller.stub.GetReceipt(missing)) is Reason.NOT_FOUND

    run(tmp_path, scenario)


def test_paying_a_bill_as_presented_marks_it_paid(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        await biller.bill(ACCOUNT)
        request = CreatePaymentIntentRequest(intent=alice.intent(ACCOUNT, BILL.bill_id, "full", BILL.amount_due))
        await biller.stub.CreatePaymentIntent(request)
        receipt = await biller.agent.record_settlement(ACCOUNT, "full", BILL.amount_due, "RAIL-9")
        assert biller.verify(receipt, alice, payment_pb2.Receipt).message.remaining_balance.amount_minor == 0
        bill = await biller.agent._store.get_bill(BILL.bill_id)
        assert bill is not None
        assert bill.status is BillStatus.PAID

    run(tmp_path, scenario)


# --- Events ----------------------------------------------------------------------------------------


def test_watch_events_resumes_from_a_cursor_without_loss_or_duplicates(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        for n in range(3):
            await biller.bill(ACCOUNT, f"bill-{n}")

        async def take(
            start: int, count: int, during: Callable[[], Awaitable[object]] | None = None
        ) -> list[envelope_pb2.Envelope]:
            call = biller.stub.WatchEvents(WatchEventsRequest(query=alice.query(ACCOUNT, start_sequence=start)))
            events: list[envelope_pb2.Envelope] = []
            async for response in call:
                events.append(response.event)
                if len(events) == 1 and during is not None:
                    await during()
                if len(events) == count:
                    call.cancel()
                    break
            return events

        first = await take(0, 2)
        emit = lambda: biller.agent.emit_event(  # noqa: E731
            ACCOUNT, event_pb2.EVENT_KIND_REMINDER, bill_id="bill-0", reminder_level=1, message="due soon"
        )
        rest = await asyncio.wait_for(take(2, 2, during=emit), timeout=10)
        log = first + rest
        events = [biller.verify(e, alice, event_pb2.Event) for e in log]
        assert [e.header.sequence for e in events] == [0, 1, 2, 3]
        assert [e.message.kind for e in events] == [event_pb2.EVENT_KIND_BILL_ISSUED] * 3 + [
            event_pb2.EVENT_KIND_REMINDER
        ]
        assert all(e.header.previous_digest == digest(p) for e, p in zip(events[1:], log, strict=False))
        # §5.2's example: the event log id of acct-1001 at biller:energy.example.
        assert {e.header.thread_id.hex() for e in events} == {"b1581a45e5c5568ee0801da2b38765c1"}
        beyond = biller.stub.WatchEvents(WatchEventsRequest(query=alice.query(ACCOUNT, start_sequence=5)))
        assert await reason(_first(beyond)) is Reason.CURSOR_OUT_OF_RANGE

    run(tmp_path, scenario)


# --- Bad input changes nothing ---------------------------------------------------------------------


def test_bad_requests_are_refused_with_their_reason_and_change_nothing(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bob = await biller.enrolled(OTHER, "consumer:bob")
        bill = await biller.bill(ACCOUNT)
        thread = await opened(biller, alice, bill)
        stranger = Consumer("consumer:stranger", biller.clock)

        forged = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))
        forged.signatures[0].sig = bytes(64)
        replayed_id = biller_payload(thread[0]).header.message_id  # type: ignore[attr-defined]
        replayed = alice.next(thread, negotiation_pb2.Withdraw(), message_id=replayed_id)
        out_of_sequence = alice.next(thread, negotiation_pb2.Offer(terms=counter_terms()), sequence=5)
        expired = alice.next(thread, negotiation_pb2.Withdraw(), created=biller.clock.now() - timedelta(hours=2))
        invalid_terms = counter_terms()
        invalid_terms.total.amount_minor += 1
        bad_terms = alice.next(thread, negotiation_pb2.Offer(terms=invalid_terms))
        two_signatures = envelope_pb2.Envelope()
        two_signatures.CopyFrom(thread[0])
        two_signatures.signatures.append(thread[0].signatures[0])
        wrong_type = alice.sign(account_pb2.ErasureRequest(header=alice.header(), account_id=ACCOUNT))
        twenty = eur("20.00")

        cases: list[tuple[Reason, Awaitable[object]]] = [
            (Reason.BAD_SIGNATURE, biller.stub.Negotiate(NegotiateRequest(move=forged))),
            (Reason.REPLAYED_MESSAGE, biller.stub.Negotiate(NegotiateRequest(move=replayed))),
            (Reason.SEQUENCE_MISMATCH, biller.stub.Negotiate(NegotiateRequest(move=out_of_sequence))),
            (Reason.MESSAGE_EXPIRED, biller.stub.Negotiate(NegotiateRequest(move=expired))),
            (Reason.TOTAL_MISMATCH, biller.stub.Negotiate(NegotiateRequest(move=bad_terms))),
            (Reason.MALFORMED_ENVELOPE, biller.stub.Negotiate(NegotiateRequest(move=two_signatures))),
            (Reason.MALFORMED_ENVELOPE, biller.stub.Negotiate(NegotiateRequest())),
            (Reason.WRONG_PAYLOAD_TYPE, biller.stub.Negotiate(NegotiateRequest(move=wrong_type))),
            (Reason.NOT_ENROLLED, biller.stub.ListBills(ListBillsRequest(query=stranger.query(ACCOUNT)))),
            # AUZ-1 for requests naming an account; AUZ-3 for moves, which name a bill or thread.
            (Reason.ACCOUNT_ACCESS_DENIED, biller.stub.ListBills(ListBillsRequest(query=bob.query(ACCOUNT)))),
            (Reason.ACCOUNT_ACCESS_DENIED, biller.stub.ListBills(ListBillsRequest(query=bob.query("no-such")))),
            (
                Reason.ACCOUNT_ACCESS_DENIED,
                biller.stub.GetBill(GetBillRequest(query=bob.query(ACCOUNT, bill_id=BILL.bill_id))),
            ),
            (
                Reason.ACCOUNT_ACCESS_DENIED,
                biller.stub.CreatePaymentIntent(
                    CreatePaymentIntentRequest(intent=bob.intent(ACCOUNT, BILL.bill_id, "steal", twenty))
                ),
            ),
            (
                Reason.ACCOUNT_ACCESS_DENIED,
                _first(biller.stub.WatchEvents(WatchEventsRequest(query=bob.query(ACCOUNT)))),
            ),
            (
                Reason.ACCOUNT_ACCESS_DENIED,
                biller.stub.RequestErasure(RequestErasureRequest(request=bob.erasure(ACCOUNT))),
            ),
            (Reason.NOT_FOUND, biller.stub.Negotiate(NegotiateRequest(move=bob.open(bill, outside_options())))),
            (
                Reason.NOT_FOUND,
                biller.stub.Negotiate(NegotiateRequest(move=bob.next(thread, negotiation_pb2.Withdraw()))),
            ),
        ]
        for expected, call in cases:
            before = dump(biller.db_path)
            assert await reason(call) is expected
            assert dump(biller.db_path) == before, expected

    run(tmp_path, scenario)


def test_plaintext_only_on_loopback_and_only_when_asked(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        with pytest.raises(ValueError, match="TLS is required"):
            await start_biller_server(biller.agent, "127.0.0.1:0")
        with pytest.raises(ValueError, match="loopback"):
            await start_biller_server(biller.agent, "0.0.0.0:0", insecure=True)

    run(tmp_path, scenario)


# --- helpers ----------------------------------------------------------------------------------------


def _thread_id(thread: list[envelope_pb2.Envelope]) -> bytes:
    return biller_payload(thread[0]).header.thread_id  # type: ignore[attr-defined, no-any-return]


async def _first(call: object) -> object:
    async for response in call:  # type: ignore[attr-defined]
        return response
    return None


def _rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def _self_signed() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and its key, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "parley test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_listener_and_transport_failures_without_error_info(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        certificate, key = _self_signed()
        server, port = await start_biller_server(biller.agent, "127.0.0.1:0", tls=(certificate, key))
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                hello = await stub.Hello(HelloRequest(protocol_versions=[1]), timeout=10)
                assert hello.biller_party_id == BILLER_ID
        finally:
            await server.stop(None)
        # A failure from gRPC itself carries no ErrorInfo: INTERNAL_ERROR by reason, the real code kept (ERR-4).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = biller_service_pb2_grpc.BillerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.Hello(HelloRequest(protocol_versions=[1]), timeout=2)
        error = error_from_rpc(failure.value)
        assert (error.reason, error.wire_reason) == (Reason.INTERNAL_ERROR, "")
        assert error.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

    run(tmp_path, scenario)
