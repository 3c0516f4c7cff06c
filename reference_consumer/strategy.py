"""The reference consumer's strategy: pay when the money is there, inside the user's mandate.

Pure logic: no I/O, no clock reads (`today` is passed in), so the consumer agent can
call it as its strategy callback and tests can replay months in microseconds.

The cash-flow model (`CashFlow`) projects the household's end-of-day balance from the
profile: the balance now, plus income on every pay day, minus every recurring expense,
minus the payments already committed. All amounts are exact integers of minor units
(TRM-15); a projected balance may be negative, so balances are plain `int`s of the
profile's currency, never `Money` (which cannot be negative).

Terms are *affordable* when, with their payments and the committed ones, the projected
end-of-day balance stays at or above the buffer on every day from their first payment
through one month after their last (so the month after a plan ends, rent included, is
paid for too). Days before the first payment are not judged: the terms do not change them.

On top of the model:

- `plan_opening` / `choose_opening`: the opening offer for one bill, in the household's
  order of preference (early payment with the discount, pay in full by the due date,
  a deferral past the next pay day, an instalment plan, then — only when nothing inside
  the advertised options is affordable — a plan outside them, as a negotiation opening).
- `respond`: the answer to a biller's counter-offer (accept, counter with a
  compromise, reject, or escalate to the human when it is affordable but outside the
  mandate, NEG-20).
- `plan_budget` / `prioritise`: several bills decided against one shared budget, in the
  household's priority order, each decision's payments committed before the next.
"""

from __future__ import annotations

import calendar
import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from agent.protocol.answers import AcceptOffer, CounterOffer, Escalate, RejectOffer
from agent.protocol.errors import LocalProtocolError
from agent.protocol.limits import DEFAULT_LIMITS, MAX_TEXT_CHARS, Limits
from agent.protocol.terms import (
    BillFacts,
    Currency,
    HardshipProgramme,
    Instalment,
    Line,
    LineKind,
    Money,
    Terms,
    TermsKind,
    build_terms,
    every_days,
    monthly_dates,
    validate_against_bill,
    validate_terms,
)
from parley.v1 import negotiation_pb2
from reference_consumer.profile import Profile

PROJECTION_DAYS = 5 * 366
"""How far ahead the model projects; terms with a payment later than this are not affordable."""

SEARCH_DAYS = 366
"""How many days a search for one payment date looks at, at most."""

OUTSIDE_DEFERRAL_PAYDAYS = 3
"""An opening outside the options may defer to just after one of the next this many pay days."""

PLAN_FIRST_PAYDAYS = 3
"""An instalment plan starts just after one of the next this many pay days."""

DEFERRAL_FEE = "Deferral fee"
INSTALMENT_FEE = "Instalment plan fee"
EARLY_DISCOUNT = "Early payment discount"


class StrategyError(ValueError):
    """The strategy cannot plan this bill at all (e.g. it is not in the household's currency)."""


def format_minor(code: str, minor: int) -> str:
    """Signed minor units as text for people: "EUR 12.34", "EUR -0.05", "JPY 1200" (TRM-15)."""
    exponent = Currency.of(code).exponent
    sign, magnitude = ("-" if minor < 0 else ""), abs(minor)
    if exponent == 0:
        return f"{code} {sign}{magnitude}"
    whole, fraction = divmod(magnitude, 10**exponent)
    return f"{code} {sign}{whole}.{fraction:0{exponent}d}"


def _add_days(day: date, days: int) -> date | None:
    """`day` + `days`, or None past the end of the calendar."""
    try:
        return day + timedelta(days=days)
    except OverflowError:
        return None


def _clamped(year: int, month: int, day: int) -> date:
    """Day `day` of the month, or the month's last day when it is shorter."""
    return date(year, month, min(day, calendar.monthrange(year, month)[1]))


def _monthly(day_of_month: int, start: date, end: date) -> Iterator[date]:
    """Every date in [start, end] falling on `day_of_month` (clamped to the month's last day)."""
    year, month = start.year, start.month
    while True:
        day = _clamped(year, month, day_of_month)
        if day > end:
            return
        if day >= start:
            yield day
        if year == 9999 and month == 12:
            return
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


