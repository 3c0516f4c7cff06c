"""A sample bill and a catalogue of terms, each labelled inside or outside its options."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime

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
)


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


OPEN_TIME = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
DUE = date(2026, 3, 31)
DEFERRAL_FEE = eur("5.00")
EARLY_DISCOUNT = eur("3.00")

BILL = BillFacts(
    bill_id="bill-2026-03",
    account_id="acct-1001",
    amount_due=eur("120.00"),
    issue_date=date(2026, 3, 1),
    due_date=DUE,
    description="Electricity, March 2026",
    options=AdvertisedOptions(
        deferral=DeferralOption(max_days=30, fee=DEFERRAL_FEE),
        instalments=InstalmentOption(
            max_count=6, min_amount=eur("20.00"), min_interval_days=14, max_interval_days=35, max_first_delay_days=30
        ),
        early_payment=EarlyPaymentDiscount(pay_by_date=date(2026, 3, 15), discount=EARLY_DISCOUNT),
        hardship_programmes=(
            HardshipProgramme(
                programme_id="hardship-12",
                description="Fees waived, up to 12 monthly instalments",
                fees_waived=True,
                max_deferral_days=60,
                max_instalments=12,
                min_instalment_amount=eur("5.00"),
                max_interval_days=35,
                max_first_delay_days=45,
                requires_disclosure=True,
            ),
        ),
    ),
)
BILL_DIGEST = hashlib.sha256(b"the bill envelope").digest()


def terms_catalogue() -> list[tuple[Terms, bool]]:
    """Valid terms for BILL, each with whether NEG-12 makes them binding on the biller."""
    principal = BILL.amount_due
    fee = (Line(LineKind.FEE, "deferral fee", DEFERRAL_FEE),)
    return [
        (build_terms(TermsKind.PAY_IN_FULL, principal, [DUE]), True),
        (
            build_terms(
                TermsKind.PAY_IN_FULL,
                principal,
                [date(2026, 3, 10)],
                [Line(LineKind.DISCOUNT, "early", EARLY_DISCOUNT)],
            ),
            True,
        ),
        (build_terms(TermsKind.DEFERRAL, principal, [date(2026, 4, 30)], fee), True),
        (build_terms(TermsKind.DEFERRAL, principal, [date(2026, 5, 1)], fee), False),
        (build_terms(TermsKind.DEFERRAL, principal, [date(2026, 4, 15)]), False),
        (build_terms(TermsKind.INSTALMENT_PLAN, principal, monthly_dates(date(2026, 4, 15), 3)), True),
        (build_terms(TermsKind.INSTALMENT_PLAN, principal, monthly_dates(date(2026, 4, 15), 8)), False),
        (build_terms(TermsKind.INSTALMENT_PLAN, principal, every_days(date(2026, 4, 1), 4, 7)), False),
        (
            build_terms(
                TermsKind.SETTLEMENT, principal, [DUE], [Line(LineKind.SETTLEMENT_REDUCTION, "waiver", eur("20.00"))]
            ),
            False,
        ),
    ]
