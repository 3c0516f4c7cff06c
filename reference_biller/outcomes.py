"""The outcome figures a collections team steers by, computed from the biller's records (sans I/O).

Each figure is defined in docs/CONSOLE.md (numerator, denominator, time window); this module is the one
place it is computed. Inputs are plain facts read from the store (`BillFact`, `ArrangementFact`,
`PaymentFact`, `EventFact`, `ThreadFact`), and `today`, passed in: no clock, no database. Arithmetic is
exact: counts are integers, ratios are `Ratio` (an exact fraction, shown rounded half up to one decimal
place), money stays in minor units.

Windows are calendar months (UTC dates). A fact belongs to the month of the date that decides it: a bill
to the month it was paid in full, an arrangement to the month it ended (kept or broken) or was agreed,
a missed instalment to the month it was missed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction

__all__ = [
    "CURE_WINDOW_DAYS",
    "DAYS_TO_PAY_BANDS",
    "ArrangementFact",
    "BillFact",
    "DaysToPay",
    "EventFact",
    "EventKind",
    "Month",
    "Outcomes",
    "PaymentFact",
    "Ratio",
    "ThreadFact",
    "Window",
    "compute_outcomes",
    "format_per_mille",
    "months_between",
]

CURE_WINDOW_DAYS = 30  # a missed instalment is cured if the bill is paid or re-arranged within this many days
DAYS_TO_PAY_BANDS: tuple[tuple[str, int | None], ...] = (  # (label, last day of the band; None: no end)
    ("0–7 days", 7),
    ("8–14", 14),
    ("15–30", 30),
    ("31–60", 60),
    ("over 60", None),
)


class EventKind(enum.IntEnum):
    """The event kinds the figures use (the values of parley.v1.EventKind)."""

    BILL_ISSUED = 1
    REMINDER = 2
    ARRANGEMENT_ACTIVE = 3
    INSTALMENT_DUE = 4
    PAYMENT_RECEIVED = 5
    INSTALMENT_MISSED = 6
    ARRANGEMENT_BROKEN = 7
    RENEGOTIATION_OFFERED = 8


# --- Facts (what the store holds, reduced to what the figures need) ------------------------------------


@dataclass(frozen=True)
class BillFact:
    bill_id: str
    account_id: str
    amount_minor: int
    currency: str
    issued_on: date
    due_on: date
    paid: bool  # the bill's status is PAID: every amount it owes is settled


@dataclass(frozen=True)
class ThreadFact:
    """A negotiation thread on a bill; `disputed` when it ended in a rejection saying a person will follow up."""

    thread_id: bytes
    bill_id: str
    opened_on: date
    disputed: bool


@dataclass(frozen=True)
class ArrangementFact:
    """An agreed thread: its agreed total and the hardship programme its terms claim ("" for none)."""

    thread_id: bytes
    bill_id: str
    agreed_on: date
    total_minor: int
    hardship_programme_id: str


@dataclass(frozen=True)
class PaymentFact:
    """A settled payment. `thread_id` is the arrangement it pays (None: the bill as issued);
    `by_hand` when an operator recorded it (`parley biller settle`) rather than a rail or a bank statement."""

    bill_id: str
    thread_id: bytes | None
    amount_minor: int
    settled_on: date
    by_hand: bool


@dataclass(frozen=True)
class EventFact:
    """One event of an account's log, by kind, with the bill and thread it names (empty when none)."""

    kind: int
    bill_id: str
    thread_id: bytes
    on: date


# --- Exact ratios and months ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator, exactly; `None`-like (no figure) when the denominator is zero."""

    numerator: int
    denominator: int

    @property
    def defined(self) -> bool:
        return self.denominator > 0

    @property
    def value(self) -> Fraction:
        if not self.defined:
            raise ZeroDivisionError("a ratio over nothing has no value")
        return Fraction(self.numerator, self.denominator)

    def per_mille(self) -> int:
        """The ratio in thousandths, rounded half up: 1/3 → 333, 2/3 → 667, 1/8 → 125."""
        return _round_half_up(self.value * 1000)

    def tenths(self) -> int:
        """The ratio in tenths, rounded half up (reminders per bill: 7/5 → 14, shown 1.4)."""
        return _round_half_up(self.value * 10)

    def percent_text(self) -> str:
        """`82.4 %`: the percentage rounded half up to one decimal place; `–` with no denominator."""
        return format_per_mille(self.per_mille()) if self.defined else "–"

    def decimal_text(self) -> str:
        """`1.4`: the ratio rounded half up to one decimal place; `–` with no denominator."""
        if not self.defined:
            return "–"
        tenths = self.tenths()
        return f"{tenths // 10}.{tenths % 10}"