def one_month_after(day: date) -> date:
    """The same day of the next month, clamped to its end (TRM-14); `date.max` past the calendar."""
    try:
        return monthly_dates(day, 2)[1]
    except ValueError:
        return date.max


# --- The cash-flow model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """How a schedule of payments would leave the household's balance.

    `lowest` is the lowest projected end-of-day balance (signed minor units, committed payments
    included) on any day from `since` — the schedule's first payment, or today for an empty
    schedule — through `through`, one month after the last payment; it is first reached on
    `lowest_on`. `affordable` is whether `lowest` is at or above the buffer and every payment
    can be made (none before today, none beyond the projection horizon). Days before the first
    payment are not judged: the schedule does not change them, so a dip the household already
    faces (an expense before pay day) does not make a later payment unaffordable.
    """

    lowest: int
    lowest_on: date
    since: date
    through: date
    affordable: bool


class CashFlow:
    """The household's projected balance, from `today` on.

    Conventions: `profile.balance` is the money at the start of `today`; income and expenses
    dated today or later are still to come; every flow of a day (income, expenses, payments)
    lands that day, and the balance of a day is its end-of-day balance. Committed payments
    dated before today are taken as already paid (they are in `profile.balance`).
    """

    def __init__(self, profile: Profile, today: date) -> None:
        self.profile = profile
        self.today = today
        self.currency = Currency.of(profile.currency)
        self._base: list[int] = []  # end-of-day balance of today + i before any committed payment
        self._extend(93)

    def _extend(self, days: int) -> None:
        """Make the baseline cover at least `days` days from today."""
        if days <= len(self._base):
            return
        days = min(max(days, 2 * len(self._base)), PROJECTION_DAYS + 62)
        end = _add_days(self.today, days - 1) or date.max
        days = (end - self.today).days + 1
        deltas = [0] * days
        income = self.profile.income
        for day in _monthly(income.pay_day, self.today, end):
            deltas[(day - self.today).days] += income.amount.minor
        for expense in self.profile.expenses:
            for day in _monthly(expense.day, self.today, end):
                deltas[(day - self.today).days] -= expense.amount.minor
        running, base = self.profile.balance.minor, []
        for delta in deltas:
            running += delta
            base.append(running)
        self._base = base

    def _minor(self, amount: Money) -> int:
        if amount.currency != self.currency:
            raise StrategyError(f"{amount} is not in the household's currency {self.currency.code}")
        return amount.minor

    def baseline_on(self, day: date) -> int:
        """The end-of-day balance on `day` with no payment at all (signed minor units)."""
        return self.balance_on(day, ())

    def balance_on(self, day: date, committed: Sequence[Instalment] = ()) -> int:
        """The end-of-day balance on `day` (signed minor units of the profile's currency).

        The balance now, plus income on every pay day, minus every expense, minus every
        committed payment, from today up to and including `day`. ValueError before today or
        beyond the projection horizon.
        """
        index = (day - self.today).days
        if not 0 <= index <= PROJECTION_DAYS:
            raise ValueError(f"{day} is outside the projection {self.today}..+{PROJECTION_DAYS} days")
        self._extend(index + 1)
        paid = sum(self._minor(p.amount) for p in committed if self.today <= p.due_date <= day)
        return self._base[index] - paid

    def horizon(self, payments: Sequence[Instalment]) -> date:
        """The last day a projection of `payments` looks at: one month after the last of them."""
        last = max((p.due_date for p in payments), default=self.today)
        return one_month_after(max(last, self.today))

    def project(self, schedule: Sequence[Instalment], committed: Sequence[Instalment] = ()) -> Projection:
        """What paying `schedule`, on top of `committed`, does to the balance through the horizon."""
        payable = all(self.today <= p.due_date for p in schedule)
        payments = [*schedule, *(p for p in committed if p.due_date >= self.today)]
        limit = self.today + timedelta(days=PROJECTION_DAYS)
        through = min(self.horizon(payments), limit)
        payable = payable and all(p.due_date <= limit for p in payments)
        last = (through - self.today).days
        self._extend(last + 1)
        by_index: dict[int, int] = {}
        for payment in payments:
            index = max(0, (payment.due_date - self.today).days)
            if index <= last:
                by_index[index] = by_index.get(index, 0) + self._minor(payment.amount)
        since = min(max(0, (p.due_date - self.today).days) for p in schedule) if schedule else 0
        since = min(since, last)
        lowest, lowest_index, cumulative, start = 0, -1, 0, 0
        for index, amount in [*sorted(by_index.items()), (last + 1, 0)]:
            low_from = max(start, since)
            if index > low_from:
                segment = self._base[low_from:index]
                low = min(segment)
                if lowest_index < 0 or low - cumulative < lowest:
                    lowest, lowest_index = low - cumulative, low_from + segment.index(low)
            cumulative += amount
            start = max(start, index)
        buffer = self._minor(self.profile.buffer)
        return Projection(
            lowest=lowest,
            lowest_on=self.today + timedelta(days=lowest_index),
            since=self.today + timedelta(days=since),
            through=through,
            affordable=payable and lowest >= buffer,
        )

    def paydays(self, start: date, end: date) -> list[date]:
        """The pay days in [start, end]."""
        return list(_monthly(self.profile.income.pay_day, start, end))

    def next_payday(self, on_or_after: date) -> date | None:
        """The first pay day on or after the date (within a year), if any."""
        end = _add_days(on_or_after, 366) or date.max
        return next(_monthly(self.profile.income.pay_day, on_or_after, end), None)


# --- Disclosure -------------------------------------------------------------------------------------


def needs_disclosure(terms: Terms, bill: BillFacts) -> bool:
    """Whether the terms claim a hardship programme that binds the biller only with a disclosure.

    When true, the thread's opening must carry a `Disclosure` with `hardship` = true (PRV-1,
    NEG-12); the user set `household.hardship = true`, which is their consent (PRV-8).
    """
    if not terms.hardship_programme_id:
        return False
    programme = bill.programme(terms.hardship_programme_id)
    return programme is not None and programme.requires_disclosure


# --- Openings ---------------------------------------------------------------------------------------


class Step(enum.Enum):
    """Which of the household's preferences an opening comes from, best first."""

    EARLY_PAYMENT = 1
    """Pay in full early, with the advertised discount."""
    ON_TIME = 2
    """Pay in full on (or before) the due date."""
    DEFERRAL = 3
    """One payment after the due date and the next pay day, inside the advertised deferral."""
    INSTALMENTS = 4
    """An instalment plan inside the advertised options."""
    OUTSIDE_OPTIONS = 5
    """Nothing inside the options is affordable: a negotiation opening outside them."""

    @property
    def inside_options(self) -> bool:
        """Whether terms from this step are built inside the bill's options (NEG-12)."""
        return self is not Step.OUTSIDE_OPTIONS


