"""The runnable reference biller: simulated rail, scheduler, service, conformance control, CLI and TLS.

Real gRPC on 127.0.0.1 (free ports), real SQLite files under tmp_path, a
ManualClock moved through months of due dates; every server is shut down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from agent.cli import main as parley_main
from agent.clock import ManualClock
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.messages import open_envelope
from agent.protocol.terms import Money, TermsKind, build_terms, monthly_dates
from agent.tools.certs import issue_server_cert, make_dev_ca
from agent.transport.status import error_from_rpc
from parley.v1 import (
    bill_pb2,
    biller_service_pb2_grpc,
    envelope_pb2,
    event_pb2,
    payment_pb2,
)
from parley.v1 import conformance_control_service_pb2 as cc
from parley.v1 import conformance_control_service_pb2_grpc as cc_grpc
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    EnrolRequest,
    GetBillRequest,
    GetKeySetsRequest,
    GetReceiptRequest,
    HelloRequest,
    ListBillsRequest,
    NegotiateRequest,
)
from reference_biller import scheduler
from reference_biller.config import SAMPLE, load_config
from reference_biller.rail import SimulatedRail, TransferStatus
from reference_biller.service import (
    CONFORMANCE_FEATURE,
    RunningBiller,
    identity_dir,
    serving_biller,
)
from tests.helpers.peer import BILLER_ID, Consumer, inside_options
from tests.helpers.process import lines_of

CONFIG = load_config()
START = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
DUE = date(2026, 3, 31)
K = event_pb2.EventKind


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


def at(day: date) -> datetime:
    """9 o'clock UTC on `day`, when the tests look at the biller."""
    return datetime(day.year, day.month, day.day, 9, tzinfo=UTC)


@dataclass
class Harness:
    """A reference biller served with conformance control, and stubs to reach it."""

    running: RunningBiller
    clock: ManualClock
    stub: biller_service_pb2_grpc.BillerServiceAsyncStub
    control: cc_grpc.ConformanceControlServiceAsyncStub

    @property
    def rail(self) -> SimulatedRail:
        return self.running.biller.rail

    async def advance_to(self, moment: datetime) -> None:
        """AdvanceClock over gRPC, which also runs the biller's upkeep at the new time."""
        seconds = int((moment - self.clock.now()).total_seconds())
        answer = await self.control.AdvanceClock(cc.AdvanceClockRequest(seconds=seconds))
        assert answer.now.ToDatetime(tzinfo=UTC) == moment

    async def enrolled(self, party_id: str) -> tuple[str, Consumer]:
        created = await self.control.CreateTestAccount(cc.CreateTestAccountRequest(holder_name="Test Holder"))
        consumer = Consumer(party_id, self.clock)
        request = consumer.enrolment(created.account_id, created.enrolment_code)
        await self.stub.Enrol(EnrolRequest(request=request))
        return created.account_id, consumer

    async def bill(self, account_id: str, consumer: Consumer, amount: str = "120.00") -> envelope_pb2.Envelope:
        issued = await self.control.IssueTestBill(
            cc.IssueTestBillRequest(account_id=account_id, amount_due=eur(amount).to_proto(), due_date=DUE.isoformat())
        )
        answer = await self.stub.GetBill(GetBillRequest(query=consumer.query(account_id, bill_id=issued.bill_id)))
        bill: envelope_pb2.Envelope = answer.bill
        return bill

    async def events(self, account_id: str, consumer: Consumer) -> list[event_pb2.Event]:
        """The account's whole log, each event verified as the consumer would (EVT-5)."""
        records = await self.running.biller.store.events(account_id, 0, 1000)
        assert [r.sequence for r in records] == list(range(len(records)))
        return [
            open_envelope(
                envelope_pb2.Envelope.FromString(r.envelope),
                (event_pb2.Event,),
                sender_keys=self.running.biller.agent.key_chain,
                recipient=consumer.party_id,
                now=None,
            ).message
            for r in records
        ]

    async def pay_intent(
        self, account_id: str, consumer: Consumer, bill_id: str, intent_id: str, amount: Money, **fields: object
    ) -> payment_pb2.PaymentInstructions:
        intent = consumer.intent(account_id, bill_id, intent_id, amount, **fields)  # type: ignore[arg-type]
        answer = await self.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
        return payment_pb2.PaymentInstructions.FromString(answer.instructions.payload)