def _round_half_up(value: Fraction) -> int:
    return (value.numerator * 2 + value.denominator) // (value.denominator * 2)


def format_per_mille(per_mille: int) -> str:
    return f"{per_mille // 10}.{per_mille % 10} %"


@dataclass(frozen=True, order=True)
class Month:
    year: int
    month: int

    @classmethod
    def of(cls, day: date) -> Month:
        return cls(day.year, day.month)

    @property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def label(self) -> str:
        return f"{self.first_day:%b %Y}"


def months_between(first: date, last: date) -> list[Month]:
    """Every calendar month from `first`'s to `last`'s, inclusive."""
    months, month, end = [], Month.of(first), Month.of(last)
    while month <= end:
        months.append(month)
        month = month.next()
    return months


# --- The figures ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaysToPay:
    """Days from issue to payment in full of the bills paid in a window."""

    days: tuple[int, ...]  # one per bill, sorted
    on_time: Ratio  # paid on or before the due date / bills paid

    @property
    def median(self) -> int | None:
        """The median number of days; of an even count, the lower of the two middle values (a whole day)."""
        return self.days[(len(self.days) - 1) // 2] if self.days else None

    def bands(self) -> list[tuple[str, int]]:
        """How many bills fell in each of DAYS_TO_PAY_BANDS."""
        counts, start = [], 0
        for label, last in DAYS_TO_PAY_BANDS:
            counts.append((label, sum(1 for d in self.days if d >= start and (last is None or d <= last))))
            start = (last or 0) + 1
        return counts


@dataclass(frozen=True)
class Window:
    """The figures of one window (a month, or the whole period shown)."""

    first: date
    last: date
    self_service: Ratio  # paid bills no person touched / paid bills
    kept: Ratio  # arrangements kept / arrangements that ended (kept + broken)
    broken: int
    cure: Ratio  # misses cured within CURE_WINDOW_DAYS / misses whose cure window has closed
    cure_pending: int  # misses still inside their cure window
    days_to_pay: DaysToPay
    reminders_per_paid_bill: Ratio  # reminders about the paid bills / paid bills
    hardship_uptake: Ratio  # arrangements on a hardship programme / arrangements agreed
    hardship_programmes: tuple[tuple[str, int], ...]  # (programme id, arrangements agreed on it)
    running_arrangements: int  # agreed, neither kept nor broken at the window's end


@dataclass(frozen=True)
class Outcomes:
    period: Window
    months: tuple[tuple[Month, Window], ...]
    bills: int
    paid_bills: int
    arrangements: int


@dataclass(frozen=True)
class _Derived:
    """Per-bill and per-arrangement dates derived once from the facts."""

    paid_on: dict[str, date]  # bill → the day its last settlement came (paid bills only)
    touched: frozenset[str]  # bills a person handled: a disputed thread, a payment recorded by hand
    kept_on: dict[bytes, date]  # arrangement → the day its last payment came (fully paid arrangements)
    broken_on: dict[bytes, date]  # arrangement → the day it was declared broken
    misses: tuple[tuple[bytes, str, date], ...]  # (arrangement, bill, the day of its first missed instalment)
    reminders: dict[str, int]  # bill → reminders sent about it


def _derive(
    bills: Sequence[BillFact],
    threads: Sequence[ThreadFact],
    arrangements: Sequence[ArrangementFact],
    payments: Sequence[PaymentFact],
    events: Sequence[EventFact],
) -> _Derived:
    paid_ids = {bill.bill_id for bill in bills if bill.paid}
    last_payment: dict[str, date] = {}
    paid_towards: dict[bytes, int] = {}
    last_towards: dict[bytes, date] = {}
    touched = {thread.bill_id for thread in threads if thread.disputed}
    for payment in payments:
        last_payment[payment.bill_id] = max(payment.settled_on, last_payment.get(payment.bill_id, payment.settled_on))
        if payment.by_hand:
            touched.add(payment.bill_id)
        if payment.thread_id is not None:
            paid_towards[payment.thread_id] = paid_towards.get(payment.thread_id, 0) + payment.amount_minor
            previous = last_towards.get(payment.thread_id, payment.settled_on)
            last_towards[payment.thread_id] = max(payment.settled_on, previous)
    broken_on: dict[bytes, date] = {}
    first_miss: dict[bytes, tuple[str, date]] = {}
    reminders: dict[str, int] = {}
    for event in sorted(events, key=lambda event: event.on):
        if event.kind == EventKind.ARRANGEMENT_BROKEN and event.thread_id:
            broken_on.setdefault(event.thread_id, event.on)
        elif event.kind == EventKind.INSTALMENT_MISSED and event.thread_id:
            first_miss.setdefault(event.thread_id, (event.bill_id, event.on))
        elif event.kind == EventKind.REMINDER and event.bill_id:
            reminders[event.bill_id] = reminders.get(event.bill_id, 0) + 1
    kept_on = {
        arrangement.thread_id: last_towards[arrangement.thread_id]
        for arrangement in arrangements
        if arrangement.thread_id not in broken_on
        and arrangement.thread_id in last_towards
        and paid_towards[arrangement.thread_id] >= arrangement.total_minor
    }
    return _Derived(
        paid_on={bill_id: day for bill_id, day in last_payment.items() if bill_id in paid_ids},
        touched=frozenset(touched),
        kept_on=kept_on,
        broken_on=broken_on,
        misses=tuple((thread_id, bill_id, day) for thread_id, (bill_id, day) in first_miss.items()),
        reminders=reminders,
    )


def _window(
    first: date,
    last: date,
    *,
    today: date,
    bills: Sequence[BillFact],
    arrangements: Sequence[ArrangementFact],
    derived: _Derived,
) -> Window:
    def inside(day: date | None) -> bool:
        return day is not None and first <= day <= last

    paid = [bill for bill in bills if inside(derived.paid_on.get(bill.bill_id))]
    untouched = [bill for bill in paid if bill.bill_id not in derived.touched]
    days = tuple(sorted((derived.paid_on[bill.bill_id] - bill.issued_on).days for bill in paid))
    on_time = sum(1 for bill in paid if derived.paid_on[bill.bill_id] <= bill.due_on)
    kept = sum(1 for day in derived.kept_on.values() if inside(day))
    broken = sum(1 for day in derived.broken_on.values() if inside(day))

    cured = closed = pending = 0
    for thread_id, bill_id, missed_on in derived.misses:
        if not inside(missed_on):
            continue
        closes = missed_on + timedelta(days=CURE_WINDOW_DAYS)
        if closes > today:
            pending += 1
            continue
        closed += 1
        paid_on = derived.paid_on.get(bill_id)
        rearranged = any(
            arrangement.bill_id == bill_id
            and arrangement.thread_id != thread_id
            and missed_on <= arrangement.agreed_on <= closes
            for arrangement in arrangements
        )
        if rearranged or (paid_on is not None and paid_on <= closes):
            cured += 1

    agreed = [arrangement for arrangement in arrangements if inside(arrangement.agreed_on)]
    programmes: dict[str, int] = {}
    for arrangement in agreed:
        if arrangement.hardship_programme_id:
            programmes[arrangement.hardship_programme_id] = programmes.get(arrangement.hardship_programme_id, 0) + 1
    running = sum(
        1
        for arrangement in arrangements
        if arrangement.agreed_on <= last
        and not _on_or_before(derived.kept_on.get(arrangement.thread_id), last)
        and not _on_or_before(derived.broken_on.get(arrangement.thread_id), last)
    )
    return Window(
        first=first,
        last=last,
        self_service=Ratio(len(untouched), len(paid)),
        kept=Ratio(kept, kept + broken),
        broken=broken,
        cure=Ratio(cured, closed),
        cure_pending=pending,
        days_to_pay=DaysToPay(days, Ratio(on_time, len(paid))),
        reminders_per_paid_bill=Ratio(sum(derived.reminders.get(bill.bill_id, 0) for bill in paid), len(paid)),
        hardship_uptake=Ratio(sum(programmes.values()), len(agreed)),
        hardship_programmes=tuple(sorted(programmes.items())),
        running_arrangements=running,
    )


def _on_or_before(day: date | None, last: date) -> bool:
    return day is not None and day <= last


def _last_day(month: Month) -> date:
    return month.next().first_day - timedelta(days=1)


def compute_outcomes(
    *,
    bills: Iterable[BillFact],
    threads: Iterable[ThreadFact],
    arrangements: Iterable[ArrangementFact],
    payments: Iterable[PaymentFact],
    events: Iterable[EventFact],
    first: date,
    today: date,
) -> Outcomes:
    """The figures over the period `first`..`today` (inclusive), and month by month within it."""
    if first > today:
        raise ValueError(f"the period starts ({first}) after it ends ({today})")
    bill_list, arrangement_list = list(bills), list(arrangements)
    derived = _derive(bill_list, list(threads), arrangement_list, list(payments), list(events))
    months = []
    for month in months_between(first, today):
        start, end = max(first, month.first_day), min(today, _last_day(month))
        months.append(
            (month, _window(start, end, today=today, bills=bill_list, arrangements=arrangement_list, derived=derived))
        )
    return Outcomes(
        period=_window(first, today, today=today, bills=bill_list, arrangements=arrangement_list, derived=derived),
        months=tuple(months),
        bills=len(bill_list),
        paid_bills=len(derived.paid_on),
        arrangements=len(arrangement_list),
    )
