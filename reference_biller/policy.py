"""The reference biller's policy: advertise the segment's options, counter what is outside them.

Offers inside the advertised options never reach `decide` — the agent accepts
them at once (NEG-12). `decide` sees the rest and answers the way a reasonable
collections team would: accept a settlement at or above the private floor,
otherwise counter with the nearest arrangement the options allow, and reject
only when no round is left for a counter.

Every window is measured from the later of the bill's due date and today (the UTC
date of the decision, TRM-18): a bill reopened long after its due date (a broken
plan, EVT-7) is countered with dates the household can still keep, never with a
date already past (NEG-23), and never beyond the TRM-19 horizon.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from agent.biller import AcceptOffer, BillContext, CounterOffer, Decision, OfferContext, RejectOffer
from agent.protocol.limits import MAX_TERMS_HORIZON_DAYS
from agent.protocol.terms import (
    AdvertisedOptions,
    BillFacts,
    DeferralOption,
    EarlyPaymentDiscount,
    HardshipProgramme,
    InstalmentOption,
    Line,
    LineKind,
    Money,
    Terms,
    TermsKind,
    build_terms,
    every_days,
    monthly_dates,
    shift_days,
)
from parley.v1 import negotiation_pb2
from reference_biller.config import BillerConfig, Segment


def _fee(amount: Money, label: str) -> tuple[Line, ...]:
    return (Line(LineKind.FEE, label, amount),) if amount.minor else ()


def settlement_floor(principal: Money, percent: int) -> Money:
    """The smallest settlement the segment accepts: percent of the principal, rounded up to a minor unit."""
    return Money(principal.currency, -(-principal.minor * percent // 100))


def today_of(now: datetime) -> date:
    """The biller's today: the UTC date of `now` (TRM-18)."""
    return now.astimezone(UTC).date()


def window_start(bill: BillFacts, today: date) -> date:
    """Where the segment's windows start: the due date, or today once it has passed (a reopened bill, NEG-23).
    The advertised options measure from the due date (§7.2); a counter-offer measured from a date already
    behind would name dates the household can no longer keep."""
    return max(bill.due_date, today)


def horizon(bill: BillFacts) -> date:
    """The last date any terms of the bill may name (TRM-19)."""
    return shift_days(bill.due_date, MAX_TERMS_HORIZON_DAYS)


def latest_settlement_date(bill: BillFacts, segment: Segment, today: date) -> date:
    """The latest date the segment accepts a settlement paid on: no later than it lets any single payment
    start (a deferral, or a plan's first instalment), measured from `window_start`, within the horizon.
    A settlement is a reduction for paying soon, not a discount on a promise to pay in years."""
    delay = max(segment.deferral_max_days, segment.instalment_max_first_delay_days)
    return min(shift_days(window_start(bill, today), delay), horizon(bill))


