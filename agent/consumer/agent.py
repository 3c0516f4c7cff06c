"""The embeddable consumer agent: the consumer side of Parley, over gRPC.

`ConsumerAgent` acts for one person (one party id, one signing key, one key set
chain) towards any number of billers. Each biller it enrolled with is a *link*:
the biller's endpoint and TLS settings, its party id and the identity
fingerprint pinned out of band (KEY-12), and its verified key set chain. Links,
bills, threads, payments and events live in a `ConsumerStore`, so an agent
re-created on the same store after a restart carries on where it stopped.

What the embedding app plugs in:

- a `Strategy` — what to offer on a bill and how to answer the biller's offers
  (pure logic; the reference consumer's cash-flow strategy is one);
- a `Mandate` — the limits inside which the agent may offer and accept without
  asking (NEG-20), and an approver callback that asks the user otherwise (by
  default `AskAndWait`: each request waits until the app answers it);
- a `PaymentSender` — the user's bank, which executes the transfer named by
  verified payment instructions.

The agent's duties, each with its requirement:

- enrolment verifies the biller's chain against the pin before trusting
  anything (ENR-10), and every biller message is opened against that chain
  with `recipient` = our party id (AUZ-6); a bill that fails is never returned
  nor paid (BIL-3);
- negotiation runs through the sans-I/O core: our moves are checked before
  they are signed (NEG-16), the biller's replies are judged by the same rules,
  and a rule the biller breaks ends the thread PROTOCOL_ERROR with the reply
  kept as evidence (NEG-17); each message we sign is stored before it is sent
  and resent byte for byte when the answer is lost (NEG-18);
- a payment intent is stored before it is sent, so a retry reuses its
  `intent_id` (PAY-2); instructions are paid only when they are signed by the
  pinned biller, chain to our intent and name its amount (PAY-8), and each
  intent is handed to the bank at most once (PAY-7); receipts are verified and
  a mismatch is raised as a dispute (PAY-9);
- events are verified and chained before they are stored, the cursor moving
  in the same transaction, so a reconnecting or restarted agent loses none and
  repeats none (EVT-5).

Embedding it::

    store = await SqliteConsumerStore.open("consumer.sqlite")
    agent = ConsumerAgent(party_id="consumer:k3x9", signing_key=key, key_sets=chain, store=store,
                          strategy=MyStrategy(), mandate=Mandate(max_fee=Money.parse("10.00", "EUR"),
                          max_instalments=6, max_total_over_bill=Money.parse("10.00", "EUR")),
                          payment_sender=MyBank())
    await agent.enrol("billing.energy.example:7443", biller_party_id="biller:energy.example",
                      fingerprint=bytes.fromhex(fingerprint_from_the_paper_bill), account_id="acct-1001",
                      code="7KQ2-M9XD-4RTB", tls=ClientTls(root_certificates=ca_pem))
    for bill in await agent.bills("biller:energy.example"):
        result = await agent.negotiate("biller:energy.example", bill.facts.bill_id)
        if result.agreed:
            payment = await agent.pay("biller:energy.example", bill.facts.bill_id)
    async with contextlib.aclosing(agent.watch("biller:energy.example")) as events:
        async for event in events: ...
    await agent.close()
    await store.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from agent.biller import ENROLMENT_CODE_ALPHABET, events_thread_id, normalize_enrolment_code
from agent.clock import Clock, SystemClock
from agent.protocol import negotiation as core
from agent.protocol.agreement import Agreement, Bundle, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, ProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import (
    DEFAULT_LIMITS,
    DIGEST_BYTES,
    MAX_ID_CHARS,
    MAX_NOTE_CHARS,
    MAX_TEXT_CHARS,
    SUPPORTED_VERSIONS,
    THREAD_ID_BYTES,
    Limits,
)
from agent.protocol.messages import (
    Verified,
    check_sequence,
    is_party_id,
    new_header,
    open_envelope,
    read_time,
    seal,
)
from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload, sign_move, thread_message
from agent.protocol.terms import BillFacts, Instalment, LineKind, Money, Terms, TermsKind, parse_date
from agent.stores.base import (
    BillerLinkRecord,
    ConsumerStore,
    ConsumerThreadRecord,
    EventCursor,
    IntentRecord,
    IntentState,
    LinkedAccountRecord,
    MessageRecord,
    ReceiptRecord,
    ReceivedBillRecord,
    ReceivedEventRecord,
    StoreConflict,
    ThreadOutcome,
    ThreadUpdate,
)
from agent.transport.client import DEFAULT_RETRY, BillerClient, ClientTls, RetryPolicy, is_transient
from agent.transport.status import CallError
from parley.v1 import (
    account_pb2,
    bill_pb2,
    biller_service_pb2,
    enrolment_pb2,
    envelope_pb2,
    event_pb2,
    header_pb2,
    negotiation_pb2,
    payment_pb2,
)

logger = logging.getLogger("parley.consumer")

M = TypeVar("M", bound=Message)

KEYSET_REFRESH_INTERVAL = timedelta(seconds=60)  # KEY-20: at most one refresh per biller per minute
DECLINED_NOTE = "The account holder declined these terms."
NO_ROUNDS_NOTE = "No offers are left in this thread."
_DISCLOSURE_SALT_BYTES = 16
_WATCH_MAX_BACKOFF_STEP = 10
_CODE_FORM = re.compile(
    f"[{ENROLMENT_CODE_ALPHABET}]{{4}}-[{ENROLMENT_CODE_ALPHABET}]{{4}}-[{ENROLMENT_CODE_ALPHABET}]{{4}}"
)
_NEGOTIATION_PAYLOADS = {cls.DESCRIPTOR.full_name: cls for cls in NEGOTIATION_TYPES}
_REJECT_REASONS = frozenset(negotiation_pb2.RejectReason.values()) - {negotiation_pb2.REJECT_REASON_UNSPECIFIED}
_EVENT_KINDS = frozenset(event_pb2.EventKind.values()) - {event_pb2.EVENT_KIND_UNSPECIFIED}
_DISCLOSURE_PURPOSES = frozenset(
    {negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_ARRANGEMENT, negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP}
)
_MAX_REMINDER_LEVEL = 3


# --- The user's limits --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mandate:
    """The limits inside which the agent offers and accepts terms without asking its user (NEG-20).

    - `max_fee`: the most the FEE lines of one arrangement may add up to;
    - `max_instalments`: the most instalments of a plan (a single payment is never over it);
    - `max_total_over_bill`: the most the total may exceed the bill's amount due;
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
        """The limits the terms break, as sentences for the user; empty when they are inside the mandate."""
        code = self.max_fee.currency.code
        if terms.total.currency.code != code or bill.amount_due.currency.code != code:
            return [f"the terms are in {terms.total.currency.code}; your limits are in {code}"]
        problems = []
        fees = sum(line.amount.minor for line in terms.lines if line.kind is LineKind.FEE)
        if fees > self.max_fee.minor:
            problems.append(f"fees of {Money(self.max_fee.currency, fees)} exceed your limit of {self.max_fee}")
        count = len(terms.schedule)
        if terms.kind is TermsKind.INSTALMENT_PLAN and count > self.max_instalments:
            problems.append(f"{count} instalments exceed your limit of {self.max_instalments}")
        if self.latest_date is not None and terms.schedule and terms.schedule[-1].due_date > self.latest_date:
            problems.append(f"the last payment, on {terms.schedule[-1].due_date}, is after {self.latest_date}")
        over = terms.total.minor - bill.amount_due.minor
        if over > self.max_total_over_bill.minor:
            problems.append(
                f"the total {terms.total} is {Money(terms.total.currency, over)} over the bill, "
                f"more than your limit of {self.max_total_over_bill}"
            )
        return problems


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
class StrategyContext:
    """What a strategy may take into account besides the bill.

    `committed` are the payments the consumer already committed to: the unpaid
    instalments of every agreed arrangement, with any biller, except the bill
    being negotiated (its new arrangement replaces any earlier one).
    """

    today: date
    biller_party_id: str
    account_id: str
    committed: tuple[Instalment, ...]


@dataclass(frozen=True)
class Accept:
    """Accept the biller's pending offer."""


@dataclass(frozen=True)
class Counter:
    """Counter with these terms (only while the thread has rounds left)."""

    terms: Terms


@dataclass(frozen=True)
class Reject:
    """End the thread without agreement; `note` goes to the biller, so it says nothing private."""

    note: str = ""
    reason: negotiation_pb2.RejectReason.ValueType = negotiation_pb2.REJECT_REASON_UNAFFORDABLE


@dataclass(frozen=True)
class Withdraw:
    """Walk away from the thread."""

    note: str = ""


@dataclass(frozen=True)
class Escalate:
    """Ask the user whether to accept the biller's pending offer; `reason` is shown to the user."""

    reason: str


Answer = Accept | Counter | Reject | Withdraw | Escalate


class Strategy(Protocol):
    """What to offer on a bill and how to answer the biller. Both methods run on the event loop: keep them
    fast and free of I/O. The agent checks every answer against the mandate (NEG-20) and the protocol
    (NEG-16) before it signs anything; an answer the protocol does not allow is replaced by a Withdraw.
    """

    def opening(self, bill: BillFacts, context: StrategyContext) -> tuple[Terms, Circumstances | None]:
        """The thread's first offer, and the circumstances to disclose with it (None: disclose nothing)."""
        ...

    def respond(
        self, bill: BillFacts, their_offer: Terms, my_last: Terms, rounds_left: int, context: StrategyContext
    ) -> Answer:
        """The answer to the biller's offer; `rounds_left` offers remain in the thread (0: no Counter)."""
        ...


