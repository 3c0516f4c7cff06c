"""Tests for agent.protocol.terms: money, dates, schedules, terms and bill checks (TRM-*, NEG-12, LIM-6)."""

from __future__ import annotations

import calendar
from collections.abc import Callable
from dataclasses import replace
from datetime import date, timedelta
from functools import partial
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.errors import LocalProtocolError, Reason
from agent.protocol.limits import AMOUNT_MAJOR_DIGITS, MAX_ID_CHARS, MAX_LINES, MAX_TEXT_CHARS, Limits
from agent.protocol.terms import (
    CURRENCY_TABLE_EDITION,
    AdvertisedOptions,
    BillFacts,
    Currency,
    DeferralOption,
    EarlyPaymentDiscount,
    HardshipProgramme,
    Instalment,
    InstalmentOption,
    Line,
    LineKind,
    Money,
    Terms,
    TermsKind,
    build_terms,
    currency_minor_units,
    every_days,
    format_date,
    monthly_dates,
    parse_date,
    split_evenly,
    validate_against_bill,
    validate_terms,
    within_options,
)
from parley.v1 import bill_pb2, header_pb2, terms_pb2

CODES = ("EUR", "USD", "GBP", "JPY", "BHD", "KWD", "CLF")


def reason_of(call: Callable[[], object]) -> Reason:
    with pytest.raises(LocalProtocolError) as info:
        call()
    return info.value.reason


def detail_of(call: Callable[[], object]) -> str:
    with pytest.raises(LocalProtocolError) as info:
        call()
    return info.value.detail


def eur(minor: int) -> Money:
    return Money.of(minor, "EUR")


def bound(code: str) -> int:
    return int(10 ** (AMOUNT_MAJOR_DIGITS + Currency.of(code).exponent))


def fee(minor: int) -> Line:
    return Line(LineKind.FEE, "fee", eur(minor))


def reduction(minor: int) -> Line:
    return Line(LineKind.SETTLEMENT_REDUCTION, "forgiven", eur(minor))


def discount(minor: int) -> Line:
    return Line(LineKind.DISCOUNT, "early payment", eur(minor))


D = date.fromisoformat
ISSUE, DUE = D("2025-01-01"), D("2025-02-01")
HP_STRICT = HardshipProgramme("HP1", "Hardship plan", True, 90, 12, eur(5_00), 45, 30, True)
HP_OPEN = HardshipProgramme("OPEN", "Breathing space", False, 60, 0, None, 0, 0, False)
BILL = BillFacts(
    bill_id="B-1",
    account_id="A-1",
    amount_due=eur(100_00),
    issue_date=ISSUE,
    due_date=DUE,
    description="Electricity, January",
    options=AdvertisedOptions(
        deferral=DeferralOption(30, eur(5_00)),
        instalments=InstalmentOption(6, eur(20_00), 28, 31, 14, eur(3_00)),
        early_payment=EarlyPaymentDiscount(D("2025-01-15"), eur(2_00)),
        hardship_programmes=(HP_STRICT, HP_OPEN),
    ),
)


def with_options(**changes: Any) -> BillFacts:
    return replace(BILL, options=replace(BILL.options, **changes))


def raw_terms(
    kind: TermsKind,
    schedule: list[tuple[str, int]],
    lines: tuple[Line, ...] = (),
    *,
    principal: int = 100_00,
    total: int | None = None,
    hardship_programme_id: str = "",
) -> Terms:
    """Terms built by hand, unchecked; total defaults to the schedule's sum."""
    return Terms(
        kind,
        eur(principal),
        lines,
        eur(sum(minor for _, minor in schedule) if total is None else total),
        tuple(Instalment(D(day), eur(minor)) for day, minor in schedule),
        hardship_programme_id,
    )


# --- Currency and Money -----------------------------------------------------------------------


def test_currency_of_reads_the_iso_table_and_caches() -> None:
    assert (Currency.of("EUR").exponent, Currency.of("JPY").exponent, Currency.of("BHD").exponent) == (2, 0, 3)
    assert Currency.of("EUR") is Currency.of("EUR")


def test_the_currency_table_is_the_dated_edition_shipped() -> None:
    """TRM-1, TRM-17: codes added and withdrawn before the 2026-01-01 edition."""
    assert "2026-01-01" in CURRENCY_TABLE_EDITION
    table = currency_minor_units()
    assert len(table) == 165
    assert (table["XCG"], table["SLE"], table["ZWG"]) == (2, 2, 2)
    for withdrawn in ("ANG", "CUC", "HRK", "SLL", "ZWL"):
        assert withdrawn not in table
        assert reason_of(partial(Currency.of, withdrawn)) is Reason.UNKNOWN_CURRENCY


