"""The households of `parley demo`: who they are, what they are billed, and what each should come to.

Six households, each a `Profile` built in code (the same fields as a profile TOML
file: money now, pay day, buffer, monthly outgoings, mandate, billers ranked),
with accounts at the reference energy supplier (`reference_biller/sample.toml`)
and the reference telecom operator (`reference_biller/telecom.toml`), and the
bill each account receives on the demo's first day. The numbers are chosen so
that the reference cash-flow strategy, left to itself, walks each household into
one of the situations Parley is for:

1. **One budget, two billers** — Household One cannot pay both bills before pay
   day; it ranks its telecom operator first (it works from home), so the phone
   bill is paid on its due date and the energy bill deferred past pay day.
2. **Early-payment discount** — Household Two has money to spare and pays its
   energy bill the day it arrives, with the advertised discount.
3. **Deferral after pay day** — Household Three is short until the 28th and
   defers its phone bill to the day after.
4. **Instalments after a counter-offer** — Household Four asks for six monthly
   instalments where the operator advertises three (it opens with a cushion:
   `cushion`); the operator counters with three, which keeps the household's
   buffer and is inside its mandate, so it accepts.
5. **Hardship programme** — Household Five cannot afford the plain options; it
   discloses hardship, for the stated purpose of assessing hardship, and claims
   the supplier's hardship programme: a later first instalment, no fees.
6. **A missed instalment** — Household Six agrees a plan; its bank declines the
   first instalment (`declined_orders`); the supplier reports it missed, ends the
   plan, offers renegotiation, and the household agrees a new plan.

Nothing here does I/O; `agent.tools.demo` runs it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date, timedelta

from agent.protocol.terms import Money
from reference_consumer.profile import BillerPreference, Expense, Income, Mandate, Profile

ENERGY = "biller:energy.example"
TELECOM = "biller:telco.example"

START = date(2026, 3, 2)
"""The demo's first day: the billers' March bill run (a Monday)."""
END = date(2026, 6, 7)
"""The demo's last day: about three months later, once the last instalment in view is paid."""
PAYMENT_TERM = timedelta(days=21)
"""Bills are due three weeks after they are issued."""


class Scenario(enum.StrEnum):
    SHARED_BUDGET = "shared-budget"
    EARLY_DISCOUNT = "early-discount"
    DEFERRAL = "deferral"
    COUNTER_OFFER = "counter-offer"
    HARDSHIP = "hardship"
    MISSED_INSTALMENT = "missed-instalment"


@dataclass(frozen=True)
class Account:
    """An account the household holds with a biller, and the bill it receives on `START`."""

    biller_party_id: str
    account_id: str
    amount: Money
    description: str


@dataclass(frozen=True)
class Household:
    """One demo household.

    `cushion`: the household opens negotiations as if its buffer were this much larger
    (`ReferenceStrategy`). `declined_orders`: the bank declines these payment orders
    (1 = the first order the household ever gives it).
    """

    key: str
    name: str
    scenario: Scenario
    summary: str
    profile: Profile
    accounts: tuple[Account, ...]
    cushion: Money | None = None
    declined_orders: frozenset[int] = frozenset()


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


def _profile(
    party_id: str,
    *,
    balance: str,
    buffer: str,
    income: str,
    pay_day: int,
    expenses: tuple[tuple[str, str, int], ...],
    max_fee: str = "10.00",
    max_instalments: int = 6,
    max_total_over_bill: str = "15.00",
    billers: tuple[tuple[str, int], ...] = (),
    hardship: bool = False,
) -> Profile:
    return Profile(
        party_id=party_id,
        currency="EUR",
        balance=eur(balance),
        buffer=eur(buffer),
        income=Income(eur(income), pay_day),
        expenses=tuple(Expense(name, eur(amount), day) for name, amount, day in expenses),
        mandate=Mandate(eur(max_fee), max_instalments, eur(max_total_over_bill), date(2026, 12, 31)),
        billers=tuple(BillerPreference(biller, priority) for biller, priority in billers),
        hardship=hardship,
        pay_as_billed=True,  # a bill the plan pays in full on time is paid without negotiating (Household One)
    )


