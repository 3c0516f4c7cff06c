"""Re-enrolment (ENR-11, ENR-12): an account re-bound to a new consumer party, end to end over real gRPC.

Each binding (account, party) has its own event log from sequence 0; the account's unpaid bills are
presented again to the new party (a new `Bill` signed to it, same bill id and terms) with a
`BILL_ISSUED` event in its log; the earlier holder's history (its events, threads, disclosures) is not
shown to the new one, and the earlier holder is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from agent.consumer import ConsumerAgent
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.protocol.events import events_thread_id
from agent.protocol.messages import Verified
from agent.stores.consumer_sqlite import SqliteConsumerStore
from agent.transport.client import RetryPolicy
from agent.transport.status import CallError, error_from_rpc
from parley.v1 import bill_pb2, envelope_pb2, event_pb2, negotiation_pb2, payment_pb2
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    EnrolRequest,
    GetBillRequest,
    GetReceiptRequest,
    GetThreadRequest,
    ListBillsRequest,
    NegotiateRequest,
    WatchEventsRequest,
)
from tests.fixtures import BILL
from tests.helpers.peer import (
    BILLER_ID,
    Biller,
    Consumer,
    disclosure,
    hardship_terms,
    inside_options,
    new_party,
    running_biller,
)
from tests.test_consumer_agent import WIDE, ScriptedStrategy

ACCOUNT = "acct-1001"
FAST = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.05, call_timeout=5)
SECOND_BILL = "bill-2026-04"
BILL_ISSUED = event_pb2.EVENT_KIND_BILL_ISSUED
PAYMENT_RECEIVED = event_pb2.EVENT_KIND_PAYMENT_RECEIVED


def run(tmp_path: Path, scenario: Callable[[Biller], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_biller(tmp_path) as biller:
            await scenario(biller)

    asyncio.run(main())


async def refused(call: Awaitable[object]) -> Reason:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return error_from_rpc(failure.value).reason


async def events(biller: Biller, consumer: Consumer, count: int, start: int = 0) -> list[Verified[event_pb2.Event]]:
    """The first `count` events of the consumer's log from `start`, each verified as EVT-5 asks."""
    call = biller.stub.WatchEvents(WatchEventsRequest(query=consumer.query(ACCOUNT, start_sequence=start)))
    taken: list[Verified[event_pb2.Event]] = []
    async with asyncio.timeout(5):
        async for response in call:
            taken.append(biller.verify(response.event, consumer, event_pb2.Event))
            if len(taken) == count:
                call.cancel()
                break
    previous = b""
    for sequence, event in enumerate(taken, start=start):
        assert event.message.header.thread_id == events_thread_id(BILLER_ID, ACCOUNT)  # HDR-15
        assert event.message.header.sequence == sequence
        if sequence == start and start == 0:
            assert event.message.header.previous_digest == b""
        elif sequence > start:
            assert event.message.header.previous_digest == previous
        previous = event.digest
    return taken


async def log_length(biller: Biller, consumer: Consumer) -> int:
    """How many events the consumer's log holds: the highest valid start_sequence (EVT-3)."""
    length = 0
    while True:
        call = biller.stub.WatchEvents(WatchEventsRequest(query=consumer.query(ACCOUNT, start_sequence=length + 1)))
        try:
            async with asyncio.timeout(0.5):
                async for _ in call:
                    break
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as error:
            reason = error_from_rpc(error).reason
            if reason is not Reason.CURSOR_OUT_OF_RANGE:
                raise
            return length
        finally:
            call.cancel()
        length += 1


async def rebind(biller: Biller, party_id: str, consumer: Consumer | None = None) -> Consumer:
    """A new code for the account and `party_id` (or `consumer`) enrolled with it."""
    consumer = consumer or Consumer(party_id, biller.clock)
    code = await biller.agent.issue_enrolment_code(ACCOUNT)
    await biller.stub.Enrol(EnrolRequest(request=consumer.enrolment(ACCOUNT, code)))
    return consumer


async def issue(biller: Biller, bill_id: str) -> None:
    await biller.agent.issue_bill(
        ACCOUNT, BILL.amount_due, BILL.due_date, BILL.description, issue_date=BILL.issue_date, bill_id=bill_id
    )


# --- The wire: what the new holder and the old one get -------------------------------------------------