@pytest.mark.parametrize("code", ["eur", "Eur", "EU", "EURO", "ZZZ", "XAU", "XXX", "", " EUR"])
def test_currency_of_rejects_unknown_malformed_and_unitless_codes(code: str) -> None:
    assert reason_of(lambda: Currency.of(code)) is Reason.UNKNOWN_CURRENCY


@pytest.mark.parametrize(
    ("minor", "code"),
    [(-1, "EUR"), (10**11, "EUR"), (10**9, "JPY"), (10**12, "BHD"), (True, "EUR"), (False, "JPY")],
)
def test_money_range_is_checked_at_construction(minor: int, code: str) -> None:
    assert reason_of(lambda: Money.of(minor, code)) is Reason.AMOUNT_OUT_OF_RANGE


def test_money_range_edges_are_allowed() -> None:
    assert Money.of(10**11 - 1, "EUR").minor == 10**11 - 1
    assert Money.zero("JPY") == Money.of(0, "JPY")


@pytest.mark.parametrize(
    ("minor", "code", "text"),
    [(1234, "EUR", "EUR 12.34"), (5, "EUR", "EUR 0.05"), (1200, "JPY", "JPY 1200"), (1500, "BHD", "BHD 1.500")],
)
def test_money_str(minor: int, code: str, text: str) -> None:
    assert str(Money.of(minor, code)) == text


@pytest.mark.parametrize(
    ("text", "code", "minor"),
    [("12.34", "EUR", 1234), ("12.3", "EUR", 1230), ("12", "EUR", 1200), ("0.5", "BHD", 500), ("1200", "JPY", 1200)],
)
def test_money_parse_is_exact(text: str, code: str, minor: int) -> None:
    assert Money.parse(text, code) == Money.of(minor, code)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("12.345", "EUR"),
        ("1.5", "JPY"),
        ("1.", "EUR"),
        (".5", "EUR"),
        ("-1", "EUR"),
        ("+1", "EUR"),
        ("1e3", "EUR"),
        (" 1", "EUR"),
        ("1\n", "EUR"),
        ("12,34", "EUR"),
        ("１２", "EUR"),
        ("", "EUR"),
        ("NaN", "EUR"),
        ("1" * 40, "EUR"),
        ("1000000000", "EUR"),
    ],
)
def test_money_parse_rejects(text: str, code: str) -> None:
    assert reason_of(lambda: Money.parse(text, code)) is Reason.AMOUNT_OUT_OF_RANGE


def test_money_arithmetic_and_ordering_within_one_currency() -> None:
    assert eur(150) + eur(50) == eur(200)
    assert eur(150) - eur(150) == eur(0)
    assert eur(1) < eur(2) <= eur(2)
    assert eur(3) > eur(2) >= eur(2)
    assert reason_of(lambda: eur(1) - eur(2)) is Reason.AMOUNT_OUT_OF_RANGE
    assert reason_of(lambda: eur(10**11 - 1) + eur(1)) is Reason.AMOUNT_OUT_OF_RANGE


@pytest.mark.parametrize(
    "operation",
    [
        lambda a, b: a + b,
        lambda a, b: a - b,
        lambda a, b: a < b,
        lambda a, b: a <= b,
        lambda a, b: a > b,
        lambda a, b: a >= b,
    ],
)
def test_money_never_mixes_currencies(operation: Callable[[Money, Money], object]) -> None:
    assert reason_of(lambda: operation(eur(1), Money.of(1, "USD"))) is Reason.CURRENCY_MISMATCH
    assert eur(1) != Money.of(1, "USD")


@st.composite
def money(draw: st.DrawFn, code: str | None = None, min_minor: int = 0) -> Money:
    code = code or draw(st.sampled_from(CODES))
    return Money.of(draw(st.integers(min_minor, bound(code) - 1)), code)


@given(money())
def test_money_parse_round_trips_str(amount: Money) -> None:
    code, text = str(amount).split(" ")
    assert Money.parse(text, code) == amount


# --- Dates ------------------------------------------------------------------------------------


def test_dates_parse_and_format() -> None:
    assert parse_date("2024-02-29") == date(2024, 2, 29)
    assert format_date(date(987, 6, 5)) == "0987-06-05"


