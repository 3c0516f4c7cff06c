"""The reference consumer: household profiles from TOML, the cash-flow model and the strategy.

Households are small and realistic; every expected number is worked out by hand in the
comment beside it. Balances are signed minor units of EUR.
"""

from __future__ import annotations

import calendar
import copy
from collections.abc import Sequence
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.consumer.mandate import Mandate
from agent.protocol.answers import AcceptOffer, CounterOffer, Escalate, RejectOffer
from agent.protocol.terms import (
    AdvertisedOptions,
    BillFacts,
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
    monthly_dates,
    validate_against_bill,
    validate_terms,
    within_options,
)
from parley.v1 import negotiation_pb2
from reference_consumer import profile as profile_module
from reference_consumer.profile import (
    BillerPreference,
    Expense,
    Income,
    Profile,
    ProfileError,
    load_profile,
    parse_profile,
)
from reference_consumer.strategy import (
    CashFlow,
    Step,
    StrategyError,
    choose_opening,
    needs_disclosure,
    plan_budget,
    plan_opening,
    prioritise,
    respond,
)
from tests.fixtures import BILL

TODAY = date(2026, 3, 5)
SAMPLE = Path(profile_module.__file__).with_name("sample.toml")


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


def cents(text: str) -> int:
    """Signed minor units of EUR, as the cash-flow model counts them: "-1.50" is -150."""
    return -eur(text[1:]).minor if text.startswith("-") else eur(text).minor


def household(
    balance: str,
    *,
    buffer: str = "200.00",
    income: str = "2100.00",
    pay_day: int = 25,
    expenses: Sequence[tuple[str, str, int]] = (("rent", "950.00", 1),),
    max_fee: str = "10.00",
    max_instalments: int = 6,
    max_total_over_bill: str = "15.00",
    latest_date: date | None = None,
    billers: Sequence[tuple[str, int]] = (),
    hardship: bool = False,
) -> Profile:
    return Profile(
        party_id="consumer:household-1",
        currency="EUR",
        balance=eur(balance),
        buffer=eur(buffer),
        income=Income(eur(income), pay_day),
        expenses=tuple(Expense(name, eur(amount), day) for name, amount, day in expenses),
        mandate=Mandate(eur(max_fee), max_instalments, eur(max_total_over_bill), latest_date),
        billers=tuple(BillerPreference(biller, priority) for biller, priority in billers),
        hardship=hardship,
    )


def naive_balances(profile: Profile, today: date, through: date, payments: Sequence[Instalment]) -> dict[date, int]:
    """Day-by-day end-of-day balances, computed the slow obvious way (a reference for CashFlow)."""

    def falls_on(day_of_month: int, day: date) -> bool:
        return day.day == min(day_of_month, calendar.monthrange(day.year, day.month)[1])

    balances, running, day = {}, profile.balance.minor, today
    while day <= through:
        if falls_on(profile.income.pay_day, day):
            running += profile.income.amount.minor
        running -= sum(e.amount.minor for e in profile.expenses if falls_on(e.day, day))
        running -= sum(p.amount.minor for p in payments if p.due_date == day)
        balances[day] = running
        day += timedelta(days=1)
    return balances


# --- profiles ----------------------------------------------------------------------------------


SAMPLE_DOCUMENT: dict[str, Any] = {
    "household": {"party_id": "consumer:household-1", "currency": "EUR", "balance": "850.00", "buffer": "200.00"},
    "income": {"amount": "2100.00", "pay_day": 25},
    "expenses": [{"name": "rent", "amount": "950.00", "day": 1}, {"name": "phone", "amount": "20.00", "day": 10}],
    "mandate": {"max_fee": "10.00", "max_instalments": 6, "latest_date": "2026-12-31", "max_total_over_bill": "15.00"},
    "billers": {"biller:energy.example": {"priority": 1}, "biller:telco.example": {"priority": 2}},
}


def test_sample_profile_loads() -> None:
    profile = load_profile(SAMPLE)
    assert profile.party_id == "consumer:household-1"
    assert profile.balance == eur("850.00")
    assert profile.buffer == eur("200.00")
    assert profile.income == Income(eur("2100.00"), 25)
    assert profile.expenses[0] == Expense("rent", eur("950.00"), 1)
    assert profile.mandate == Mandate(eur("10.00"), 6, eur("15.00"), date(2026, 12, 31))
    assert profile.priority_of("biller:energy.example") == 1
    assert profile.priority_of("biller:telco.example") == 2
    assert profile.priority_of("biller:unknown.example") is None
    assert profile.hardship is False