class SegmentPolicy:
    """`agent.biller.Policy` driven by a `BillerConfig`."""

    def __init__(self, config: BillerConfig) -> None:
        self.config = config

    def advertise(self, context: BillContext) -> AdvertisedOptions:
        account_id, amount_due, issue_date, due_date = (
            context.account_id,
            context.amount_due,
            context.issue_date,
            context.due_date,
        )
        segment = self.config.segment_of(account_id)
        pay_by = shift_days(due_date, -segment.early_payment_days_before_due)
        discount = segment.early_payment_discount
        early = (
            EarlyPaymentDiscount(pay_by, discount)
            if discount.minor and issue_date <= pay_by and discount < amount_due
            else None
        )
        return AdvertisedOptions(
            deferral=DeferralOption(segment.deferral_max_days, segment.deferral_fee)
            if segment.deferral_max_days
            else None,
            instalments=InstalmentOption(
                max_count=segment.instalment_max_count,
                min_amount=segment.instalment_min_amount,
                min_interval_days=segment.instalment_min_interval_days,
                max_interval_days=segment.instalment_max_interval_days,
                max_first_delay_days=segment.instalment_max_first_delay_days,
                fee=segment.instalment_fee,
            ),
            early_payment=early,
            hardship_programmes=tuple(
                HardshipProgramme(
                    h.programme_id,
                    h.description,
                    h.fees_waived,
                    h.max_deferral_days,
                    h.max_instalments,
                    h.min_instalment_amount,
                    h.max_interval_days,
                    h.max_first_delay_days,
                    h.requires_disclosure,
                )
                for h in segment.hardship
            ),
        )

    def decide(self, context: OfferContext) -> Decision:
        segment = self.config.segment_of(context.account_id)
        offer, bill, today = context.offer, context.bill, today_of(context.now)
        if (
            offer.kind is TermsKind.SETTLEMENT
            and offer.total >= settlement_floor(offer.principal, segment.settlement_floor_percent)
            and today <= offer.schedule[0].due_date
            and offer.schedule[-1].due_date <= latest_settlement_date(bill, segment, today)
        ):
            return AcceptOffer()
        if context.round >= context.max_rounds:
            return RejectOffer(
                negotiation_pb2.REJECT_REASON_OUT_OF_POLICY, "no rounds left; the advertised options stand"
            )
        counter = self._counter(offer, bill, segment, today)
        if counter is None:
            return RejectOffer(
                negotiation_pb2.REJECT_REASON_OUT_OF_POLICY, "please choose one of the advertised options"
            )
        return CounterOffer(counter)

    def _counter(self, offer: Terms, bill: BillFacts, segment: Segment, today: date) -> Terms | None:
        """The arrangement inside the options nearest to what the consumer asked for: its windows measured from
        `window_start`, every date on or after today and the issue date (NEG-23, TRM-12) and within the horizon
        (TRM-19); None when no such arrangement exists."""
        due, principal = bill.due_date, bill.outstanding  # the amount due less what was received (TRM-11)
        earliest = max(today, bill.issue_date)
        if offer.kind is TermsKind.SETTLEMENT:
            floor = settlement_floor(principal, segment.settlement_floor_percent)
            if floor >= principal:  # a floor of 100 %, or a balance of a few minor units: nothing to forgive
                return None
            reduction = Line(LineKind.SETTLEMENT_REDUCTION, "settlement reduction", principal - floor)
            # The consumer's date only if the policy would accept it: never echo an out-of-bounds date.
            latest = latest_settlement_date(bill, segment, today)
            day = max(min(offer.schedule[-1].due_date, latest), earliest)
            return build_terms(TermsKind.SETTLEMENT, principal, [day], [reduction]) if day <= latest else None
        if offer.kind is TermsKind.PAY_IN_FULL and today <= due:
            return build_terms(TermsKind.PAY_IN_FULL, principal, [max(min(offer.schedule[0].due_date, due), earliest)])
        if offer.kind is TermsKind.DEFERRAL and segment.deferral_max_days:
            latest = min(shift_days(window_start(bill, today), segment.deferral_max_days), horizon(bill))
            day = max(min(offer.schedule[-1].due_date, latest), earliest, shift_days(due, 1))
            if day > latest:
                return None
            return build_terms(TermsKind.DEFERRAL, principal, [day], _fee(segment.deferral_fee, "deferral fee"))
        if offer.kind in (TermsKind.INSTALMENT_PLAN, TermsKind.DEFERRAL):
            return self._plan(offer, bill, segment, today)
        return None  # PAY_IN_FULL once the due date has passed: the outstanding balance is paid without terms

    @staticmethod
    def _plan(offer: Terms, bill: BillFacts, segment: Segment, today: date) -> Terms | None:
        """As many instalments as asked, within the count, minimum amount and interval limits, the first within
        the first-delay window from `window_start` and not before today, the last within the horizon."""
        fee = _fee(segment.instalment_fee, "instalment plan fee")
        total = bill.outstanding.minor + sum(line.amount.minor for line in fee)
        affordable_count = total // segment.instalment_min_amount.minor if segment.instalment_min_amount.minor else 0
        count = min(len(offer.schedule), segment.instalment_max_count, affordable_count)
        if count < 2:
            return None
        latest_first = shift_days(window_start(bill, today), segment.instalment_max_first_delay_days)
        first = max(min(offer.schedule[0].due_date, latest_first), bill.issue_date, today)
        monthly_fits = segment.instalment_min_interval_days <= 28 and segment.instalment_max_interval_days >= 31
        try:
            dates = (
                monthly_dates(first, count)
                if monthly_fits
                else every_days(first, count, segment.instalment_max_interval_days)
            )
        except ValueError:  # the plan would run past the calendar's end: no counter
            return None
        if dates[-1] > horizon(bill):
            return None
        return build_terms(TermsKind.INSTALMENT_PLAN, bill.outstanding, dates, fee)