@pytest.mark.parametrize(
    "text",
    [
        "2023-02-29",
        "2024-13-01",
        "2024-00-10",
        "0000-01-01",
        "2024-2-01",
        "20240201",
        "2024-02-01T00:00",
        " 2024-02-01",
        "2024-02-01\n",
        "٢٠٢٤-٠٢-٠١",
        "",
    ],
)
def test_parse_date_rejects(text: str) -> None:
    assert reason_of(lambda: parse_date(text)) is Reason.INVALID_DATE


def test_monthly_dates_clamp_from_the_original_day() -> None:
    assert monthly_dates(D("2024-01-31"), 4) == (D("2024-01-31"), D("2024-02-29"), D("2024-03-31"), D("2024-04-30"))
    assert monthly_dates(D("2024-11-30"), 3) == (D("2024-11-30"), D("2024-12-30"), D("2025-01-30"))


@given(st.dates(max_value=date(9000, 1, 1)), st.integers(1, 40))
def test_monthly_dates_are_increasing_and_clamped(first: date, count: int) -> None:
    dates = monthly_dates(first, count)
    assert len(dates) == count
    assert dates[0] == first
    for index, day in enumerate(dates):
        assert day.year * 12 + day.month == first.year * 12 + first.month + index
        assert day.day == min(first.day, calendar.monthrange(day.year, day.month)[1])
    assert all(a < b for a, b in pairwise(dates))


def test_every_days_and_bad_counts() -> None:
    assert every_days(D("2025-01-30"), 3, 14) == (D("2025-01-30"), D("2025-02-13"), D("2025-02-27"))
    with pytest.raises(ValueError, match="at least 1"):
        every_days(DUE, 0, 7)
    with pytest.raises(ValueError, match="at least 1"):
        every_days(DUE, 2, 0)
    with pytest.raises(ValueError, match="at least 1"):
        monthly_dates(DUE, 0)


# --- split_evenly and build_terms -------------------------------------------------------------


def test_split_evenly_gives_the_remainder_to_the_first_instalments() -> None:
    assert split_evenly(eur(100), 3) == (eur(34), eur(33), eur(33))
    assert split_evenly(eur(101), 3) == (eur(34), eur(34), eur(33))
    with pytest.raises(ValueError, match="at least 1"):
        split_evenly(eur(100), 0)
    with pytest.raises(ValueError, match="positive shares"):
        split_evenly(eur(2), 3)


@given(st.data())
def test_split_evenly_sums_exactly(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 100))
    total = data.draw(money(min_minor=count))
    parts = split_evenly(total, count)
    assert len(parts) == count
    assert sum(part.minor for part in parts) == total.minor
    assert {part.currency for part in parts} == {total.currency}
    assert max(parts).minor - min(parts).minor <= 1
    assert list(parts) == sorted(parts, reverse=True)