HOUSEHOLDS: tuple[Household, ...] = (
    Household(
        key="household-1",
        name="Household One",
        scenario=Scenario.SHARED_BUDGET,
        summary="one budget for two billers, telecom ranked first",
        profile=_profile(
            "consumer:household-1",
            balance="640.00",
            buffer="250.00",
            income="2300.00",
            pay_day=25,
            expenses=(("rent", "1000.00", 1), ("groceries", "600.00", 26)),
            billers=((TELECOM, 1), (ENERGY, 2)),
        ),
        accounts=(
            Account(ENERGY, "acct-1001", eur("212.40"), "Electricity and gas, March 2026"),
            Account(TELECOM, "tc-2001", eur("189.90"), "Fibre broadband and two mobiles, March 2026"),
        ),
    ),
    Household(
        key="household-2",
        name="Household Two",
        scenario=Scenario.EARLY_DISCOUNT,
        summary="money to spare: pays at once for the early-payment discount",
        profile=_profile(
            "consumer:household-2",
            balance="3400.00",
            buffer="300.00",
            income="3100.00",
            pay_day=28,
            expenses=(("mortgage", "1350.00", 1),),
        ),
        accounts=(Account(ENERGY, "acct-1002", eur("146.75"), "Electricity, March 2026"),),
    ),
    Household(
        key="household-3",
        name="Household Three",
        scenario=Scenario.DEFERRAL,
        summary="short until pay day on the 28th: defers to the day after",
        profile=_profile(
            "consumer:household-3",
            balance="140.00",
            buffer="100.00",
            income="1650.00",
            pay_day=28,
            expenses=(("rent", "820.00", 1), ("food", "420.00", 29)),
        ),
        accounts=(Account(TELECOM, "tc-2002", eur("64.30"), "Mobile plan, March 2026"),),
    ),
    Household(
        key="household-4",
        name="Household Four",
        scenario=Scenario.COUNTER_OFFER,
        summary="asks for more instalments than advertised; accepts the counter-offer",
        profile=_profile(
            "consumer:household-4",
            balance="400.00",
            buffer="150.00",
            income="1900.00",
            pay_day=25,
            expenses=(("rent", "1100.00", 1), ("groceries", "520.00", 26), ("transport", "160.00", 5)),
        ),
        accounts=(Account(TELECOM, "tc-2003", eur("249.00"), "New handset and mobile plan, March 2026"),),
        cushion=eur("400.00"),
    ),
    Household(
        key="household-5",
        name="Household Five",
        scenario=Scenario.HARDSHIP,
        summary="in hardship: claims the hardship programme, fees waived",
        profile=_profile(
            "consumer:household-5",
            balance="150.00",
            buffer="50.00",
            income="1320.00",
            pay_day=28,
            expenses=(("rent", "760.00", 1), ("transport", "60.00", 15), ("food", "430.00", 29)),
            max_instalments=12,
            hardship=True,
        ),
        accounts=(Account(ENERGY, "acct-1003", eur("448.00"), "Electricity and gas, winter quarter"),),
    ),
    Household(
        key="household-6",
        name="Household Six",
        scenario=Scenario.MISSED_INSTALMENT,
        summary="misses an instalment, then renegotiates",
        profile=_profile(
            "consumer:household-6",
            balance="180.00",
            buffer="100.00",
            income="1500.00",
            pay_day=25,
            expenses=(("rent", "900.00", 1), ("food", "450.00", 26)),
        ),
        accounts=(Account(ENERGY, "acct-1004", eur("287.60"), "Electricity and gas, February-March 2026"),),
        declined_orders=frozenset({1}),
    ),
)


__all__ = ["END", "ENERGY", "HOUSEHOLDS", "PAYMENT_TERM", "START", "TELECOM", "Account", "Household", "Scenario"]
