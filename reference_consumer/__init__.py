"""The reference consumer: a household's personal-finance bot.

`profile` reads the household (balance, pay day, buffer, outgoings, mandate limits,
billers) from TOML; `strategy` is the pure decision logic the consumer agent calls:
the cash-flow model, the opening offer for a bill, the answer to a biller's
counter-offer, and a budget shared across billers. Neither does I/O beyond reading
the profile file, and neither reads the clock: `today` is always passed in.
"""

from reference_consumer.profile import (
    BillerPreference,
    Expense,
    Income,
    Mandate,
    Profile,
    ProfileError,
    load_profile,
    parse_profile,
)
from reference_consumer.strategy import (
    CashFlow,
    Opening,
    PlannedBill,
    Projection,
    Response,
    Step,
    StrategyError,
    choose_opening,
    needs_disclosure,
    plan_budget,
    plan_opening,
    prioritise,
    respond,
)

__all__ = [
    "BillerPreference",
    "CashFlow",
    "Expense",
    "Income",
    "Mandate",
    "Opening",
    "PlannedBill",
    "Profile",
    "ProfileError",
    "Projection",
    "Response",
    "Step",
    "StrategyError",
    "choose_opening",
    "load_profile",
    "needs_disclosure",
    "parse_profile",
    "plan_budget",
    "plan_opening",
    "prioritise",
    "respond",
]
