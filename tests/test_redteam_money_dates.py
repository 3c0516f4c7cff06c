"""Red team issue 13 item 3: a settlement dated 9999-12-31 is refused (TRM-19), the reference policy bounds
settlement dates, and no date, however extreme, makes the scheduler or a payment overflow."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from datetime import date
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.biller import AcceptOffer, CounterOffer
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, Reason
from agent.protocol.limits import MAX_TERMS_HORIZON_DAYS, PAYMENT_GRACE_DAYS
from agent.protocol.terms import (
    Line,
    LineKind,
    Money,
    TermsKind,
    build_terms,
    every_days,
    monthly_dates,
    shift_days,
    validate_against_bill,
)
from parley.v1 import payment_pb2
from parley.v1.biller_service_pb2 import CreatePaymentIntentRequest, NegotiateRequest
from reference_biller import scheduler
from reference_biller.policy import SegmentPolicy, latest_settlement_date
from tests.helpers.peer import START, Biller, running_biller
from tests.test_biller_grpc import reason
from tests.test_reference_biller import AMOUNT, BILL, CONFIG, DUE, POLICY, context

ACCOUNT = "acct-1001"  # configured in the sample: the scheduler walks it


def settlement_on(day: date, percent: int = 90) -> object:
    paid = Money(AMOUNT.currency, AMOUNT.minor * percent // 100)
    return build_terms(
        TermsKind.SETTLEMENT, AMOUNT, [day], [Line(LineKind.SETTLEMENT_REDUCTION, "reduction", AMOUNT - paid)]
    )


def test_no_term_date_beyond_the_horizon_after_the_due_date() -> None:
    validate_against_bill(settlement_on(shift_days(DUE, MAX_TERMS_HORIZON_DAYS)), BILL)  # type: ignore[arg-type]
    for day in (shift_days(DUE, MAX_TERMS_HORIZON_DAYS + 1), date(9999, 12, 31)):
        with pytest.raises(LocalProtocolError) as refused:
            validate_against_bill(settlement_on(day), BILL)  # type: ignore[arg-type]
        assert refused.value.reason is Reason.INVALID_TERMS
        assert "TRM-19" in refused.value.detail


def test_the_policy_accepts_a_settlement_at_its_floor_only_if_paid_in_time_and_never_echoes_a_late_date() -> None:
    segment = CONFIG.segment_of("acct-1001")
    latest = latest_settlement_date(BILL, segment, date(2026, 3, 5))  # the context's today, before the due date
    assert isinstance(POLICY.decide(context(settlement_on(latest))), AcceptOffer)  # type: ignore[arg-type]
    late = POLICY.decide(context(settlement_on(shift_days(latest, 400))))  # type: ignore[arg-type]
    assert isinstance(late, CounterOffer)
    assert late.terms.schedule[-1].due_date == latest


def test_date_helpers_never_overflow_they_clamp_or_refuse() -> None:
    assert shift_days(date.max, 1) == date.max
    assert shift_days(date.min, -1) == date.min
    with pytest.raises(ValueError, match="past year 9999"):
        monthly_dates(date(9999, 11, 1), 3)
    with pytest.raises(ValueError, match="past year 9999"):
        every_days(date(9999, 12, 1), 3, 30)


def test_an_opening_settlement_dated_9999_12_31_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_biller(tmp_path, policy=SegmentPolicy(CONFIG)) as biller:
            alice = await biller.enrolled(ACCOUNT, "consumer:alice")
            bill = await biller.bill(ACCOUNT)
            opening = alice.open(bill, settlement_on(date(9999, 12, 31)).to_proto())  # type: ignore[attr-defined]
            assert await reason(biller.stub.Negotiate(NegotiateRequest(move=opening))) is Reason.INVALID_TERMS

    asyncio.run(scenario())


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def _extreme_bill(biller: Biller, due: date, today: date) -> None:
    """A bill due on `due`, agreed to be paid in full that day, paid by intent, and the scheduler's pass."""
    alice = await biller.enrolled(ACCOUNT, "consumer:alice")
    issue = min(due, START.date())
    bill_id = await biller.agent.issue_bill(ACCOUNT, AMOUNT, due, "Electricity", issue_date=issue, bill_id="b-1")
    bill = await biller.bill_envelope(bill_id)
    terms = build_terms(TermsKind.PAY_IN_FULL, AMOUNT, [due])
    answer = await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, terms.to_proto())))
    intent = alice.intent(ACCOUNT, bill_id, "pay-1", AMOUNT, agreement_digest=digest(answer.reply))
    if (START.date() - due).days > PAYMENT_GRACE_DAYS:  # long past its agreed date: refused (PAY-15), not INTERNAL
        assert await reason(biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))) is (
            Reason.PAYMENT_AMOUNT_MISMATCH
        )
    else:
        instructed = await biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
        payment_pb2.PaymentInstructions.FromString(instructed.instructions.payload).pay_by_time.ToDatetime()
    for day in (today, shift_days(due, -3), due, shift_days(due, 4), shift_days(due, 40)):
        now = START.replace(year=min(max(day.year, 1), 9998), month=day.month, day=min(day.day, 28))
        await scheduler.tick(biller.agent, CONFIG, now, store=biller.agent.party.store, accounts=[ACCOUNT])


@pytest.mark.slow  # twelve billers, each ticked five times: 1.2 s
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    due=st.one_of(
        st.dates(min_value=date(9990, 1, 1)), st.dates(max_value=date(1, 3, 1)), st.just(date.max), st.just(date.min)
    ),
    today=st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)),
)
def test_extreme_dates_go_through_payments_and_the_scheduler_without_overflow(due: date, today: date) -> None:
    failures = _Failures()
    logging.getLogger("parley").addHandler(failures)

    async def scenario(directory: str) -> None:
        async with running_biller(Path(directory), policy=SegmentPolicy(CONFIG)) as biller:
            await _extreme_bill(biller, due, today)

    try:
        with tempfile.TemporaryDirectory() as directory:
            asyncio.run(scenario(directory))
    finally:
        logging.getLogger("parley").removeHandler(failures)
    assert failures.messages == []
