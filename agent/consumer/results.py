"""What the consumer agent returns: frozen views of links, bills, negotiations, payments and events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

from agent.consumer.plugins import PaymentOrder
from agent.protocol.agreement import Agreement, Bundle
from agent.protocol.errors import ProtocolError
from agent.protocol.terms import BillFacts, Money
from agent.stores.base import IntentState, ThreadOutcome
from agent.transport.client import ClientTls
from agent.transport.status import CallError
from parley.v1 import envelope_pb2, event_pb2


@dataclass(frozen=True)
class BillerLink:
    """A biller the consumer enrolled with (restored from the store after a restart)."""

    biller_party_id: str
    target: str
    fingerprint: bytes
    insecure: bool
    tls: ClientTls | None
    accounts: tuple[str, ...]


@dataclass(frozen=True)
class ReceivedBill:
    """A bill that passed BIL-3: signed by the pinned biller, for us, on an enrolled account, valid."""

    biller_party_id: str
    account_id: str
    facts: BillFacts
    digest: bytes
    envelope: envelope_pb2.Envelope
    received_at: datetime


@dataclass(frozen=True)
class NegotiationResult:
    """How a negotiation stands after `negotiate` returned.

    `outcome` is None when no thread was opened (the user declined the opening),
    OPEN when the biller refused our last move (`refusal`; call `negotiate`
    again later), else one of the five outcomes (NEG-13). When AGREED,
    `agreement` is the verified agreement and `bundle()` its `parley-bundle/1`;
    when PROTOCOL_ERROR, `violation` is the rule the biller broke, its signed
    evidence being the last of `messages` (NEG-17). `messages` are the thread's
    signed messages as sent and received, sequence 0 first.
    """

    biller_party_id: str
    account_id: str
    bill_id: str
    thread_id: bytes | None
    outcome: ThreadOutcome | None
    messages: tuple[envelope_pb2.Envelope, ...] = ()
    agreement: Agreement | None = None
    violation: ProtocolError | None = None
    refusal: ProtocolError | CallError | None = None
    _bundle: Bundle | None = field(default=None, repr=False)

    @property
    def agreed(self) -> bool:
        return self.outcome is ThreadOutcome.AGREED

    def bundle(self) -> Bundle:
        """The agreement bundle (BND-7); ValueError unless the thread was agreed."""
        if self._bundle is None:
            raise ValueError("only an agreed thread has an agreement bundle")
        return self._bundle


@dataclass(frozen=True)
class Payment:
    """An intent and where it stands; `order` is set once instructions were verified, and unset again once they
    lapsed unpaid (`IntentState.LAPSED`, PAY-17: never payable, and the payment has a new intent).

    `holds_payment` is False once the intent is history: it lapsed, or it was REFUSED and its user set it aside
    (`ConsumerAgent.set_aside_refused`). The payment's next `pay` then starts a new intent."""

    biller_party_id: str
    intent_id: str
    account_id: str
    bill_id: str
    agreement_digest: bytes
    instalment_index: int
    amount: Money
    state: IntentState
    order: PaymentOrder | None
    proof: str
    holds_payment: bool = True


@dataclass(frozen=True)
class PaymentReceipt:
    """A verified receipt (PAY-9). `dispute` says why it does not match the instructions, if it does not."""

    biller_party_id: str
    intent_id: str
    amount_received: Money
    remaining_balance: Money | None
    settle_time: datetime
    rail_reference: str
    digest: bytes
    envelope: envelope_pb2.Envelope
    dispute: str | None

    @property
    def disputed(self) -> bool:
        return self.dispute is not None


@dataclass(frozen=True)
class AccountEvent:
    """A verified event of an account's log (EVT-5). Events inform; they never change an obligation (EVT-8)."""

    biller_party_id: str
    account_id: str
    sequence: int
    kind: event_pb2.EventKind.ValueType
    bill_id: str
    thread_id: bytes
    amount: Money | None
    date: date | None
    reminder_level: int
    message: str
    related_digest: bytes
    digest: bytes
    envelope: envelope_pb2.Envelope


__all__ = ["AccountEvent", "BillerLink", "NegotiationResult", "Payment", "PaymentReceipt", "ReceivedBill"]