@given(st.data())
def test_build_terms_always_validates(data: st.DataObject) -> None:
    code = data.draw(st.sampled_from(CODES))
    limits = Limits(max_instalments=data.draw(st.integers(2, 60)))
    kind = data.draw(st.sampled_from(TermsKind))
    count = data.draw(st.integers(2, limits.max_instalments)) if kind is TermsKind.INSTALMENT_PLAN else 1
    principal = Money.of(data.draw(st.integers(count + 1, bound(code) // 2)), code)
    adjust = Money.of(data.draw(st.integers(1, principal.minor - count)), code)
    line_kind = {
        TermsKind.PAY_IN_FULL: LineKind.DISCOUNT,
        TermsKind.SETTLEMENT: LineKind.SETTLEMENT_REDUCTION,
    }.get(kind, LineKind.FEE)
    need_line = kind is TermsKind.SETTLEMENT or data.draw(st.booleans())
    lines = (Line(line_kind, "adjustment", adjust),) if need_line else ()
    first = data.draw(st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)))
    monthly = data.draw(st.booleans())
    dates = monthly_dates(first, count) if monthly else every_days(first, count, data.draw(st.integers(1, 60)))

    terms = build_terms(kind, principal, dates, lines, limits=limits)

    validate_terms(terms, limits)
    assert len(terms.schedule) <= limits.max_instalments
    sign = 1 if line_kind is LineKind.FEE else -1
    assert terms.total.minor == principal.minor + (sign * adjust.minor if lines else 0)
    assert tuple(i.amount for i in terms.schedule) == split_evenly(terms.total, count)
    assert tuple(i.due_date for i in terms.schedule) == dates


def test_build_terms_adds_the_fee_and_respects_limits() -> None:
    terms = build_terms(TermsKind.INSTALMENT_PLAN, eur(100_00), monthly_dates(DUE, 3), (fee(1),))
    assert terms.total == eur(100_01)
    assert [i.amount.minor for i in terms.schedule] == [33_34, 33_34, 33_33]
    four = monthly_dates(DUE, 4)
    small = Limits(max_instalments=3)
    assert (
        reason_of(lambda: build_terms(TermsKind.INSTALMENT_PLAN, eur(100), four, limits=small))
        is Reason.TOO_MANY_INSTALMENTS
    )
    assert reason_of(lambda: build_terms(TermsKind.DEFERRAL, eur(100), every_days(DUE, 2, 1))) is Reason.INVALID_TERMS


# --- Round trips and structural decoding ------------------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=20)
kinds = st.sampled_from(LineKind)


@st.composite
def any_terms(draw: st.DrawFn) -> Terms:
    """Structurally valid terms, arithmetic not necessarily right."""
    code = draw(st.sampled_from(CODES))
    amounts = money(code)
    return Terms(
        kind=draw(st.sampled_from(TermsKind)),
        principal=draw(amounts),
        lines=tuple(draw(st.lists(st.builds(Line, kinds, texts, amounts), max_size=4))),
        total=draw(amounts),
        schedule=tuple(draw(st.lists(st.builds(Instalment, st.dates(), amounts), max_size=4))),
        hardship_programme_id=draw(texts),
    )


@given(any_terms())
def test_terms_round_trip_through_bytes(terms: Terms) -> None:
    assert Terms.from_proto(terms.to_proto()) == terms
    assert Terms.from_proto(terms_pb2.Terms.FromString(terms.to_proto().SerializeToString())) == terms


days = st.integers(0, 400)


@st.composite
def bills(draw: st.DrawFn) -> BillFacts:
    code = draw(st.sampled_from(CODES))
    maybe_money = st.none() | money(code)
    amount_due = draw(money(code, min_minor=1))
    # A fee option's terms restate the amount due plus the fee, which must stay below the ceiling (BIL-2 item 9).
    maybe_fee = st.none() | st.integers(0, bound(code) - 1 - amount_due.minor).map(lambda minor: Money.of(minor, code))
    issue = draw(st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)))
    due = issue + timedelta(days=draw(days))
    min_interval = draw(days)
    early = None
    if amount_due.minor > 1 and draw(st.booleans()):
        early = EarlyPaymentDiscount(
            issue + timedelta(days=draw(st.integers(0, (due - issue).days))),
            Money.of(draw(st.integers(1, amount_due.minor - 1)), code),
        )
    ids = draw(
        st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_ID_CHARS), unique=True, max_size=3)
    )
    programmes = tuple(
        HardshipProgramme(
            pid,
            draw(texts),
            draw(st.booleans()),
            draw(days),
            draw(days),
            draw(maybe_money),
            draw(days),
            draw(days),
            draw(st.booleans()),
        )
        for pid in ids
    )
    instalments = InstalmentOption(
        draw(st.integers(2, 60)),
        draw(money(code)),
        min_interval,
        min_interval + draw(days),
        draw(days),
        draw(maybe_fee),
    )
    return BillFacts(
        bill_id=draw(st.text(st.characters(codec="ascii"), min_size=1, max_size=MAX_ID_CHARS)),
        account_id=draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_ID_CHARS)),
        amount_due=amount_due,
        issue_date=issue,
        due_date=due,
        description=draw(texts),
        options=AdvertisedOptions(
            deferral=draw(st.none() | st.builds(DeferralOption, days, maybe_fee)),
            instalments=draw(st.none() | st.just(instalments)),
            early_payment=early,
            hardship_programmes=programmes,
        ),
    )


@given(bills())
def test_bills_round_trip_through_bytes(bill: BillFacts) -> None:
    assert BillFacts.from_proto(bill.to_proto()) == bill
    assert BillFacts.from_proto(bill_pb2.Bill.FromString(bill.to_proto().SerializeToString())) == bill


def test_bill_from_proto_ignores_the_header_and_keeps_zero_fees_distinct_from_absent() -> None:
    assert BILL.options.instalments is not None
    bill = with_options(deferral=DeferralOption(10, eur(0)), instalments=replace(BILL.options.instalments, fee=None))
    pb = bill.to_proto()
    pb.header.CopyFrom(header_pb2.Header(protocol_version=1, sender="biller"))
    assert pb.options.deferral.HasField("fee")
    assert not pb.options.instalments.HasField("fee")
    assert BillFacts.from_proto(pb) == bill