@asynccontextmanager
async def harness(tmp_path: Path, clock: ManualClock | None = None) -> AsyncIterator[Harness]:
    clock = clock or ManualClock(START)
    async with (
        serving_biller(
            CONFIG,
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            clock=clock,
            insecure=True,
            conformance_control=True,
            interval=timedelta(hours=1),  # upkeep runs at start, then when the tests advance the clock
        ) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = biller_service_pb2_grpc.BillerServiceStub(channel)
        yield Harness(running, clock, stub, cc_grpc.ConformanceControlServiceStub(channel))


def run(tmp_path: Path, scenario: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        async with harness(tmp_path) as h:
            await scenario(h)

    asyncio.run(main())


def kinds(events: list[event_pb2.Event]) -> list[str]:
    return [
        K.Name(e.kind).removeprefix("EVENT_KIND_") + (f"{e.reminder_level}" if e.reminder_level else "") for e in events
    ]


# --- The simulated rail ----------------------------------------------------------------------------


def test_instructions_give_each_intent_its_own_stable_reference() -> None:
    rail = SimulatedRail(CONFIG.payments)
    amount = eur("10.00")
    references = {
        rail.instructions(account, f"intent-{n}", amount).payment_reference
        for account in ("acct-1001", "acct-1002")
        for n in range(200)
    }
    assert len(references) == 400
    details = rail.instructions("acct-1001", "intent-7", amount)
    assert details == rail.instructions("acct-1001", "intent-7", amount)  # a retried intent: same reference
    assert (details.rail, details.payee_name, details.payee_account) == (
        "simulated",
        "Example Energy Ltd",
        "DE89370400440532013000",
    )
    prefix, _, n = details.payment_reference.rpartition("-")
    assert prefix == "EE-acct-1001"
    assert n.isdigit()
    # Derived from the intent, so a restarted rail gives the same references (no counter to lose).
    assert SimulatedRail(CONFIG.payments).instructions("acct-1001", "intent-7", amount) == details


def test_rail_settles_after_the_delay_exactly_once_and_holds_a_wrong_amount(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        alice_account, alice = await h.enrolled("consumer:alice")
        bob_account, bob = await h.enrolled("consumer:bob")
        alice_bill = biller_bill_id(await h.bill(alice_account, alice))
        bob_bill = biller_bill_id(await h.bill(bob_account, bob, "80.00"))
        to_alice = await h.pay_intent(alice_account, alice, alice_bill, "pay-1", eur("120.00"))
        to_bob = await h.pay_intent(bob_account, bob, bob_bill, "pay-1", eur("80.00"))
        assert to_alice.payment_reference != to_bob.payment_reference
        agent, rail = h.running.biller.agent, h.rail

        rail.pay(to_alice.payment_reference, eur("120.00"), h.clock.now())
        wrong = rail.pay(to_bob.payment_reference, eur("79.00"), h.clock.now())
        assert wrong.status is TransferStatus.MISMATCH
        h.clock.advance(timedelta(hours=23))
        assert await rail.settle_due(agent, h.clock.now()) == []
        receipt_query = alice.query(alice_account, intent_id="pay-1")
        failure = await refused(h.stub.GetReceipt(GetReceiptRequest(query=receipt_query)))
        assert failure is Reason.PAYMENT_NOT_SETTLED

        h.clock.advance(timedelta(hours=1))
        first, second = await asyncio.gather(
            rail.settle_due(agent, h.clock.now()), rail.settle_due(agent, h.clock.now())
        )
        assert len(first) + len(second) == 1
        assert await rail.settle_due(agent, h.clock.now()) == []
        (receipt_envelope,) = first + second
        receipt = open_envelope(
            receipt_envelope, (payment_pb2.Receipt,), sender_keys=agent.key_chain, recipient=alice.party_id, now=None
        ).message
        assert (receipt.intent_id, Money.from_proto(receipt.amount_received)) == ("pay-1", eur("120.00"))
        assert Money.from_proto(receipt.remaining_balance) == eur("0.00")
        assert receipt.settle_time.ToDatetime(tzinfo=UTC) == START + timedelta(hours=24)
        fetched = await h.stub.GetReceipt(GetReceiptRequest(query=alice.query(alice_account, intent_id="pay-1")))
        assert fetched.receipt == receipt_envelope
        thanks = [e for e in await h.events(alice_account, alice) if e.kind == K.EVENT_KIND_PAYMENT_RECEIVED]
        assert len(thanks) == 1
        assert thanks[0].related_digest == digest(receipt_envelope)

        # Bob's wrong amount: received, held for a person, never a receipt (PAY-6, PAY-9).
        assert [t.transfer_id for t in rail.disputes()] == [wrong.transfer_id]
        bob_receipt = bob.query(bob_account, intent_id="pay-1")
        assert await refused(h.stub.GetReceipt(GetReceiptRequest(query=bob_receipt))) is Reason.PAYMENT_NOT_SETTLED
        # A second transfer under a paid reference is an overpayment to refund (PAY-7).
        again = rail.pay(to_alice.payment_reference, eur("120.00"), h.clock.now())
        assert again.status is TransferStatus.OVERPAYMENT
        assert rail.pay("EE-nobody-1", eur("1.00"), h.clock.now()).status is TransferStatus.UNMATCHED

        # SettlePayments (CNF-4) settles Bob's instructed payment at the instructed amount, once.
        settled = await h.control.SettlePayments(cc.SettlePaymentsRequest())
        assert settled.settled_count == 1
        assert (await h.control.SettlePayments(cc.SettlePaymentsRequest())).settled_count == 0
        bob_receipt = bob.query(bob_account, intent_id="pay-1")
        fetched = await h.stub.GetReceipt(GetReceiptRequest(query=bob_receipt))
        receipt = payment_pb2.Receipt.FromString(fetched.receipt.payload)
        assert Money.from_proto(receipt.amount_received) == eur("80.00")

    run(tmp_path, scenario)


def test_an_intent_instructed_before_a_restart_is_still_matched_and_settled_once(tmp_path: Path) -> None:
    """The rail's reference table is rebuilt from the store: a crash between instructions and payment loses nothing."""
    instructed: list[tuple[str, Consumer, payment_pb2.PaymentInstructions]] = []

    async def before(h: Harness) -> None:
        for party in ("consumer:alice", "consumer:bob"):
            account_id, consumer = await h.enrolled(party)
            bill_id = biller_bill_id(await h.bill(account_id, consumer))
            instructions = await h.pay_intent(account_id, consumer, bill_id, "pay-1", eur("120.00"))
            instructed.append((account_id, consumer, instructions))

    run(tmp_path, before)

    async def after_restart() -> None:
        async with harness(tmp_path) as h:
            (alice_account, alice, to_alice), (bob_account, bob, _) = instructed
            transfer = h.rail.pay(to_alice.payment_reference, eur("120.00"), h.clock.now())
            assert transfer.status is TransferStatus.PENDING  # not UNMATCHED: the reference survived the restart
            h.clock.advance(timedelta(days=1))
            assert len(await h.rail.settle_due(h.running.biller.agent, h.clock.now())) == 1
            # SettlePayments (CNF-4) settles Bob's intent, instructed before the restart too, and nothing twice.
            assert (await h.control.SettlePayments(cc.SettlePaymentsRequest())).settled_count == 1
            assert (await h.control.SettlePayments(cc.SettlePaymentsRequest())).settled_count == 0
            assert await h.running.biller.agent.awaited_payments() == []
            for account_id, consumer in ((alice_account, alice), (bob_account, bob)):
                consumer.clock = h.clock  # the consumers' clocks of the first run stopped at its start
                query = consumer.query(account_id, intent_id="pay-1")
                receipt = (await h.stub.GetReceipt(GetReceiptRequest(query=query))).receipt
                amount = payment_pb2.Receipt.FromString(receipt.payload).amount_received
                assert Money.from_proto(amount) == eur("120.00")

    asyncio.run(after_restart())


def biller_bill_id(bill: envelope_pb2.Envelope) -> str:
    return bill_pb2.Bill.FromString(bill.payload).bill_id


async def refused(call: Awaitable[object]) -> Reason:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return error_from_rpc(failure.value).reason


# --- The scheduler ---------------------------------------------------------------------------------


def test_reminders_escalate_on_the_configured_days_once_each_even_after_a_restart(tmp_path: Path) -> None:
    account: list[str] = []
    consumer: list[Consumer] = []

    async def first_run(h: Harness) -> None:
        account_id, alice = await h.enrolled("consumer:alice")
        account.append(account_id)
        consumer.append(alice)
        await h.bill(account_id, alice)
        biller = h.running.biller

        async def reminders() -> list[tuple[int, str]]:
            return [
                (e.reminder_level, e.date) for e in await h.events(account_id, alice) if e.kind == K.EVENT_KIND_REMINDER
            ]

        await h.advance_to(at(date(2026, 3, 27)))
        assert await reminders() == []
        await h.advance_to(at(date(2026, 3, 28)))  # before_due_days = 3: courteous
        assert await reminders() == [(1, "2026-03-31")]
        await biller.maintain()
        await asyncio.gather(biller.maintain(), biller.maintain())
        assert len(await reminders()) == 1
        await h.advance_to(at(date(2026, 3, 31)))
        await h.advance_to(at(date(2026, 4, 1)))  # after_due_days[0] = 1: courteous again
        await h.advance_to(at(date(2026, 4, 6)))
        assert await reminders() == [(1, "2026-03-31"), (1, "2026-03-31")]
        await h.advance_to(at(date(2026, 4, 7)))  # 7: firm
        await h.advance_to(at(date(2026, 4, 14)))  # 14: final
        await biller.maintain()
        await h.advance_to(at(date(2026, 5, 1)))
        events = await h.events(account_id, alice)
        assert kinds(events) == ["BILL_ISSUED", "REMINDER1", "REMINDER1", "REMINDER2", "REMINDER3"]
        texts = [e.message for e in events[1:]]
        assert "friendly reminder" in texts[0]
        assert "Final reminder" in texts[3]
        assert all(Money.from_proto(e.amount) == eur("120.00") for e in events[1:])

    run(tmp_path, first_run)

    async def after_restart() -> None:
        # The same state directory, a new process' worth of objects: what was sent is read from the log.
        async with harness(tmp_path, ManualClock(at(date(2026, 5, 1)))) as h:
            biller = h.running.biller
            now = h.clock.now()
            emitted = await scheduler.tick(biller.agent, CONFIG, now, store=biller.store, accounts=account)
            assert emitted == []
            assert len(await h.events(account[0], consumer[0])) == 5

    asyncio.run(after_restart())


class ReadsWatched:
    """The biller's store, noting whose event log is read and which leases are claimed."""

    def __init__(self, store: object) -> None:
        self.store = store
        self.logs_read: list[str] = []
        self.leases_claimed: list[str] = []

    async def events(self, account_id: str, *args: object) -> object:
        self.logs_read.append(account_id)
        return await self.store.events(account_id, *args)  # type: ignore[attr-defined]

    async def claim_lease(self, name: str, *args: object) -> object:
        self.leases_claimed.append(name)
        return await self.store.claim_lease(name, *args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def test_a_tick_reads_only_the_accounts_that_owe_something_and_leases_only_to_append(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        alice_account, alice = await h.enrolled("consumer:alice")  # an open bill
        alice_bill = biller_bill_id(await h.bill(alice_account, alice))
        bob_account, _ = await h.enrolled("consumer:bob")  # no bill
        carol_account, carol = await h.enrolled("consumer:carol")  # a bill, paid
        carol_bill = biller_bill_id(await h.bill(carol_account, carol))
        await h.pay_intent(carol_account, carol, carol_bill, "pay-1", eur("120.00"))
        await h.control.SettlePayments(cc.SettlePaymentsRequest())

        biller = h.running.biller
        watched = ReadsWatched(biller.store)
        accounts = [alice_account, bob_account, carol_account]
        now = at(date(2026, 3, 28))  # three days before the due date: the courteous reminder
        emitted = await scheduler.tick(biller.agent, CONFIG, now, store=watched, accounts=accounts)  # type: ignore[arg-type]
        # Alice's log is read twice: looking whether anything is due, then under the lease taken because it was.
        assert watched.logs_read == [alice_account, alice_account]  # one batch each: the log's end is not read again
        assert watched.leases_claimed == [f"scheduler:{alice_account}"]
        events = [event_pb2.Event.FromString(envelope.payload) for envelope in emitted]
        assert [(event.kind, event.bill_id) for event in events] == [(K.EVENT_KIND_REMINDER, alice_bill)]

        again = ReadsWatched(biller.store)  # the same day again: nothing is due, so nothing is written
        assert await scheduler.tick(biller.agent, CONFIG, now, store=again, accounts=accounts) == []  # type: ignore[arg-type]
        assert (again.logs_read, again.leases_claimed) == ([alice_account], [])

    run(tmp_path, scenario)


def test_a_round_lets_other_work_run_between_accounts(tmp_path: Path) -> None:
    # The round runs on a worker's event loop between RPCs. On SQLite an account with nothing due is read without
    # ever suspending, so a round over N owing accounts kept every request waiting for all N (0.6 s at 2,000,
    # measured with scripts/upkeep_cost.py).
    async def scenario(h: Harness) -> None:
        accounts = []
        for name in ("alice", "bob", "carol"):
            account_id, consumer = await h.enrolled(f"consumer:{name}")
            await h.bill(account_id, consumer)
            accounts.append(account_id)
        turns = 0

        async def other_work() -> None:  # a request waiting for the loop, as often as the loop lets it
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        class TurnsWatched(ReadsWatched):
            def __init__(self, store: object) -> None:
                super().__init__(store)
                self.turns_at_read: list[int] = []

            async def events(self, account_id: str, *args: object) -> object:
                self.turns_at_read.append(turns)
                return await super().events(account_id, *args)

        biller = h.running.biller
        watched = TurnsWatched(biller.store)
        other = asyncio.create_task(other_work())
        try:
            now = at(date(2026, 3, 20))  # before any reminder: the round only looks
            assert await scheduler.tick(biller.agent, CONFIG, now, store=watched, accounts=accounts) == []  # type: ignore[arg-type]
        finally:
            other.cancel()
        assert watched.logs_read == accounts
        first, second, third = watched.turns_at_read
        assert first < second < third, f"no other work ran between the accounts' looks: {watched.turns_at_read}"

    run(tmp_path, scenario)


def test_a_missed_instalment_breaks_the_plan_and_reopens_the_bill(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        account_id, alice = await h.enrolled("consumer:alice")
        bill = await h.bill(account_id, alice)
        bill_id = biller_bill_id(bill)
        # 3 x EUR 40.00 on 15 April, May and June: inside the advertised options, so agreed at once.
        agreed = await h.stub.Negotiate(NegotiateRequest(move=alice.open(bill, inside_options())))
        assert agreed.reply.payload_type == "parley.v1.Accept"
        agreement = digest(agreed.reply)

        await h.advance_to(at(date(2026, 4, 12)))  # instalment 1 falls due in 3 days
        instructions = await h.pay_intent(
            account_id, alice, bill_id, "inst-1", eur("40.00"), agreement_digest=agreement, instalment_index=0
        )
        h.rail.pay(instructions.payment_reference, eur("40.00"), h.clock.now())
        await h.advance_to(at(date(2026, 4, 13)))  # settled after 24 hours: receipt and thanks
        await h.advance_to(at(date(2026, 5, 12)))  # instalment 2 falls due in 3 days; it is never paid
        await h.advance_to(at(date(2026, 5, 18)))  # 15 May + 3 days of grace: not missed yet
        before = kinds(await h.events(account_id, alice))
        assert before == ["BILL_ISSUED", "ARRANGEMENT_ACTIVE", "INSTALMENT_DUE", "PAYMENT_RECEIVED", "INSTALMENT_DUE"]

        await h.advance_to(at(date(2026, 5, 19)))
        await h.running.biller.maintain()
        await asyncio.gather(h.running.biller.maintain(), h.running.biller.maintain())
        events = await h.events(account_id, alice)
        assert kinds(events)[len(before) :] == ["INSTALMENT_MISSED", "ARRANGEMENT_BROKEN", "RENEGOTIATION_OFFERED"]
        missed, broken, offered = events[len(before) :]
        thread_id = events[1].thread_id
        assert (missed.date, Money.from_proto(missed.amount), missed.thread_id) == (
            "2026-05-15",
            eur("40.00"),
            thread_id,
        )
        assert missed.related_digest == broken.related_digest == agreement
        assert Money.from_proto(broken.amount) == eur("80.00")  # what is left of the plan
        assert (offered.bill_id, offered.thread_id) == (bill_id, thread_id)

        # The bill is negotiable again (NEG-3): a new opening restating the outstanding balance (TRM-11: 120.00
        # due less the 40.00 received) is answered, not refused.
        plan = build_terms(TermsKind.INSTALMENT_PLAN, eur("80.00"), monthly_dates(date(2026, 6, 1), 4))
        answer = await h.stub.Negotiate(NegotiateRequest(move=alice.open(bill, plan.to_proto())))
        assert answer.reply.payload_type in {"parley.v1.Offer", "parley.v1.Reject"}

    run(tmp_path, scenario)


# --- Conformance control ---------------------------------------------------------------------------


def test_conformance_control_is_announced_and_refuses_bad_fixtures(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        hello = await h.stub.Hello(HelloRequest(protocol_versions=[1]))
        assert CONFORMANCE_FEATURE in hello.features
        assert hello.biller_party_id == BILLER_ID == CONFIG.party_id
        unknown = cc.IssueTestBillRequest(account_id="nobody", amount_due=eur("1.00").to_proto(), due_date="2026-04-01")
        assert await refused(h.control.IssueTestBill(unknown)) is Reason.NOT_FOUND
        account_id, _ = await h.enrolled("consumer:alice")
        bad_date = cc.IssueTestBillRequest(
            account_id=account_id, amount_due=eur("1.00").to_proto(), due_date="2026-02-30"
        )
        assert await refused(h.control.IssueTestBill(bad_date)) is Reason.INVALID_DATE
        assert await refused(h.control.AdvanceClock(cc.AdvanceClockRequest(seconds=0))) is Reason.MALFORMED_PAYLOAD

    run(tmp_path, scenario)


def test_conformance_control_issues_a_code_that_supersedes_the_unspent_one_and_re_binds(tmp_path: Path) -> None:
    """IssueTestEnrolmentCode (CNF-4): a new code for an account, enrolled or not; the unspent earlier code no
    longer enrols, and enrolling with a code for a bound account re-binds it (ENR-11)."""

    async def scenario(h: Harness) -> None:
        unknown = cc.IssueTestEnrolmentCodeRequest(account_id="nobody")
        assert await refused(h.control.IssueTestEnrolmentCode(unknown)) is Reason.NOT_FOUND
        created = await h.control.CreateTestAccount(cc.CreateTestAccountRequest(holder_name="Test Holder"))
        account_id = created.account_id
        request = cc.IssueTestEnrolmentCodeRequest(account_id=account_id)
        newer = (await h.control.IssueTestEnrolmentCode(request)).enrolment_code
        assert newer != created.enrolment_code
        alice, bob = Consumer("consumer:alice", h.clock), Consumer("consumer:bob", h.clock)
        superseded = alice.enrolment(account_id, created.enrolment_code)
        assert await refused(h.stub.Enrol(EnrolRequest(request=superseded))) is Reason.ENROLMENT_CODE_EXPIRED
        await h.stub.Enrol(EnrolRequest(request=alice.enrolment(account_id, newer)))
        await h.bill(account_id, alice)

        third = (await h.control.IssueTestEnrolmentCode(request)).enrolment_code  # the account is bound now
        await h.stub.Enrol(EnrolRequest(request=bob.enrolment(account_id, third)))
        (bill,) = (await h.stub.ListBills(ListBillsRequest(query=bob.query(account_id)))).bills
        assert bill_pb2.Bill.FromString(bill.payload).header.recipient == "consumer:bob"  # ENR-12
        denied = h.stub.ListBills(ListBillsRequest(query=alice.query(account_id)))
        assert await refused(denied) is Reason.ACCOUNT_ACCESS_DENIED

    run(tmp_path, scenario)


# --- Identity ----------------------------------------------------------------------------------------


def test_identity_is_created_once_kept_private_and_renewed_before_expiry(tmp_path: Path) -> None:
    identities = identity_dir(tmp_path)
    first = identities.load(BILLER_ID, START)
    assert os.stat(tmp_path / "biller.key").st_mode & 0o777 == 0o600
    again = identities.load(BILLER_ID, START + timedelta(days=10))
    assert (again.key.keyid, again.chain.fingerprint, len(again.chain.versions)) == (
        first.key.keyid,
        first.chain.fingerprint,
        1,
    )
    later = first.chain.latest.expire_time - timedelta(days=5)
    renewed = identities.load(BILLER_ID, later).chain
    assert (renewed.fingerprint, renewed.latest.version) == (first.chain.fingerprint, 2)
    assert renewed.latest.expire_time > later + timedelta(days=300)
    with pytest.raises(ValueError, match=r"biller:energy\.example"):
        identities.load("biller:other.example", START)
    assert isinstance(SigningKey.load(tmp_path / "biller.key"), SigningKey)


def test_rotating_the_biller_key_keeps_its_identity_and_everything_signed_before(tmp_path: Path) -> None:
    """KEY-17 for the reference biller: rotate the key while it is stopped; after the restart its
    answers are signed by the new key, served in the next key set version, under the same fingerprint, and
    what the old key signed still verifies offline against the extended chain."""
    before: dict[str, object] = {}

    async def first_run(h: Harness) -> None:
        account_id, consumer = await h.enrolled("consumer:alice")
        before.update(account=account_id, consumer=consumer, bill=await h.bill(account_id, consumer))
        before.update(chain=h.running.biller.agent.key_chain)

    run(tmp_path, first_run)
    state = tmp_path / "state"
    old_key = SigningKey.load(state / "biller.key")
    new_key = identity_dir(state).rotate(BILLER_ID, START + timedelta(hours=1)).key
    assert SigningKey.load(state / "biller.key").keyid == new_key.keyid != old_key.keyid

    async def after_restart() -> None:
        async with harness(tmp_path, ManualClock(START + timedelta(hours=2))) as h:
            old_chain = before["chain"]
            assert isinstance(old_chain, KeyChain)
            served = await h.stub.GetKeySets(GetKeySetsRequest())
            chain = KeyChain.verify(list(served.key_sets))
            assert chain.fingerprint == old_chain.fingerprint  # the pinned identity did not change
            assert [v.version for v in chain.versions] == [1, 2]
            assert {e.key.keyid for e in chain.latest.keys} == {old_key.keyid, new_key.keyid}  # a transition
            consumer = before["consumer"]
            assert isinstance(consumer, Consumer)
            consumer.clock = h.clock
            account_id = str(before["account"])
            bill = await h.bill(account_id, consumer)
            assert bill.signatures[0].keyid == new_key.keyid
            open_envelope(bill, (bill_pb2.Bill,), sender_keys=chain, recipient=consumer.party_id, now=h.clock.now())
            old_bill = before["bill"]
            assert isinstance(old_bill, envelope_pb2.Envelope)
            assert old_bill.signatures[0].keyid == old_key.keyid
            open_envelope(old_bill, (bill_pb2.Bill,), sender_keys=chain, recipient=consumer.party_id, now=None)
            with pytest.raises(RemoteProtocolError) as refused:  # the old key signs nothing after the rotation
                chain.check_key_at(old_key.keyid, h.clock.now())
            assert refused.value.reason is Reason.KEY_NOT_VALID

    asyncio.run(after_restart())


def test_a_rotation_cut_short_is_finished_or_undone_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identities = identity_dir(tmp_path)
    key = identities.load(BILLER_ID, START).key
    # Killed after the new version was written, before the new key replaced biller.key: finished at load.
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        identities.rotate(BILLER_ID, START + timedelta(hours=1))
    monkeypatch.setattr(os, "replace", replace)
    assert identities.next_key_path.exists()
    loaded = identities.load(BILLER_ID, START + timedelta(hours=2))
    assert loaded.key.keyid != key.keyid
    assert loaded.chain.latest.version == 2
    assert loaded.chain.latest.entry(loaded.key.keyid) is not None
    assert not identities.next_key_path.exists()
    # A new key saved but its version never written: discarded at load, the current key stays.
    SigningKey.generate().save(identities.next_key_path)
    again = identities.load(BILLER_ID, START + timedelta(hours=3))
    assert (again.key.keyid, again.chain.latest.version) == (loaded.key.keyid, 2)
    assert not identities.next_key_path.exists()


# --- The CLI -----------------------------------------------------------------------------------------


def test_rotate_key_replaces_the_key_and_prints_the_unchanged_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = identity_dir(tmp_path).load(BILLER_ID, datetime.now(UTC))
    key, chain = identity.key, identity.chain
    assert parley_main(["biller", "rotate-key", "--state-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rotated = SigningKey.load(tmp_path / "biller.key")
    assert rotated.keyid != key.keyid
    assert f"new key     {rotated.keyid} in key set version 2" in printed
    assert chain.fingerprint.hex() in printed
    assert (tmp_path / "biller-keyset-v2.pb").exists()
    (tmp_path / "biller.key").chmod(0o644)  # a key file others can read is refused, and nothing is written
    assert parley_main(["biller", "rotate-key", "--state-dir", str(tmp_path)]) == 1
    assert "cannot rotate the key" in capsys.readouterr().out
    assert not (tmp_path / "biller-keyset-v3.pb").exists()


def test_check_config_says_ok_or_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parley_main(["biller", "check-config", str(SAMPLE)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(SAMPLE.read_text().replace("deferral_fee", "deferal_fee"))
    assert parley_main(["biller", "check-config", str(bad)]) == 1
    assert "segments.standard.deferal_fee: unknown key" in capsys.readouterr().out
    assert parley_main(["biller", "serve", "--config", str(bad), "--listen", "127.0.0.1:0", "--insecure"]) == 2
    assert "deferal_fee" in capsys.readouterr().out


def test_serve_refuses_plaintext_off_loopback_and_tls_less_listeners(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(tmp_path / "state")
    assert parley_main(["biller", "serve", "--listen", "0.0.0.0:0", "--insecure", "--state-dir", state]) == 2
    assert "loopback" in capsys.readouterr().out
    assert parley_main(["biller", "serve", "--listen", "127.0.0.1:0", "--state-dir", state]) == 2
    assert "TLS is required" in capsys.readouterr().out
    assert not (tmp_path / "state").exists()  # refused before anything was created


@pytest.mark.slow
def test_serve_answers_hello_and_stops_on_sigterm_then_codes_share_its_identity(tmp_path: Path) -> None:
    state = tmp_path / "state"
    command = [sys.executable, "-m", "agent.cli", "biller", "serve", "--insecure", "--listen", "127.0.0.1:0"]
    with (tmp_path / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(
            [*command, "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        lines, printed = lines_of(process.stdout), {}
        while "listening" not in printed:
            name, _, value = lines.get(timeout=30).partition(" ")
            printed[name] = value.strip()
        port = int(printed["listening"].split()[0].rpartition(":")[2])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            hello = biller_service_pb2_grpc.BillerServiceStub(channel).Hello(
                HelloRequest(protocol_versions=[1]), timeout=10
            )
        assert hello.biller_party_id == printed["biller"] == CONFIG.party_id
        assert hello.identity_fingerprint.hex() == printed["fingerprint"]
        assert CONFORMANCE_FEATURE not in hello.features
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    codes = subprocess.run(
        [sys.executable, "-m", "agent.cli", "biller", "codes", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert codes.returncode == 0, codes.stderr
    assert f"fingerprint {printed['fingerprint']}" in codes.stdout
    assert sum(line.startswith("account") for line in codes.stdout.splitlines()) == len(CONFIG.accounts)


# --- TLS -----------------------------------------------------------------------------------------------


def test_tls_with_dev_certificates_trusts_only_the_issuing_ca(tmp_path: Path) -> None:
    ca, stranger = make_dev_ca(), make_dev_ca("Another CA")
    server_cert = issue_server_cert(ca, hostnames=["localhost"], ips=["127.0.0.1"])

    async def main() -> None:
        async with serving_biller(
            CONFIG,
            listen="127.0.0.1:0",
            state_dir=tmp_path / "state",
            clock=ManualClock(START),
            tls=(server_cert.chain_pem, server_cert.key_pem),
            interval=timedelta(hours=1),
        ) as running:
            for target in (f"127.0.0.1:{running.port}", f"localhost:{running.port}"):
                trusted = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
                async with grpc.aio.secure_channel(target, trusted) as channel:
                    stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                    hello = await stub.Hello(HelloRequest(protocol_versions=[1]), timeout=10)
                    assert hello.biller_party_id == CONFIG.party_id
                    assert CONFORMANCE_FEATURE not in hello.features
                    control = cc_grpc.ConformanceControlServiceStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as failure:
                        await control.CreateTestAccount(cc.CreateTestAccountRequest(), timeout=10)
                    assert failure.value.code() is grpc.StatusCode.UNIMPLEMENTED  # CNF-1: not exposed
            untrusted = grpc.ssl_channel_credentials(root_certificates=stranger.cert_pem)
            async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", untrusted) as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.Hello(HelloRequest(protocol_versions=[1]), timeout=5)
                assert failure.value.code() is grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_a_serving_process_exempts_its_start_up_heap_from_the_cyclic_collector() -> None:
    """`freeze_startup_heap` (called by `parley biller serve` once ready): a full collection afterwards walks
    only what was allocated since, not the tens of thousands of objects the imports left behind."""
    probe = (
        "import gc, reference_biller.service\n"
        "from agent.transport.server import freeze_startup_heap\n"
        "before = len(gc.get_objects())\n"
        "freeze_startup_heap()\n"
        "print(before, gc.get_freeze_count(), len(gc.get_objects()))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    before, frozen, walked = map(int, out.split())
    assert before > 10_000
    assert frozen >= before * 0.9
    assert walked < 1_000