@dataclass(frozen=True)
class Opening:
    """The chosen opening for one bill and why.

    - `affordable`: the projection keeps the buffer (else: nothing was affordable and these are
      the gentlest terms, within the mandate if anything is: the agent should tell its user);
    - `violations`: the mandate limits the terms break; when not empty the agent MUST ask its
      user before sending them (NEG-20). An affordable opening outside the mandate is preferred
      to an unaffordable one inside it;
    - `needs_disclosure`: the opening must carry a hardship disclosure (PRV-1).
    """

    terms: Terms
    step: Step
    projection: Projection
    violations: tuple[str, ...] = ()
    needs_disclosure: bool = False

    @property
    def affordable(self) -> bool:
        return self.projection.affordable

    @property
    def inside_options(self) -> bool:
        """The strategy's claim that the terms are inside the options (the biller must accept them)."""
        return self.step.inside_options

    @property
    def pays_as_billed(self) -> bool:
        """Whether the terms are the bill itself paid in full (no fee, discount or programme), affordable and
        inside the mandate: nothing to negotiate, for a household that pays such bills as billed."""
        terms = self.terms
        plain = terms.kind is TermsKind.PAY_IN_FULL and not terms.lines and not terms.hardship_programme_id
        return plain and self.affordable and not self.violations


