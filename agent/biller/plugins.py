"""What the embedder plugs into a biller agent: its `Policy` and its `PaymentRail`, and what each is shown.

Both plugins take one context object per call (`BillContext`, `OfferContext`), so a field can be added
to what they see without breaking an implementation. A policy answers an offer with the one answer
vocabulary of the protocol (`agent.protocol.answers`), the same words a consumer's strategy uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from agent.protocol.answers import AcceptOffer, Answer, CounterOffer, RejectOffer
from agent.protocol.terms import AdvertisedOptions, BillFacts, Money, Terms
from parley.v1 import negotiation_pb2

# The name this module used before the answers moved to the protocol core; the same type.
Decision = Answer


@dataclass(frozen=True)
class PaymentDetails:
    """Where and with what reference to pay one intent (PaymentInstructions, PAY-4)."""

    rail: str
    payee_name: str
    payee_account: str
    payment_reference: str  # non-empty and unique to the intent


class PaymentRail(Protocol):
    """The biller's payment rail. Settlement comes back through `BillerAgent.record_settlement`."""

    def instructions(self, account_id: str, intent_id: str, amount: Money) -> PaymentDetails:
        """How the consumer should pay `amount` for this intent; called once per intent."""
        ...


@dataclass(frozen=True)
class BillContext:
    """What the policy sees when a bill is issued without explicit options: the bill to advertise them on."""

    account_id: str
    amount_due: Money
    issue_date: date
    due_date: date


@dataclass(frozen=True)
class OfferContext:
    """What the policy sees when the consumer's offer is outside the advertised options.

    `round` counts the offers in the thread so far, this one included (the opening
    is round 1), out of `max_rounds`; `previous_offers` are the earlier offers of
    both parties, oldest first; `circumstances` is the verified disclosure of the
    thread's opening, if any and not erased (use it only for its purpose, PRV-5).
    """

    bill: BillFacts
    account_id: str
    offer: Terms
    round: int
    max_rounds: int
    previous_offers: tuple[Terms, ...]
    circumstances: negotiation_pb2.Circumstances | None
    now: datetime


class Policy(Protocol):
    """The biller's rules. Both methods run on the event loop: keep them fast and free of I/O."""

    def advertise(self, context: BillContext) -> AdvertisedOptions:
        """The options to advertise on a new bill; they bind the biller (NEG-12)."""
        ...

    def decide(self, context: OfferContext) -> Answer:
        """The answer to a consumer offer outside the advertised options.

        Offers inside them are accepted without asking (NEG-12). An answer the
        protocol does not allow (a counter past the round limit, invalid terms, an
        undefined reject reason) is replaced by RejectOffer(OUT_OF_POLICY) and logged.
        """
        ...


__all__ = [
    "AcceptOffer",
    "Answer",
    "BillContext",
    "CounterOffer",
    "Decision",
    "OfferContext",
    "PaymentDetails",
    "PaymentRail",
    "Policy",
    "RejectOffer",
]