def test_the_new_holder_lists_its_bills_signed_to_it_and_follows_its_own_log_from_zero(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        alice_bill = await biller.bill(ACCOUNT)
        assert [e.message.kind for e in await events(biller, alice, 1)] == [BILL_ISSUED]
        bob = await rebind(biller, "consumer:bob")

        # ListBills and GetBill: the same bill (id, terms), signed to bob (BIL-1, BIL-7), verified as BIL-3 asks.
        (listed,) = (await biller.stub.ListBills(ListBillsRequest(query=bob.query(ACCOUNT)))).bills
        bill = biller.verify(listed, bob, bill_pb2.Bill)
        assert bill.message.header.recipient == "consumer:bob"
        assert bill.message.header.sequence == 0
        assert bill.message.header.previous_digest == b""
        alice_payload = bill_pb2.Bill.FromString(alice_bill.payload)
        bill.message.ClearField("header")
        alice_payload.ClearField("header")
        assert bill.message == alice_payload  # same bill id, account, amounts, dates, options
        got = await biller.stub.GetBill(GetBillRequest(query=bob.query(ACCOUNT, bill_id=BILL.bill_id)))
        assert got.bill == listed  # BIL-1: one presentation, served byte for byte
        again = await biller.stub.ListBills(ListBillsRequest(query=bob.query(ACCOUNT)))
        assert list(again.bills) == [listed]

        # bob's own log from 0 (ENR-12, EVT-11): BILL_ISSUED naming his presentation, then what follows.
        await issue(biller, SECOND_BILL)
        (first, second) = await events(biller, bob, 2)
        assert (first.message.kind, first.message.bill_id) == (BILL_ISSUED, BILL.bill_id)
        assert first.message.related_digest == digest(listed)
        assert first.message.header.recipient == "consumer:bob"
        assert (second.message.kind, second.message.bill_id) == (BILL_ISSUED, SECOND_BILL)
        assert await log_length(biller, bob) == 2

        # The old holder is refused everywhere (ENR-11, AUZ-1).
        assert await refused(biller.stub.ListBills(ListBillsRequest(query=alice.query(ACCOUNT)))) is (
            Reason.ACCOUNT_ACCESS_DENIED
        )
        watch = biller.stub.WatchEvents(WatchEventsRequest(query=alice.query(ACCOUNT)))
        assert await refused(watch.read()) is Reason.ACCOUNT_ACCESS_DENIED

    run(tmp_path, scenario)


def test_the_old_holders_threads_disclosures_and_events_are_not_shown_to_the_new_one(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        await issue(biller, SECOND_BILL)
        secret = disclosure()
        opening = alice.open(bill, hardship_terms(), disclosure=secret)
        answer = await biller.stub.Negotiate(NegotiateRequest(move=opening, disclosure=secret))
        assert answer.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_AGREED
        alice_log = await events(biller, alice, 3)  # two bills, then alice's arrangement
        assert alice_log[2].message.kind == event_pb2.EVENT_KIND_ARRANGEMENT_ACTIVE
        thread_id = alice_log[2].message.thread_id

        bob = await rebind(biller, "consumer:bob")
        # Both bills are unpaid: both are presented to bob; his log holds only their BILL_ISSUED.
        listed = (await biller.stub.ListBills(ListBillsRequest(query=bob.query(ACCOUNT)))).bills
        assert [biller.verify(b, bob, bill_pb2.Bill).message.bill_id for b in listed] == [BILL.bill_id, SECOND_BILL]
        bob_log = await events(biller, bob, 2)
        assert [(e.message.kind, e.message.bill_id) for e in bob_log] == [
            (BILL_ISSUED, BILL.bill_id),
            (BILL_ISSUED, SECOND_BILL),
        ]
        assert [e.message.related_digest for e in bob_log] == [digest(b) for b in listed]
        assert await log_length(biller, bob) == 2
        # alice's thread (and the disclosure it committed to) is not bob's: the very error of a thread that
        # does not exist (AUZ-5).
        assert (
            await refused(biller.stub.GetThread(GetThreadRequest(query=bob.query(ACCOUNT, thread_id=thread_id))))
            is Reason.NOT_FOUND
        )
        # bob negotiates on the bill presented to him, naming his presentation's digest (NEG-2).
        opened = await biller.stub.Negotiate(NegotiateRequest(move=bob.open(listed[1], inside_options())))
        assert opened.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_AGREED

    run(tmp_path, scenario)


def test_a_holder_bound_again_resumes_its_own_log_and_gets_the_bills_issued_meanwhile(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        first_bill = await biller.bill(ACCOUNT)
        (alice_first,) = await events(biller, alice, 1)
        bob = await rebind(biller, "consumer:bob")
        await issue(biller, SECOND_BILL)
        assert await log_length(biller, bob) == 2
        await rebind(biller, "consumer:alice", alice)
        # alice's log goes on where it was (no fork: sequence 0 is the event she verified), and the bill
        # issued while bob held the account is presented to her; the bill she had keeps its bytes.
        log = await events(biller, alice, 2)
        assert log[0].envelope == alice_first.envelope
        assert (log[1].message.kind, log[1].message.bill_id) == (BILL_ISSUED, SECOND_BILL)
        listed = (await biller.stub.ListBills(ListBillsRequest(query=alice.query(ACCOUNT)))).bills
        assert listed[0] == first_bill
        assert biller.verify(listed[1], alice, bill_pb2.Bill).message.bill_id == SECOND_BILL
        assert log[1].message.related_digest == digest(listed[1])
        assert await refused(biller.stub.ListBills(ListBillsRequest(query=bob.query(ACCOUNT)))) is (
            Reason.ACCOUNT_ACCESS_DENIED
        )

    run(tmp_path, scenario)


def test_a_payment_in_flight_across_a_re_enrolment_is_receipted_to_its_payer_in_its_payers_log(
    tmp_path: Path,
) -> None:
    """A payment is its payer's thread (intent, instructions, receipt): settled after the account was re-bound,
    its receipt is still addressed to the payer and thanked in the payer's log (ENR-12), and the new holder
    cannot read it (AUZ-5); the new holder's own payment is receipted to it, in its log."""

    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        await biller.bill(ACCOUNT)
        await issue(biller, SECOND_BILL)
        amount = BILL.amount_due
        await biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(intent=alice.intent(ACCOUNT, BILL.bill_id, "alice-pay", amount))
        )
        bob = await rebind(biller, "consumer:bob")
        receipt = await biller.agent.record_settlement(ACCOUNT, "alice-pay", amount, "BANK-ALICE")
        assert biller.verify(receipt, alice, payment_pb2.Receipt).message.header.recipient == "consumer:alice"
        # alice's log (which she can no longer watch, AUZ-1): two bills, then the thanks for her payment.
        alice_log = await biller.agent._store.events(ACCOUNT, 0, 10, "consumer:alice")
        thanks = biller.verify(envelope_pb2.Envelope.FromString(alice_log[-1].envelope), alice, event_pb2.Event)
        assert [r.sequence for r in alice_log] == [0, 1, 2]
        assert (thanks.message.kind, thanks.message.related_digest) == (PAYMENT_RECEIVED, digest(receipt))
        assert await log_length(biller, bob) == 2  # the two bills presented to bob, nothing of alice's payment
        assert (
            await refused(biller.stub.GetReceipt(GetReceiptRequest(query=bob.query(ACCOUNT, intent_id="alice-pay"))))
            is Reason.NOT_FOUND
        )

        await biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(intent=bob.intent(ACCOUNT, SECOND_BILL, "bob-pay", amount))
        )
        own = await biller.agent.record_settlement(ACCOUNT, "bob-pay", amount, "BANK-BOB")
        got = await biller.stub.GetReceipt(GetReceiptRequest(query=bob.query(ACCOUNT, intent_id="bob-pay")))
        assert got.receipt == own
        assert biller.verify(own, bob, payment_pb2.Receipt).message.header.recipient == "consumer:bob"
        bob_log = await events(biller, bob, 3)
        assert (bob_log[2].message.kind, bob_log[2].message.related_digest) == (PAYMENT_RECEIVED, digest(own))

    run(tmp_path, scenario)


# --- The consumer agent: a spec-following client on a re-bound account ------------------------------------


@asynccontextmanager
async def consumer_agent(biller: Biller, tmp_path: Path, party_id: str) -> AsyncIterator[ConsumerAgent]:
    key, key_set = new_party(party_id, biller.clock)
    store = await SqliteConsumerStore.open(tmp_path / f"{party_id.replace(':', '-')}.sqlite")
    agent = ConsumerAgent(
        party_id=party_id,
        signing_key=key,
        key_sets=[key_set],
        store=store,
        strategy=ScriptedStrategy(),
        mandate=WIDE,
        clock=biller.clock,
        retry=FAST,
    )
    try:
        yield agent
    finally:
        await agent.close()
        await store.close()


async def enrol_agent(biller: Biller, agent: ConsumerAgent) -> None:
    code = await biller.agent.issue_enrolment_code(ACCOUNT)
    await agent.enrol(
        biller.target,
        biller_party_id=BILLER_ID,
        fingerprint=biller.chain.fingerprint,
        account_id=ACCOUNT,
        code=code,
        insecure=True,
    )


def test_a_consumer_agent_enrolling_on_a_rebound_account_lists_verifies_and_watches_from_zero(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        await biller.agent.create_account(ACCOUNT, "Alice Example")
        async with (
            consumer_agent(biller, tmp_path, "consumer:alice") as alice,
            consumer_agent(biller, tmp_path, "consumer:bob") as bob,
        ):
            await enrol_agent(biller, alice)
            await biller.bill(ACCOUNT)
            assert [b.facts.bill_id for b in await alice.bills(BILLER_ID)] == [BILL.bill_id]
            async with contextlib.aclosing(alice.watch(BILLER_ID)) as alice_events:
                first = await asyncio.wait_for(anext(alice_events), 5)
                assert (first.sequence, first.kind) == (0, BILL_ISSUED)

            await enrol_agent(biller, bob)
            (bill,) = await bob.bills(BILLER_ID)  # verified: signed by the pinned biller, addressed to bob
            assert bill.facts == BILL
            async with contextlib.aclosing(bob.watch(BILLER_ID)) as bob_events:
                event = await asyncio.wait_for(anext(bob_events), 5)
                assert (event.sequence, event.kind, event.bill_id) == (0, BILL_ISSUED, BILL.bill_id)
                assert event.related_digest == bill.digest
                await issue(biller, SECOND_BILL)
                event = await asyncio.wait_for(anext(bob_events), 5)
                assert (event.sequence, event.kind, event.bill_id) == (1, BILL_ISSUED, SECOND_BILL)
            assert sorted(b.facts.bill_id for b in await bob.bills(BILLER_ID)) == [BILL.bill_id, SECOND_BILL]

            with pytest.raises(CallError) as failure:
                await alice.bills(BILLER_ID)
            assert failure.value.reason is Reason.ACCOUNT_ACCESS_DENIED

    run(tmp_path, scenario)


def test_a_consumer_agent_bound_again_resumes_its_own_log_from_its_cursor(tmp_path: Path) -> None:
    """A holder's agent that followed its log, lost the account to another party and enrolled on it again,
    goes on from its stored cursor: its log continues without a fork (EVT-5), with the bill issued meanwhile."""

    async def scenario(biller: Biller) -> None:
        await biller.agent.create_account(ACCOUNT, "Alice Example")
        async with (
            consumer_agent(biller, tmp_path, "consumer:alice") as alice,
            consumer_agent(biller, tmp_path, "consumer:bob") as bob,
        ):
            await enrol_agent(biller, alice)
            await biller.bill(ACCOUNT)
            async with contextlib.aclosing(alice.watch(BILLER_ID)) as alice_events:
                first = await asyncio.wait_for(anext(alice_events), 5)
                assert (first.sequence, first.kind, first.bill_id) == (0, BILL_ISSUED, BILL.bill_id)

            await enrol_agent(biller, bob)
            await issue(biller, SECOND_BILL)  # presented to bob, in bob's log
            assert sorted(b.facts.bill_id for b in await bob.bills(BILLER_ID)) == [BILL.bill_id, SECOND_BILL]

            await enrol_agent(biller, alice)  # bound again: the second bill is presented to her, in her log
            async with contextlib.aclosing(alice.watch(BILLER_ID)) as alice_events:
                event = await asyncio.wait_for(anext(alice_events), 5)
            assert (event.sequence, event.kind, event.bill_id) == (1, BILL_ISSUED, SECOND_BILL)
            listed = {b.facts.bill_id: b for b in await alice.bills(BILLER_ID)}
            assert sorted(listed) == [BILL.bill_id, SECOND_BILL]
            assert event.related_digest == listed[SECOND_BILL].digest
            with pytest.raises(CallError) as failure:
                await bob.bills(BILLER_ID)
            assert failure.value.reason is Reason.ACCOUNT_ACCESS_DENIED

    run(tmp_path, scenario)
