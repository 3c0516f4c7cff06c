"""What a payment or an event watch can end in besides success, under the one root `ParleyError`.

`PaymentRefused` and `EventLogForked` are the biller's fault, so they are `RemoteProtocolError`s with
a spec reason; the other three are outcomes of the user's bank, not of the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.protocol.errors import ParleyError, Reason, RemoteProtocolError
from parley.v1 import envelope_pb2

if TYPE_CHECKING:
    from agent.consumer.results import PaymentReceipt


class PaymentNotSent(ParleyError):
    """Raised by a `PaymentSender` when the bank certainly did not execute the transfer (it may be tried again)."""


class PaymentInDoubt(ParleyError):
    """The intent was handed to the bank and its answer never came: it is not handed over again (PAY-7)."""

    def __init__(self, biller_party_id: str, intent_id: str, bank_error: str = "") -> None:
        because = f" (the bank's sender failed: {bank_error})" if bank_error else ""
        super().__init__(
            f"payment {intent_id!r} to {biller_party_id!r} was handed to the bank without an answer{because}; "
            "check with the bank and call resolve_payment"
        )
        self.biller_party_id = biller_party_id
        self.intent_id = intent_id


class PaymentDispute(ParleyError):
    """A receipt that does not match the instructions (PAY-9): the intent, instructions, receipt and
    bank proof are kept in the store; tell the user."""

    def __init__(self, receipt: PaymentReceipt) -> None:
        super().__init__(f"payment {receipt.intent_id!r} to {receipt.biller_party_id!r} is disputed: {receipt.dispute}")
        self.receipt = receipt


class EventLogFull(ParleyError):
    """The account's log reached the most events this consumer stores (`max_stored_events`): the watch ends
    rather than let the biller grow our store without bound. Nothing past the bound is stored."""

    def __init__(self, biller_party_id: str, account_id: str, max_stored_events: int) -> None:
        super().__init__(
            f"the event log of {account_id!r} at {biller_party_id!r} reached {max_stored_events} events, the most "
            "this consumer stores: no more are taken (a biller that sends that many is flooding the log)"
        )
        self.biller_party_id = biller_party_id
        self.account_id = account_id


class PaymentRefused(RemoteProtocolError):
    """The instructions fail PAY-8 (not the pinned biller's, not chained to our intent, another amount,
    past their pay-by time): nothing was paid, and nothing will be under them."""

    def __init__(self, reason: Reason, detail: str, intent_id: str) -> None:
        super().__init__(reason, detail)
        self.intent_id = intent_id


class EventLogForked(RemoteProtocolError):
    """The biller sent two different signed events at one sequence of an account's log (EVT-5)."""

    def __init__(self, sequence: int, stored: envelope_pb2.Envelope, received: envelope_pb2.Envelope) -> None:
        super().__init__(Reason.PREVIOUS_DIGEST_MISMATCH, f"two different events at sequence {sequence}: a forked log")
        self.sequence = sequence
        self.stored = stored
        self.received = received


__all__ = ["EventLogForked", "EventLogFull", "PaymentDispute", "PaymentInDoubt", "PaymentNotSent", "PaymentRefused"]
