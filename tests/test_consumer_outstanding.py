"""Issue 13 item 5, the consumer's side (TRM-11, PAY-16): after a plan breaks half paid, the reference consumer
renegotiates or pays only the bill's outstanding balance, never the whole amount due again.

Real gRPC on 127.0.0.1: the reference biller (served in this process, one ManualClock for both sides) and the
reference consumer's `Household` passes over real SQLite files. A 120.00 bill; a plan of 2 x 60.00 agreed;
the first 60.00 paid and settled; the plan broken (the second instalment missed); then the household either
renegotiates (the biller offers it) or pays (the biller does not). Either way exactly 60.00 more is paid: the
receipts add up to the amount due, never more, and no opening is refused PRINCIPAL_MISMATCH.

The consumer computes the outstanding balance from its own record (every payment of the bill its bank made);
the hypothesis properties check the one arithmetic both sides use (`agent.protocol.terms.outstanding_balance`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.biller import BillerAgent
from agent.clock import ManualClock
from agent.protocol.errors import LocalProtocolError, Reason
from agent.protocol.terms import AdvertisedOptions, Currency, Money, TermsKind, outstanding_balance
from parley.v1 import event_pb2, payment_pb2
from reference_biller.service import RunningBiller
from reference_consumer.profile import load_profile
from reference_consumer.runner import Approval, Household, PassReport
from tests.fixtures import BILL
from tests.test_consumer_run import ACCOUNT, START, code_for, eur, orders, reference_biller, write_profile

BILL_ID = "spring"

# 150.00 now, 60.00 on the 28th, a 100.00 buffer: 120.00 is affordable only as 2 x 60.00 after pay day,
# inside a mandate that allows a plan without fees and nothing over what is owed.
TIGHT = """
[household]
party_id = "consumer:household-7"
currency = "EUR"
balance = "150.00"
buffer = "100.00"

[income]
amount = "60.00"
pay_day = 28

[mandate]
max_fee = "0.00"
max_instalments = 6
max_total_over_bill = "0.00"
"""


async def bill_120(agent: BillerAgent) -> None:
    await agent.issue_bill(ACCOUNT, eur("120.00"), date(2026, 3, 26), "Spring energy", bill_id=BILL_ID)


def at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 9, 0, tzinfo=UTC)


class Story:
    """One household and the reference biller, moved through the months by one clock."""

    def __init__(self, tmp_path: Path, running: RunningBiller, clock: ManualClock) -> None:
        self.state = tmp_path / "state"
        self.profile = tmp_path / "household.toml"
        self.running = running
        self.clock = clock
        self.settled = 0
        self.receipts: list[payment_pb2.Receipt] = []

    async def one_pass(self) -> PassReport:
        household = await Household.open(
            load_profile(self.profile), self.state, clock=self.clock, approval=Approval.APPROVE
        )
        try:
            report = await household.run_pass()
        finally:
            await household.close()
        refused = [line for line in report.negotiations if "PRINCIPAL_MISMATCH" in line.note]
        assert refused == [], refused
        return report

    async def settle_new_orders(self) -> list[Money]:
        """The household's bank pays each new order; the biller's rail settles it and signs a receipt."""
        rail, agent = self.running.biller.rail, self.running.biller.agent
        assert rail is not None
        amounts = []
        for order in orders(self.state)[self.settled :]:
            amount = eur(order["amount"])
            rail.pay(order["payment_reference"], amount, self.clock.now())
            amounts.append(amount)
        self.settled = len(orders(self.state))
        receipts = await rail.settle_all(agent, self.clock.now())
        assert len(receipts) == len(amounts)
        self.receipts.extend(payment_pb2.Receipt.FromString(receipt.payload) for receipt in receipts)
        return amounts

    async def received(self) -> int:
        """What the biller recorded as received for the bill, in minor units."""
        return await self.running.biller.store.received_minor(BILL_ID)

    async def a_plan_agreed_and_half_paid(self) -> bytes:
        """2 x 60.00 agreed on the 5th; the first paid on its date and settled. Returns the agreement's thread."""
        write_profile(
            self.profile,
            target=f"127.0.0.1:{self.running.port}",
            fingerprint=self.running.biller.fingerprint.hex(),
            code=await code_for(self.running),
            household=TIGHT,
        )
        report = await self.one_pass()
        [line] = report.negotiations
        assert line.outcome == "agreed"
        assert line.terms is not None
        assert line.terms.kind is TermsKind.INSTALMENT_PLAN
        assert [i.amount for i in line.terms.schedule] == [eur("60.00"), eur("60.00")]
        first, second = (i.due_date for i in line.terms.schedule)
        self.clock.set(at(first))
        report = await self.one_pass()
        assert [(p.instalment, p.status) for p in report.payments] == [(1, "paid now"), (2, "scheduled")]
        assert await self.settle_new_orders() == [eur("60.00")]
        (arrangement,) = await self.running.biller.agent.arrangements(ACCOUNT, active_only=False)
        assert arrangement.terms.schedule[1].due_date == second
        return arrangement.thread_id


def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, story: object) -> None:
    clock = ManualClock(START)

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_120) as running:
            await story(Story(tmp_path, running, clock))  # type: ignore[operator]

    asyncio.run(main())