@dataclass(frozen=True)
class _Basis:
    """The limits a candidate is built under: the plain options, or a claimed hardship programme's."""

    programme: HardshipProgramme | None = None

    @property
    def programme_id(self) -> str:
        return "" if self.programme is None else self.programme.programme_id

    @property
    def discloses(self) -> bool:
        return self.programme is not None and self.programme.requires_disclosure

    def fee(self, fee: Money | None) -> Money | None:
        """The option's fee under this basis: None when absent, zero or waived by the programme."""
        if fee is None or fee.minor == 0 or (self.programme is not None and self.programme.fees_waived):
            return None
        return fee


def _bases(bill: BillFacts, profile: Profile) -> list[_Basis]:
    """The plain options, then (for a household in hardship) each advertised programme."""
    programmes = bill.options.hardship_programmes if profile.hardship else ()
    return [_Basis(), *(_Basis(programme) for programme in programmes)]


def _fee_lines(fee: Money | None, description: str) -> tuple[Line, ...]:
    return () if fee is None else (Line(LineKind.FEE, description, fee),)


def _days(start: date, end: date) -> Iterator[date]:
    """Every date in [start, end], at most SEARCH_DAYS of them."""
    for offset in range(min((end - start).days + 1, SEARCH_DAYS)):
        yield start + timedelta(days=offset)


def _after_paydays(flow: CashFlow, earliest: date, count: int, end: date = date.max) -> list[date]:
    """The day after each of the next `count` pay days, on or after `earliest` and at most `end`."""
    out: list[date] = []
    stop = min(_add_days(earliest, SEARCH_DAYS + 31) or date.max, end)
    for payday in flow.paydays(earliest - timedelta(days=1) if earliest > date.min else earliest, stop):
        day = _add_days(payday, 1)
        if day is not None and earliest <= day <= end:
            out.append(day)
            if len(out) == count:
                break
    return out


def _plan_series(first: date, longest: int, min_interval: int, max_interval: int) -> Callable[[int], tuple[date, ...]]:
    """Plan dates from `first`: `count` monthly dates (TRM-14) while their intervals fit, else every k days.

    The returned function gives the dates for a count (up to `longest`), or () when neither
    spacing fits the intervals or the calendar ends first.
    """
    try:
        monthly = monthly_dates(first, longest)
    except (ValueError, OverflowError):
        monthly = ()
    fitting = 1
    while fitting < len(monthly) and min_interval <= (monthly[fitting] - monthly[fitting - 1]).days <= max_interval:
        fitting += 1
    days = min(max(30, min_interval), max_interval)
    steady: tuple[date, ...] = ()
    if days >= max(1, min_interval):
        with contextlib.suppress(ValueError, OverflowError):
            steady = every_days(first, longest, days)

    def dates(count: int) -> tuple[date, ...]:
        if count <= fitting:
            return monthly[:count]
        return steady[:count] if count <= len(steady) else ()

    return dates


def _build(
    kind: TermsKind,
    bill: BillFacts,
    dates: Sequence[date],
    *,
    lines: Sequence[Line] = (),
    programme_id: str = "",
    limits: Limits,
) -> Terms | None:
    """Terms by `build_terms`, checked against the bill; None when they cannot be built validly."""
    try:
        # The principal is what is still owed (TRM-11, PAY-16): the amount due less what was paid of it.
        terms = build_terms(kind, bill.outstanding, dates, lines, programme_id, limits=limits)
        validate_against_bill(terms, bill)
    except (LocalProtocolError, ValueError):
        return None
    return terms


_Candidate = tuple[Step, Terms]


