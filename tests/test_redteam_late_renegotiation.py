"""A late renegotiation is never answered with a deal already late (NEG-23).

The reference biller's windows were measured from the bill's due date only: for a bill reopened long after it
(a plan broken on 19 April, the household coming back on 20 May), its counter-offer to a plan, a deferral or a
settlement dated after those windows named 30 April — a date before the biller's own today, an instalment the
household could never pay on time (PAY-15). Over the real stack: the reference biller served with conformance
control on a manual clock, a 120.00 bill due 31 March, 2 x 60.00 agreed, the first paid, the second missed.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent.biller import BillContext, CounterOffer, OfferContext, RejectOffer
from agent.protocol.dsse import digest
from agent.protocol.limits import MAX_TERMS_HORIZON_DAYS
from agent.protocol.terms import (
    BillFacts,
    Currency,
    Line,
    LineKind,
    Money,
    Terms,
    TermsKind,
    build_terms,
    monthly_dates,
    shift_days,
    validate_against_bill,
    validate_terms,
    within_options,
)
from parley.v1 import envelope_pb2, negotiation_pb2
from parley.v1.biller_service_pb2 import NegotiateRequest
from reference_biller.config import load_config
from reference_biller.policy import SegmentPolicy, latest_settlement_date, settlement_floor
from tests.helpers.peer import Consumer, running_biller
from tests.test_reference_biller_runtime import Harness, at, biller_bill_id, kinds, run

CONFIG = load_config()
EUR = Currency.of("EUR")
OUT_OF_POLICY = negotiation_pb2.REJECT_REASON_OUT_OF_POLICY

TODAY = date(2026, 5, 20)  # a month after the plan broke: every window measured from 31 March has closed


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


async def broken_and_late(h: Harness) -> tuple[Consumer, envelope_pb2.Envelope]:
    """A bill under a broken plan, reopened (RENEGOTIATION_OFFERED) for its 60.00 outstanding; the clock at TODAY."""
    account_id, alice = await h.enrolled("consumer:alice")
    bill = await h.bill(account_id, alice)
    bill_id = biller_bill_id(bill)
    plan = build_terms(TermsKind.INSTALMENT_PLAN, eur("120.00"), [date(2026, 4, 1), date(2026, 4, 15)])
    agreed = await h.stub.Negotiate(NegotiateRequest(move=alice.open(bill, plan.to_proto())))
    assert agreed.reply.payload_type == "parley.v1.Accept"
    paid = await h.pay_intent(account_id, alice, bill_id, "inst-1", eur("60.00"), agreement_digest=digest(agreed.reply))
    h.rail.pay(paid.payment_reference, eur("60.00"), h.clock.now())
    await h.advance_to(at(date(2026, 3, 31)))  # settled: 60.00 received
    await h.advance_to(at(date(2026, 4, 19)))  # 15 April + 3 days of grace: broken
    assert kinds(await h.events(account_id, alice))[-2:] == ["ARRANGEMENT_BROKEN", "RENEGOTIATION_OFFERED"]
    await h.advance_to(at(TODAY))
    return alice, bill


def _dates(terms: Terms) -> list[date]:
    return [instalment.due_date for instalment in terms.schedule]


def test_a_late_renegotiation_is_countered_with_dates_from_today_not_from_the_due_date(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        alice, bill = await broken_and_late(h)

        async def counter(terms: Terms) -> Terms:
            opening = alice.open(bill, terms.to_proto())
            answer = await h.stub.Negotiate(NegotiateRequest(move=opening))
            assert answer.reply.payload_type == "parley.v1.Offer", answer.reply.payload_type
            offer = negotiation_pb2.Offer.FromString(answer.reply.payload)
            assert offer.header.create_time.ToDatetime().date() == TODAY
            withdraw = alice.next([opening, answer.reply], negotiation_pb2.Withdraw())
            await h.stub.Negotiate(NegotiateRequest(move=withdraw))
            return Terms.from_proto(offer.terms)

        # 2 x 30.00 from 1 July: later than any window the bill advertised; the counter was 30 April, 30 May.
        plan = await counter(build_terms(TermsKind.INSTALMENT_PLAN, eur("60.00"), monthly_dates(date(2026, 7, 1), 2)))

        # A deferral to 1 August; the counter was a deferral to 30 April.
        deferral = build_terms(
            TermsKind.DEFERRAL, eur("60.00"), [date(2026, 8, 1)], [Line(LineKind.FEE, "deferral fee", eur("5.00"))]
        )
        deferred = await counter(deferral)

        # A settlement above the floor (54.00 of 60.00) to be paid on 1 August; the counter was 30 April.
        reduction = [Line(LineKind.SETTLEMENT_REDUCTION, "settlement", eur("5.00"))]
        settled = await counter(build_terms(TermsKind.SETTLEMENT, eur("60.00"), [date(2026, 8, 1)], reduction))

        # Before the fix: {plan: [2026-04-30, 2026-05-30], deferral: [2026-04-30], settlement: [2026-04-30]}.
        late = {t.kind.name: _dates(t) for t in (plan, deferred, settled) if min(_dates(t)) < TODAY}
        assert not late, late
        assert [plan.kind, deferred.kind, settled.kind] == [
            TermsKind.INSTALMENT_PLAN,
            TermsKind.DEFERRAL,
            TermsKind.SETTLEMENT,
        ]

    run(tmp_path, scenario)


def test_the_biller_agent_rejects_rather_than_sign_a_policys_late_counter_offer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any policy, not only the reference: the sample policy counters with 6 x 20.00 from 15 April whatever the
    date; on 1 May the agent signs a Reject instead of that counter-offer (NEG-23), and logs why."""

    async def scenario() -> None:
        async with running_biller(tmp_path) as biller:
            alice = await biller.enrolled("acct-1001", "consumer:alice")
            bill = await biller.bill("acct-1001")
            biller.clock.set(datetime(2026, 5, 1, 9, tzinfo=UTC))
            outside = build_terms(TermsKind.INSTALMENT_PLAN, eur("120.00"), monthly_dates(date(2026, 6, 15), 8))
            answer = await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, outside.to_proto())))
            assert answer.reply.payload_type == "parley.v1.Reject"
            assert negotiation_pb2.Reject.FromString(answer.reply.payload).reason == OUT_OF_POLICY
            assert answer.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_REJECTED

    with caplog.at_level(logging.WARNING, logger="parley.biller"):
        asyncio.run(scenario())
    late = [r.getMessage() for r in caplog.records if r.getMessage().startswith("policy-answer-late ")]
    assert len(late) == 1
    assert "date=2026-04-15" in late[0]