def _pb(terms: Terms, edit: Callable[[terms_pb2.Terms], object]) -> terms_pb2.Terms:
    pb = terms.to_proto()
    edit(pb)
    return pb


VALID = build_terms(TermsKind.INSTALMENT_PLAN, eur(100_00), monthly_dates(D("2025-02-15"), 2), (fee(3_00),))


@pytest.mark.parametrize(
    ("edit", "reason", "where"),
    [
        (lambda pb: setattr(pb, "kind", 0), Reason.INVALID_TERMS, "kind"),
        (lambda pb: setattr(pb, "kind", 9), Reason.INVALID_TERMS, "kind"),
        (lambda pb: setattr(pb.lines[0], "kind", 0), Reason.INVALID_TERMS, "lines[0]: kind"),
        (lambda pb: pb.ClearField("principal"), Reason.UNKNOWN_CURRENCY, "principal"),
        (lambda pb: setattr(pb.total, "currency_code", "eur"), Reason.UNKNOWN_CURRENCY, "total"),
        (
            lambda pb: setattr(pb.schedule[1].amount, "amount_minor", -5),
            Reason.AMOUNT_OUT_OF_RANGE,
            "schedule[1]: amount",
        ),
        (lambda pb: setattr(pb.schedule[1], "due_date", "2025-02-30"), Reason.INVALID_DATE, "schedule[1]: due_date"),
    ],
)
def test_terms_from_proto_rejects_bad_structure(
    edit: Callable[[terms_pb2.Terms], object], reason: Reason, where: str
) -> None:
    pb = _pb(VALID, edit)
    assert reason_of(lambda: Terms.from_proto(pb)) is reason
    assert detail_of(lambda: Terms.from_proto(pb)).startswith(where)


def test_terms_from_proto_does_not_check_arithmetic() -> None:
    pb = _pb(VALID, lambda pb: setattr(pb.total, "amount_minor", 1))
    assert Terms.from_proto(pb).total == eur(1)


# --- validate_terms ---------------------------------------------------------------------------

PLAN = [("2025-02-15", 51_50), ("2025-03-15", 51_50)]


@pytest.mark.parametrize(
    ("terms", "reason", "where"),
    [
        (replace(VALID, total=Money.of(103_00, "USD")), Reason.CURRENCY_MISMATCH, "total"),
        (replace(VALID, lines=(Line(LineKind.FEE, "fee", Money.of(3, "USD")),)), Reason.CURRENCY_MISMATCH, "lines[0]"),
        (
            raw_terms(TermsKind.INSTALMENT_PLAN, [*PLAN, ("2025-04-15", 0)], (fee(3_00),)),
            Reason.AMOUNT_OUT_OF_RANGE,
            "schedule[2]",
        ),
        (raw_terms(TermsKind.INSTALMENT_PLAN, PLAN, (fee(0),), total=103_00), Reason.AMOUNT_OUT_OF_RANGE, "lines[0]"),
        (raw_terms(TermsKind.PAY_IN_FULL, PLAN), Reason.INVALID_TERMS, "PAY_IN_FULL"),
        (raw_terms(TermsKind.DEFERRAL, [], total=100_00), Reason.INVALID_TERMS, "DEFERRAL"),
        (raw_terms(TermsKind.INSTALMENT_PLAN, PLAN[:1]), Reason.INVALID_TERMS, "INSTALMENT_PLAN"),
        (raw_terms(TermsKind.SETTLEMENT, [("2025-02-01", 80_00)], principal=80_00), Reason.INVALID_TERMS, "SETTLEMENT"),
        (
            raw_terms(
                TermsKind.SETTLEMENT,
                [("2025-02-01", 60_00)],
                (reduction(20_00),) * 2,
            ),
            Reason.INVALID_TERMS,
            "SETTLEMENT",
        ),
        (
            raw_terms(TermsKind.DEFERRAL, [("2025-03-01", 80_00)], (reduction(20_00),)),
            Reason.INVALID_TERMS,
            "DEFERRAL",
        ),
        (raw_terms(TermsKind.DEFERRAL, [("2025-03-01", 98_00)], (discount(2_00),)), Reason.INVALID_TERMS, "lines[0]"),
        (
            raw_terms(TermsKind.DEFERRAL, [("2025-03-01", 109_00)], (fee(1_00),) * (MAX_LINES + 1)),
            Reason.INVALID_TERMS,
            "lines;",
        ),
        (
            replace(VALID, lines=(Line(LineKind.FEE, "x" * (MAX_TEXT_CHARS + 1), eur(3_00)),)),
            Reason.INVALID_TERMS,
            "lines[0].description",
        ),
        (replace(VALID, hardship_programme_id="h" * (MAX_ID_CHARS + 1)), Reason.INVALID_TERMS, "hardship_programme_id"),
        (
            raw_terms(
                TermsKind.INSTALMENT_PLAN, [(format_date(d), 1_00) for d in monthly_dates(DUE, 37)], principal=37_00
            ),
            Reason.TOO_MANY_INSTALMENTS,
            "37",
        ),
        (replace(VALID, total=eur(103_01)), Reason.TOTAL_MISMATCH, "total"),
        (
            raw_terms(TermsKind.INSTALMENT_PLAN, PLAN, (fee(3_00),), total=103_01, principal=100_01),
            Reason.SCHEDULE_SUM_MISMATCH,
            "schedule sums",
        ),
        (
            raw_terms(TermsKind.INSTALMENT_PLAN, [("2025-02-15", 51_50), ("2025-02-15", 51_50)], (fee(3_00),)),
            Reason.SCHEDULE_DATES_NOT_INCREASING,
            "schedule[1]",
        ),
        (
            raw_terms(TermsKind.INSTALMENT_PLAN, [("2025-03-15", 51_50), ("2025-02-15", 51_50)], (fee(3_00),)),
            Reason.SCHEDULE_DATES_NOT_INCREASING,
            "schedule[1]",
        ),
    ],
)
def test_validate_terms_reasons(terms: Terms, reason: Reason, where: str) -> None:
    assert reason_of(lambda: validate_terms(terms)) is reason
    assert where in detail_of(lambda: validate_terms(terms))