def _early(bill: BillFacts, earliest: date, limits: Limits) -> Iterator[_Candidate]:
    """(1) In full with the discount, on the earliest possible date first."""
    early = bill.options.early_payment
    if early is None:
        return
    lines = (Line(LineKind.DISCOUNT, EARLY_DISCOUNT, early.discount),)
    for day in _days(earliest, early.pay_by_date):
        terms = _build(TermsKind.PAY_IN_FULL, bill, [day], lines=lines, limits=limits)
        if terms is not None:
            yield Step.EARLY_PAYMENT, terms


def _on_time(bill: BillFacts, earliest: date, limits: Limits) -> Iterator[_Candidate]:
    """(2) In full on the due date, else on the earliest date before it."""
    due = bill.due_date
    if due < earliest:
        return
    for day in [due, *_days(earliest, due - timedelta(days=1))]:
        terms = _build(TermsKind.PAY_IN_FULL, bill, [day], limits=limits)
        if terms is not None:
            yield Step.ON_TIME, terms


def _deferrals(bill: BillFacts, profile: Profile, flow: CashFlow, earliest: date, limits: Limits) -> list[_Candidate]:
    """(3) One payment after the due date and the next pay day, inside the advertised deferral."""
    deferral = bill.options.deferral
    if deferral is None:
        return []
    payday = flow.next_payday(flow.today)
    after_payday = _add_days(payday, 1) if payday is not None else None
    due_after = _add_days(bill.due_date, 1)
    if after_payday is None or due_after is None:
        return []
    start = max(due_after, after_payday, earliest)
    ranked: list[tuple[tuple[int, bool, date], _Candidate]] = []
    for basis in _bases(bill, profile):
        max_days = deferral.max_days if basis.programme is None else basis.programme.max_deferral_days
        end = _add_days(bill.due_date, max_days) or date.max
        lines = _fee_lines(basis.fee(deferral.fee), DEFERRAL_FEE)
        for day in _days(start, end):
            terms = _build(TermsKind.DEFERRAL, bill, [day], lines=lines, programme_id=basis.programme_id, limits=limits)
            if terms is not None:
                ranked.append(((terms.total.minor, basis.discloses, day), (Step.DEFERRAL, terms)))
    ranked.sort(key=lambda item: item[0])
    return [candidate for _, candidate in ranked]


def _instalments(bill: BillFacts, profile: Profile, flow: CashFlow, earliest: date, limits: Limits) -> list[_Candidate]:
    """(4) Plans inside the advertised options: cheapest, then fewest instalments, monthly after pay day."""
    plan = bill.options.instalments
    if plan is None:
        return []
    ranked: list[tuple[tuple[int, int, bool, date], _Candidate]] = []
    for basis in _bases(bill, profile):
        max_count, min_amount = plan.max_count, plan.min_amount
        max_interval, max_first_delay = plan.max_interval_days, plan.max_first_delay_days
        programme = basis.programme
        if programme is not None:
            max_count = programme.max_instalments
            min_amount = programme.min_instalment_amount or min_amount
            max_interval = programme.max_interval_days or max_interval
            max_first_delay = programme.max_first_delay_days or max_first_delay
        latest_first = _add_days(bill.due_date, min(max_first_delay, PROJECTION_DAYS)) or date.max
        if latest_first < earliest:
            continue
        firsts = _after_paydays(flow, earliest, PLAN_FIRST_PAYDAYS, latest_first) or [latest_first]
        fee = basis.fee(plan.fee)
        lines = _fee_lines(fee, INSTALMENT_FEE)
        total = bill.outstanding.minor + (0 if fee is None else fee.minor)
        longest = min(max_count, limits.max_instalments)
        series = [(first, _plan_series(first, longest, plan.min_interval_days, max_interval)) for first in firsts]
        for count in range(2, longest + 1):
            if total // count < min_amount.minor:
                break  # smaller shares from here on
            for first, dates_for in series:
                dates = dates_for(count)
                if not dates:
                    continue
                terms = _build(
                    TermsKind.INSTALMENT_PLAN, bill, dates, lines=lines, programme_id=basis.programme_id, limits=limits
                )
                if terms is not None:
                    ranked.append(((total, count, basis.discloses, first), (Step.INSTALMENTS, terms)))
    ranked.sort(key=lambda item: item[0])
    return [candidate for _, candidate in ranked]


