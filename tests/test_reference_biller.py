"""The reference biller's TOML configuration and its policy."""

from __future__ import annotations

import tomllib
from datetime import UTC, date, datetime
from typing import Any

import pytest

from agent.biller import AcceptOffer, BillContext, CounterOffer, OfferContext, RejectOffer
from agent.protocol.terms import (
    BillFacts,
    Line,
    LineKind,
    Money,
    Terms,
    TermsKind,
    build_terms,
    monthly_dates,
    within_options,
)
from reference_biller.config import SAMPLE, ConfigError, load_config, parse_config
from reference_biller.policy import SegmentPolicy, settlement_floor

CONFIG = load_config()
POLICY = SegmentPolicy(CONFIG)
EUR = "EUR"
DUE = date(2026, 3, 31)
AMOUNT = Money.parse("120.00", EUR)
BILL = BillFacts(
    "bill-1",
    "acct-1001",
    AMOUNT,
    date(2026, 3, 1),
    DUE,
    "Electricity",
    POLICY.advertise(BillContext("acct-1001", AMOUNT, date(2026, 3, 1), DUE)),
)


def context(offer: Terms, round_: int = 1, max_rounds: int = 4) -> OfferContext:
    return OfferContext(BILL, "acct-1001", offer, round_, max_rounds, (), None, datetime(2026, 3, 5, tzinfo=UTC))


def test_sample_config_advertises_binding_options() -> None:
    options = BILL.options
    assert options.deferral is not None
    assert options.deferral.max_days == 30
    assert options.instalments is not None
    assert options.instalments.max_count == 6
    assert options.early_payment is not None
    assert options.early_payment.pay_by_date == date(2026, 3, 17)
    assert [p.programme_id for p in options.hardship_programmes] == ["hardship-12"]


def test_a_plan_with_too_many_instalments_is_countered_inside_the_options() -> None:
    asked = build_terms(TermsKind.INSTALMENT_PLAN, AMOUNT, monthly_dates(date(2026, 4, 15), 9))
    decision = POLICY.decide(context(asked))
    assert isinstance(decision, CounterOffer)
    assert len(decision.terms.schedule) == 6
    assert within_options(decision.terms, BILL, hardship_disclosed=False)


def test_a_long_deferral_is_countered_with_the_longest_allowed() -> None:
    fee = (Line(LineKind.FEE, "deferral fee", Money.parse("5.00", EUR)),)
    asked = build_terms(TermsKind.DEFERRAL, AMOUNT, [date(2026, 6, 1)], fee)
    decision = POLICY.decide(context(asked))
    assert isinstance(decision, CounterOffer)
    assert decision.terms.schedule[0].due_date == date(2026, 4, 30)
    assert within_options(decision.terms, BILL, hardship_disclosed=False)


def settlement(percent: int) -> Terms:
    paid = Money(AMOUNT.currency, AMOUNT.minor * percent // 100)
    reduction = Line(LineKind.SETTLEMENT_REDUCTION, "reduction", AMOUNT - paid)
    return build_terms(TermsKind.SETTLEMENT, AMOUNT, [DUE], [reduction])


def test_settlement_floor_is_exact_and_rounds_up() -> None:
    assert settlement_floor(Money.parse("100.01", EUR), 90) == Money.parse("90.01", EUR)
    assert isinstance(POLICY.decide(context(settlement(90))), AcceptOffer)
    counter = POLICY.decide(context(settlement(50)))
    assert isinstance(counter, CounterOffer)
    assert counter.terms.total == Money.parse("108.00", EUR)


def test_no_counter_when_no_round_is_left() -> None:
    asked = build_terms(TermsKind.INSTALMENT_PLAN, AMOUNT, monthly_dates(date(2026, 4, 15), 9))
    assert isinstance(POLICY.decide(context(asked, round_=4, max_rounds=4)), RejectOffer)


def sample() -> dict[str, Any]:
    return tomllib.loads(SAMPLE.read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["segments"]["standard"].update(deferal_max_days=3),
            "segments.standard.deferal_max_days: unknown key",
        ),
        (
            lambda d: d["segments"]["standard"].update(deferral_fee="five"),
            "segments.standard.deferral_fee: 'five' is not an amount in EUR",
        ),
        (lambda d: d["segments"]["standard"].update(deferral_fee="5.001"), "segments.standard.deferral_fee"),
        (lambda d: d["biller"].update(currency="XAU"), "biller.currency"),
        (lambda d: d["biller"].pop("party_id"), "biller.party_id: missing"),
        (lambda d: d["accounts"][0].update(segment="gold"), "accounts[0].segment: no segment named 'gold'"),
        (
            lambda d: d["segments"]["standard"].update(instalment_max_count=True),
            "segments.standard.instalment_max_count: expected int",
        ),
        (lambda d: d["reminders"].update(after_due_days=[1, 2]), "reminders.after_due_days"),
    ],
)
def test_invalid_config_names_the_key(change: Any, message: str) -> None:
    data = sample()
    change(data)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_config(data)