# --- the reference policy, as a property ---------------------------------------------------------------------------

POLICY = SegmentPolicy(CONFIG)
SEGMENT = CONFIG.segment_of("acct-1001")
KINDS = [TermsKind.PAY_IN_FULL, TermsKind.DEFERRAL, TermsKind.INSTALMENT_PLAN, TermsKind.SETTLEMENT]


@st.composite
def situations(draw: st.DrawFn) -> tuple[OfferContext, date]:
    """A bill (random amount, dates, something received), a today from its issue date to past its horizon, and a
    valid offer of any kind restating its outstanding balance, on dates anywhere its terms may name."""
    issue = draw(st.dates(min_value=date(2000, 1, 1), max_value=date(2090, 1, 1)))
    due = shift_days(issue, draw(st.integers(0, 90)))
    amount = Money(EUR, draw(st.integers(100, 1_000_000)))
    options = POLICY.advertise(BillContext("acct-1001", amount, issue, due))
    bill = BillFacts("bill-1", "acct-1001", amount, issue, due, "Energy", options)
    bill = bill.with_received(draw(st.integers(0, amount.minor - 1)))
    today = shift_days(issue, draw(st.one_of(st.integers(0, 150), st.integers(0, MAX_TERMS_HORIZON_DAYS + 200))))
    kind = draw(st.sampled_from(KINDS))
    principal = bill.outstanding
    horizon = shift_days(due, MAX_TERMS_HORIZON_DAYS)
    near_today = (max(issue, shift_days(today, -40)), min(horizon, shift_days(today, 60)))
    pick = st.dates(min_value=issue, max_value=horizon)
    if near_today[0] <= near_today[1]:  # dates around today, where the boundaries are
        pick = st.one_of(pick, st.dates(min_value=near_today[0], max_value=near_today[1]))
    lines: list[Line] = []
    if kind is TermsKind.PAY_IN_FULL:
        dates = [draw(st.dates(min_value=issue, max_value=due))]
        lines = [Line(LineKind.FEE, "odd fee", Money(EUR, 1))]  # any line: outside the options, so decided
    elif kind is TermsKind.DEFERRAL:
        dates = [draw(pick.filter(lambda day: day > due))]
    elif kind is TermsKind.SETTLEMENT:
        dates = [draw(pick)]
        reduction = draw(st.integers(1, principal.minor - 1)) if principal.minor > 1 else 0
        assume(reduction)
        lines = [Line(LineKind.SETTLEMENT_REDUCTION, "reduction", Money(EUR, reduction))]
    else:
        dates = sorted(set(draw(st.lists(pick, min_size=2, max_size=6))))
        assume(len(dates) >= 2 and principal.minor >= len(dates))
    offer = build_terms(kind, principal, dates, lines)
    validate_terms(offer)
    validate_against_bill(offer, bill)
    now = datetime(today.year, today.month, today.day, draw(st.integers(0, 23)), tzinfo=UTC)
    rounds = draw(st.integers(1, 4))
    return OfferContext(bill, "acct-1001", offer, rounds, 4, (), None, now), today