def _outside(bill: BillFacts, profile: Profile, flow: CashFlow, earliest: date, limits: Limits) -> list[_Candidate]:
    """(5) Openings outside the options: fewest payments first, just after pay days, fees as advertised."""
    ranked: list[tuple[tuple[int, int, bool, date], _Candidate]] = []
    deferral, plan = bill.options.deferral, bill.options.instalments
    due_after = _add_days(bill.due_date, 1) or date.max
    for basis in _bases(bill, profile):
        fee = basis.fee(None if deferral is None else deferral.fee)
        for day in _after_paydays(flow, max(earliest, due_after), OUTSIDE_DEFERRAL_PAYDAYS):
            lines = _fee_lines(fee, DEFERRAL_FEE)
            terms = _build(TermsKind.DEFERRAL, bill, [day], lines=lines, programme_id=basis.programme_id, limits=limits)
            if terms is not None:
                ranked.append(((1, terms.total.minor, basis.discloses, day), (Step.OUTSIDE_OPTIONS, terms)))
        fee = basis.fee(None if plan is None else plan.fee)
        lines = _fee_lines(fee, INSTALMENT_FEE)
        for first in _after_paydays(flow, earliest, PLAN_FIRST_PAYDAYS):
            try:
                monthly = monthly_dates(first, limits.max_instalments)
            except (ValueError, OverflowError):
                continue
            for count in range(2, limits.max_instalments + 1):
                dates = monthly[:count]
                terms = _build(
                    TermsKind.INSTALMENT_PLAN, bill, dates, lines=lines, programme_id=basis.programme_id, limits=limits
                )
                if terms is None:
                    break  # too many shares for the amount, or past the calendar
                ranked.append(((count, terms.total.minor, basis.discloses, first), (Step.OUTSIDE_OPTIONS, terms)))
    ranked.sort(key=lambda item: item[0])
    return [candidate for _, candidate in ranked]


def _candidates(bill: BillFacts, profile: Profile, flow: CashFlow, limits: Limits) -> Iterator[_Candidate]:
    """Every candidate opening, in the household's order of preference."""
    earliest = max(flow.today, bill.issue_date)
    yield from _early(bill, earliest, limits)
    yield from _on_time(bill, earliest, limits)
    yield from _deferrals(bill, profile, flow, earliest, limits)
    yield from _instalments(bill, profile, flow, earliest, limits)
    yield from _outside(bill, profile, flow, earliest, limits)


def _check_currency(bill: BillFacts, profile: Profile) -> None:
    if bill.amount_due.currency.code != profile.currency:
        raise StrategyError(
            f"bill {bill.bill_id} is in {bill.amount_due.currency.code}; "
            f"the household's budget is in {profile.currency}"
        )