def test_validate_terms_uses_the_given_limits() -> None:
    validate_terms(VALID)
    assert reason_of(lambda: validate_terms(VALID, Limits(max_instalments=1))) is Reason.TOO_MANY_INSTALMENTS


# --- validate_against_bill --------------------------------------------------------------------


def in_full(day: str, *lines: Line) -> Terms:
    return build_terms(TermsKind.PAY_IN_FULL, eur(100_00), [D(day)], lines)


@pytest.mark.parametrize(
    ("terms", "reason"),
    [
        (build_terms(TermsKind.PAY_IN_FULL, Money.of(100_00, "USD"), [DUE]), Reason.CURRENCY_MISMATCH),
        (build_terms(TermsKind.PAY_IN_FULL, eur(99_99), [DUE]), Reason.PRINCIPAL_MISMATCH),
        (in_full("2024-12-31"), Reason.INVALID_TERMS),
        (in_full("2025-02-02"), Reason.INVALID_TERMS),
        (build_terms(TermsKind.DEFERRAL, eur(100_00), [DUE]), Reason.INVALID_TERMS),
        (build_terms(TermsKind.INSTALMENT_PLAN, eur(100_00), [D("2024-12-15"), DUE]), Reason.INVALID_TERMS),
        (
            raw_terms(TermsKind.SETTLEMENT, [("2025-02-01", 100_00)], (reduction(1),)),
            Reason.INVALID_TERMS,
        ),
        (replace(in_full("2025-02-01"), hardship_programme_id="NOPE"), Reason.INVALID_TERMS),
    ],
)
def test_validate_against_bill_reasons(terms: Terms, reason: Reason) -> None:
    assert reason_of(lambda: validate_against_bill(terms, BILL)) is reason


def test_validate_against_bill_accepts_each_kind() -> None:
    for terms in (
        in_full("2025-01-01"),
        in_full("2025-02-01"),
        build_terms(TermsKind.DEFERRAL, eur(100_00), [D("2025-02-02")]),
        build_terms(TermsKind.SETTLEMENT, eur(100_00), [DUE], [reduction(30_00)]),
        replace(in_full("2025-02-01"), hardship_programme_id="OPEN"),
    ):
        validate_against_bill(terms, BILL)