# --- Asking the user --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalRequest:
    """A move outside the mandate that needs the user's explicit approval (NEG-20).

    `action` is "open" (make the opening offer `terms`, disclosing `circumstances`
    if any), "counter" (offer `terms`) or "accept" (accept the biller's `terms`).
    `violations` are the mandate's limits it breaks; `reason` the strategy's
    words when it escalated. Until `deadline` the thread can still move.
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


class PaymentNotSent(Exception):
    """Raised by a `PaymentSender` when the bank certainly did not execute the transfer (it may be tried again)."""


class PaymentSender(Protocol):
    """The user's bank."""

    async def send(self, order: PaymentOrder) -> str:
        """Execute the transfer and return the bank's reference for it (the proof of payment, PAY-9).

        Raise `PaymentNotSent` when the bank certainly did not pay. Any other failure
        leaves the payment in doubt: the agent never hands that intent over again
        (PAY-7) until `ConsumerAgent.resolve_payment` says what happened.
        """
        ...


class PaymentRefused(RemoteProtocolError):
    """The instructions fail PAY-8 (not the pinned biller's, not chained to our intent, another amount,
    past their pay-by time): nothing was paid, and nothing will be under them."""

    def __init__(self, reason: Reason, detail: str, intent_id: str) -> None:
        super().__init__(reason, detail)
        self.intent_id = intent_id


class PaymentInDoubt(Exception):
    """The intent was handed to the bank and its answer never came: it is not handed over again (PAY-7)."""

    def __init__(self, biller_party_id: str, intent_id: str) -> None:
        super().__init__(
            f"payment {intent_id!r} to {biller_party_id!r} was handed to the bank without an answer; "
            "check with the bank and call resolve_payment"
        )
        self.biller_party_id = biller_party_id
        self.intent_id = intent_id


@dataclass(frozen=True)
class Payment:
    """An intent and where it stands; `order` is set once instructions were verified."""

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


class PaymentDispute(Exception):
    """A receipt that does not match the instructions (PAY-9): the intent, instructions, receipt and
    bank proof are kept in the store; tell the user."""

    def __init__(self, receipt: PaymentReceipt) -> None:
        super().__init__(f"payment {receipt.intent_id!r} to {receipt.biller_party_id!r} is disputed: {receipt.dispute}")
        self.receipt = receipt


# --- What the agent returns -----------------------------------------------------------------------------------


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


class EventLogForked(RemoteProtocolError):
    """The biller sent two different signed events at one sequence of an account's log (EVT-5)."""

    def __init__(self, sequence: int, stored: envelope_pb2.Envelope, received: envelope_pb2.Envelope) -> None:
        super().__init__(Reason.PREVIOUS_DIGEST_MISMATCH, f"two different events at sequence {sequence}: a forked log")
        self.sequence = sequence
        self.stored = stored
        self.received = received


# --- Internals ------------------------------------------------------------------------------------------------


@dataclass
class _Session:
    """One biller link in memory: its channel, its verified chain and what Hello said."""

    link: BillerLinkRecord
    client: BillerClient
    chain: KeyChain
    limits: Limits
    hello: biller_service_pb2.HelloResponse | None = None
    refreshed_at: datetime | None = None

    @property
    def biller(self) -> str:
        return self.link.biller_party_id


@dataclass
class _Run:
    """A thread being driven: the core's state plus what the agent needs beside it."""

    session: _Session
    bill: ReceivedBill
    thread_id: bytes
    negotiation: core.Negotiation
    envelopes: list[envelope_pb2.Envelope]
    my_last: Terms
    awaiting: bool
    disclosure: bytes | None
    violation: ProtocolError | None = None
    refusal: ProtocolError | CallError | None = None

    @property
    def deadline(self) -> datetime:
        assert self.negotiation.deadline is not None
        return self.negotiation.deadline


class _BrokenLog(Exception):
    """An event that cannot be taken (verification, gap, broken chain): reconnect from the cursor."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(str(error))
        self.error = error


def _envelope(data: bytes) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(data)


def _negotiation_payload(envelope: envelope_pb2.Envelope) -> NegotiationPayload:
    return _NEGOTIATION_PAYLOADS[envelope.payload_type].FromString(envelope.payload)


def _outcome(state: core.State) -> ThreadOutcome:
    return ThreadOutcome(state.value) if state.terminal else ThreadOutcome.OPEN


def _error(pair: tuple[str, str] | None) -> ProtocolError | None:
    if pair is None:
        return None
    reason = Reason.__members__.get(pair[0], Reason.INTERNAL_ERROR)
    return RemoteProtocolError(reason, pair[1])


def _money(pb: Message, field_name: str) -> Money:
    """A received amount, decoded (TRM-1, TRM-3); RemoteProtocolError if it is not one."""
    if not pb.HasField(field_name):
        raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, f"{field_name} is missing")
    try:
        return Money.from_proto(getattr(pb, field_name))
    except LocalProtocolError as error:
        raise error.as_remote() from error


def _smaller(mine: int, announced: int) -> int:
    return min(mine, announced) if announced else mine


def _agreed_limits(own: Limits, announced: biller_service_pb2.Limits) -> Limits:
    """LIM-10: never send what the biller's announced limits refuse."""
    seconds = int(own.max_negotiation_time.total_seconds())
    return dataclasses.replace(
        own,
        max_envelope_bytes=_smaller(own.max_envelope_bytes, announced.max_envelope_bytes),
        max_rounds=_smaller(own.max_rounds, announced.max_rounds),
        max_negotiation_time=timedelta(seconds=_smaller(seconds, announced.max_negotiation_seconds)),
        max_instalments=_smaller(own.max_instalments, announced.max_instalments),
    )


def _agreed_terms(thread: ConsumerThreadRecord) -> tuple[Terms, bytes]:
    """The terms of an agreed thread and its agreement digest (the Accept's)."""
    accept_envelope = _envelope(thread.messages[-1].envelope)
    accept = _negotiation_payload(accept_envelope)
    assert isinstance(accept, negotiation_pb2.Accept), "an agreed thread ends with its Accept"
    offer = next(
        _negotiation_payload(_envelope(m.envelope)) for m in thread.messages if m.digest == accept.offer_digest
    )
    assert isinstance(offer, negotiation_pb2.ThreadOpen | negotiation_pb2.Offer)
    return Terms.from_proto(offer.terms), thread.messages[-1].digest


# --- The agent --------------------------------------------------------------------------------------------------


