"""The reference biller's TOML configuration and its policy."""

from __future__ import annotations

import re
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
        # Every number has a finite range, checked as the file loads: these crashed every command that loads the
        # file with an OverflowError or "cannot convert float NaN to integer", or were accepted and then broke serve
        # or had every bill refused.
        (
            lambda d: d["payments"].update(settlement_delay_hours=9_999_999_999_999),
            "payments.settlement_delay_hours: expected a whole number of hours from 0 to 8,784 (a year), "
            "got 9999999999999",
        ),
        (
            lambda d: d["simulation"].update(upkeep_interval_seconds=float("inf")),
            "simulation.upkeep_interval_seconds: expected a number of seconds above 0 and at most 86,400",
        ),
        (lambda d: d["simulation"].update(upkeep_interval_seconds=1e300), "upkeep_interval_seconds: expected"),
        (lambda d: d["simulation"].update(upkeep_interval_seconds=float("nan")), "got nan"),
        (
            lambda d: d.update(server={"idle_timeout_seconds": float("inf")}),
            "server.idle_timeout_seconds: expected a number of seconds above 0 and at most 2,147,483 (gRPC",
        ),
        (lambda d: d.update(server={"idle_timeout_seconds": float("nan")}), "server.idle_timeout_seconds"),
        (lambda d: d.update(server={"handshake_timeout_seconds": 2_147_484}), "got 2147484"),
        (
            lambda d: d.update(server={"shutdown_grace_seconds": float("nan")}),
            "server.shutdown_grace_seconds: expected a number of seconds 0 or more and at most 86,400 (a day), got nan",
        ),
        (
            lambda d: d.update(server={"max_connections": 99_999_999_999}),
            "server.max_connections: expected a whole number of connections from 1 to 1,000,000",
        ),
        (
            lambda d: d["segments"]["standard"].update(deferral_max_days=99_999_999_999_999),
            "segments.standard.deferral_max_days: expected a whole number of days from 0 to 4,294,967,295",
        ),
        (
            lambda d: d["segments"]["standard"]["hardship"][0].update(max_instalments=2**32),
            "segments.standard.hardship[0].max_instalments: expected a whole number of instalments from 0 to",
        ),
        (
            lambda d: d["segments"]["standard"].update(early_payment_days_before_due=10**17),
            "segments.standard.early_payment_days_before_due: expected a whole number of days from 0 to 1,830",
        ),
        (lambda d: d["reminders"].update(grace_days=10**17), "reminders.grace_days: expected a whole number of days"),
        (
            lambda d: d["reminders"].update(after_due_days=[True, 7, 14]),  # a bool is not a number of days
            "reminders.after_due_days[0]: expected a whole number of days from 1 to 1,830",
        ),
        (lambda d: d["reminders"].update(after_due_days=[1, 7, 10**9]), "reminders.after_due_days[2]"),
        # What `parley biller accounts add` refuses, and what a bill or a bank order would carry blank.
        (lambda d: d["accounts"][0].update(id="acct 1001"), "accounts[0].id: 'acct 1001' is not usable: 1 to 64"),
        (lambda d: d["accounts"][1].update(id="acct-100\u00e9"), "accounts[1].id: 'acct-100\u00e9' is not usable"),
        (lambda d: d["accounts"][0].update(holder=""), "accounts[0].holder: the holder name must be 1 to 200"),
        (lambda d: d["accounts"][0].update(holder="  "), "accounts[0].holder"),
        (lambda d: d["payments"].update(payee_account=""), "payments.payee_account: must not be empty"),
        (lambda d: d["payments"].update(payee_name=" "), "payments.payee_name: must not be empty"),
        (lambda d: d["biller"].update(name=""), "biller.name: must not be empty"),
        (lambda d: d.update(server={"tls_key": ""}), "server.tls_key: must not be empty"),
        # A hardship programme every bill of the segment would name, as the protocol bounds it (BillFacts).
        (lambda d: d["segments"]["standard"]["hardship"][0].update(id=""), "hardship[0].id: '' must be 1 to 64"),
        (
            lambda d: d["segments"]["standard"]["hardship"].append(dict(d["segments"]["standard"]["hardship"][0])),
            "segments.standard.hardship[1].id: 'hardship-12' is listed twice",
        ),
        (
            lambda d: d["segments"]["standard"]["hardship"][0].update(description="x" * 201),
            "hardship[0].description: 201 characters; at most 200",
        ),
    ],
)
def test_invalid_config_names_the_key(change: Any, message: str) -> None:
    data = sample()
    change(data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_the_options_a_segment_advertises_are_bounded_by_what_a_bill_can_carry() -> None:
    """The bound on a segment's day counts is the protocol's own (a uint32, what BillFacts checks): at it, bills
    are issued; past it, the file is refused as it loads, not every bill at issue ("allowed 0..4294967295")."""
    data = sample()
    data["segments"]["standard"].update(deferral_max_days=2**32 - 1, instalment_max_first_delay_days=2**32 - 1)
    policy = SegmentPolicy(parse_config(data))
    options = policy.advertise(BillContext("acct-1001", AMOUNT, date(2026, 3, 1), DUE))
    assert options.deferral is not None
    assert options.deferral.max_days == 2**32 - 1
    BillFacts("bill-2", "acct-1001", AMOUNT, date(2026, 3, 1), DUE, "Electricity", options)  # the protocol agrees
    data["segments"]["standard"].update(deferral_max_days=2**32)
    with pytest.raises(ConfigError, match=r"deferral_max_days: .* from 0 to 4,294,967,295 .*, got 4294967296"):
        parse_config(data)


def test_the_longest_bounds_load() -> None:
    """Each range's upper end is allowed: the bounds refuse mistakes, not settings."""
    data = sample()
    data["payments"].update(settlement_delay_hours=8784)
    data["simulation"].update(upkeep_interval_seconds=86_400)
    data["reminders"].update(before_due_days=1830, after_due_days=[1, 7, 1830], grace_days=1830)
    data["server"] = {
        "idle_timeout_seconds": 2_147_483,
        "handshake_timeout_seconds": 2_147_483.0,
        "shutdown_grace_seconds": 86_400,
        "max_connections": 1_000_000,
        "max_connections_per_address": 1_000_000,
    }
    config = parse_config(data)
    assert config.server.idle_timeout_seconds == 2_147_483.0
    assert config.reminders.after_due_days == (1, 7, 1830)
