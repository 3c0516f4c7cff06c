"""What the biller agent's embedding API returns: agreed arrangements and the payments a rail awaits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agent.protocol.arrangements import unpaid_instalments
from agent.protocol.terms import Instalment, Money, Terms
from agent.stores.base import SettledPayment


@dataclass(frozen=True)
class AwaitedPayment:
    """A payment intent that was given instructions and is not settled yet: what a rail must still match."""

    account_id: str
    intent_id: str
    amount: Money
    payment_reference: str


@dataclass(frozen=True)
class Arrangement:
    """An agreed arrangement, for schedulers: its terms and the payments settled under it."""

    account_id: str
    bill_id: str
    thread_id: bytes
    agreement_digest: bytes  # the Accept's digest, which payment intents and events name
    terms: Terms
    agreed_at: datetime
    active: bool  # the bill is under this arrangement (not paid, not reopened)
    payments: tuple[SettledPayment, ...]

    @property
    def paid_instalments(self) -> frozenset[int]:
        return frozenset(payment.instalment_index for payment in self.payments)

    def unpaid_instalments(self) -> tuple[tuple[int, Instalment], ...]:
        """(index, instalment) of each scheduled payment not settled yet, in schedule order."""
        return unpaid_instalments(self.terms, self.paid_instalments)


__all__ = ["Arrangement", "AwaitedPayment"]