def test_parse_profile_reads_every_key() -> None:
    document = copy.deepcopy(SAMPLE_DOCUMENT)
    document["household"]["hardship"] = True
    profile = parse_profile(document)
    assert profile.hardship is True
    assert profile.expenses == (Expense("rent", eur("950.00"), 1), Expense("phone", eur("20.00"), 10))
    assert profile.mandate.latest_date == date(2026, 12, 31)
    assert profile.billers == (
        BillerPreference("biller:energy.example", 1),
        BillerPreference("biller:telco.example", 2),
    )


def test_optional_sections_default() -> None:
    document = copy.deepcopy(SAMPLE_DOCUMENT)
    del document["expenses"], document["billers"], document["mandate"]["latest_date"]
    profile = parse_profile(document)
    assert profile.expenses == ()
    assert profile.billers == ()
    assert profile.mandate.latest_date is None


def test_amounts_in_a_currency_without_decimals() -> None:
    document = copy.deepcopy(SAMPLE_DOCUMENT)
    document["household"]["currency"] = "JPY"
    for section, key, value in [
        ("household", "balance", "85000"),
        ("household", "buffer", "20000"),
        ("income", "amount", "210000"),
        ("mandate", "max_fee", "1000"),
        ("mandate", "max_total_over_bill", "1500"),
    ]:
        document[section][key] = value
    document["expenses"] = [{"name": "rent", "amount": "95000", "day": 1}]
    profile = parse_profile(document)
    assert profile.balance == Money.of(85000, "JPY")


def _with(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    """The sample document with the key at `path` set to `value` (or deleted, for ...)."""
    document = copy.deepcopy(SAMPLE_DOCUMENT)
    parent: Any = document
    for step in path[:-1]:
        parent = parent[step]
    if value is ...:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("mandate", "max_fee"), "ten", 'mandate.max_fee: "ten" is not an amount in EUR'),
        (("mandate", "max_fee"), "10.001", 'mandate.max_fee: "10.001" is not an amount in EUR'),
        (("mandate", "max_fee"), "-1.00", 'mandate.max_fee: "-1.00" is not an amount in EUR'),
        (
            ("household", "balance"),
            850.0,
            "household.balance: 850.0 is a TOML number, which can round: write the amount in EUR as quoted decimal "
            'text, e.g. "850.00"',
        ),
        (
            ("household", "balance"),
            850,
            'household.balance: 850 is a TOML number: write the amount in EUR as quoted decimal text, e.g. "850.00"',
        ),
        (("household", "currency"), "EURO", 'household.currency: "EURO" is not an ISO 4217 currency code'),
        (("household", "party_id"), "household 1", 'household.party_id: "household 1" is not a party id'),
        (("household", "hardship"), "yes", 'household.hardship: expected true or false, got "yes"'),
        (("household", "buffer"), ..., "household.buffer: missing"),
        (("household", "balanse"), "1.00", "household.balanse: unknown key"),
        (("income", "pay_day"), 32, "income.pay_day: expected a whole number 1..31, got 32"),
        (("income", "pay_day"), True, "income.pay_day: expected a whole number 1..31, got true"),
        (("income", "amount"), ..., "income.amount: missing"),
        (("expenses", 1, "day"), ..., "expenses[1].day: missing"),
        (("expenses", 0, "amount"), "9,50", 'expenses[0].amount: "9,50" is not an amount in EUR'),
        (("expenses", 0, "every"), "month", "expenses[0].every: unknown key"),
        (("expenses", 0, "name"), "", 'expenses[0].name: expected a non-empty string, got ""'),
        (("expenses",), {"name": "rent"}, "expenses: expected an array of tables ([[expenses]])"),
        (("mandate", "max_fees"), "10.00", "mandate.max_fees: unknown key"),
        (("mandate", "max_instalments"), -1, "mandate.max_instalments: expected a whole number at least 0, got -1"),
        (("mandate", "latest_date"), "2026-02-30", 'mandate.latest_date: "2026-02-30" is not a date YYYY-MM-DD'),
        (("mandate",), ..., "mandate: missing"),
        (("billers", "biller:energy.example", "priorty"), 1, 'billers."biller:energy.example".priorty: unknown key'),
        (("billers", "biller:energy.example", "priority"), "1", 'billers."biller:energy.example".priority: expected'),
        (("billers", "not a party"), {"priority": 3}, 'billers."not a party": "not a party" is not a party id'),
        (("billers", "biller:x"), 3, 'billers."biller:x": expected a table, got 3'),
        (("payday",), 25, "payday: unknown key"),
    ],
)
def test_profile_errors_name_the_key(path: tuple[str | int, ...], value: object, message: str) -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile(_with(path, value))
    assert str(info.value).startswith(message)
    assert info.value.key == message.split(": ", maxsplit=1)[0]