# --- BillFacts validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason", "where"),
    [
        (lambda: replace(BILL, bill_id=""), Reason.INVALID_TERMS, "bill_id"),
        (lambda: replace(BILL, account_id="a" * (MAX_ID_CHARS + 1)), Reason.INVALID_TERMS, "account_id"),
        (lambda: replace(BILL, description="d" * (MAX_TEXT_CHARS + 1)), Reason.INVALID_TERMS, "description"),
        (lambda: replace(BILL, amount_due=eur(0)), Reason.AMOUNT_OUT_OF_RANGE, "amount_due"),
        (lambda: replace(BILL, due_date=ISSUE - timedelta(days=1)), Reason.INVALID_TERMS, "due_date"),
        (
            lambda: with_options(deferral=DeferralOption(5, Money.of(1, "USD"))),
            Reason.CURRENCY_MISMATCH,
            "options.deferral.fee",
        ),
        (lambda: with_options(deferral=DeferralOption(-1)), Reason.INVALID_TERMS, "options.deferral.max_days"),
        (lambda: with_options(instalments=InstalmentOption(1, eur(1), 0, 31, 0)), Reason.INVALID_TERMS, "max_count"),
        (
            lambda: with_options(instalments=InstalmentOption(3, eur(1), 32, 31, 0)),
            Reason.INVALID_TERMS,
            "max_interval_days",
        ),
        (
            lambda: with_options(early_payment=EarlyPaymentDiscount(DUE + timedelta(days=1), eur(1))),
            Reason.INVALID_TERMS,
            "pay_by_date",
        ),
        (
            lambda: with_options(early_payment=EarlyPaymentDiscount(DUE, eur(100_00))),
            Reason.AMOUNT_OUT_OF_RANGE,
            "discount",
        ),
        (lambda: with_options(hardship_programmes=(HP_OPEN, HP_OPEN)), Reason.INVALID_TERMS, "repeated"),
        (
            lambda: with_options(hardship_programmes=(replace(HP_OPEN, programme_id=""),)),
            Reason.INVALID_TERMS,
            "programme_id",
        ),
        (
            lambda: with_options(hardship_programmes=(replace(HP_STRICT, min_instalment_amount=Money.of(5, "GBP")),)),
            Reason.CURRENCY_MISMATCH,
            "hardship_programmes[0].min_instalment_amount",
        ),
        (
            lambda: with_options(hardship_programmes=(replace(HP_OPEN, max_interval_days=2**32),)),
            Reason.INVALID_TERMS,
            "hardship_programmes[0].max_interval_days",
        ),
    ],
)
def test_bill_facts_validation(make: Callable[[], BillFacts], reason: Reason, where: str) -> None:
    assert reason_of(make) is reason
    assert where in detail_of(make)


@pytest.mark.parametrize(
    ("edit", "reason", "where"),
    [
        (lambda pb: pb.ClearField("amount_due"), Reason.UNKNOWN_CURRENCY, "amount_due"),
        (lambda pb: setattr(pb, "issue_date", "2025-1-1"), Reason.INVALID_DATE, "issue_date"),
        (
            lambda pb: setattr(pb.options.deferral.fee, "currency_code", "XAU"),
            Reason.UNKNOWN_CURRENCY,
            "options: deferral: fee",
        ),
        (
            lambda pb: setattr(pb.options.instalments, "max_count", 1),
            Reason.INVALID_TERMS,
            "options.instalments.max_count",
        ),
    ],
)
def test_bill_from_proto_rejects(edit: Callable[[bill_pb2.Bill], object], reason: Reason, where: str) -> None:
    pb = BILL.to_proto()
    edit(pb)
    assert reason_of(lambda: BillFacts.from_proto(pb)) is reason
    assert detail_of(lambda: BillFacts.from_proto(pb)).startswith(where)


# --- within_options (NEG-12) ------------------------------------------------------------------


def deferral(day: date, *lines: Line, programme: str = "") -> Terms:
    return build_terms(TermsKind.DEFERRAL, eur(100_00), [day], lines, programme)


def plan(dates: tuple[date, ...], *lines: Line, programme: str = "") -> Terms:
    return build_terms(TermsKind.INSTALMENT_PLAN, eur(100_00), dates, lines, programme)


def inside(terms: Terms, bill: BillFacts = BILL, *, disclosed: bool = False) -> bool:
    return within_options(terms, bill, hardship_disclosed=disclosed)


MONTHLY = monthly_dates(D("2025-02-15"), 5)  # first 14 days after due; intervals 28, 31, 30, 31 days


def test_pay_in_full_inside_options() -> None:
    assert inside(in_full("2025-02-01"))
    assert inside(in_full("2025-01-15", discount(2_00)))
    assert not inside(in_full("2025-01-16", discount(2_00)))
    assert not inside(in_full("2025-01-15", discount(2_01)))
    assert not inside(in_full("2025-01-15", discount(1_99)))
    assert not inside(in_full("2025-01-15", discount(1_00), discount(1_00)))
    assert not inside(in_full("2025-01-15", discount(2_00)), with_options(early_payment=None))
    assert not inside(in_full("2025-01-15", fee(1)))