def plan_opening(
    bill: BillFacts,
    profile: Profile,
    today: date,
    committed: Sequence[Instalment] = (),
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Opening:
    """The opening offer for `bill`, with the projection and mandate check behind it.

    Candidates are tried in the household's order of preference (see `Step`); the first one
    that is affordable and inside the mandate wins. If none is: the first affordable one
    outside the mandate (the agent must ask the user before sending it, NEG-20); else —
    nothing is affordable — the gentlest one inside the mandate (else the gentlest of all):
    the smallest largest payment, then the latest first payment, so the household asks for
    as much time in as small steps as it may. `limits` are the biller's (from Hello).
    StrategyError if the bill is not in the household's currency.
    """
    _check_currency(bill, profile)
    flow = CashFlow(profile, today)
    needs_approval: Opening | None = None
    gentlest: Opening | None = None
    gentlest_in_mandate: Opening | None = None

    def gentleness(opening: Opening) -> tuple[int, int]:
        schedule = opening.terms.schedule
        return (max(p.amount.minor for p in schedule), -schedule[0].due_date.toordinal())

    for step, terms in _candidates(bill, profile, flow, limits):
        violations = tuple(profile.mandate.violations(terms, bill))
        if violations and needs_approval is not None:
            continue  # it could only be chosen before needs_approval as the gentlest of all
        opening = Opening(
            terms=terms,
            step=step,
            projection=flow.project(terms.schedule, committed),
            violations=violations,
            needs_disclosure=needs_disclosure(terms, bill),
        )
        if opening.affordable:
            if not opening.violations:
                return opening
            needs_approval = needs_approval or opening
            continue
        if gentlest is None or gentleness(opening) < gentleness(gentlest):
            gentlest = opening
        if not opening.violations and (
            gentlest_in_mandate is None or gentleness(opening) < gentleness(gentlest_in_mandate)
        ):
            gentlest_in_mandate = opening
    chosen = needs_approval or gentlest_in_mandate or gentlest
    if chosen is None:  # only when no payment date at all is possible (the calendar's end)
        raise StrategyError(f"no terms can be built for bill {bill.bill_id} from {today}")
    return chosen


def choose_opening(
    bill: BillFacts,
    profile: Profile,
    today: date,
    committed: Sequence[Instalment] = (),
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Terms:
    """The terms of `plan_opening`: what the consumer opens the thread on `bill` with."""
    return plan_opening(bill, profile, today, committed, limits=limits).terms


# --- Answering the biller ---------------------------------------------------------------------------


# The answers are the one vocabulary of `agent.protocol.answers`; the strategy never withdraws.
Response = AcceptOffer | CounterOffer | RejectOffer | Escalate

UNAFFORDABLE_NOTE = "These terms are not affordable for this household."


def _toward(start: int, end: int) -> list[int]:
    """The integers from midway between start and end (rounded toward end) to end, inclusive."""
    if start == end:
        return [end]
    step = 1 if end > start else -1
    middle = start + (abs(end - start) + 1) // 2 * step
    return list(range(middle, end + step, step))


def _compromises(
    bill: BillFacts, theirs: Terms, mine: Terms, flow: CashFlow, earliest: date
) -> Iterator[tuple[date, ...]]:
    """Schedules between theirs and mine, from midway toward mine."""
    count_theirs, count_mine = len(theirs.schedule), len(mine.schedule)
    if count_theirs == 1 and count_mine == 1:
        day_theirs, day_mine = theirs.schedule[0].due_date, mine.schedule[0].due_date
        offsets = _toward(0, (day_mine - day_theirs).days)
        for offset in offsets[:SEARCH_DAYS]:
            day = day_theirs + timedelta(days=offset)
            if day >= earliest:
                yield (day,)
        return
    if count_mine >= 2:
        first = mine.schedule[0].due_date
    else:
        after = _after_paydays(flow, earliest, 1)
        first = after[0] if after else earliest
    for count in _toward(count_theirs, count_mine):
        if count == 1:
            yield (first,)
            continue
        try:
            yield monthly_dates(first, count)
        except (ValueError, OverflowError):
            return


def _compromise(
    bill: BillFacts,
    theirs: Terms,
    mine: Terms,
    *,
    profile: Profile,
    flow: CashFlow,
    committed: Sequence[Instalment],
    limits: Limits,
) -> Terms | None:
    """The counter-offer closest to theirs (from midway toward mine) that is affordable and inside the mandate.

    Fees: the biller's fee when the mandate allows it, else ours. Falls back to repeating our
    last offer (holding firm), then to a fresh opening; None when nothing is affordable.
    """
    earliest = max(flow.today, bill.issue_date)
    fee_lines = [
        tuple(line for line in offer.lines if line.kind is LineKind.FEE) for offer in (theirs, mine) if offer.lines
    ]
    fee_options: list[tuple[Line, ...]] = []
    for lines in [*fee_lines, ()]:
        if lines not in fee_options:
            fee_options.append(lines)

    def acceptable(terms: Terms) -> bool:
        return (
            terms != theirs
            and flow.project(terms.schedule, committed).affordable
            and profile.mandate.allows(terms, bill)
        )

    programme_id = mine.hardship_programme_id
    for dates in _compromises(bill, theirs, mine, flow, earliest):
        if len(dates) >= 2:
            kind = TermsKind.INSTALMENT_PLAN
        else:
            kind = TermsKind.PAY_IN_FULL if dates[0] <= bill.due_date else TermsKind.DEFERRAL
        for fees in fee_options:
            lines = () if kind is TermsKind.PAY_IN_FULL else fees
            terms = _build(kind, bill, dates, lines=lines, programme_id=programme_id, limits=limits)
            if terms is not None and acceptable(terms):
                return terms
    if acceptable(mine):
        return mine
    fresh = plan_opening(bill, profile, flow.today, committed, limits=limits)
    if fresh.affordable and not fresh.violations and fresh.terms != theirs:
        return fresh.terms
    return None


def respond(
    bill: BillFacts,
    their_offer: Terms,
    my_last_offer: Terms,
    profile: Profile,
    today: date,
    *,
    committed: Sequence[Instalment] = (),
    rounds_left: int,
    limits: Limits = DEFAULT_LIMITS,
) -> Response:
    """The answer to the biller's pending offer.

    - affordable and inside the mandate: `AcceptOffer`;
    - affordable but outside the mandate: `Escalate`, naming every limit broken (NEG-20);
    - not affordable, with `rounds_left` > 0 (offers the thread still allows): `CounterOffer` with
      the compromise closest to theirs that is affordable and inside the mandate;
    - otherwise (or terms that are not valid for the bill): `RejectOffer`.
    """
    _check_currency(bill, profile)
    try:
        validate_terms(their_offer, limits)
        validate_against_bill(their_offer, bill)
    except LocalProtocolError as error:
        return RejectOffer(negotiation_pb2.REJECT_REASON_OTHER, f"Invalid terms: {error.detail}"[:MAX_TEXT_CHARS])
    flow = CashFlow(profile, today)
    if flow.project(their_offer.schedule, committed).affordable:
        violations = profile.mandate.violations(their_offer, bill)
        return Escalate("; ".join(violations)) if violations else AcceptOffer()
    if rounds_left > 0:
        counter = _compromise(
            bill, their_offer, my_last_offer, profile=profile, flow=flow, committed=committed, limits=limits
        )
        if counter is not None:
            return CounterOffer(counter)
    return RejectOffer(negotiation_pb2.REJECT_REASON_UNAFFORDABLE, UNAFFORDABLE_NOTE)


# --- Several billers, one budget --------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedBill:
    """One bill of a shared budget, with the biller it came from and the opening decided for it."""

    biller_id: str
    bill: BillFacts
    opening: Opening


def plan_budget(
    bills: Sequence[tuple[str, BillFacts]],
    profile: Profile,
    today: date,
    committed: Sequence[Instalment] = (),
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> list[PlannedBill]:
    """Openings for several bills, `(biller_id, bill)` pairs, against one shared budget.

    Bills are decided in the household's order: the biller's priority in the profile (lower
    first; billers the profile does not rank come last), then the due date, then the bill id.
    Each decision's payments are committed before the next bill is decided, so two openings
    never together break the buffer that each alone would keep. An unaffordable opening's
    payments are committed too: the household still has to pay that bill.
    """

    def order(pair: tuple[str, BillFacts]) -> tuple[int, int, date, str, str]:
        biller_id, bill = pair
        priority = profile.priority_of(biller_id)
        return (priority is None, priority or 0, bill.due_date, bill.bill_id, biller_id)

    planned: list[PlannedBill] = []
    so_far = list(committed)
    for biller_id, bill in sorted(bills, key=order):
        opening = plan_opening(bill, profile, today, so_far, limits=limits)
        planned.append(PlannedBill(biller_id, bill, opening))
        so_far.extend(opening.terms.schedule)
    return planned


def prioritise(
    bills: Sequence[tuple[str, BillFacts]],
    profile: Profile,
    today: date,
    committed: Sequence[Instalment] = (),
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> list[tuple[BillFacts, Terms]]:
    """`plan_budget` as (bill, opening terms) pairs, in the order the bills were decided."""
    return [(p.bill, p.opening.terms) for p in plan_budget(bills, profile, today, committed, limits=limits)]
