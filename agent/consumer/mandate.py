"""The user's mandate (NEG-20): the one implementation of "may the bot agree to these terms alone?".

The agent checks every opening, counter and acceptance against it before signing; the reference
strategy uses the same check to prefer terms that need no approval. Its sentences are shown to the
user, so they name amounts and dates exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from agent.protocol.terms import BillFacts, LineKind, Money, Terms, TermsKind


@dataclass(frozen=True)
class Mandate:
    """The limits inside which the agent offers and accepts terms without asking its user (NEG-20).

    - `max_fee`: the most the FEE lines of one arrangement may add up to;
    - `max_instalments`: the most instalments of a plan (a single payment is never over it);
    - `max_total_over_bill`: the most the total may exceed what the terms settle: the bill's outstanding
      balance (its amount due, less what was already paid of it, PAY-16);
    - `latest_date`: no payment after this date (None: no such limit);
    - `allow_disclosure`: the user consents to disclosing the circumstances the
      strategy chooses (PRV-8); without it, every disclosure is asked for.
    """

    max_fee: Money
    max_instalments: int
    max_total_over_bill: Money
    latest_date: date | None = None
    allow_disclosure: bool = False

    def violations(self, terms: Terms, bill: BillFacts) -> list[str]:
        """The limits the terms break, as sentences for the user; empty when they are inside the mandate.

        The fee is the sum of the FEE lines; "instalments" counts the payments of an INSTALMENT_PLAN;
        the latest date is compared with the last payment; the total with the bill's outstanding balance
        (`bill.outstanding`: the amount due, unless the facts say part of it was paid, TRM-11), so that after
        a half-paid plan broke a total that would pay again what was already paid is outside the mandate.
        """
        currency = self.max_fee.currency
        if terms.total.currency.code != currency.code or bill.amount_due.currency.code != currency.code:
            return [f"the terms are in {terms.total.currency.code}; your limits are in {currency.code}"]
        problems = []
        fees = sum(line.amount.minor for line in terms.lines if line.kind is LineKind.FEE)
        if fees > self.max_fee.minor:
            problems.append(f"fee {Money(currency, fees)} exceeds your limit {self.max_fee}")
        count = len(terms.schedule)
        if terms.kind is TermsKind.INSTALMENT_PLAN and count > self.max_instalments:
            problems.append(f"{count} instalments exceed your limit of {self.max_instalments}")
        if self.latest_date is not None and terms.schedule:
            last = terms.schedule[-1].due_date
            if last > self.latest_date:
                problems.append(f"last payment on {last} is after your latest date {self.latest_date}")
        owed = bill.outstanding
        over = terms.total.minor - owed.minor
        if over > self.max_total_over_bill.minor:
            what = "the bill" if owed == bill.amount_due else f"the {owed} still owed on the bill"
            problems.append(
                f"total {terms.total} is {Money(currency, over)} over {what}, "
                f"more than your limit {self.max_total_over_bill}"
            )
        return problems

    def allows(self, terms: Terms, bill: BillFacts) -> bool:
        """Whether the terms are inside the mandate (no violation)."""
        return not self.violations(terms, bill)


__all__ = ["Mandate"]