def test_deferral_inside_options() -> None:
    limit = DUE + timedelta(days=30)
    assert inside(deferral(limit, fee(5_00)))
    assert not inside(deferral(limit + timedelta(days=1), fee(5_00)))
    assert not inside(deferral(limit, fee(5_01)))
    assert not inside(deferral(limit, fee(4_99)))
    assert not inside(deferral(limit))
    assert not inside(deferral(limit, fee(5_00)), with_options(deferral=None))
    free = with_options(deferral=DeferralOption(30, eur(0)))
    assert inside(deferral(limit), free)
    assert not inside(deferral(limit, fee(1)), free)
    assert inside(deferral(limit), with_options(deferral=DeferralOption(30)))


def test_deferral_under_hardship_programmes() -> None:
    limit = DUE + timedelta(days=90)
    assert inside(deferral(limit, programme="HP1"), disclosed=True)
    assert not inside(deferral(limit, programme="HP1"), disclosed=False)
    assert not inside(deferral(limit + timedelta(days=1), programme="HP1"), disclosed=True)
    assert not inside(deferral(limit, fee(5_00), programme="HP1"), disclosed=True)  # fees are waived
    assert inside(deferral(DUE + timedelta(days=60), fee(5_00), programme="OPEN"))
    assert not inside(deferral(DUE + timedelta(days=61), fee(5_00), programme="OPEN"))


def test_instalment_plan_inside_options() -> None:
    assert inside(plan(MONTHLY, fee(3_00)))
    assert not inside(plan(MONTHLY, fee(3_01)))
    assert not inside(plan(MONTHLY))
    assert not inside(plan(MONTHLY, fee(3_00)), with_options(instalments=None))
    assert not inside(plan(monthly_dates(D("2025-02-15"), 6), fee(3_00)))  # 17.17 each, below 20.00


def test_instalment_plan_boundaries() -> None:
    two = plan(every_days(D("2025-02-15"), 2, 28), fee(3_00))  # 51.50 each
    base = BILL.options.instalments
    assert base is not None
    assert inside(two, with_options(instalments=replace(base, min_amount=eur(51_50))))
    assert not inside(two, with_options(instalments=replace(base, min_amount=eur(51_51))))
    assert inside(plan(MONTHLY, fee(3_00)), with_options(instalments=replace(base, max_count=5)))
    assert not inside(plan(MONTHLY, fee(3_00)), with_options(instalments=replace(base, max_count=4)))
    for interval, expected in ((27, False), (28, True), (31, True), (32, False)):
        assert inside(plan(every_days(D("2025-02-15"), 3, interval), fee(3_00))) is expected, interval
    assert not inside(plan(monthly_dates(D("2025-02-16"), 3), fee(3_00)))  # first 15 days after due


def test_instalment_plan_under_hardship_programme() -> None:
    ten = every_days(DUE + timedelta(days=30), 10, 45)  # 10.00 each, fees waived
    assert inside(plan(ten, programme="HP1"), disclosed=True)
    assert not inside(plan(ten, programme="HP1"))
    assert not inside(plan(every_days(DUE + timedelta(days=30), 10, 46), programme="HP1"), disclosed=True)
    assert not inside(plan(every_days(DUE + timedelta(days=31), 10, 45), programme="HP1"), disclosed=True)
    assert inside(plan(every_days(DUE + timedelta(days=30), 12, 28), programme="HP1"), disclosed=True)
    assert not inside(plan(every_days(DUE + timedelta(days=30), 13, 28), programme="HP1"), disclosed=True)
    for minimum, expected in ((10_00, True), (10_01, False)):
        strict = replace(HP_STRICT, min_instalment_amount=eur(minimum))
        assert (
            inside(plan(ten, programme="HP1"), with_options(hardship_programmes=(strict,)), disclosed=True) is expected
        )
    assert not inside(plan(MONTHLY, fee(3_00), programme="OPEN"))  # max_instalments 0: no plan


def test_settlement_and_invalid_terms_are_never_inside() -> None:
    assert not inside(build_terms(TermsKind.SETTLEMENT, eur(100_00), [DUE], [reduction(1)]))
    assert not inside(build_terms(TermsKind.PAY_IN_FULL, eur(99_99), [DUE]))
    assert not inside(raw_terms(TermsKind.INSTALMENT_PLAN, PLAN, (fee(3_00),), total=103_01))