def test_load_profile_reads_toml_dates_and_refuses_bad_toml(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    assert "latest_date = 2026-12-31" in text  # a TOML date, not a string
    good = tmp_path / "good.toml"
    good.write_text(text.replace("latest_date = 2026-12-31", 'latest_date = "2027-01-31"'))
    assert load_profile(good).mandate.latest_date == date(2027, 1, 31)
    bad = tmp_path / "bad.toml"
    bad.write_text("[household\nparty_id = 1\n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text(text.replace("max_fee =", "max_fees ="))
    with pytest.raises(ProfileError, match=r"^mandate\.max_fees: unknown key \(did you mean max_fee\?\)$"):
        load_profile(typo)


# --- the cash-flow model -----------------------------------------------------------------------


def test_balance_on_adds_pay_days_and_subtracts_expenses_and_commitments() -> None:
    profile = household("850.00", expenses=(("rent", "950.00", 1), ("phone", "20.00", 31)))
    flow = CashFlow(profile, TODAY)
    committed = [Instalment(date(2026, 3, 20), eur("100.00")), Instalment(date(2026, 3, 1), eur("999.00"))]
    assert flow.balance_on(TODAY) == cents("850.00")
    assert flow.balance_on(date(2026, 3, 20), committed) == cents("750.00")  # the 03-01 payment is in the past
    assert flow.balance_on(date(2026, 3, 25), committed) == cents("2850.00")  # + pay
    assert flow.balance_on(date(2026, 3, 31), committed) == cents("2830.00")  # - phone on the 31st
    assert flow.balance_on(date(2026, 4, 1), committed) == cents("1880.00")  # - rent
    assert flow.balance_on(date(2026, 4, 30), committed) == cents("3960.00")  # + pay, - phone on the 30th
    with pytest.raises(ValueError, match="outside the projection"):
        flow.balance_on(date(2026, 3, 4))


def test_pay_day_31_is_the_last_day_of_each_month() -> None:
    profile = household("0.00", pay_day=31, expenses=())
    flow = CashFlow(profile, date(2026, 2, 1))
    assert flow.balance_on(date(2026, 2, 27)) == 0
    assert flow.balance_on(date(2026, 2, 28)) == cents("2100.00")
    assert flow.balance_on(date(2026, 3, 30)) == cents("2100.00")
    assert flow.balance_on(date(2026, 3, 31)) == cents("4200.00")
    assert flow.balance_on(date(2026, 4, 30)) == cents("6300.00")


def test_projection_judges_from_the_first_payment_through_a_month_after_the_last() -> None:
    # Overdrawn on 03-10 before pay day whatever happens; a payment after pay day is still fine.
    profile = household("300.00", expenses=(("rent", "950.00", 1), ("insurance", "400.00", 10)))
    flow = CashFlow(profile, TODAY)
    after_pay = flow.project([Instalment(date(2026, 3, 26), eur("300.00"))])
    assert after_pay.affordable
    assert (after_pay.since, after_pay.through) == (date(2026, 3, 26), date(2026, 4, 26))
    # 03-26: 300 - 400 + 2100 - 300 = 1700; 04-01: 750; 04-10: 350; 04-25: 2450
    assert (after_pay.lowest, after_pay.lowest_on) == (cents("350.00"), date(2026, 4, 10))
    too_much = flow.project([Instalment(date(2026, 3, 26), eur("500.00"))])
    assert not too_much.affordable
    assert (too_much.lowest, too_much.lowest_on) == (cents("150.00"), date(2026, 4, 10))
    before = flow.project([Instalment(date(2026, 3, 6), eur("10.00"))])
    assert not before.affordable
    assert (before.lowest, before.lowest_on) == (cents("-110.00"), date(2026, 3, 10))
    assert not flow.project([Instalment(date(2026, 3, 4), eur("1.00"))]).affordable  # in the past


# --- openings ----------------------------------------------------------------------------------


def test_rich_household_takes_the_early_payment_discount_today() -> None:
    opening = plan_opening(BILL, household("2000.00"), TODAY)
    assert opening.step is Step.EARLY_PAYMENT
    assert opening.affordable
    assert not opening.violations
    terms = opening.terms
    assert terms.kind is TermsKind.PAY_IN_FULL
    assert terms.lines == (Line(LineKind.DISCOUNT, "Early payment discount", eur("3.00")),)
    assert terms.total == eur("117.00")
    assert terms.schedule == (Instalment(TODAY, eur("117.00")),)
    assert within_options(terms, BILL, hardship_disclosed=False)
    assert choose_opening(BILL, household("2000.00"), TODAY) == terms


def test_early_payment_waits_for_the_earliest_affordable_day() -> None:
    # 250 now; 1000 more arrives on pay day the 12th: the discount (by 03-15) is affordable from 03-12.
    profile = household("250.00", pay_day=12, income="1000.00", expenses=())
    terms = choose_opening(BILL, profile, TODAY)
    assert terms.schedule == (Instalment(date(2026, 3, 12), eur("117.00")),)


def test_pays_on_the_due_date_when_the_discount_is_unaffordable() -> None:
    # 250 until pay day (250 - 117 < 200); on 03-31: 250 + 2100 - 120 = 2230, 04-01: 1280.
    opening = plan_opening(BILL, household("250.00"), TODAY)
    assert opening.step is Step.ON_TIME
    assert opening.terms == build_terms(TermsKind.PAY_IN_FULL, eur("120.00"), [date(2026, 3, 31)])
    assert opening.projection.lowest == cents("1280.00")
    assert within_options(opening.terms, BILL, hardship_disclosed=False)


def short_until_pay_day(**kwargs: Any) -> Profile:
    """1200 now, rent 950 tomorrow (250 left), paid 2100 on the 3rd: nothing spare before 04-03."""
    return household("1200.00", pay_day=3, expenses=(("rent", "950.00", 6),), **kwargs)


def test_defers_to_the_day_after_pay_day_when_short_now() -> None:
    opening = plan_opening(BILL, short_until_pay_day(), TODAY)
    assert opening.step is Step.DEFERRAL
    assert opening.terms == build_terms(
        TermsKind.DEFERRAL, eur("120.00"), [date(2026, 4, 4)], [Line(LineKind.FEE, "Deferral fee", eur("5.00"))]
    )
    assert opening.affordable
    assert within_options(opening.terms, BILL, hardship_disclosed=False)


def test_hardship_claims_the_programme_and_needs_a_disclosure() -> None:
    opening = plan_opening(BILL, short_until_pay_day(hardship=True), TODAY)
    assert opening.step is Step.DEFERRAL
    terms = opening.terms
    assert terms.hardship_programme_id == "hardship-12"
    assert terms.lines == ()  # the programme waives the fee: cheaper than the plain deferral
    assert terms.schedule == (Instalment(date(2026, 4, 4), eur("120.00")),)
    assert opening.needs_disclosure
    assert needs_disclosure(terms, BILL)
    assert within_options(terms, BILL, hardship_disclosed=True)
    assert not within_options(terms, BILL, hardship_disclosed=False)


def test_hardship_is_not_disclosed_when_the_household_can_pay() -> None:
    opening = plan_opening(BILL, household("2000.00", hardship=True), TODAY)
    assert opening.step is Step.EARLY_PAYMENT
    assert opening.terms.hardship_programme_id == ""
    assert not opening.needs_disclosure


def large_bill(amount: str, *, max_count: int, max_first_delay_days: int) -> BillFacts:
    return BillFacts(
        bill_id="bill-big",
        account_id="acct-7",
        amount_due=eur(amount),
        issue_date=date(2026, 3, 1),
        due_date=date(2026, 3, 31),
        description="Annual heating",
        options=AdvertisedOptions(
            deferral=DeferralOption(max_days=30, fee=eur("10.00")),
            instalments=InstalmentOption(
                max_count=max_count,
                min_amount=eur("100.00"),
                min_interval_days=14,
                max_interval_days=35,
                max_first_delay_days=max_first_delay_days,
            ),
        ),
    )


def saving_300_a_month() -> Profile:
    """400 now; paid 2000 on the 25th; 700 groceries on the 26th, rent 1000 on the 1st: +300 a month.

    Before any bill: 03-25 2400, 03-26 1700, 04-01 700, 04-25 2700, 04-26 2000, 05-01 1000,
    05-26 2300, 06-01 1300, 06-26 2600, 07-01 1600, 07-26 2900, 08-01 1900, 08-26 3200, 09-01 2200.
    """
    return household("400.00", income="2000.00", expenses=(("rent", "1000.00", 1), ("groceries", "700.00", 26)))


def test_instalment_plan_when_the_bill_is_large() -> None:
    # 2 x 600 from 04-26 leaves 100 on 06-01; 3 x 400 from 03-26 leaves 100 on 06-01;
    # 3 x 400 from 04-26 keeps at least 400 (07-01) through 07-26.
    bill = large_bill("1200.00", max_count=6, max_first_delay_days=30)
    opening = plan_opening(bill, saving_300_a_month(), TODAY)
    assert opening.step is Step.INSTALMENTS
    assert opening.terms == build_terms(TermsKind.INSTALMENT_PLAN, eur("1200.00"), monthly_dates(date(2026, 4, 26), 3))
    assert opening.projection.lowest == cents("400.00")
    assert within_options(opening.terms, bill, hardship_disclosed=False)


def test_opens_outside_the_options_when_the_advertised_plan_breaks_the_buffer() -> None:
    # At most 3 instalments: 3 x 600 from 05-26 leaves 100 on 08-01. 4 x 450 from 05-26 keeps
    # at least 400 (09-01); from 03-26 or 04-26 it would not.
    bill = large_bill("1800.00", max_count=3, max_first_delay_days=60)
    opening = plan_opening(bill, saving_300_a_month(), TODAY)
    assert opening.step is Step.OUTSIDE_OPTIONS
    assert opening.affordable
    assert not opening.violations
    assert opening.terms == build_terms(TermsKind.INSTALMENT_PLAN, eur("1800.00"), monthly_dates(date(2026, 5, 26), 4))
    assert not within_options(opening.terms, bill, hardship_disclosed=False)


def test_an_affordable_opening_outside_the_mandate_is_flagged_for_the_user() -> None:
    bill = large_bill("1800.00", max_count=3, max_first_delay_days=60)
    opening = plan_opening(bill, replace(saving_300_a_month(), mandate=Mandate(eur("0"), 3, eur("0"))), TODAY)
    assert opening.affordable
    assert opening.violations == ("4 instalments exceed your limit of 3",)


def test_when_nothing_is_affordable_the_gentlest_opening_inside_the_mandate_is_returned() -> None:
    profile = household("100.00", income="900.00")  # rent 950 of 900 pay: sinking, never above the buffer
    opening = plan_opening(BILL, profile, TODAY)
    assert not opening.affordable
    assert not opening.violations
    # As many instalments as the mandate allows (6 x 20), from the day after the third pay day.
    assert opening.terms == build_terms(TermsKind.INSTALMENT_PLAN, eur("120.00"), monthly_dates(date(2026, 5, 26), 6))
    assert opening.step is Step.OUTSIDE_OPTIONS  # the first instalment is 56 days after the due date


def test_a_bill_in_another_currency_is_refused() -> None:
    bill = replace(BILL, amount_due=Money.parse("120.00", "USD"), options=AdvertisedOptions())
    with pytest.raises(StrategyError, match="USD"):
        choose_opening(bill, household("2000.00"), TODAY)


# --- answering the biller ----------------------------------------------------------------------

BIG = large_bill("1800.00", max_count=3, max_first_delay_days=60)
MY_SIX = build_terms(TermsKind.INSTALMENT_PLAN, eur("1800.00"), monthly_dates(date(2026, 5, 26), 6))


def plan(count: int, first: date, fee: str | None = None) -> Terms:
    lines = [Line(LineKind.FEE, "Plan fee", eur(fee))] if fee else []
    return build_terms(TermsKind.INSTALMENT_PLAN, eur("1800.00"), monthly_dates(first, count), lines)


def test_accepts_an_affordable_counter_offer_inside_the_mandate() -> None:
    theirs = plan(5, date(2026, 5, 26), fee="5.00")  # 361 a month keeps at least 575
    answer = respond(BIG, theirs, MY_SIX, saving_300_a_month(), TODAY, rounds_left=2)
    assert answer == AcceptOffer()


def test_escalates_an_affordable_offer_whose_fee_exceeds_the_mandate() -> None:
    theirs = plan(5, date(2026, 5, 26), fee="12.00")
    answer = respond(BIG, theirs, MY_SIX, saving_300_a_month(), TODAY, rounds_left=2)
    assert answer == Escalate("fee EUR 12.00 exceeds your limit EUR 10.00")


def test_escalation_names_every_limit_broken() -> None:
    theirs = plan(8, date(2026, 5, 26), fee="20.00")  # 227.50 a month: affordable
    profile = replace(saving_300_a_month(), mandate=Mandate(eur("10.00"), 6, eur("15.00"), date(2026, 11, 30)))
    answer = respond(BIG, theirs, MY_SIX, profile, TODAY, rounds_left=2)
    assert answer == Escalate(
        "fee EUR 20.00 exceeds your limit EUR 10.00; 8 instalments exceed your limit of 6; "
        "last payment on 2026-12-26 is after your latest date 2026-11-30; "
        "total EUR 1820.00 is EUR 20.00 over the bill, more than your limit EUR 15.00"
    )


def test_counters_with_a_compromise_midway_between_the_offers() -> None:
    # Theirs: 2 x 900 (unaffordable); mine: 6 instalments. Midway: 4 x 450 from my first date.
    theirs = plan(2, date(2026, 5, 26))
    answer = respond(BIG, theirs, MY_SIX, saving_300_a_month(), TODAY, rounds_left=1)
    assert answer == CounterOffer(plan(4, date(2026, 5, 26)))
    assert isinstance(answer, CounterOffer)
    validate_terms(answer.terms)
    validate_against_bill(answer.terms, BIG)


def test_compromise_moves_toward_my_offer_until_affordable() -> None:
    # Theirs 2, mine 4 (from 04-26): 3 x 600 from 04-26 leaves 1300 - 1800 < 200 on 07-01: back to mine.
    mine = plan(4, date(2026, 4, 26))
    answer = respond(
        BIG,
        plan(2, date(2026, 4, 26)),
        mine,
        replace(saving_300_a_month(), balance=eur("700.00")),
        TODAY,
        rounds_left=1,
    )
    assert answer == CounterOffer(mine)


def test_compromise_on_a_date_between_two_single_payments() -> None:
    # The biller wants it all tomorrow, I offered 04-16: midway (21 of 41 days, rounded toward
    # mine) is 03-27, affordable for a household paid on the 15th.
    profile = household("150.00", pay_day=15)
    mine = build_terms(TermsKind.DEFERRAL, eur("120.00"), [date(2026, 4, 16)])
    theirs = build_terms(TermsKind.PAY_IN_FULL, eur("120.00"), [date(2026, 3, 6)])
    answer = respond(BILL, theirs, mine, profile, TODAY, rounds_left=3)
    assert answer == CounterOffer(build_terms(TermsKind.PAY_IN_FULL, eur("120.00"), [date(2026, 3, 27)]))


def test_rejects_when_no_rounds_are_left() -> None:
    theirs = plan(2, date(2026, 5, 26))
    answer = respond(BIG, theirs, MY_SIX, saving_300_a_month(), TODAY, rounds_left=0)
    assert answer == RejectOffer(
        negotiation_pb2.REJECT_REASON_UNAFFORDABLE, "These terms are not affordable for this household."
    )
    assert isinstance(answer, RejectOffer)
    assert answer.reason == negotiation_pb2.REJECT_REASON_UNAFFORDABLE


def test_rejects_terms_that_do_not_match_the_bill() -> None:
    wrong = build_terms(TermsKind.PAY_IN_FULL, eur("100.00"), [date(2026, 3, 31)])
    answer = respond(BIG, wrong, MY_SIX, saving_300_a_month(), TODAY, rounds_left=3)
    assert isinstance(answer, RejectOffer)
    assert answer.reason == negotiation_pb2.REJECT_REASON_OTHER
    assert "principal" in answer.note


def test_the_mandate_has_no_violation_inside_the_limits() -> None:
    assert household("0.00").mandate.violations(plan(6, date(2026, 5, 26), fee="10.00"), BIG) == []


# --- several billers, one budget -----------------------------------------------------------------

ENERGY, TELCO = "biller:energy.example", "biller:telco.example"


def simple_bill(bill_id: str, amount: str, due: date) -> BillFacts:
    return BillFacts(
        bill_id=bill_id,
        account_id="acct-1",
        amount_due=eur(amount),
        issue_date=date(2026, 3, 1),
        due_date=due,
        description=bill_id,
        options=AdvertisedOptions(deferral=DeferralOption(max_days=30)),
    )


ENERGY_BILL = simple_bill("energy-03", "800.00", date(2026, 3, 20))
TELCO_BILL = simple_bill("telco-03", "700.00", date(2026, 3, 18))


def test_shared_budget_pays_the_priority_biller_first_and_keeps_the_buffer() -> None:
    # 1000 until pay day: only one of the two bills (800, 700) fits before it.
    profile = household("1000.00", billers=[(ENERGY, 1), (TELCO, 2)])
    planned = plan_budget([(TELCO, TELCO_BILL), (ENERGY, ENERGY_BILL)], profile, TODAY)
    assert [p.biller_id for p in planned] == [ENERGY, TELCO]  # priority beats the earlier due date
    energy, telco = (p.opening for p in planned)
    assert energy.step is Step.ON_TIME
    assert energy.terms.schedule == (Instalment(date(2026, 3, 20), eur("800.00")),)
    assert telco.step is Step.DEFERRAL
    assert telco.terms.schedule == (Instalment(date(2026, 3, 26), eur("700.00")),)
    schedules = [*energy.terms.schedule, *telco.terms.schedule]
    for day, balance in naive_balances(profile, TODAY, date(2026, 6, 30), schedules).items():
        assert balance >= cents("200.00"), day
    assert prioritise([(TELCO, TELCO_BILL), (ENERGY, ENERGY_BILL)], profile, TODAY) == [
        (ENERGY_BILL, energy.terms),
        (TELCO_BILL, telco.terms),
    ]


def test_shared_budget_follows_the_profile_when_priorities_change() -> None:
    profile = household("1000.00", billers=[(ENERGY, 2), (TELCO, 1)])
    decided = prioritise([(ENERGY, ENERGY_BILL), (TELCO, TELCO_BILL)], profile, TODAY)
    assert [(bill.bill_id, terms.kind) for bill, terms in decided] == [
        ("telco-03", TermsKind.PAY_IN_FULL),
        ("energy-03", TermsKind.DEFERRAL),
    ]


def test_unranked_billers_come_last_then_by_due_date() -> None:
    profile = household("5000.00", billers=[(TELCO, 1)])
    later = simple_bill("energy-04", "10.00", date(2026, 4, 20))
    decided = prioritise([(ENERGY, later), (ENERGY, ENERGY_BILL), (TELCO, TELCO_BILL)], profile, TODAY)
    assert [bill.bill_id for bill, _ in decided] == ["telco-03", "energy-03", "energy-04"]


# --- properties ----------------------------------------------------------------------------------


def money(low: int, high: int) -> st.SearchStrategy[Money]:
    return st.integers(low, high).map(lambda minor: Money.of(minor, "EUR"))


@st.composite
def profiles(draw: st.DrawFn, today: date) -> Profile:
    expenses = draw(
        st.lists(st.tuples(money(0, 150_000), st.integers(1, 31)), max_size=3).map(
            lambda items: tuple(Expense(f"expense-{i}", amount, day) for i, (amount, day) in enumerate(items))
        )
    )
    latest = draw(st.none() | st.integers(0, 700).map(lambda days: today + timedelta(days=days)))
    return Profile(
        party_id="consumer:p",
        currency="EUR",
        balance=draw(money(0, 500_000)),
        buffer=draw(money(0, 50_000)),
        income=Income(draw(money(0, 400_000)), draw(st.integers(1, 31))),
        expenses=expenses,
        mandate=Mandate(draw(money(0, 3_000)), draw(st.integers(0, 12)), draw(money(0, 3_000)), latest),
        hardship=draw(st.booleans()),
    )


@st.composite
def bills(draw: st.DrawFn, today: date) -> BillFacts:
    amount = draw(st.integers(1, 500_000))
    issue = today - timedelta(days=draw(st.integers(0, 40)))
    due = issue + timedelta(days=draw(st.integers(0, 60)))
    fee = st.none() | money(0, 2_000)
    deferral = draw(st.none() | st.builds(DeferralOption, st.integers(0, 90), fee))
    instalments = None
    if draw(st.booleans()):
        low = draw(st.integers(0, 31))
        instalments = InstalmentOption(
            max_count=draw(st.integers(2, 12)),
            min_amount=draw(money(0, amount)),
            min_interval_days=low,
            max_interval_days=draw(st.integers(low, 62)),
            max_first_delay_days=draw(st.integers(0, 90)),
            fee=draw(fee),
        )
    early = None
    if amount >= 2 and draw(st.booleans()):
        pay_by = issue + timedelta(days=draw(st.integers(0, (due - issue).days)))
        early = EarlyPaymentDiscount(pay_by, draw(money(1, amount - 1)))
    programmes: tuple[HardshipProgramme, ...] = ()
    if draw(st.booleans()):
        programmes = (
            HardshipProgramme(
                programme_id="hardship",
                description="",
                fees_waived=draw(st.booleans()),
                max_deferral_days=draw(st.integers(0, 120)),
                max_instalments=draw(st.integers(0, 24)),
                min_instalment_amount=draw(st.none() | money(0, amount)),
                max_interval_days=draw(st.integers(0, 62)),
                max_first_delay_days=draw(st.integers(0, 120)),
                requires_disclosure=draw(st.booleans()),
            ),
        )
    return BillFacts(
        bill_id="b",
        account_id="a",
        amount_due=Money.of(amount, "EUR"),
        issue_date=issue,
        due_date=due,
        description="",
        options=AdvertisedOptions(deferral, instalments, early, programmes),
    )


@st.composite
def situations(draw: st.DrawFn) -> tuple[Profile, BillFacts, date]:
    today = date(2026, 1, 1) + timedelta(days=draw(st.integers(0, 400)))
    return draw(profiles(today)), draw(bills(today)), today


def check_affordable(profile: Profile, today: date, schedule: Sequence[Instalment], since: date, through: date) -> None:
    balances = naive_balances(profile, today, through, schedule)
    for day in range(0, (through - since).days + 1):
        current = since + timedelta(days=day)
        assert balances[current] >= profile.buffer.minor, current


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(situations())
def test_openings_are_valid_honest_and_affordable_when_claimed(situation: tuple[Profile, BillFacts, date]) -> None:
    profile, bill, today = situation
    opening = plan_opening(bill, profile, today)
    terms = opening.terms
    validate_terms(terms)
    validate_against_bill(terms, bill)
    assert all(p.due_date >= today for p in terms.schedule) or not opening.affordable
    if opening.inside_options:
        assert within_options(terms, bill, hardship_disclosed=opening.needs_disclosure)
    assert opening.needs_disclosure == needs_disclosure(terms, bill)
    assert not terms.hardship_programme_id or profile.hardship
    assert list(opening.violations) == profile.mandate.violations(terms, bill)
    if opening.affordable:
        assert opening.projection.since == terms.schedule[0].due_date
        assert opening.projection.through >= terms.schedule[-1].due_date
        check_affordable(profile, today, terms.schedule, opening.projection.since, opening.projection.through)


@settings(max_examples=15, deadline=None)
@given(situations(), st.lists(st.integers(1, 200_000), min_size=1, max_size=2))
def test_a_shared_budget_never_breaks_the_buffer_it_claims_to_keep(
    situation: tuple[Profile, BillFacts, date], more: list[int]
) -> None:
    profile, first, today = situation
    pairs = [("biller:a", first)] + [
        (
            f"biller:{i}",
            replace(first, bill_id=f"b{i}", amount_due=Money.of(amount, "EUR"), options=AdvertisedOptions()),
        )
        for i, amount in enumerate(more)
    ]
    committed: list[Instalment] = []
    for planned in plan_budget(pairs, profile, today):
        committed.extend(planned.opening.terms.schedule)
        projection = planned.opening.projection
        if planned.opening.affordable:
            check_affordable(profile, today, committed, projection.since, projection.through)


@st.composite
def offers(draw: st.DrawFn, bill: BillFacts, today: date) -> Terms:
    """Valid terms for the bill, as a biller might counter: one payment or a monthly plan, maybe with a fee."""
    start = max(today, bill.issue_date) + timedelta(days=draw(st.integers(0, 60)))
    count = draw(st.integers(1, min(12, bill.amount_due.minor)))
    fee = draw(st.none() | money(1, 2_000))
    if count == 1:
        kind = TermsKind.PAY_IN_FULL if start <= bill.due_date else TermsKind.DEFERRAL
        lines = [] if fee is None or kind is TermsKind.PAY_IN_FULL else [Line(LineKind.FEE, "fee", fee)]
        return build_terms(kind, bill.amount_due, [start], lines)
    lines = [] if fee is None else [Line(LineKind.FEE, "fee", fee)]
    return build_terms(TermsKind.INSTALMENT_PLAN, bill.amount_due, monthly_dates(start, count), lines)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(st.data())
def test_answers_are_consistent_with_affordability_and_the_mandate(data: st.DataObject) -> None:
    profile, bill, today = data.draw(situations())
    mine = choose_opening(bill, profile, today)
    theirs = data.draw(offers(bill, today))
    rounds_left = data.draw(st.integers(0, 3))
    answer = respond(bill, theirs, mine, profile, today, rounds_left=rounds_left)
    flow = CashFlow(profile, today)
    violations = profile.mandate.violations(theirs, bill)
    if isinstance(answer, AcceptOffer):
        assert flow.project(theirs.schedule).affordable
        assert not violations
    elif isinstance(answer, Escalate):
        assert flow.project(theirs.schedule).affordable
        assert answer.reason == "; ".join(violations)
    elif isinstance(answer, CounterOffer):
        assert rounds_left > 0
        assert answer.terms != theirs
        validate_terms(answer.terms)
        validate_against_bill(answer.terms, bill)
        assert profile.mandate.violations(answer.terms, bill) == []
        projection = flow.project(answer.terms.schedule)
        assert projection.affordable
        check_affordable(profile, today, answer.terms.schedule, projection.since, projection.through)
    else:
        assert not flow.project(theirs.schedule).affordable
        assert len(answer.note) <= 200