class ConsumerAgent:
    """The consumer side of Parley. See the module docstring; every method is a coroutine unless noted."""

    def __init__(
        self,
        *,
        party_id: str,
        signing_key: SigningKey,
        key_sets: KeyChain | Sequence[envelope_pb2.Envelope],
        store: ConsumerStore,
        strategy: Strategy,
        mandate: Mandate,
        approve: Approver | None = None,
        payment_sender: PaymentSender | None = None,
        clock: Clock | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_rounds: int = 6,
        negotiation_time: timedelta = timedelta(days=2),
        message_lifetime: timedelta = timedelta(minutes=15),
        retry: RetryPolicy = DEFAULT_RETRY,
        watch_failure_limit: int = 20,
        client_certificate: tuple[bytes, bytes] | None = None,
    ) -> None:
        """`key_sets` is our own chain (verified here if given as envelopes).

        `client_certificate` is (certificate chain PEM, private key PEM), presented on
        every TLS channel to a biller that asks for mutual TLS (TRN-9); it is held in
        memory only, never written to the store.

        `approve` asks the user about moves outside the mandate (default: an
        `AskAndWait`, available as `agent.approvals`). `max_rounds` and
        `negotiation_time` are what our openings ask for, lowered to the biller's
        announced limits. `message_lifetime` is the expire_time - create_time of
        what we sign (HDR-14: minutes). `watch_failure_limit` is how many bad
        events in a row `watch` tolerates before it raises. ValueError for a
        party id that is not one, a chain of another party, or a signing key
        not in the chain's newest version.
        """
        if not is_party_id(party_id):
            raise ValueError(f"{party_id!r} is not a party id (HDR-13)")
        chain = key_sets if isinstance(key_sets, KeyChain) else KeyChain.verify(list(key_sets), limits=limits)
        if chain.party_id != party_id:
            raise ValueError(f"the key set chain is {chain.party_id!r}'s, not {party_id!r}")
        if chain.latest.entry(signing_key.keyid) is None:
            raise ValueError(f"signing key {signing_key.keyid} is not in key set version {chain.latest.version}")
        if not timedelta(0) < message_lifetime <= limits.max_message_lifetime:
            raise ValueError(f"message_lifetime must be within (0, {limits.max_message_lifetime}]")
        if max_rounds < 1 or negotiation_time <= timedelta(0):
            raise ValueError("max_rounds must be at least 1 and negotiation_time positive")
        self.party_id = party_id
        self.key_chain = chain
        self.limits = limits
        self.clock: Clock = clock or SystemClock()
        self.approvals = AskAndWait()
        self._key = signing_key
        self._store = store
        self._strategy = strategy
        self._mandate = mandate
        self._approve: Approver = approve or self.approvals
        self._sender = payment_sender
        self._max_rounds = max_rounds
        self._negotiation_time = negotiation_time
        self._lifetime = message_lifetime
        self._retry = retry
        self._watch_failure_limit = watch_failure_limit
        self._client_certificate = client_certificate
        self._sessions: dict[str, _Session] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}

    async def close(self) -> None:
        """Close every biller channel (running watches end). The store is the caller's to close."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.client.close()

    async def __aenter__(self) -> ConsumerAgent:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # === Links and enrolment (§6) ==================================================================

    async def enrol(
        self,
        target: str,
        *,
        biller_party_id: str,
        fingerprint: bytes,
        account_id: str,
        code: str,
        tls: ClientTls | None = None,
        insecure: bool = False,
    ) -> BillerLink:
        """Enrol on an account with the material the biller gave out of band (§6.1) and pin the biller.

        `target` is the biller's endpoint ("host:port"); TLS unless `insecure`
        (loopback only, TRN-3). The biller's Hello must name the party and
        fingerprint given (VER-4), and its key set chain must start at
        `fingerprint` (KEY-12, ENR-10) before anything in the answer is trusted.
        Nothing is stored unless everything verifies. Raises CallError with the
        biller's reason (ENROLMENT_CODE_INVALID...), RemoteProtocolError
        (PIN_MISMATCH...) for an answer that does not verify, ValueError for
        unusable input (a code that is not 12 Crockford base32 characters).
        """
        normalized = normalize_enrolment_code(code)
        if not _CODE_FORM.fullmatch(normalized):
            raise ValueError("an enrolment code is 12 characters of Crockford base32, e.g. 7KQ2-M9XD-4RTB (ENR-7)")
        if not is_party_id(biller_party_id):
            raise ValueError(f"{biller_party_id!r} is not a party id (HDR-13)")
        if len(fingerprint) != DIGEST_BYTES:
            raise ValueError(f"an identity fingerprint is {DIGEST_BYTES} bytes (64 hex characters)")
        if not 0 < len(account_id) <= MAX_ID_CHARS:
            raise ValueError(f"account_id must be 1 to {MAX_ID_CHARS} characters")
        known = await self._store.get_link(biller_party_id)
        if known is not None and known.fingerprint != fingerprint:
            raise ValueError(f"{biller_party_id!r} is already pinned to another identity fingerprint (KEY-12)")
        link = BillerLinkRecord(
            biller_party_id=biller_party_id,
            target=target,
            fingerprint=fingerprint,
            insecure=insecure,
            root_certificates=None if tls is None else tls.root_certificates,
            server_name=None if tls is None else tls.server_name,
            enrolled_at=self.clock.now() if known is None else known.enrolled_at,
        )
        channel_tls = self._with_certificate(tls, insecure)
        client = BillerClient.connect(target, tls=channel_tls, insecure=insecure, retry=self._retry)
        try:
            hello = await client.hello()
            self._check_hello(hello, link)
            now = self.clock.now()
            request = seal(
                enrolment_pb2.EnrolmentRequest(
                    header=self._header(biller_party_id, secrets.token_bytes(THREAD_ID_BYTES), 0, b"", now),
                    account_id=account_id,
                    code=normalized,
                    consumer_key_set=self.key_chain.versions[0].envelope,
                ),
                self._key,
            )
            response = await client.enrol(request)
            chain = self._verify_enrolment(response, request, link, account_id)
            await self._store.save_enrolment(
                link,
                [envelope.SerializeToString() for envelope in chain.envelopes],
                LinkedAccountRecord(
                    biller_party_id,
                    account_id,
                    self.clock.now(),
                    request.SerializeToString(),
                    response.confirmation.SerializeToString(),
                ),
            )
            await self._publish_rotations(client)
        except BaseException:
            await client.close()
            raise
        previous = self._sessions.pop(biller_party_id, None)
        if previous is not None:
            await previous.client.close()
        stored = await self._store.get_link(biller_party_id)
        assert stored is not None
        session = _Session(stored, client, chain, _agreed_limits(self.limits, hello.limits), hello)
        self._sessions[biller_party_id] = session
        logger.info("enrolled biller=%s account=%s", biller_party_id, account_id)
        return await self._link_view(stored)

    async def links(self) -> list[BillerLink]:
        """Every biller enrolled with, as stored."""
        return [await self._link_view(link) for link in await self._store.links()]

    def _verify_enrolment(
        self,
        response: biller_service_pb2.EnrolResponse,
        request: envelope_pb2.Envelope,
        link: BillerLinkRecord,
        account_id: str,
    ) -> KeyChain:
        """ENR-10: the chain against the pin first, then the confirmation against that chain."""
        now = self.clock.now()
        chain = KeyChain.verify(list(response.biller_key_sets), pin=link.fingerprint, now=now, limits=self.limits)
        if chain.party_id != link.biller_party_id:
            raise RemoteProtocolError(
                Reason.WRONG_SENDER, f"the pinned chain is {chain.party_id!r}'s, not {link.biller_party_id!r}"
            )
        confirmation = open_envelope(
            response.confirmation,
            (enrolment_pb2.EnrolmentConfirmation,),
            sender_keys=chain,
            recipient=self.party_id,
            now=now,
            limits=self.limits,
        )
        request_header = enrolment_pb2.EnrolmentRequest.FromString(request.payload).header
        if confirmation.header.thread_id != request_header.thread_id:
            raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the confirmation belongs to another thread")
        check_sequence(confirmation.header, expected_sequence=1, expected_previous=digest(request))
        body = confirmation.message
        if body.account_id != account_id or body.consumer_party_id != self.party_id:
            raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, "the confirmation names another account or party")
        return chain

    async def _publish_rotations(self, client: BillerClient) -> None:
        """KEY-17: a biller learns our later key set versions before it sees a key only they list.

        The enrolment is stored by then, so a failure is logged, not raised.
        """
        for envelope in self.key_chain.envelopes[1:]:
            try:
                await client.publish_key_set(envelope)
            except CallError as error:
                if error.reason is not Reason.KEYSET_ROLLBACK:  # ROLLBACK: the biller holds a later version
                    logger.warning("publishing our key set failed: %s %s", error.reason.name, error.detail)
                    return

    async def _link_view(self, link: BillerLinkRecord) -> BillerLink:
        accounts = tuple(account.account_id for account in await self._store.linked_accounts(link.biller_party_id))
        tls = None if link.insecure else ClientTls(link.root_certificates, link.server_name)
        return BillerLink(link.biller_party_id, link.target, link.fingerprint, link.insecure, tls, accounts)

    def _with_certificate(self, tls: ClientTls | None, insecure: bool) -> ClientTls | None:
        """The channel's TLS settings with our client certificate, unless they carry one or the channel is plaintext."""
        if insecure or self._client_certificate is None or (tls is not None and tls.certificate_chain is not None):
            return tls
        chain, key = self._client_certificate
        base = tls or ClientTls()
        return dataclasses.replace(base, certificate_chain=chain, private_key=key)

    # === Bills (§7) =================================================================================

    async def bills(self, biller: str, *, account_id: str | None = None) -> list[ReceivedBill]:
        """The biller's bills for our accounts (or one), verified (BIL-3) and stored; oldest first.

        A bill that fails verification — not signed by the pinned biller, not for
        us, for another account, invalid — is logged and left out: it is never
        returned, stored or paid.
        """
        session = await self._session(biller)
        accounts = await self._accounts(biller, account_id)
        records: list[ReceivedBillRecord] = []
        for account in accounts:
            response = await session.client.list_bills(self._query(biller, account))
            for envelope in response.bills:
                record = await self._checked_bill(session, envelope, account)
                if record is not None:
                    records.append(record)
        stored = await self._store.save_bills(records)
        for new, kept in zip(records, stored, strict=True):
            if new.digest != kept.digest:
                logger.warning(
                    "biller=%s changed bill %s after presenting it (BIL-1); keeping the first", biller, new.bill_id
                )
        return [self._bill_view(record) for record in stored]

    async def _checked_bill(
        self, session: _Session, envelope: envelope_pb2.Envelope, account_id: str
    ) -> ReceivedBillRecord | None:
        try:
            verified = await self._open(session, envelope, (bill_pb2.Bill,), stored=True)
            check_sequence(verified.header, expected_sequence=0, expected_previous=b"")
            try:
                facts = BillFacts.from_proto(verified.message)
            except LocalProtocolError as error:
                raise error.as_remote() from error
            if facts.account_id != account_id:
                raise RemoteProtocolError(Reason.ACCOUNT_ACCESS_DENIED, f"the bill is for account {facts.account_id!r}")
        except RemoteProtocolError as error:
            logger.warning("biller=%s bill refused (%s): %s", session.biller, error.reason.name, error.detail)
            return None
        return ReceivedBillRecord(
            session.biller, facts.bill_id, account_id, envelope.SerializeToString(), verified.digest, self.clock.now()
        )

    def _bill_view(self, record: ReceivedBillRecord) -> ReceivedBill:
        envelope = _envelope(record.envelope)
        facts = BillFacts.from_proto(bill_pb2.Bill.FromString(envelope.payload))  # verified when stored
        return ReceivedBill(
            record.biller_party_id, record.account_id, facts, record.digest, envelope, record.received_at
        )

    async def _bill(self, session: _Session, bill_id: str) -> ReceivedBill:
        """A verified bill: from the store, else fetched with GetBill from each of our accounts."""
        record = await self._store.get_bill(session.biller, bill_id)
        if record is None:
            for account in await self._accounts(session.biller, None):
                try:
                    response = await session.client.get_bill(self._query(session.biller, account, bill_id=bill_id))
                except CallError as error:
                    if error.reason is Reason.NOT_FOUND:
                        continue
                    raise
                checked = await self._checked_bill(session, response.bill, account)
                if checked is not None and checked.bill_id == bill_id:
                    record = (await self._store.save_bills([checked]))[0]
                    break
        if record is None:
            raise LookupError(f"no verified bill {bill_id!r} from {session.biller!r}")
        return self._bill_view(record)

    # === Negotiation (§9) ===========================================================================

    async def negotiate(self, biller: str, bill_id: str) -> NegotiationResult:
        """Negotiate on a bill until the thread ends, or resume the thread still open on it.

        The strategy makes the offers and answers; the mandate decides what needs
        the user's approval (NEG-20). Returns the result (see `NegotiationResult`).
        Raises CallError when the biller cannot be reached after the retries (the
        thread, stored, resumes on the next call), LocalProtocolError when the
        strategy's opening is not valid terms, LookupError for an unknown bill.
        """
        async with self._lock("negotiate", biller, bill_id):
            session = await self._session(biller)
            await self._require(session, "negotiation")
            bill = await self._bill(session, bill_id)
            run = await self._resume(session, bill)
            if run is None:
                run = await self._start(session, bill)
                if run is None:
                    return NegotiationResult(biller, bill.account_id, bill_id, None, None)
            return await self._drive(run)

    async def negotiation(self, thread_id: bytes) -> NegotiationResult:
        """A thread's result as stored (LookupError if unknown)."""
        record = await self._store.get_thread(thread_id)
        if record is None:
            raise LookupError(f"no thread {thread_id.hex()}")
        return await self._result_of(record)

    async def export_bundle(self, thread_id: bytes) -> Bundle:
        """The `parley-bundle/1` of an agreed thread (BND-7): both chains, the bill, the thread through
        the Accept. ValueError unless the thread is agreed."""
        record = await self._store.get_thread(thread_id)
        if record is None:
            raise LookupError(f"no thread {thread_id.hex()}")
        if record.outcome is not ThreadOutcome.AGREED:
            raise ValueError(f"thread {thread_id.hex()} is {record.outcome.value}, not agreed")
        bill = await self._store.get_bill(record.biller_party_id, record.bill_id)
        assert bill is not None, "a thread's bill is stored before the thread"
        biller_chain = [_envelope(data) for data in await self._store.link_key_sets(record.biller_party_id)]
        return Bundle(
            key_sets={record.biller_party_id: biller_chain, self.party_id: list(self.key_chain.envelopes)},
            bill=_envelope(bill.envelope),
            thread=[_envelope(message.envelope) for message in record.messages],
        )

    async def _start(self, session: _Session, bill: ReceivedBill) -> _Run | None:
        """Open a thread: the strategy's opening, approved if outside the mandate, stored, then sent."""
        facts = bill.facts
        context = await self._context(session.biller, bill.account_id, facts.bill_id)
        terms, circumstances = self._strategy.opening(facts, context)
        violations = self._mandate.violations(terms, facts)
        if circumstances is not None and not self._mandate.allow_disclosure:
            violations.append("it discloses your circumstances to the biller")
        if violations:
            request = self._approval("open", session, bill, terms, violations, circumstances=circumstances)
            if not await self._ask(request):
                logger.info("biller=%s bill=%s opening declined by the user", session.biller, facts.bill_id)
                return None
        disclosure = b""
        if circumstances is not None:
            disclosure = negotiation_pb2.Disclosure(
                salt=secrets.token_bytes(_DISCLOSURE_SALT_BYTES), circumstances=circumstances.to_proto()
            ).SerializeToString(deterministic=True)
        negotiation = core.Negotiation(
            bill=facts,
            bill_digest=bill.digest,
            role=core.Role.CONSUMER,
            limits=session.limits,
            hardship_disclosed=circumstances is not None and circumstances.hardship,
        )
        now = self.clock.now()
        thread_id = secrets.token_bytes(THREAD_ID_BYTES)
        opening = core.Open(
            terms,
            min(self._max_rounds, session.limits.max_rounds),
            now + min(self._negotiation_time, session.limits.max_negotiation_time),
            bill.digest,
            hashlib.sha256(disclosure).digest() if disclosure else b"",  # PRV-2: exactly the bytes sent
        )
        envelope, message = sign_move(
            negotiation,
            opening,
            key=self._key,
            sender=self.party_id,
            recipient=session.biller,
            thread_id=thread_id,
            now=now,
            lifetime=self._lifetime,
            bill_id=facts.bill_id,
        )
        await self._store.create_thread(
            ConsumerThreadRecord(
                thread_id=thread_id,
                biller_party_id=session.biller,
                account_id=bill.account_id,
                bill_id=facts.bill_id,
                outcome=ThreadOutcome.OPEN,
                deadline=opening.deadline,
                opened_at=now,
                hardship_disclosed=negotiation.hardship_disclosed,
                awaiting_answer=True,
                disclosure=disclosure or None,
                violation=None,
                refusal=None,
                messages=(self._message_record(envelope, message.digest, self.party_id, now),),
            )
        )
        logger.info("biller=%s bill=%s thread=%s opened", session.biller, facts.bill_id, thread_id.hex())
        return _Run(session, bill, thread_id, negotiation, [envelope], terms, True, disclosure or None)

    async def _resume(self, session: _Session, bill: ReceivedBill) -> _Run | None:
        """The thread on the bill that can go on — open, or ended by our move that the biller has not
        acknowledged yet — rebuilt from the store (None if there is none)."""
        for record in reversed(await self._store.threads(session.biller, bill.facts.bill_id)):
            # An opening the biller refused leaves a thread without messages.
            if record.messages and (record.outcome is ThreadOutcome.OPEN or record.awaiting_answer):
                return self._rebuild(session, bill, record)
        return None

    def _rebuild(self, session: _Session, bill: ReceivedBill, record: ConsumerThreadRecord) -> _Run:
        """Replay the stored thread (already verified) through the core, each message at its own time."""
        negotiation = core.Negotiation(
            bill=bill.facts,
            bill_digest=bill.digest,
            role=core.Role.CONSUMER,
            limits=session.limits,
            hardship_disclosed=record.hardship_disclosed,
        )
        envelopes = []
        my_last: Terms | None = None
        for stored in record.messages:
            envelope = _envelope(stored.envelope)
            payload = _negotiation_payload(envelope)
            verified = Verified(payload, envelope, stored.digest, envelope.signatures[0].keyid)
            if stored.sender == self.party_id:
                negotiation.send(thread_message(verified, core.Role.CONSUMER), stored.received_at)
                if isinstance(payload, negotiation_pb2.ThreadOpen | negotiation_pb2.Offer):
                    my_last = Terms.from_proto(payload.terms)
            else:
                with contextlib.suppress(RemoteProtocolError):  # a violation's evidence: the thread ends there
                    negotiation.receive(thread_message(verified, core.Role.BILLER), stored.received_at)
            envelopes.append(envelope)
        if record.outcome is ThreadOutcome.EXPIRED and not negotiation.state.terminal:
            negotiation.state = core.State.EXPIRED
        assert my_last is not None, "a stored thread starts with our opening"
        return _Run(
            session,
            bill,
            record.thread_id,
            negotiation,
            envelopes,
            my_last,
            record.awaiting_answer,
            record.disclosure,
            violation=_error(record.violation),
            refusal=_error(record.refusal),
        )

    async def _drive(self, run: _Run) -> NegotiationResult:
        """Move the thread on until it ends or the biller refuses our move."""
        run.refusal = None
        while True:
            if run.awaiting:
                await self._exchange(run)
                if run.refusal is not None:
                    break
                continue
            state = run.negotiation.state
            if state.terminal:
                break
            if state is core.State.BILLER_TO_MOVE:
                # Our move is answered but no reply came with the answer: read the thread (NEG-22).
                if not await self._resync(run):
                    error = RemoteProtocolError(Reason.INTERNAL_ERROR, "the biller applied our move but did not reply")
                    await self._refuse(run, error, drop=False)
                    break
                continue
            if await self._expire(run):
                continue
            move = await self._decide(run)
            if move is None:
                await self._expire(run, force=True)
                continue
            await self._send(run, move)
        record = await self._store.get_thread(run.thread_id)
        assert record is not None
        return await self._result_of(record, refusal=run.refusal)

    async def _decide(self, run: _Run) -> core.Move | None:
        """Our next move: the strategy's answer, checked against the mandate (None: no time left to move)."""
        negotiation = run.negotiation
        pending = negotiation.pending
        assert pending is not None
        assert pending.by is core.Role.BILLER
        facts = run.bill.facts
        context = await self._context(run.session.biller, run.bill.account_id, facts.bill_id)
        rounds_left = negotiation.max_rounds - negotiation.rounds
        answer = self._strategy.respond(facts, pending.terms, run.my_last, rounds_left, context)
        if isinstance(answer, Accept | Escalate):
            violations = self._mandate.violations(pending.terms, facts)
            if violations or isinstance(answer, Escalate):
                reason = answer.reason if isinstance(answer, Escalate) else ""
                request = self._approval(
                    "accept", run.session, run.bill, pending.terms, violations, run=run, reason=reason
                )
                approved = await self._ask(request, run.deadline)
                if approved is None:
                    return None
                if not approved:
                    return core.Withdraw(DECLINED_NOTE)
            return core.Accept(pending.digest)
        if isinstance(answer, Counter):
            if rounds_left <= 0:
                logger.warning("thread=%s strategy countered with no rounds left; withdrawing", run.thread_id.hex())
                return core.Withdraw(NO_ROUNDS_NOTE)
            violations = self._mandate.violations(answer.terms, facts)
            if violations:
                request = self._approval("counter", run.session, run.bill, answer.terms, violations, run=run)
                approved = await self._ask(request, run.deadline)
                if approved is None:
                    return None
                if not approved:
                    return core.Withdraw(DECLINED_NOTE)
            return core.Offer(answer.terms)
        if isinstance(answer, Reject):
            why = answer.reason if answer.reason in _REJECT_REASONS else negotiation_pb2.REJECT_REASON_OTHER
            return core.Reject(why, answer.note[:MAX_TEXT_CHARS])
        return core.Withdraw(answer.note[:MAX_TEXT_CHARS])

    async def _send(self, run: _Run, move: core.Move) -> None:
        """Sign our move (the core refuses one the rules do not allow, NEG-16), store it, mark it unanswered."""
        now = self.clock.now()
        if now > run.deadline - self.limits.max_clock_skew:  # NEG-21: too late to move safely
            await self._expire(run, force=True)
            return
        try:
            envelope, message = self._sign(run, move, now)
        except LocalProtocolError as error:
            if isinstance(move, core.Withdraw):
                raise
            logger.warning(
                "thread=%s our %s is not allowed (%s); withdrawing",
                run.thread_id.hex(),
                type(move).__name__,
                error.reason.name,
            )
            envelope, message = self._sign(run, core.Withdraw(""), now)
        record = self._message_record(envelope, message.digest, self.party_id, now)
        await self._store.update_thread(
            ThreadUpdate(run.thread_id, (record,), _outcome(run.negotiation.state), awaiting_answer=True)
        )
        run.envelopes.append(envelope)
        run.awaiting = True
        if isinstance(message.move, core.Offer):
            run.my_last = message.move.terms

    def _sign(self, run: _Run, move: core.Move, now: datetime) -> tuple[envelope_pb2.Envelope, core.ThreadMessage]:
        return sign_move(
            run.negotiation,
            move,
            key=self._key,
            sender=self.party_id,
            recipient=run.session.biller,
            thread_id=run.thread_id,
            now=now,
            lifetime=self._lifetime,
        )

    async def _exchange(self, run: _Run) -> None:
        """Send our last message (again, byte for byte, NEG-18) and take the biller's answer."""
        opening = len(run.envelopes) == 1
        disclosure = run.disclosure if opening and run.disclosure is not None else b""
        try:
            response = await run.session.client.negotiate(run.envelopes[-1], disclosure)
        except CallError as error:
            await self._refused(run, error)
            return
        clear = run.disclosure is not None
        run.disclosure = None  # the opening is answered: the disclosure is needed no more (PRV-7)
        if response.HasField("reply"):
            await self._take_reply(run, response.reply, stored=False, clear_disclosure=clear)
            return
        state = run.negotiation.state
        if state is core.State.BILLER_TO_MOVE and response.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED:
            await self._expire(run, force=True)  # NEG-11: the deadline came before the biller could reply
            return
        # Our move is applied; when it called for a reply that did not come, `_drive` reads the thread.
        await self._store.update_thread(
            ThreadUpdate(run.thread_id, (), _outcome(state), awaiting_answer=False, clear_disclosure=clear)
        )
        run.awaiting = False

    async def _refused(self, run: _Run, error: CallError) -> None:
        """The biller's error for our last message (§13, ERR-6)."""
        if error.reason is Reason.NEGOTIATION_DEADLINE_PASSED:
            await self._expire(run, force=True)
            return
        recoverable = (
            Reason.SEQUENCE_MISMATCH,
            Reason.PREVIOUS_DIGEST_MISMATCH,
            Reason.THREAD_CLOSED,
            Reason.MESSAGE_EXPIRED,
        )
        if is_transient(error) or error.reason in recoverable:
            if await self._resync(run):
                return
            if is_transient(error):
                raise error  # stored as unanswered: the next negotiate() sends it again
        await self._refuse(run, error)

    async def _refuse(self, run: _Run, error: ProtocolError | CallError, *, drop: bool = True) -> None:
        """The thread cannot go on now; report why. With `drop`, the biller refused our last message
        (NEG-15: it changed nothing there), so it leaves our copy too and the thread stands where the
        biller has it: the next `negotiate` asks the strategy again."""
        logger.warning("thread=%s stopped: %s %s", run.thread_id.hex(), error.reason.name, error.detail)
        await self._store.update_thread(
            ThreadUpdate(
                run.thread_id,
                (),
                ThreadOutcome.OPEN if drop else _outcome(run.negotiation.state),
                awaiting_answer=False,
                refusal=(error.reason.name, error.detail),
                clear_disclosure=True,
                drop_from=len(run.envelopes) - 1 if drop else None,
            )
        )
        record = await self._store.get_thread(run.thread_id)
        assert record is not None
        if drop and record.messages:
            rebuilt = self._rebuild(run.session, run.bill, record)
            run.negotiation, run.envelopes, run.my_last = rebuilt.negotiation, rebuilt.envelopes, rebuilt.my_last
        run.awaiting = False
        run.disclosure = None
        run.refusal = error

    async def _take_reply(
        self, run: _Run, envelope: envelope_pb2.Envelope, *, stored: bool, clear_disclosure: bool = False
    ) -> None:
        """Verify the biller's move and put it through the core (NEG-15); a violation is kept as evidence."""
        verified = await self._open(run.session, envelope, NEGOTIATION_TYPES, stored=stored)
        if verified.header.thread_id != run.thread_id:
            raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the reply belongs to another thread")
        message = thread_message(verified, core.Role.BILLER)
        now = self.clock.now()
        record = self._message_record(envelope, verified.digest, run.session.biller, now)
        negotiation = run.negotiation
        try:
            negotiation.receive(message, now)
        except RemoteProtocolError as error:
            if negotiation.state is core.State.PROTOCOL_ERROR:  # NEG-17
                logger.warning(
                    "thread=%s the biller broke %s: %s; evidence kept",
                    run.thread_id.hex(),
                    error.reason.name,
                    error.detail,
                )
                await self._store.update_thread(
                    ThreadUpdate(
                        run.thread_id,
                        (record,),
                        ThreadOutcome.PROTOCOL_ERROR,
                        awaiting_answer=False,
                        violation=(error.reason.name, error.detail),
                        clear_disclosure=True,
                    )
                )
                run.envelopes.append(envelope)
                run.awaiting = False
                run.violation = error
                return
            if negotiation.state is core.State.EXPIRED:
                await self._expire(run, force=True)
                return
            raise
        await self._store.update_thread(
            ThreadUpdate(
                run.thread_id,
                (record,),
                _outcome(negotiation.state),
                awaiting_answer=False,
                clear_disclosure=clear_disclosure or negotiation.state.terminal,
            )
        )
        run.envelopes.append(envelope)
        run.awaiting = False

    async def _resync(self, run: _Run) -> bool:
        """NEG-22: read the thread back and take what the biller recorded beyond our copy; True if it moved on."""
        session = run.session
        try:
            response = await session.client.get_thread(
                self._query(session.biller, run.bill.account_id, thread_id=run.thread_id)
            )
        except CallError as error:
            logger.info("thread=%s GetThread failed: %s", run.thread_id.hex(), error.reason.name)
            return False
        theirs, ours = list(response.messages), run.envelopes
        for position, (their, our) in enumerate(zip(theirs, ours, strict=False)):
            if digest(their) != digest(our):
                raise RemoteProtocolError(
                    Reason.PREVIOUS_DIGEST_MISMATCH, f"the biller's copy of the thread differs at sequence {position}"
                )
        if len(theirs) < len(ours):  # the biller never applied our last message
            if response.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED:
                await self._expire(run, force=True)
                return True
            return False
        clear = run.disclosure is not None
        run.disclosure = None
        if len(theirs) > len(ours):
            await self._take_reply(run, theirs[len(ours)], stored=True, clear_disclosure=clear)
            return True
        if response.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED and not run.negotiation.state.terminal:
            await self._expire(run, force=True)
            return True
        await self._store.update_thread(
            ThreadUpdate(
                run.thread_id, (), _outcome(run.negotiation.state), awaiting_answer=False, clear_disclosure=clear
            )
        )
        progressed = run.awaiting
        run.awaiting = False
        return progressed

    async def _expire(self, run: _Run, *, force: bool = False) -> bool:
        """NEG-6: the thread is EXPIRED once its deadline has passed (or, forced, when it cannot move in time)."""
        negotiation = run.negotiation
        if negotiation.state.terminal:
            return False
        if not negotiation.expire(self.clock.now()):
            if not force:
                return False
            negotiation.state = core.State.EXPIRED
        await self._store.update_thread(
            ThreadUpdate(run.thread_id, (), ThreadOutcome.EXPIRED, awaiting_answer=False, clear_disclosure=True)
        )
        run.awaiting = False
        run.disclosure = None
        return True

    async def _result_of(
        self, record: ConsumerThreadRecord, refusal: ProtocolError | CallError | None = None
    ) -> NegotiationResult:
        bundle = agreement = None
        if record.outcome is ThreadOutcome.AGREED:
            bundle = await self.export_bundle(record.thread_id)
            link = await self._store.get_link(record.biller_party_id)
            assert link is not None
            # The agreement as anyone would verify it offline, with both identities pinned (BND-8).
            agreement = verify_bundle(
                bundle, pins={record.biller_party_id: link.fingerprint, self.party_id: self.key_chain.fingerprint}
            )
        return NegotiationResult(
            biller_party_id=record.biller_party_id,
            account_id=record.account_id,
            bill_id=record.bill_id,
            thread_id=record.thread_id,
            outcome=record.outcome,
            messages=tuple(_envelope(message.envelope) for message in record.messages),
            agreement=agreement,
            violation=_error(record.violation),
            refusal=refusal if refusal is not None else _error(record.refusal),
            _bundle=bundle,
        )

    def _approval(
        self,
        action: Literal["open", "counter", "accept"],
        session: _Session,
        bill: ReceivedBill,
        terms: Terms,
        violations: Sequence[str],
        *,
        run: _Run | None = None,
        reason: str = "",
        circumstances: Circumstances | None = None,
    ) -> ApprovalRequest:
        return ApprovalRequest(
            request_id=secrets.token_hex(8),
            action=action,
            biller_party_id=session.biller,
            account_id=bill.account_id,
            bill=bill.facts,
            terms=terms,
            violations=tuple(violations),
            reason=reason,
            circumstances=circumstances,
            thread_id=None if run is None else run.thread_id,
            deadline=None if run is None else run.deadline,
        )

    async def _ask(self, request: ApprovalRequest, deadline: datetime | None = None) -> bool | None:
        """The user's answer (NEG-20); None when none came while the thread could still move (NEG-21)."""
        timeout = None
        if deadline is not None:
            timeout = (deadline - self.limits.max_clock_skew - self.clock.now()).total_seconds()
            if timeout <= 0:
                return None
        logger.info(
            "approval needed: %s on %s (%s)", request.action, request.bill.bill_id, "; ".join(request.violations)
        )
        try:
            return bool(await asyncio.wait_for(self._approve(request), timeout))
        except TimeoutError:
            return None

    async def _context(self, biller: str, account_id: str, bill_id: str) -> StrategyContext:
        committed = await self.committed(excluding=[(biller, bill_id)])
        return StrategyContext(self.clock.now().date(), biller, account_id, committed)

    async def committed(self, *, excluding: Iterable[tuple[str, str]] = ()) -> tuple[Instalment, ...]:
        """The payments already committed to: the unpaid instalments of every agreed arrangement,
        with any biller, by date (what a strategy's cash-flow model subtracts).

        Only the latest agreement on a bill counts: a bill is negotiated again only once the biller
        ended its arrangement and offered renegotiation (NEG-3, EVT-7), so a later agreement replaces
        the earlier one. `excluding` lists (biller, bill id) pairs to leave out: bills about to be
        negotiated again, whose new arrangements will replace the old.
        """
        left_out = set(excluding)
        settled = {
            (intent.biller_party_id, intent.agreement_digest, intent.instalment_index)
            for intent in await self._store.intents()
            if intent.state in (IntentState.PAID, IntentState.SENDING)
        }
        latest = {
            (thread.biller_party_id, thread.bill_id): thread
            for thread in await self._store.threads(outcome=ThreadOutcome.AGREED)  # oldest first: the last wins
        }
        committed: list[Instalment] = []
        for key, thread in latest.items():
            if key in left_out:
                continue
            terms, agreement_digest = _agreed_terms(thread)
            committed.extend(
                instalment
                for index, instalment in enumerate(terms.schedule)
                if (thread.biller_party_id, agreement_digest, index) not in settled
            )
        return tuple(sorted(committed, key=lambda instalment: instalment.due_date))

    # === Payments (§10) =============================================================================

    async def pay(self, biller: str, bill_id: str, *, instalment_index: int | None = None) -> Payment:
        """Pay a bill, or one instalment of its agreement, through the `PaymentSender`, at most once.

        Under an agreement on the bill, `instalment_index` (zero-based) defaults to
        the first instalment not yet paid; without one, the bill's amount due is
        paid (index 0). The intent is stored before it is sent, so calling `pay`
        again — after a failure, a crash or a success — continues the same intent
        and never pays twice (PAY-2, PAY-7). Raises PaymentRefused (PAY-8),
        PaymentInDoubt (an earlier hand-over to the bank never answered), CallError
        (the biller refused the intent or could not be reached), LookupError for a
        bill never verified, ValueError for an instalment that does not exist.
        """
        if self._sender is None:
            raise RuntimeError("this agent has no PaymentSender (payment_sender=...)")
        async with self._lock("pay", biller, bill_id):
            session = await self._session(biller)
            bill = await self._bill(session, bill_id)
            agreement_digest, index, amount = await self._amount_to_pay(bill, instalment_index)
            intent = await self._store.find_intent(biller, bill_id, agreement_digest, index)
            if intent is None:
                intent = await self._store.create_intent(self._new_intent(bill, agreement_digest, index, amount))
                logger.info("biller=%s bill=%s intent=%s created for %s", biller, bill_id, intent.intent_id, amount)
            return await self._carry_out(session, intent)

    async def payments(self, biller: str | None = None) -> list[Payment]:
        """Every payment intent (of one biller, or all), oldest first."""
        return [self._payment(intent) for intent in await self._store.intents(biller)]

    async def resolve_payment(self, biller: str, intent_id: str, *, paid: bool, proof: str = "") -> Payment:
        """Settle an in-doubt payment once the bank said what happened: paid (with its proof) or not sent."""
        intent = await self._store.finish_sending(biller, intent_id, paid=paid, proof=proof, now=self.clock.now())
        return self._payment(intent)

    async def receipt(self, biller: str, intent_id: str) -> PaymentReceipt | None:
        """The verified receipt of a payment, or None while the biller has not seen it settle (PAY-5).

        The receipt must be signed by the pinned biller and chain to the
        instructions (PAY-9); one whose amount differs from the instructed amount
        is stored and raised as PaymentDispute.
        """
        intent = await self._store.get_intent(biller, intent_id)
        if intent is None:
            raise LookupError(f"no payment intent {intent_id!r} with {biller!r}")
        if intent.instructions is None or intent.state is IntentState.REFUSED:
            raise ValueError(f"intent {intent_id!r} has no instructions it was paid under")
        stored = await self._store.get_receipt(biller, intent_id)
        if stored is None:
            session = await self._session(biller)
            try:
                response = await session.client.get_receipt(self._query(biller, intent.account_id, intent_id=intent_id))
            except CallError as error:
                if error.reason is Reason.PAYMENT_NOT_SETTLED:
                    return None
                raise
            stored = await self._store.save_receipt(await self._checked_receipt(session, intent, response.receipt))
        result = self._receipt_view(stored)
        if result.dispute is not None:
            logger.warning("biller=%s intent=%s disputed: %s", biller, intent_id, result.dispute)
            raise PaymentDispute(result)
        return result

    async def _amount_to_pay(self, bill: ReceivedBill, instalment_index: int | None) -> tuple[bytes, int, Money]:
        """(agreement digest, instalment index, amount) of what is paid (PAY-3)."""
        agreed = await self._store.threads(bill.biller_party_id, bill.facts.bill_id, ThreadOutcome.AGREED)
        if not agreed:
            if instalment_index not in (None, 0):
                raise ValueError("without an agreement, a bill is paid whole (instalment 0)")
            return b"", 0, bill.facts.amount_due
        if agreed[-1].awaiting_answer:
            raise ValueError(f"our acceptance on {bill.facts.bill_id!r} has not reached the biller: negotiate again")
        terms, agreement_digest = _agreed_terms(agreed[-1])
        if instalment_index is None:
            paid = {
                intent.instalment_index
                for intent in await self._store.intents(bill.biller_party_id)
                if intent.agreement_digest == agreement_digest and intent.state is IntentState.PAID
            }
            unpaid = [index for index in range(len(terms.schedule)) if index not in paid]
            if not unpaid:
                raise ValueError(f"every instalment of the agreement on {bill.facts.bill_id!r} is paid")
            instalment_index = unpaid[0]
        if not 0 <= instalment_index < len(terms.schedule):
            raise ValueError(f"the agreement has {len(terms.schedule)} instalments")
        return agreement_digest, instalment_index, terms.schedule[instalment_index].amount

    def _new_intent(self, bill: ReceivedBill, agreement_digest: bytes, index: int, amount: Money) -> IntentRecord:
        intent_id = f"pi-{secrets.token_hex(16)}"
        thread_id = secrets.token_bytes(THREAD_ID_BYTES)
        now = self.clock.now()
        record = IntentRecord(
            biller_party_id=bill.biller_party_id,
            intent_id=intent_id,
            account_id=bill.account_id,
            bill_id=bill.facts.bill_id,
            agreement_digest=agreement_digest,
            instalment_index=index,
            amount_minor=amount.minor,
            currency=amount.currency.code,
            thread_id=thread_id,
            state=IntentState.CREATED,
            created_at=now,
            messages=(),
        )
        return dataclasses.replace(record, messages=(self._intent_envelope(record, now).SerializeToString(),))

    def _intent_envelope(self, intent: IntentRecord, now: datetime) -> envelope_pb2.Envelope:
        """A signed PaymentIntent for the intent (the same content every time, PAY-2)."""
        return seal(
            payment_pb2.PaymentIntent(
                header=self._header(intent.biller_party_id, intent.thread_id, 0, b"", now),
                intent_id=intent.intent_id,
                account_id=intent.account_id,
                bill_id=intent.bill_id,
                agreement_digest=intent.agreement_digest,
                instalment_index=intent.instalment_index,
                amount=Money.of(intent.amount_minor, intent.currency).to_proto(),
            ),
            self._key,
        )

    async def _carry_out(self, session: _Session, intent: IntentRecord) -> Payment:
        """Move an intent on: instructions, then the bank, each step at most once."""
        if intent.state is IntentState.CREATED:
            intent = await self._instruct(session, intent)
        if intent.state is IntentState.REFUSED:
            reason, detail = intent.refusal or (Reason.MALFORMED_PAYLOAD.name, "refused instructions")
            raise PaymentRefused(Reason.__members__.get(reason, Reason.MALFORMED_PAYLOAD), detail, intent.intent_id)
        if intent.state is IntentState.SENDING:
            raise PaymentInDoubt(intent.biller_party_id, intent.intent_id)
        if intent.state is IntentState.PAID:
            return self._payment(intent)
        order = self._order(intent)
        now = self.clock.now()
        if order.pay_by_time < now:  # PAY-8: never pay under instructions past their time
            raise PaymentRefused(
                Reason.MESSAGE_EXPIRED, f"the instructions were to be paid by {order.pay_by_time}", intent.intent_id
            )
        # PAY-7: recorded as being paid before the bank is asked, so no crash or retry pays twice.
        if not await self._store.begin_sending(intent.biller_party_id, intent.intent_id, now):
            current = await self._store.get_intent(intent.biller_party_id, intent.intent_id)
            assert current is not None
            return await self._carry_out(session, current)
        assert self._sender is not None
        try:
            proof = await self._sender.send(order)
        except PaymentNotSent:
            await self._store.finish_sending(
                intent.biller_party_id, intent.intent_id, paid=False, proof="", now=self.clock.now()
            )
            raise
        intent = await self._store.finish_sending(
            intent.biller_party_id, intent.intent_id, paid=True, proof=proof, now=self.clock.now()
        )
        logger.info("biller=%s intent=%s paid %s", intent.biller_party_id, intent.intent_id, order.amount)
        return self._payment(intent)

    async def _instruct(self, session: _Session, intent: IntentRecord) -> IntentRecord:
        """Send the intent (the stored envelope, or a fresh signature of the same content once it expired)
        and take the instructions, checked as PAY-8 says."""
        envelopes = [_envelope(data) for data in intent.messages]
        if not envelopes or self._expired(envelopes[-1]):
            envelopes.append(await self._resign_intent(intent))
        try:
            response = await session.client.create_payment_intent(envelopes[-1])
        except CallError as error:
            if error.reason is not Reason.MESSAGE_EXPIRED:
                raise
            envelopes.append(await self._resign_intent(intent))  # the biller's clock is ahead of ours
            response = await session.client.create_payment_intent(envelopes[-1])
        try:
            verified = await self._open(session, response.instructions, (payment_pb2.PaymentInstructions,), stored=True)
        except RemoteProtocolError as error:  # not the pinned biller's: nothing to keep, nothing to pay
            raise PaymentRefused(error.reason, f"instructions refused: {error.detail}", intent.intent_id) from error
        refusal = self._check_instructions(verified, intent, {digest(envelope) for envelope in envelopes})
        intent = await self._store.record_instructions(
            intent.biller_party_id, intent.intent_id, response.instructions.SerializeToString(), refusal
        )
        if refusal is not None:
            logger.warning(
                "biller=%s intent=%s instructions refused: %s", intent.biller_party_id, intent.intent_id, refusal
            )
        return intent

    async def _resign_intent(self, intent: IntentRecord) -> envelope_pb2.Envelope:
        envelope = self._intent_envelope(intent, self.clock.now())
        await self._store.add_intent_message(intent.biller_party_id, intent.intent_id, envelope.SerializeToString())
        return envelope

    def _expired(self, envelope: envelope_pb2.Envelope) -> bool:
        header = payment_pb2.PaymentIntent.FromString(envelope.payload).header
        return read_time(header, "expire_time", Reason.MALFORMED_HEADER) <= self.clock.now()

    def _check_instructions(
        self, verified: Verified[payment_pb2.PaymentInstructions], intent: IntentRecord, intent_digests: set[bytes]
    ) -> tuple[str, str] | None:
        """PAY-8 on signed instructions: (reason, detail) of the first check they fail, else None."""
        header, body = verified.header, verified.message
        try:
            if header.thread_id != intent.thread_id:
                raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the instructions belong to another thread")
            if header.sequence != 1:
                raise RemoteProtocolError(Reason.SEQUENCE_MISMATCH, f"instructions at sequence {header.sequence}")
            if header.previous_digest not in intent_digests:
                raise RemoteProtocolError(
                    Reason.PREVIOUS_DIGEST_MISMATCH, "the instructions do not chain to our intent"
                )
            if body.intent_id != intent.intent_id:
                raise RemoteProtocolError(
                    Reason.MALFORMED_PAYLOAD, f"the instructions are for intent {body.intent_id!r}"
                )
            amount = _money(body, "amount")
            intended = Money.of(intent.amount_minor, intent.currency)
            if amount != intended:
                raise RemoteProtocolError(
                    Reason.PAYMENT_AMOUNT_MISMATCH, f"the instructions ask for {amount}; the intent pays {intended}"
                )
            if not body.payment_reference:
                raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, "the instructions carry no payment reference")
            pay_by = read_time(body, "pay_by_time", Reason.MALFORMED_PAYLOAD)
            if pay_by < self.clock.now():
                raise RemoteProtocolError(Reason.MESSAGE_EXPIRED, f"the instructions were to be paid by {pay_by}")
        except RemoteProtocolError as error:
            return error.reason.name, error.detail
        return None

    async def _checked_receipt(
        self, session: _Session, intent: IntentRecord, envelope: envelope_pb2.Envelope
    ) -> ReceiptRecord:
        """PAY-9: a receipt signed by the pinned biller, chained to the instructions; its amount compared."""
        verified = await self._open(session, envelope, (payment_pb2.Receipt,), stored=True)
        assert intent.instructions is not None
        instructions_envelope = _envelope(intent.instructions)
        if verified.header.thread_id != intent.thread_id:
            raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the receipt belongs to another thread")
        check_sequence(verified.header, expected_sequence=2, expected_previous=digest(instructions_envelope))
        if verified.message.intent_id != intent.intent_id:
            raise RemoteProtocolError(
                Reason.MALFORMED_PAYLOAD, f"the receipt is for intent {verified.message.intent_id!r}"
            )
        received = _money(verified.message, "amount_received")
        read_time(verified.message, "settle_time", Reason.MALFORMED_PAYLOAD)
        instructed = Money.from_proto(payment_pb2.PaymentInstructions.FromString(instructions_envelope.payload).amount)
        dispute = (
            None if received == instructed else f"the receipt says {received} was received; {instructed} was instructed"
        )
        return ReceiptRecord(
            session.biller,
            intent.intent_id,
            envelope.SerializeToString(),
            verified.digest,
            received.minor,
            dispute,
            self.clock.now(),
        )

    def _order(self, intent: IntentRecord) -> PaymentOrder:
        assert intent.instructions is not None
        body = payment_pb2.PaymentInstructions.FromString(_envelope(intent.instructions).payload)
        return PaymentOrder(
            biller_party_id=intent.biller_party_id,
            account_id=intent.account_id,
            bill_id=intent.bill_id,
            intent_id=intent.intent_id,
            amount=Money.from_proto(body.amount),
            rail=body.rail,
            payee_name=body.payee_name,
            payee_account=body.payee_account,
            payment_reference=body.payment_reference,
            pay_by_time=read_time(body, "pay_by_time", Reason.MALFORMED_PAYLOAD),
        )

    def _payment(self, intent: IntentRecord) -> Payment:
        usable = intent.instructions is not None and intent.state is not IntentState.REFUSED
        return Payment(
            biller_party_id=intent.biller_party_id,
            intent_id=intent.intent_id,
            account_id=intent.account_id,
            bill_id=intent.bill_id,
            agreement_digest=intent.agreement_digest,
            instalment_index=intent.instalment_index,
            amount=Money.of(intent.amount_minor, intent.currency),
            state=intent.state,
            order=self._order(intent) if usable else None,
            proof=intent.payment_proof,
        )

    @staticmethod
    def _receipt_view(record: ReceiptRecord) -> PaymentReceipt:
        envelope = _envelope(record.envelope)
        body = payment_pb2.Receipt.FromString(envelope.payload)
        return PaymentReceipt(
            biller_party_id=record.biller_party_id,
            intent_id=record.intent_id,
            amount_received=Money.from_proto(body.amount_received),
            remaining_balance=Money.from_proto(body.remaining_balance) if body.HasField("remaining_balance") else None,
            settle_time=read_time(body, "settle_time", Reason.MALFORMED_PAYLOAD),
            rail_reference=body.rail_reference,
            digest=record.digest,
            envelope=envelope,
            dispute=record.dispute,
        )

    # === Events (§11) ===============================================================================

    async def watch(self, biller: str, *, account_id: str | None = None) -> AsyncGenerator[AccountEvent, None]:
        """The account's verified events, from the stored cursor on, then live (EVT-5).

        Each event is verified (signature, recipient, the account's log id, next
        sequence, chained to the last event) and stored with the cursor in one
        transaction before it is yielded, so across reconnections and restarts
        none is lost and none is yielded twice. Duplicates are dropped; a gap, a
        broken chain, a bad event or a transport failure closes the stream and
        resumes from the cursor with backoff. Raises EventLogForked on two
        different events at one sequence, the error of the last bad event after
        `watch_failure_limit` in a row, and CallError for a permanent refusal
        (CURSOR_OUT_OF_RANGE: the biller's log is shorter than what it served
        before). `account_id` may be left out when the biller has one of our
        accounts. Use it inside `contextlib.aclosing(...)` so the stream closes
        when the loop ends.
        """
        (account,) = await self._accounts(biller, account_id, one=True)
        session = await self._session(biller)
        await self._require(session, "events")
        log_id = events_thread_id(biller, account)
        failures = 0
        while True:
            cursor = await self._store.event_cursor(biller, account)
            query = self._query(biller, account, start_sequence=cursor.next_sequence)
            try:
                async with contextlib.aclosing(session.client.watch_events(query)) as stream:
                    async for envelope in stream:
                        event = await self._take_event(session, account, log_id, envelope, cursor)
                        if event is None:
                            continue
                        cursor = EventCursor(event.sequence + 1, event.digest)
                        failures = 0
                        yield event
            except CallError as error:
                if error.code is grpc.StatusCode.CANCELLED:
                    return  # the agent was closed
                if not is_transient(error):
                    raise
                logger.info("watch biller=%s account=%s: %s; reconnecting", biller, account, error.code.name)
            except _BrokenLog as broken:
                logger.warning(
                    "watch biller=%s account=%s: %s %s; reconnecting from %d",
                    biller,
                    account,
                    broken.error.reason.name,
                    broken.error.detail,
                    cursor.next_sequence,
                )
                if failures >= self._watch_failure_limit:
                    raise broken.error from broken
            failures += 1
            await asyncio.sleep(self._retry.delay(min(failures, _WATCH_MAX_BACKOFF_STEP)))

    async def stored_events(self, biller: str, *, account_id: str | None = None, start: int = 0) -> list[AccountEvent]:
        """The events already taken from the account's log, from sequence `start`, in order."""
        (account,) = await self._accounts(biller, account_id, one=True)
        records = await self._store.stored_events(biller, account, start, limit=1_000_000)
        return [self._event_view(record) for record in records]

    async def _take_event(
        self,
        session: _Session,
        account: str,
        log_id: bytes,
        envelope: envelope_pb2.Envelope,
        cursor: EventCursor,
    ) -> AccountEvent | None:
        """Verify one streamed event and store it with the cursor; None for a duplicate."""
        try:
            verified = await self._open(session, envelope, (event_pb2.Event,), stored=True)
            header = verified.header
            if header.thread_id != log_id:
                raise RemoteProtocolError(Reason.MALFORMED_HEADER, "the event is not on the account's log (HDR-15)")
            if header.sequence < cursor.next_sequence:
                stored = await self._store.stored_events(session.biller, account, header.sequence, 1)
                if stored and stored[0].digest != verified.digest:
                    raise EventLogForked(header.sequence, _envelope(stored[0].envelope), envelope)
                return None
            check_sequence(header, expected_sequence=cursor.next_sequence, expected_previous=cursor.last_digest)
            event = self._event_facts(verified, session.biller, account)
        except EventLogForked:
            raise
        except RemoteProtocolError as error:
            raise _BrokenLog(error) from error
        record = ReceivedEventRecord(
            session.biller,
            account,
            event.sequence,
            envelope.SerializeToString(),
            verified.digest,
            event.kind,
            self.clock.now(),
        )
        try:
            await self._store.append_event(record, previous_digest=cursor.last_digest)
        except StoreConflict as conflict:  # another watcher of this store took it first
            raise _BrokenLog(conflict) from conflict
        return event

    @staticmethod
    def _event_facts(verified: Verified[event_pb2.Event], biller: str, account: str) -> AccountEvent:
        """EVT-1, EVT-2: the event's body is well formed and about our account."""
        body = verified.message

        def malformed(detail: str) -> RemoteProtocolError:
            return RemoteProtocolError(Reason.MALFORMED_PAYLOAD, detail)

        if body.kind not in _EVENT_KINDS:
            raise malformed(f"event kind {body.kind} is not defined")
        if body.account_id != account:
            raise malformed(f"the event is about account {body.account_id!r}")
        if len(body.message) > MAX_NOTE_CHARS:
            raise malformed(f"the event message is longer than {MAX_NOTE_CHARS} characters")
        reminder = body.kind == event_pb2.EVENT_KIND_REMINDER
        if (reminder and not 1 <= body.reminder_level <= _MAX_REMINDER_LEVEL) or (not reminder and body.reminder_level):
            raise malformed(f"reminder_level {body.reminder_level} does not fit the event kind")
        if len(body.thread_id) not in (0, THREAD_ID_BYTES) or len(body.related_digest) not in (0, DIGEST_BYTES):
            raise malformed("thread_id or related_digest has the wrong length")
        amount = _money(body, "amount") if body.HasField("amount") else None
        try:
            day = parse_date(body.date) if body.date else None
        except LocalProtocolError as error:
            raise error.as_remote() from error
        return AccountEvent(
            biller_party_id=biller,
            account_id=account,
            sequence=verified.header.sequence,
            kind=body.kind,
            bill_id=body.bill_id,
            thread_id=body.thread_id,
            amount=amount,
            date=day,
            reminder_level=body.reminder_level,
            message=body.message,
            related_digest=body.related_digest,
            digest=verified.digest,
            envelope=verified.envelope,
        )

    def _event_view(self, record: ReceivedEventRecord) -> AccountEvent:
        envelope = _envelope(record.envelope)
        body = event_pb2.Event.FromString(envelope.payload)  # verified when stored
        verified = Verified(body, envelope, record.digest, envelope.signatures[0].keyid)
        return self._event_facts(verified, record.biller_party_id, record.account_id)

    # === Sessions, verification and small helpers =====================================================

    async def _session(self, biller: str) -> _Session:
        """The biller's link in memory: restored from the store (chain re-verified against the pin)."""
        async with self._lock("session", biller):
            session = self._sessions.get(biller)
            if session is not None:
                return session
            link = await self._store.get_link(biller)
            if link is None:
                raise LookupError(f"not enrolled with {biller!r}")
            envelopes = [_envelope(data) for data in await self._store.link_key_sets(biller)]
            chain = KeyChain.verify(envelopes, pin=link.fingerprint, limits=self.limits)
            tls = None if link.insecure else ClientTls(link.root_certificates, link.server_name)
            tls = self._with_certificate(tls, link.insecure)
            client = BillerClient.connect(link.target, tls=tls, insecure=link.insecure, retry=self._retry)
            session = _Session(link, client, chain, self.limits)
            try:
                await self._hello(session)  # VER-2: Hello first on a new channel
            except BaseException:
                await client.close()
                raise
            self._sessions[biller] = session
            return session

    async def _hello(self, session: _Session) -> biller_service_pb2.HelloResponse:
        """The biller's Hello, checked against the pin (VER-4), and the limits we then keep to (LIM-10)."""
        if session.hello is None:
            hello = await session.client.hello()
            self._check_hello(hello, session.link)
            session.hello = hello
            session.limits = _agreed_limits(self.limits, hello.limits)
        return session.hello

    async def _require(self, session: _Session, feature: str) -> None:
        """VER-3: use only what the biller announced."""
        if feature not in (await self._hello(session)).features:
            raise ValueError(f"{session.biller!r} does not offer {feature!r} (VER-3)")

    @staticmethod
    def _check_hello(hello: biller_service_pb2.HelloResponse, link: BillerLinkRecord) -> None:
        """VER-2, VER-4: a version we speak, and the identity we pinned (the answer is unsigned: it can only fail)."""
        if hello.protocol_version not in SUPPORTED_VERSIONS:
            raise RemoteProtocolError(Reason.UNSUPPORTED_VERSION, f"the biller speaks version {hello.protocol_version}")
        if hello.biller_party_id != link.biller_party_id or hello.identity_fingerprint != link.fingerprint:
            raise RemoteProtocolError(
                Reason.PIN_MISMATCH, f"the endpoint is {hello.biller_party_id!r}, not the biller pinned"
            )

    async def _open(
        self, session: _Session, envelope: envelope_pb2.Envelope, expected: tuple[type[M], ...], *, stored: bool
    ) -> Verified[M]:
        """Open a biller message against the pinned chain, addressed to us (§3.8, AUZ-6).

        `stored` answers (bills, events, instructions, receipts) skip MESSAGE_EXPIRED
        but not MESSAGE_NOT_YET_VALID (PAY-10). On UNKNOWN_KEY or KEYSET_EXPIRED the
        chain is refreshed once (rate limited, KEY-20) and the message judged again.
        """
        for attempt in range(2):
            try:
                return self._open_now(session.chain, envelope, expected, stored=stored)
            except RemoteProtocolError as error:
                refreshable = error.reason in (Reason.UNKNOWN_KEY, Reason.KEYSET_EXPIRED)
                if attempt or not refreshable or not await self._refresh(session):
                    raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _open_now(
        self, chain: KeyChain, envelope: envelope_pb2.Envelope, expected: tuple[type[M], ...], *, stored: bool
    ) -> Verified[M]:
        now = self.clock.now()
        if not stored:
            return open_envelope(
                envelope, expected, sender_keys=chain, recipient=self.party_id, now=now, limits=self.limits
            )
        verified = open_envelope(
            envelope, expected, sender_keys=chain, recipient=self.party_id, now=None, limits=self.limits
        )
        created = read_time(verified.header, "create_time", Reason.MALFORMED_HEADER)
        if created > now + self.limits.max_clock_skew:
            raise RemoteProtocolError(Reason.MESSAGE_NOT_YET_VALID, f"created {created}, now {now}")
        return verified

    async def _refresh(self, session: _Session) -> bool:
        """KEY-20: fetch the biller's newer key set versions (at most once a minute); True if the chain grew."""
        now = self.clock.now()
        if session.refreshed_at is not None and now - session.refreshed_at < KEYSET_REFRESH_INTERVAL:
            return False
        session.refreshed_at = now
        latest = session.chain.latest.version
        try:
            response = await session.client.get_key_sets(session.biller, latest)
            chain = session.chain
            for envelope in response.key_sets:
                chain = chain.extend(envelope, limits=self.limits)
            chain.check_fresh(now)
        except (ProtocolError, CallError) as error:
            logger.warning("biller=%s key set refresh failed: %s %s", session.biller, error.reason.name, error.detail)
            return False
        if chain.latest.version == latest:
            return False
        await self._store.append_link_key_sets(
            session.biller, latest + 1, [envelope.SerializeToString() for envelope in response.key_sets]
        )
        session.chain = chain
        logger.info("biller=%s key set chain now at version %d", session.biller, chain.latest.version)
        return True

    async def _accounts(self, biller: str, account_id: str | None, *, one: bool = False) -> list[str]:
        accounts = [account.account_id for account in await self._store.linked_accounts(biller)]
        if account_id is not None:
            if account_id not in accounts:
                raise LookupError(f"account {account_id!r} is not enrolled with {biller!r}")
            return [account_id]
        if not accounts:
            raise LookupError(f"not enrolled with {biller!r}")
        if one and len(accounts) > 1:
            raise ValueError(f"several accounts are enrolled with {biller!r}: name one")
        return accounts

    def _header(
        self, recipient: str, thread_id: bytes, sequence: int, previous_digest: bytes, now: datetime
    ) -> header_pb2.Header:
        return new_header(
            sender=self.party_id,
            recipient=recipient,
            thread_id=thread_id,
            sequence=sequence,
            previous_digest=previous_digest,
            now=now,
            lifetime=self._lifetime,
        )

    def _query(
        self,
        biller: str,
        account_id: str,
        *,
        bill_id: str = "",
        thread_id: bytes = b"",
        intent_id: str = "",
        start_sequence: int = 0,
    ) -> envelope_pb2.Envelope:
        """A signed read (§6.3): a one-message thread with exactly the fields its RPC needs (AUZ-4)."""
        query = account_pb2.AccountQuery(
            header=self._header(biller, secrets.token_bytes(THREAD_ID_BYTES), 0, b"", self.clock.now()),
            account_id=account_id,
            bill_id=bill_id,
            thread_id=thread_id,
            intent_id=intent_id,
            start_sequence=start_sequence,
        )
        return seal(query, self._key)

    def _message_record(
        self, envelope: envelope_pb2.Envelope, message_digest: bytes, sender: str, now: datetime
    ) -> MessageRecord:
        header = _negotiation_payload(envelope).header
        return MessageRecord(
            thread_id=header.thread_id,
            sequence=header.sequence,
            envelope=envelope.SerializeToString(),
            digest=message_digest,
            sender=sender,
            payload_type=envelope.payload_type,
            message_id=header.message_id,
            received_at=now,
        )

    def _lock(self, *key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())


__all__ = [
    "Accept",
    "AccountEvent",
    "Answer",
    "ApprovalRequest",
    "Approver",
    "AskAndWait",
    "BillerLink",
    "Circumstances",
    "ConsumerAgent",
    "Counter",
    "Escalate",
    "EventLogForked",
    "Mandate",
    "NegotiationResult",
    "Payment",
    "PaymentDispute",
    "PaymentInDoubt",
    "PaymentNotSent",
    "PaymentOrder",
    "PaymentReceipt",
    "PaymentRefused",
    "PaymentSender",
    "ReceivedBill",
    "Reject",
    "Strategy",
    "StrategyContext",
    "Withdraw",
]