def _in_the_options_from(terms: Terms, bill: BillFacts, start: date) -> bool:
    """Inside the segment's advertised options, every window measured from `start` (the due date, or today once it
    has passed): the options the biller would advertise on the bill were it due on `start`."""
    dates = [i.due_date for i in terms.schedule]
    if terms.kind is TermsKind.PAY_IN_FULL:
        return not terms.lines and dates[0] <= bill.due_date
    if terms.kind is TermsKind.DEFERRAL:
        fee = [Line(LineKind.FEE, "deferral fee", SEGMENT.deferral_fee)] if SEGMENT.deferral_fee.minor else []
        return list(terms.lines) == fee and bill.due_date < dates[0] <= shift_days(start, SEGMENT.deferral_max_days)
    if terms.kind is TermsKind.INSTALMENT_PLAN:
        plan_fee = SEGMENT.instalment_fee
        fee = [Line(LineKind.FEE, "instalment plan fee", plan_fee)] if plan_fee.minor else []
        return (
            list(terms.lines) == fee
            and 2 <= len(dates) <= SEGMENT.instalment_max_count
            and all(i.amount >= SEGMENT.instalment_min_amount for i in terms.schedule)
            and all(
                SEGMENT.instalment_min_interval_days <= (b - a).days <= SEGMENT.instalment_max_interval_days
                for a, b in pairwise(dates)
            )
            and dates[0] <= shift_days(start, SEGMENT.instalment_max_first_delay_days)
        )
    # SETTLEMENT: at the private floor, paid no later than the longest single-payment window from `start`.
    return terms.total >= settlement_floor(terms.principal, SEGMENT.settlement_floor_percent) and dates[
        0
    ] <= latest_settlement_date(bill, SEGMENT, start)


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(situations())
def test_every_counter_and_acceptance_of_the_reference_policy_is_dated_from_today(
    situation: tuple[OfferContext, date],
) -> None:
    """Whatever the bill, the reopening date and the offer: the terms the policy counters with, or accepts, are
    valid for the bill, every date on or after today and within the TRM-19 horizon, and inside its own options
    with their windows measured from the later of the due date and today."""
    context, today = situation
    bill = context.bill
    decision = POLICY.decide(context)
    if isinstance(decision, RejectOffer):
        return
    terms = decision.terms if isinstance(decision, CounterOffer) else context.offer
    dates = [i.due_date for i in terms.schedule]
    validate_terms(terms)
    validate_against_bill(terms, bill)
    assert all(today <= day <= shift_days(bill.due_date, MAX_TERMS_HORIZON_DAYS) for day in dates), (today, dates)
    start = max(bill.due_date, today)
    assert _in_the_options_from(terms, bill, start), (terms, start)
    if today <= bill.due_date and terms.kind is not TermsKind.SETTLEMENT:  # not reopened: the advertised options
        assert within_options(terms, bill, hardship_disclosed=False)