@pytest.mark.slow
def test_a_broken_half_paid_plan_is_renegotiated_for_the_outstanding_balance_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def story(s: Story) -> None:
        thread_id = await s.a_plan_agreed_and_half_paid()
        # The second instalment is missed; the biller ends the plan and offers to agree anew (EVT-7), stating
        # what is still owed. (The reference scheduler does it past the grace days; here while the bill's
        # options still leave room for a plan, so the renegotiation is agreed at once.)
        agent = s.running.biller.agent
        await agent.emit_event(
            ACCOUNT, event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id=BILL_ID, thread_id=thread_id, amount=eur("60.00")
        )
        offered = event_pb2.Event.FromString((await agent.offer_renegotiation(BILL_ID)).payload)
        assert Money.from_proto(offered.amount) == eur("60.00")

        report = await s.one_pass()
        [line] = report.negotiations
        assert line.outcome == "agreed", line.note
        assert line.terms is not None
        assert line.terms.principal == eur("60.00")  # the outstanding balance, not the 120.00 due (TRM-11)
        assert line.terms.total == eur("60.00")
        # Its instalments are paid on their dates, and nothing else: 60.00 more in all.
        for instalment in line.terms.schedule:
            s.clock.set(at(instalment.due_date))
            await s.one_pass()
            assert await s.settle_new_orders() == [instalment.amount]
        s.clock.set(at(date(2026, 7, 1)))
        report = await s.one_pass()
        assert [p for p in report.payments if p.status == "paid now"] == []
        paid = [eur(order["amount"]) for order in orders(s.state)]
        assert sum(amount.minor for amount in paid) == eur("120.00").minor
        assert sum(r.amount_received.amount_minor for r in s.receipts) == eur("120.00").minor
        assert s.receipts[-1].remaining_balance.amount_minor == 0
        assert await s.received() == eur("120.00").minor

    run(tmp_path, monkeypatch, story)


@pytest.mark.slow
def test_a_broken_half_paid_plan_without_an_offer_is_paid_for_its_outstanding_balance_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def story(s: Story) -> None:
        thread_id = await s.a_plan_agreed_and_half_paid()
        # The biller ends the plan and offers nothing new (EVT-7's SHOULD not taken): it reopens the bill with
        # ARRANGEMENT_BROKEN alone. What is owed now is the outstanding balance (PAY-16).
        s.clock.set(at(date(2026, 5, 3)))
        party = s.running.biller.agent.party
        broken = party.events.pending_event(
            ACCOUNT,
            event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN,
            s.clock.now(),
            bill_id=BILL_ID,
            thread_id=thread_id,
            amount=eur("60.00"),
        )
        party.wakeups.notify(await party.store.reopen_bill(BILL_ID, [broken]))
        report = await s.one_pass()
        assert [(p.amount, p.status) for p in report.payments] == [("EUR 60.00", "paid now")], report.problems
        assert [line.status for line in report.bills] == ["arrangement ended: outstanding balance paid"]
        assert await s.settle_new_orders() == [eur("60.00")]
        # Paid once: a later pass finds nothing owed, pays nothing and opens nothing.
        s.clock.set(at(date(2026, 5, 4)))
        report = await s.one_pass()
        assert report.payments == []
        assert report.negotiations == []
        assert [o["amount"] for o in orders(s.state)] == ["60.00", "60.00"]
        assert sum(r.amount_received.amount_minor for r in s.receipts) == eur("120.00").minor
        assert s.receipts[-1].remaining_balance.amount_minor == 0
        assert await s.received() == eur("120.00").minor

    run(tmp_path, monkeypatch, story)


# --- The arithmetic both sides use ------------------------------------------------------------------------

EUR = Currency.of("EUR")
MAX_MINOR = 10**11  # EUR: at most 99,999,999,999 minor units (TRM-3)


@given(
    due=st.integers(min_value=1, max_value=MAX_MINOR - 1),
    received=st.lists(st.integers(min_value=0, max_value=MAX_MINOR - 1), max_size=8),
)
def test_the_outstanding_balance_is_never_negative_and_receipts_never_exceed_the_amount_due(
    due: int, received: list[int]
) -> None:
    amount_due = Money(EUR, due)
    amounts = [Money(EUR, minor) for minor in received]
    if sum(received) > due:
        with pytest.raises(ValueError, match="more than"):
            outstanding_balance(amount_due, amounts)
        return
    owed = outstanding_balance(amount_due, amounts)
    assert 0 <= owed.minor <= due
    assert owed.minor + sum(received) == due
    if owed.minor > 0:  # the facts a new thread restates: its principal is exactly what is owed (TRM-11)
        facts = dataclasses.replace(BILL, amount_due=amount_due, options=AdvertisedOptions())
        assert facts.with_received(due - owed.minor).outstanding == owed
        assert facts.restated_by(owed).outstanding == owed


@given(due=st.integers(min_value=1, max_value=10**6), received=st.integers(min_value=1, max_value=10**6))
def test_an_amount_in_another_currency_is_never_subtracted(due: int, received: int) -> None:
    with pytest.raises(LocalProtocolError) as raised:
        outstanding_balance(Money(EUR, due), [Money(Currency.of("USD"), received)])
    assert raised.value.reason is Reason.CURRENCY_MISMATCH
