"""What the embedding app plugs into the consumer agent, and the context objects the agent hands them.

- a `Strategy`: the opening on a bill and the answer to the biller's offers (pure logic), each
  called with one frozen context object, as the biller's `Policy.decide(context)` is;
- an `Approver`: asks the user about a move outside the mandate (NEG-20); `AskAndWait` by default;
- a `PaymentSender`: the user's bank, which executes the transfer named by verified instructions.

Answers come from the one vocabulary of `agent.protocol.answers` (AcceptOffer, CounterOffer,
RejectOffer, Withdraw, Escalate).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal, Protocol

from agent.protocol.answers import ConsumerAnswer
from agent.protocol.limits import MAX_NOTE_CHARS
from agent.protocol.terms import BillFacts, Instalment, Money, Terms
from parley.v1 import negotiation_pb2

_DISCLOSURE_PURPOSES = frozenset(
    {negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_ARRANGEMENT, negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP}
)


@dataclass(frozen=True)
class Circumstances:
    """What the strategy chooses to disclose beside an opening, for a stated purpose (PRV-1, PRV-8)."""

    purpose: negotiation_pb2.DisclosurePurpose.ValueType
    next_pay_date: date | None = None
    hardship: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if self.purpose not in _DISCLOSURE_PURPOSES:
            raise ValueError(f"disclosure purpose {self.purpose} is not a defined purpose (PRV-1)")
        if len(self.note) > MAX_NOTE_CHARS:
            raise ValueError(f"a disclosure note is at most {MAX_NOTE_CHARS} characters")

    def to_proto(self) -> negotiation_pb2.Circumstances:
        return negotiation_pb2.Circumstances(
            purpose=self.purpose,
            next_pay_date="" if self.next_pay_date is None else self.next_pay_date.isoformat(),
            hardship=self.hardship,
            note=self.note,
        )


# --- The strategy ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpeningContext:
    """What the strategy sees when it opens a thread on `bill`.

    The terms' principal MUST be `bill.outstanding` (TRM-11): the bill's amount due
    less what our bank already paid of it (`bill.received_minor`, PAY-16) — the amount
    due itself for a bill nothing was paid on, 60.00 of a 120.00 bill renegotiated
    after a plan broke half paid. Terms restating more are refused by the agent before
    they are signed (NEG-16), and by the biller (PRINCIPAL_MISMATCH).

    `committed` are the payments the consumer already committed to: the unpaid
    instalments of every agreed arrangement still in force, with any biller, except
    the bill being negotiated (its new arrangement replaces any earlier one); an
    arrangement the biller ended commits nothing (PAY-16).
    """

    bill: BillFacts
    today: date
    biller_party_id: str
    account_id: str
    committed: tuple[Instalment, ...]


@dataclass(frozen=True)
class ResponseContext:
    """What the strategy sees when it answers the biller's pending offer `their_offer`.

    `my_last` is our last offer in the thread; `rounds_left` offers remain (0: no CounterOffer).
    `bill`, `today`, `biller_party_id`, `account_id` and `committed` are as in `OpeningContext`
    (`bill.outstanding` is the principal the thread's opening restated).
    """

    bill: BillFacts
    their_offer: Terms
    my_last: Terms
    rounds_left: int
    today: date
    biller_party_id: str
    account_id: str
    committed: tuple[Instalment, ...]


class Strategy(Protocol):
    """What to offer on a bill and how to answer the biller. Both methods run on the event loop: keep them
    fast and free of I/O. The agent checks every answer against the mandate (NEG-20) and the protocol
    (NEG-16) before it signs anything; an answer the protocol does not allow is replaced by a Withdraw.
    """

    def opening(self, context: OpeningContext) -> tuple[Terms, Circumstances | None]:
        """The thread's first offer, and the circumstances to disclose with it (None: disclose nothing)."""
        ...

    def respond(self, context: ResponseContext) -> ConsumerAnswer:
        """The answer to the biller's offer."""
        ...


# --- Asking the user --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalRequest:
    """A move outside the mandate that needs the user's explicit approval (NEG-20).

    `action` is "open" (make the opening offer `terms`, disclosing `circumstances`
    if any), "counter" (offer `terms`) or "accept" (accept the biller's `terms`).
    `violations` are the mandate's limits it breaks; `reason` the strategy's
    words when it escalated. Until `deadline` the thread can still move.
    `in_reply_to` is the digest of the biller's offer the move answers (None for an opening).

    `request_id` is stable: derived from everything the request binds (the biller, account and
    bill, the thread and the offer answered, the action and the exact terms), so the same move at
    the same point of the negotiation has the same id on every pass, and any change gives a new one.
    """

    request_id: str
    action: Literal["open", "counter", "accept"]
    biller_party_id: str
    account_id: str
    bill: BillFacts
    terms: Terms
    violations: tuple[str, ...]
    reason: str = ""
    circumstances: Circumstances | None = None
    thread_id: bytes | None = None
    deadline: datetime | None = None
    in_reply_to: bytes | None = None

    @property
    def terms_digest(self) -> bytes:
        """SHA-256 of the terms' deterministic protobuf form: what the person approves, exactly."""
        return terms_digest(self.terms)


def terms_digest(terms: Terms) -> bytes:
    """SHA-256 of `terms` serialized deterministically (`parley.v1.Terms`)."""
    return hashlib.sha256(terms.to_proto().SerializeToString(deterministic=True)).digest()


Approver = Callable[[ApprovalRequest], Awaitable[bool]]


class AskAndWait:
    """The default approver: each request waits, as a Future, until the embedding app answers it.

    The app lists `pending()` (or is told through `on_request`) and calls
    `answer(request_id, approved)`. A request about a move in an open thread is
    given up when the thread's deadline comes (the thread then expires); one
    about an opening waits until answered (no thread exists yet).
    """

    def __init__(self, on_request: Callable[[ApprovalRequest], object] | None = None) -> None:
        self._on_request = on_request
        self._waiting: dict[str, tuple[ApprovalRequest, asyncio.Future[bool]]] = {}

    async def __call__(self, request: ApprovalRequest) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = (request, future)
        try:
            if self._on_request is not None:
                self._on_request(request)
            return await future
        finally:
            self._waiting.pop(request.request_id, None)

    def pending(self) -> list[ApprovalRequest]:
        """The requests waiting for an answer, oldest first."""
        return [request for request, _ in self._waiting.values()]

    def answer(self, request_id: str, approved: bool) -> None:
        """Approve or deny a waiting request; KeyError if it is not waiting."""
        _, future = self._waiting[request_id]
        if not future.done():
            future.set_result(approved)


# --- Paying -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaymentOrder:
    """What the bank is asked to pay: taken only from verified instructions (BIL-3, PAY-8).

    The transfer MUST carry `payment_reference` exactly as given.
    """

    biller_party_id: str
    account_id: str
    bill_id: str
    intent_id: str
    amount: Money
    rail: str
    payee_name: str
    payee_account: str
    payment_reference: str
    pay_by_time: datetime


class PaymentSender(Protocol):
    """The user's bank."""

    async def send(self, order: PaymentOrder) -> str:
        """Execute the transfer and return the bank's reference for it (the proof of payment, PAY-9).

        Raise `PaymentNotSent` when the bank certainly did not pay. Any other failure
        leaves the payment in doubt: `ConsumerAgent.pay` raises `PaymentInDoubt` (the
        failure as its `__cause__`), and the agent never hands that intent over again
        (PAY-7) until `ConsumerAgent.resolve_payment` says what happened.
        """
        ...


__all__ = [
    "ApprovalRequest",
    "Approver",
    "AskAndWait",
    "Circumstances",
    "OpeningContext",
    "PaymentOrder",
    "PaymentSender",
    "ResponseContext",
    "Strategy",
    "terms_digest",
]
