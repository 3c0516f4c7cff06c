"""The outcome figures (reference_biller/outcomes.py) on crafted records: each figure, its window, its edges."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from reference_biller.outcomes import (
    CURE_WINDOW_DAYS,
    ArrangementFact,
    BillFact,
    EventFact,
    EventKind,
    Month,
    Outcomes,
    PaymentFact,
    Ratio,
    ThreadFact,
    compute_outcomes,
    months_between,
)

MARCH = date(2026, 3, 1)
TODAY = date(2026, 6, 30)


def bill(bill_id: str, *, issued: date = MARCH, due_in: int = 21, paid: bool = True, amount: int = 10_000) -> BillFact:
    return BillFact(bill_id, "acct-" + bill_id, amount, "EUR", issued, issued + timedelta(days=due_in), paid)


def paid(
    bill_id: str, on: date, amount: int = 10_000, *, thread: bytes | None = None, by_hand: bool = False
) -> PaymentFact:
    return PaymentFact(bill_id, thread, amount, on, by_hand)


def arrangement(thread: bytes, bill_id: str, agreed: date, total: int = 10_000, programme: str = "") -> ArrangementFact:
    return ArrangementFact(thread, bill_id, agreed, total, programme)


def event(kind: EventKind, bill_id: str, on: date, thread: bytes = b"") -> EventFact:
    return EventFact(kind, bill_id, thread, on)


def outcomes(
    bills: list[BillFact],
    *,
    threads: list[ThreadFact] | None = None,
    arrangements: list[ArrangementFact] | None = None,
    payments: list[PaymentFact] | None = None,
    events: list[EventFact] | None = None,
    first: date = MARCH,
    today: date = TODAY,
) -> Outcomes:
    return compute_outcomes(
        bills=bills,
        threads=threads or [],
        arrangements=arrangements or [],
        payments=payments or [],
        events=events or [],
        first=first,
        today=today,
    )


def test_no_bills_no_figures_but_every_month_is_there() -> None:
    result = outcomes([])
    period = result.period
    for ratio in (
        period.self_service,
        period.kept,
        period.cure,
        period.reminders_per_paid_bill,
        period.hardship_uptake,
        period.days_to_pay.on_time,
    ):
        assert not ratio.defined
        assert ratio.percent_text() == "–"
    assert period.days_to_pay.median is None
    assert [month for month, _ in result.months] == [Month(2026, m) for m in (3, 4, 5, 6)]
    assert (result.bills, result.paid_bills, result.arrangements) == (0, 0, 0)


def test_self_service_counts_paid_bills_no_person_touched() -> None:
    bills = [bill("a"), bill("b"), bill("c"), bill("unpaid", paid=False)]
    result = outcomes(
        bills,
        threads=[ThreadFact(b"t-b", "b", MARCH, disputed=True), ThreadFact(b"t-a", "a", MARCH, disputed=False)],
        payments=[
            paid("a", date(2026, 3, 10)),
            paid("b", date(2026, 3, 11)),
            paid("c", date(2026, 4, 2), by_hand=True),
        ],
    )
    assert result.period.self_service == Ratio(1, 3)
    assert result.period.self_service.percent_text() == "33.3 %"
    by_month = {month: window for month, window in result.months}
    assert by_month[Month(2026, 3)].self_service == Ratio(1, 2)  # a and b were paid in March
    assert by_month[Month(2026, 4)].self_service == Ratio(0, 1)
    assert not by_month[Month(2026, 5)].self_service.defined


def test_a_bill_paid_in_part_is_not_resolved() -> None:
    result = outcomes([bill("a", paid=False)], payments=[paid("a", date(2026, 3, 10), 4_000)])
    assert not result.period.self_service.defined
    assert result.paid_bills == 0


def test_arrangements_kept_broken_and_running() -> None:
    bills = [bill("k", paid=True), bill("b", paid=False), bill("r", paid=False)]
    arrangements = [
        arrangement(b"k", "k", date(2026, 3, 5), total=10_500),
        arrangement(b"b", "b", date(2026, 3, 5)),
        arrangement(b"r", "r", date(2026, 3, 5)),
    ]
    payments = [
        paid("k", date(2026, 4, 5), 5_250, thread=b"k"),
        paid("k", date(2026, 5, 5), 5_250, thread=b"k"),
        paid("b", date(2026, 4, 5), 5_000, thread=b"b"),
        paid("r", date(2026, 6, 5), 5_000, thread=b"r"),
    ]
    events = [event(EventKind.ARRANGEMENT_BROKEN, "b", date(2026, 5, 10), b"b")]
    result = outcomes(bills, arrangements=arrangements, payments=payments, events=events)
    assert result.period.kept == Ratio(1, 2)
    assert result.period.broken == 1
    assert result.period.running_arrangements == 1
    by_month = {month: window for month, window in result.months}
    assert by_month[Month(2026, 5)].kept == Ratio(1, 2)  # kept on its last payment, broken on the event: both May
    assert by_month[Month(2026, 3)].running_arrangements == 3


def test_all_broken_is_zero_percent_not_no_figure() -> None:
    arrangements = [arrangement(b"1", "a", MARCH), arrangement(b"2", "b", MARCH)]
    events = [event(EventKind.ARRANGEMENT_BROKEN, x, date(2026, 4, 1), t) for x, t in (("a", b"1"), ("b", b"2"))]
    result = outcomes([bill("a", paid=False), bill("b", paid=False)], arrangements=arrangements, events=events)
    assert result.period.kept == Ratio(0, 2)
    assert result.period.kept.percent_text() == "0.0 %"
    assert result.period.running_arrangements == 0


def test_cure_rate_counts_closed_windows_only() -> None:
    missed = date(2026, 4, 10)
    closes = missed + timedelta(days=CURE_WINDOW_DAYS)
    arrangements = [
        arrangement(b"paid-off", "p", MARCH),
        arrangement(b"re-arranged", "r", MARCH),
        arrangement(b"r-again", "r", missed + timedelta(days=3)),
        arrangement(b"lost", "l", MARCH),
        arrangement(b"late-cure", "z", MARCH),
        arrangement(b"recent", "n", MARCH),
    ]
    events = [
        event(EventKind.INSTALMENT_MISSED, "p", missed, b"paid-off"),
        event(EventKind.INSTALMENT_MISSED, "p", missed + timedelta(days=5), b"paid-off"),  # only the first counts
        event(EventKind.INSTALMENT_MISSED, "r", missed, b"re-arranged"),
        event(EventKind.INSTALMENT_MISSED, "l", missed, b"lost"),
        event(EventKind.INSTALMENT_MISSED, "z", missed, b"late-cure"),
        event(EventKind.INSTALMENT_MISSED, "n", TODAY - timedelta(days=5), b"recent"),
    ]
    bills = [bill("p"), bill("r", paid=False), bill("l", paid=False), bill("z"), bill("n", paid=False)]
    payments = [paid("p", closes), paid("z", closes + timedelta(days=1))]
    result = outcomes(bills, arrangements=arrangements, events=events, payments=payments)
    assert result.period.cure == Ratio(2, 4)  # paid-off (on the last day) and re-arranged; lost and late-cure not
    assert result.period.cure_pending == 1


def test_days_to_pay_median_bands_and_on_time() -> None:
    bills = [bill(name, issued=MARCH, due_in=21) for name in "abcd"]
    payments = [
        paid("a", MARCH + timedelta(days=3)),
        paid("b", MARCH + timedelta(days=10)),
        paid("c", MARCH + timedelta(days=21)),
        paid("d", MARCH + timedelta(days=75)),
    ]
    days = outcomes(bills, payments=payments).period.days_to_pay
    assert days.days == (3, 10, 21, 75)
    assert days.median == 10  # the lower of the two middle values: a whole day
    assert days.on_time == Ratio(3, 4)  # paid on the due date counts as on time
    assert days.bands() == [("0–7 days", 1), ("8–14", 1), ("15–30", 1), ("31–60", 0), ("over 60", 1)]


def test_reminders_per_paid_bill() -> None:
    bills = [bill("a"), bill("b"), bill("unpaid", paid=False)]
    events = [
        event(EventKind.REMINDER, "a", date(2026, 3, 20)),
        event(EventKind.REMINDER, "a", date(2026, 3, 25)),
        event(EventKind.REMINDER, "b", date(2026, 3, 25)),
        event(EventKind.REMINDER, "unpaid", date(2026, 3, 25)),
        event(EventKind.BILL_ISSUED, "a", MARCH),
    ]
    payments = [paid("a", date(2026, 4, 1)), paid("b", date(2026, 4, 1))]
    ratio = outcomes(bills, events=events, payments=payments).period.reminders_per_paid_bill
    assert ratio == Ratio(3, 2)
    assert ratio.decimal_text() == "1.5"


def test_hardship_uptake_among_arrangements_agreed() -> None:
    arrangements = [
        arrangement(b"1", "a", date(2026, 3, 3), programme="hardship-12"),
        arrangement(b"2", "b", date(2026, 3, 4), programme="hardship-12"),
        arrangement(b"3", "c", date(2026, 4, 4)),
        arrangement(b"old", "d", date(2026, 2, 1), programme="hardship-12"),  # before the period
    ]
    period = outcomes([], arrangements=arrangements).period
    assert period.hardship_uptake == Ratio(2, 3)
    assert period.hardship_uptake.percent_text() == "66.7 %"
    assert period.hardship_programmes == (("hardship-12", 2),)


@pytest.mark.parametrize(
    ("ratio", "text", "tenths"),
    [
        (Ratio(1, 3), "33.3 %", "0.3"),
        (Ratio(2, 3), "66.7 %", "0.7"),
        (Ratio(1, 8), "12.5 %", "0.1"),  # 1.25 tenths rounds down; 125 per mille is exact
        (Ratio(1, 16), "6.3 %", "0.1"),  # 62.5 per mille rounds half up
        (Ratio(3, 20), "15.0 %", "0.2"),  # 1.5 tenths rounds half up
        (Ratio(0, 5), "0.0 %", "0.0"),
        (Ratio(7, 7), "100.0 %", "1.0"),
    ],
)
def test_ratios_round_half_up_to_one_decimal(ratio: Ratio, text: str, tenths: str) -> None:
    assert ratio.percent_text() == text
    assert ratio.decimal_text() == tenths


def test_months_and_period_edges() -> None:
    assert months_between(date(2025, 11, 30), date(2026, 2, 1)) == [
        Month(2025, 11),
        Month(2025, 12),
        Month(2026, 1),
        Month(2026, 2),
    ]
    assert Month(2025, 12).label() == "Dec 2025"
    with pytest.raises(ValueError, match="after it ends"):
        outcomes([], first=TODAY, today=MARCH)
    with pytest.raises(ZeroDivisionError):
        _ = Ratio(1, 0).value
