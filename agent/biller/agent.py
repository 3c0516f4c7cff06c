"""The embeddable biller agent: the biller side of Parley, with no transport in it.

`BillerAgent` holds the biller's identity (party id, signing key, key set chain),
a `BillerStore`, the biller's `Policy` and `PaymentRail`, and a `Clock`. It has
two faces:

- the **embedding API**, for the biller's own systems: `create_account`,
  `issue_enrolment_code`, `issue_bill`, `record_settlement`, `emit_event`,
  `offer_renegotiation`, and the reads `account` and `arrangements` (what a
  reminder or missed-instalment scheduler works from);
- the **protocol methods**, one per `BillerService` RPC, which the gRPC servicer
  (`agent.transport.server`) calls with the request's envelope(s). They return
  the response messages and raise `ProtocolError` with the spec reason.

Every signed request takes the receive path of PROTOCOL.md §3.8: envelope form
and payload type, the sender resolved by keyid among enrolled parties
(NOT_ENROLLED), `open_envelope` against that party's chain, authorization of the
account and then of the bill, thread or intent named (AUZ-1, AUZ-3), the replay
cache (HDR-8, HDR-12: an identical retry gets the stored answer), and only then
the RPC's own rules. Negotiation rules live in the sans-I/O core
(`agent.protocol.negotiation`); this module only feeds it the stored thread and
the received move, asks the policy for the biller's answer and stores the step.

Embedding it (the reference biller is a complete example)::

    store = await SqliteBillerStore.open("biller.sqlite")
    agent = BillerAgent(party_id="biller:energy.example", signing_key=key, key_sets=chain,
                        store=store, policy=MyPolicy(), rail=MyRail())
    server, port = await start_biller_server(agent, "0.0.0.0:7443", tls=(cert_pem, key_pem))

    await agent.create_account("acct-1001", "A. Holder")
    code = await agent.issue_enrolment_code("acct-1001")   # send it with the paper bill
    ...                                                    # once the holder's app has enrolled:
    bill_id = await agent.issue_bill("acct-1001", Money.parse("120.00", "EUR"), due, "Electricity, March")
    receipt = await agent.record_settlement("acct-1001", intent_id, amount, rail_reference)
    for arrangement in await agent.arrangements():         # a reminder scheduler's loop
        for index, instalment in arrangement.unpaid_instalments(): ...

    await server.stop(grace=5)
    await store.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message

from agent.clock import Clock, SystemClock
from agent.logs import log_step, request_ids, set_request_ids
from agent.lru import Lru
from agent.metrics import BillerMetrics
from agent.protocol.dsse import check_envelope_form, digest
from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KEYSET_PAYLOAD_TYPE, KeyChain
from agent.protocol.limits import (
    DEFAULT_LIMITS,
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
    new_header,
    open_envelope,
    parse_payload,
    seal,
    to_timestamp,
)
from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload, sign_move, thread_message
from agent.protocol.negotiation import Accept, Move, Negotiation, Offer, Open, Reject, Role, State, ThreadMessage
from agent.protocol.terms import AdvertisedOptions, BillFacts, Instalment, Money, Terms, parse_date, within_options
from agent.ratelimit import RateLimiter
from agent.stores.base import (
    AccountRecord,
    AgreementFacts,
    ArrangementRecord,
    BillerStore,
    BillRecord,
    BillStatus,
    Enrolment,
    EnrolmentCodeRecord,
    EventRecord,
    KeySetRecord,
    MessageRecord,
    NegotiationStep,
    NewThread,
    PaymentIntentRecord,
    PendingEvent,
    ReplayRecord,
    SealedSettlement,
    Settle,
    SettledPayment,
    StoreConflict,
    ThreadOutcome,
    ThreadRecord,
)
from agent.version import software_name
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
    terms_pb2,
)

logger = logging.getLogger("parley.biller")

M = TypeVar("M", bound=Message)

SERVER_NAME = software_name("biller")
# VER-3: everything this agent implements beyond the core RPCs.
FEATURES = ("negotiation", "instalments", "settlement", "hardship", "events", "erasure")
ENROLMENT_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32 (ENR-7)
ENROLMENT_CODE_VALIDITY = timedelta(days=30)  # ENR-4
DISCLOSURE_RETENTION = timedelta(days=90)  # PRV-6
_CODE_SALT_BYTES = 16
_DISCLOSURE_SALT_BYTES = 16
_CODE_ALIASES = str.maketrans({"I": "1", "L": "1", "O": "0"})
_INTENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_WATCH_BATCH = 100
# In-process caches, bounded (agent/lru.py); what they forget is read and verified again.
_PARTY_CACHE_ENTRIES = 10_000  # consumers' verified chains and keyid -> party (a few KiB per party)
_MOVE_CACHE_ENTRIES = 4_096  # thread messages parsed into the core's moves, by digest and role
# LIM-11: limits a biller may lower but not raise (peers and offline verifiers judge with the defaults).
_NOT_RAISABLE = (
    "max_envelope_bytes",
    "max_clock_skew",
    "max_message_lifetime",
    "max_rounds",
    "max_negotiation_time",
    "max_instalments",
    "enrolment_max_attempts",
)
_MAX_REMINDER_LEVEL = 3


def events_thread_id(biller_party_id: str, account_id: str) -> bytes:
    """The thread id of an account's event log (§5.2)."""
    seed = b"parley/v1/events/" + biller_party_id.encode() + b"\x00" + account_id.encode()
    return hashlib.sha256(seed).digest()[:THREAD_ID_BYTES]


def normalize_enrolment_code(text: str) -> str:
    """ENR-7: upper-case, drop spaces and hyphens, read I and L as 1 and O as 0, regroup by four with hyphens."""
    compact = text.upper().replace(" ", "").replace("-", "").translate(_CODE_ALIASES)
    return "-".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def _code_hash(salt: bytes, code: str) -> bytes:
    """ENR-8: only SHA-256(salt || normalized code) is ever stored."""
    return hashlib.sha256(salt + normalize_enrolment_code(code).encode()).digest()


# --- What the embedder plugs in --------------------------------------------------------------------


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


@dataclass(frozen=True)
class AcceptOffer:
    """Accept the consumer's offer."""


@dataclass(frozen=True)
class CounterOffer:
    """Counter with these terms (only while the thread has rounds left)."""

    terms: Terms


@dataclass(frozen=True)
class RejectOffer:
    """End the thread without agreement."""

    reason: negotiation_pb2.RejectReason.ValueType = negotiation_pb2.REJECT_REASON_OUT_OF_POLICY
    note: str = ""


Decision = AcceptOffer | CounterOffer | RejectOffer


class Policy(Protocol):
    """The biller's rules. Both methods run on the event loop: keep them fast and free of I/O."""

    def advertise(self, account_id: str, amount_due: Money, issue_date: date, due_date: date) -> AdvertisedOptions:
        """The options to advertise on a new bill; they bind the biller (NEG-12)."""
        ...

    def decide(self, context: OfferContext) -> Decision:
        """The answer to a consumer offer outside the advertised options.

        Offers inside them are accepted without asking (NEG-12). An answer the
        protocol does not allow (a counter past the round limit, invalid terms, an
        undefined reject reason) is replaced by RejectOffer(OUT_OF_POLICY) and logged.
        """
        ...


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
        paid = self.paid_instalments
        return tuple((i, instalment) for i, instalment in enumerate(self.terms.schedule) if i not in paid)


# --- Internals ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inbound(Generic[M]):
    """A verified request and its sender's party id."""

    verified: Verified[M]
    sender: str

    @property
    def message(self) -> M:
        return self.verified.message

    @property
    def header(self) -> header_pb2.Header:
        return self.verified.header


class _Wakeups:
    """Per-account notification for event watchers: `event(account)` is set when the log grows."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, account_id: str) -> asyncio.Event:
        return self._events.setdefault(account_id, asyncio.Event())

    def notify(self, records: Sequence[EventRecord]) -> None:
        for account_id in {record.account_id for record in records}:
            event = self._events.pop(account_id, None)
            if event is not None:
                event.set()


def _malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.MALFORMED_PAYLOAD, detail)


def _envelope(data: bytes) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(data)


def _bill_facts(bill: BillRecord) -> BillFacts:
    """The facts of a stored bill (signed by us, so it parses and validates)."""
    return BillFacts.from_proto(bill_pb2.Bill.FromString(_envelope(bill.envelope).payload))


def _stored_payload(envelope: envelope_pb2.Envelope) -> NegotiationPayload:
    cls = next(c for c in NEGOTIATION_TYPES if c.DESCRIPTOR.full_name == envelope.payload_type)
    return cls.FromString(envelope.payload)


_QUERY_TARGET = {"GetBill": "bill_id", "GetThread": "thread_id", "GetReceipt": "intent_id"}


def _check_query_shape(query: account_pb2.AccountQuery, rpc: str) -> None:
    """AUZ-4: a read sets exactly the fields its RPC needs (start_sequence only for WatchEvents)."""
    target = _QUERY_TARGET.get(rpc)
    for name in ("bill_id", "thread_id", "intent_id"):
        if bool(getattr(query, name)) != (name == target):
            raise _malformed(f"{rpc} needs {name} {'set' if name == target else 'empty'}")
    if target == "thread_id" and len(query.thread_id) != THREAD_ID_BYTES:
        raise _malformed(f"thread_id must be {THREAD_ID_BYTES} bytes")
    if query.start_sequence and rpc != "WatchEvents":
        raise _malformed(f"{rpc} needs start_sequence 0")


def _thread_outcome(state: State) -> ThreadOutcome:
    return ThreadOutcome(state.value) if state.terminal else ThreadOutcome.OPEN


def _end_of(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(0), UTC)


# --- The agent ---------------------------------------------------------------------------------------


class BillerAgent:
    """The biller side of Parley. See the module docstring; every method is a coroutine unless noted."""

    def __init__(
        self,
        *,
        party_id: str,
        signing_key: SigningKey,
        key_sets: KeyChain | Sequence[envelope_pb2.Envelope],
        store: BillerStore,
        policy: Policy,
        rail: PaymentRail,
        clock: Clock | None = None,
        limits: Limits = DEFAULT_LIMITS,
        message_lifetime: timedelta = timedelta(hours=1),
        watch_poll_interval: timedelta = timedelta(seconds=5),
        features: Sequence[str] = FEATURES,
        metrics: BillerMetrics | None = None,
    ) -> None:
        """`key_sets` is the biller's own chain (verified here if given as envelopes).

        `features` are announced in Hello (VER-3): announce only what is served in
        full, e.g. FEATURES + ("conformance-control",) when that service is exposed.

        `message_lifetime` is the expire_time - create_time of everything the agent
        signs. `watch_poll_interval` bounds how late an event appended by another
        process sharing the store reaches this process's watchers (events appended
        here wake them at once). `metrics` (default: new ones, on a registry of their
        own) count its protocol steps. ValueError if the key is not in the chain's
        newest version or the chain is another party's.
        """
        chain = key_sets if isinstance(key_sets, KeyChain) else KeyChain.verify(list(key_sets), limits=limits)
        if chain.party_id != party_id:
            raise ValueError(f"the key set chain is {chain.party_id!r}'s, not {party_id!r}")
        if chain.latest.entry(signing_key.keyid) is None:
            raise ValueError(f"signing key {signing_key.keyid} is not in key set version {chain.latest.version}")
        raised = [name for name in _NOT_RAISABLE if getattr(limits, name) > getattr(DEFAULT_LIMITS, name)]
        if raised:
            raise ValueError(f"LIM-11: these limits may not exceed the spec defaults: {', '.join(raised)}")
        if not timedelta(0) < message_lifetime <= limits.max_message_lifetime:
            raise ValueError(f"message_lifetime must be within (0, {limits.max_message_lifetime}]")
        self.party_id = party_id
        self.key_chain = chain
        self.limits = limits
        self.clock: Clock = clock or SystemClock()
        self.features = tuple(features)
        self.metrics = metrics if metrics is not None else BillerMetrics()
        self.rate_limiter = RateLimiter(limits)  # LIM-8: per process; the transport adds the peer limits
        self._key = signing_key
        self._store = store
        self._policy = policy
        self._rail = rail
        self._lifetime = message_lifetime
        self._watch_poll = watch_poll_interval.total_seconds()
        # Verification cache, by the stored bytes of the chain it was verified from; the store is the truth.
        self._chains: Lru[str, tuple[list[bytes], KeyChain]] = Lru(_PARTY_CACHE_ENTRIES)
        # keyid -> enrolled party: a stored keyid never moves to another party (KEY-21), so a hit stays true.
        self._keyid_parties: Lru[str, str] = Lru(_PARTY_CACHE_ENTRIES)
        # A stored message's move, by its digest (the digest fixes its bytes): a thread is replayed on every
        # move, and parsing its earlier messages again was most of that.
        self._moves: Lru[tuple[bytes, Role], ThreadMessage] = Lru(_MOVE_CACHE_ENTRIES)
        self._wakeups = _Wakeups()

    # === Embedding API ===================================================================================

    async def create_account(self, account_id: str, holder_name: str) -> None:
        """Add an account; AlreadyExists if the id is taken, ValueError if it is not 1..64 characters."""
        if not 0 < len(account_id) <= MAX_ID_CHARS:
            raise ValueError(f"account_id must be 1 to {MAX_ID_CHARS} characters")
        await self._store.create_account(account_id, holder_name, self.clock.now())

    async def account(self, account_id: str) -> AccountRecord | None:
        """The account, with its bound consumer party (None until enrolled), or None if unknown."""
        return await self._store.get_account(account_id)

    async def issue_enrolment_code(self, account_id: str, valid_for: timedelta = ENROLMENT_CODE_VALIDITY) -> str:
        """A fresh one-time code for the account holder, e.g. "7KQ2-M9XD-4RTB" (ENR-7).

        Only a salted hash is stored (ENR-8); the code is returned once and must reach
        the holder out of band, with the account id and `key_chain.fingerprint`.
        Issuing a code lifts an enrolment lock (ENR-5). Enrolling with it binds the
        account to the enrolling party, replacing any earlier binding (ENR-11).
        LookupError if the account does not exist.
        """
        if await self._store.get_account(account_id) is None:
            raise LookupError(f"no account {account_id!r}")
        code = normalize_enrolment_code("".join(secrets.choice(ENROLMENT_CODE_ALPHABET) for _ in range(12)))
        salt = secrets.token_bytes(_CODE_SALT_BYTES)
        now = self.clock.now()
        record = EnrolmentCodeRecord(account_id, salt, _code_hash(salt, code), now + valid_for, used=False)
        await self._store.add_enrolment_code(record, now)
        log_step(logger, "enrolment-code-issued", account=account_id)  # the code itself: never logged
        return code

    async def issue_bill(
        self,
        account_id: str,
        amount_due: Money,
        due_date: date,
        description: str,
        *,
        issue_date: date | None = None,
        bill_id: str | None = None,
        options: AdvertisedOptions | None = None,
    ) -> str:
        """Sign a bill to the account's consumer, store it and append BILL_ISSUED; returns the bill id.

        A Parley bill is addressed to the enrolled consumer, so the account must be
        enrolled first (ValueError otherwise): bill accounts that are not enrolled
        the usual way and send the enrolment code with it. `issue_date` defaults to
        today (the clock's), `bill_id` to a random id, `options` to
        `policy.advertise(...)`. The bill is validated as `BillFacts` does
        (LocalProtocolError); AlreadyExists if the bill id is taken.
        """
        recipient = await self._bound_consumer(account_id)
        now = self.clock.now()
        issue_date = issue_date or now.date()
        if options is None:
            options = self._policy.advertise(account_id, amount_due, issue_date, due_date)
        facts = BillFacts(
            bill_id=bill_id or f"bill-{secrets.token_hex(8)}",
            account_id=account_id,
            amount_due=amount_due,
            issue_date=issue_date,
            due_date=due_date,
            description=description,
            options=options,
        )
        bill = facts.to_proto()
        bill.header.CopyFrom(self._header(recipient, secrets.token_bytes(THREAD_ID_BYTES), 0, b"", now))
        envelope = seal(bill, self._key)
        record = BillRecord(
            bill_id=facts.bill_id,
            account_id=account_id,
            envelope=envelope.SerializeToString(),
            digest=digest(envelope),
            amount_minor=amount_due.minor,
            currency=amount_due.currency.code,
            due_date=due_date,
            status=BillStatus.OPEN,
            issued_at=now,
        )
        event = self._event(
            account_id,
            recipient,
            event_pb2.EVENT_KIND_BILL_ISSUED,
            now,
            bill_id=facts.bill_id,
            amount=amount_due,
            day=due_date,
            related_digest=record.digest,
            message=f"New bill: {description}, {amount_due} due {due_date.isoformat()}."[:MAX_NOTE_CHARS],
        )
        self._wakeups.notify(await self._store.insert_bill(record, [event]))
        log_step(logger, "bill-issued", account=account_id, bill=facts.bill_id)
        return facts.bill_id

    async def emit_event(
        self,
        account_id: str,
        kind: event_pb2.EventKind.ValueType,
        *,
        bill_id: str = "",
        thread_id: bytes = b"",
        amount: Money | None = None,
        day: date | None = None,
        reminder_level: int = 0,
        message: str = "",
        related_digest: bytes = b"",
    ) -> envelope_pb2.Envelope:
        """Append a signed event to the account's log (EVT-1) and wake its watchers; returns the envelope.

        For the biller's schedulers: REMINDER (reminder_level 1 to 3), INSTALMENT_DUE,
        INSTALMENT_MISSED, ARRANGEMENT_BROKEN... with the fields EVT-2 lists for the kind.
        The agent itself emits BILL_ISSUED, ARRANGEMENT_ACTIVE and PAYMENT_RECEIVED, and
        `offer_renegotiation` emits RENEGOTIATION_OFFERED. ValueError for an undefined
        kind, a reminder level outside its range or a message over 500 characters.
        """
        if kind not in event_pb2.EventKind.values() or kind == event_pb2.EVENT_KIND_UNSPECIFIED:
            raise ValueError(f"event kind {kind} is not defined")
        if kind == event_pb2.EVENT_KIND_REMINDER:
            if not 1 <= reminder_level <= _MAX_REMINDER_LEVEL:
                raise ValueError("a reminder has a reminder_level from 1 to 3")
        elif reminder_level:
            raise ValueError("only a reminder has a reminder_level")
        if len(message) > MAX_NOTE_CHARS:
            raise ValueError(f"message is longer than {MAX_NOTE_CHARS} characters")
        recipient = await self._bound_consumer(account_id)
        event = self._event(
            account_id,
            recipient,
            kind,
            self.clock.now(),
            bill_id=bill_id,
            thread_id=thread_id,
            amount=amount,
            day=day,
            reminder_level=reminder_level,
            message=message,
            related_digest=related_digest,
        )
        records = await self._store.append_events([event])
        self._wakeups.notify(records)
        return _envelope(records[0].envelope)

    async def offer_renegotiation(self, bill_id: str, *, message: str = "") -> envelope_pb2.Envelope:
        """Make a bill under an arrangement negotiable again and append RENEGOTIATION_OFFERED (EVT-7, NEG-3).

        For a scheduler that broke an arrangement after a missed instalment. LookupError
        unless the bill is under an arrangement; returns the event's envelope.
        """
        bill = await self._store.get_bill(bill_id)
        if bill is None:
            raise LookupError(f"no bill {bill_id!r}")
        arrangements = await self._store.arrangements(bill.account_id, active_only=True)
        thread_id = next((a.thread_id for a in arrangements if a.bill_id == bill_id), b"")
        recipient = await self._bound_consumer(bill.account_id)
        owed = Money.of(bill.amount_minor, bill.currency)
        event = self._event(
            bill.account_id,
            recipient,
            event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED,
            self.clock.now(),
            bill_id=bill_id,
            thread_id=thread_id,
            amount=owed,
            message=message[:MAX_NOTE_CHARS],
        )
        records = await self._store.reopen_bill(bill_id, [event])
        self._wakeups.notify(records)
        return _envelope(records[0].envelope)

    async def record_settlement(
        self,
        account_id: str,
        intent_id: str,
        amount: Money,
        rail_reference: str,
        *,
        settle_time: datetime | None = None,
    ) -> envelope_pb2.Envelope:
        """Record that the rail settled an intent: sign the Receipt, append PAYMENT_RECEIVED; returns the receipt.

        Idempotent: recording the same settlement again returns the same receipt. One
        intent never yields two payments (PAY-7): ValueError for a second settlement
        under another rail reference, and for an amount other than the instructed one
        (PAY-6: no receipt; resolve it out of band). LookupError for an unknown intent.
        """
        intent = await self._store.get_payment_intent(account_id, intent_id)
        if intent is None:
            raise LookupError(f"no payment intent {intent_id!r} on account {account_id!r}")
        instructed = Money.of(intent.amount_minor, intent.currency)
        if amount != instructed:
            raise ValueError(f"settled {amount}, instructed {instructed}: no receipt (PAY-6)")
        settled_at = settle_time or self.clock.now()
        recipient = await self._bound_consumer(account_id)
        instructions = _envelope(intent.instructions)
        thread_id = payment_pb2.PaymentInstructions.FromString(instructions.payload).header.thread_id

        def sealed(remaining_minor: int) -> SealedSettlement:
            now = self.clock.now()
            receipt = payment_pb2.Receipt(
                header=self._header(recipient, thread_id, 2, digest(instructions), now),
                intent_id=intent_id,
                amount_received=amount.to_proto(),
                settle_time=to_timestamp(settled_at),
                rail_reference=rail_reference,
                remaining_balance=Money(amount.currency, remaining_minor).to_proto(),
            )
            envelope = seal(receipt, self._key)
            thanks = self._event(
                account_id,
                recipient,
                event_pb2.EVENT_KIND_PAYMENT_RECEIVED,
                now,
                bill_id=intent.bill_id,
                amount=amount,
                related_digest=digest(envelope),
                message=f"Thank you: we received {amount}.",
            )
            return SealedSettlement(envelope, (thanks,))

        settlement, records = await self._store.settle(
            Settle(account_id, intent_id, amount.minor, rail_reference, settled_at, sealed)
        )
        if settlement.rail_reference != rail_reference:
            raise ValueError(f"intent {intent_id!r} was already settled under another rail reference (PAY-7)")
        self._wakeups.notify(records)
        if records:  # not a repeat of a settlement already recorded
            self.metrics.payments_settled.inc()
            log_step(logger, "payment-settled", account=account_id, intent=intent_id, thread_id=thread_id)
        return _envelope(settlement.receipt)

    async def arrangements(self, account_id: str | None = None, *, active_only: bool = True) -> list[Arrangement]:
        """Agreed arrangements (of one account, or all), oldest first, with the payments settled under each.

        Active means the bill is still under the arrangement: not fully paid, not
        reopened. This is what a reminder or missed-instalment scheduler reads.
        """
        return [
            self._arrangement(record) for record in await self._store.arrangements(account_id, active_only=active_only)
        ]

    async def awaited_payments(self) -> list[AwaitedPayment]:
        """Intents instructed but not settled, oldest first, read from the store: a payment rail restores
        from this after a restart, or sees what another replica instructed (PAY-7 still holds: each settles once)."""
        return [
            AwaitedPayment(
                record.account_id,
                record.intent_id,
                Money.of(record.amount_minor, record.currency),
                record.payment_reference,
            )
            for record in await self._store.unsettled_payment_intents()
        ]

    async def purge_expired(self, disclosure_retention: timedelta = DISCLOSURE_RETENTION) -> tuple[int, int]:
        """Retention: drop replay records no message can match any more (LIM-12) and erase disclosures
        older than `disclosure_retention` (PRV-6). Returns (replay records, disclosures) removed;
        run it periodically."""
        now = self.clock.now()
        replays = await self._store.purge_replay_cache(now)
        disclosures = await self._store.erase_disclosures_before(now - disclosure_retention)
        return replays, disclosures

    # === Protocol methods (called by the transport) ===============================================

    async def hello(self, request: biller_service_pb2.HelloRequest) -> biller_service_pb2.HelloResponse:
        """VER-2: the highest common version, our identity, features and limits."""
        common = set(request.protocol_versions) & set(SUPPORTED_VERSIONS)
        if not common:
            raise RemoteProtocolError(
                Reason.UNSUPPORTED_VERSION, f"no common protocol version; this biller speaks {SUPPORTED_VERSIONS}"
            )
        limits = self.limits
        return biller_service_pb2.HelloResponse(
            protocol_version=max(common),
            supported_versions=SUPPORTED_VERSIONS,
            biller_party_id=self.party_id,
            identity_fingerprint=self.key_chain.fingerprint,
            features=self.features,
            limits=biller_service_pb2.Limits(
                max_envelope_bytes=limits.max_envelope_bytes,
                max_clock_skew_seconds=int(limits.max_clock_skew.total_seconds()),
                max_message_lifetime_seconds=int(limits.max_message_lifetime.total_seconds()),
                max_rounds=limits.max_rounds,
                max_negotiation_seconds=int(limits.max_negotiation_time.total_seconds()),
                max_instalments=limits.max_instalments,
                max_open_threads_per_account=limits.max_open_threads_per_account,
                rate_limit_per_second=limits.rate_limit_per_second,
                rate_limit_burst=limits.rate_limit_burst,
                enrolment_max_attempts=limits.enrolment_max_attempts,
            ),
            server_name=SERVER_NAME,
        )

    async def get_key_sets(
        self, request: biller_service_pb2.GetKeySetsRequest
    ) -> biller_service_pb2.GetKeySetsResponse:
        """KEY-20: our own chain above `after_version`; consumers' chains are not served (NOT_FOUND)."""
        if request.party_id not in ("", self.party_id):
            raise RemoteProtocolError(Reason.NOT_FOUND, "this biller serves only its own key set chain")
        versions = [v.envelope for v in self.key_chain.versions if v.version > request.after_version]
        return biller_service_pb2.GetKeySetsResponse(key_sets=versions)

    async def publish_key_set(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.PublishKeySetResponse:
        """KEY-19: extend the publishing consumer's chain with its next version."""
        now = self.clock.now()
        signature = check_envelope_form(envelope, self.limits)
        if envelope.payload_type != KEYSET_PAYLOAD_TYPE:
            raise RemoteProtocolError(
                Reason.WRONG_PAYLOAD_TYPE, f"payloadType {envelope.payload_type!r} is not a KeySet"
            )
        party_id = await self._party_of(signature.keyid)
        chain = await self._consumer_chain(party_id)
        if digest(envelope) == chain.latest.digest:  # a retry of the version just stored (HDR-12)
            self.rate_limiter.admit_signer(signature.keyid, now)
            return biller_service_pb2.PublishKeySetResponse(version=chain.latest.version)
        extended = chain.extend(envelope, now=now, limits=self.limits)
        self.rate_limiter.admit_signer(signature.keyid, now)
        keyids = tuple(entry.key.keyid for entry in extended.latest.keys)
        await self._check_keyids_free(keyids, party_id)
        response = biller_service_pb2.PublishKeySetResponse(version=extended.latest.version)
        try:
            await self._store.append_key_set(
                KeySetRecord(party_id, extended.latest.version, envelope.SerializeToString(), keyids)
            )
        except StoreConflict:  # HDR-12: a copy of this version, published at the same time, was stored first
            if digest(envelope) != (await self._consumer_chain(party_id)).latest.digest:
                raise
            return response
        self._chains.pop(party_id)
        log_step(logger, "key-set-published", party=party_id, version=extended.latest.version)
        return response

    async def enrol(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.EnrolResponse:
        """Bind the consumer's key set to an account with a one-time code, in the order of ENR-1."""
        now = self.clock.now()
        # (1)-(2) The request carries the key that verifies it: parse only to take that key set.
        check_envelope_form(envelope, self.limits)
        request_type = enrolment_pb2.EnrolmentRequest
        if envelope.payload_type != request_type.DESCRIPTOR.full_name:
            raise RemoteProtocolError(
                Reason.WRONG_PAYLOAD_TYPE, f"payloadType {envelope.payload_type!r} is not an EnrolmentRequest"
            )
        unverified = parse_payload(request_type, envelope.payload)
        if not unverified.HasField("consumer_key_set"):
            raise RemoteProtocolError(Reason.KEYSET_INVALID, "the request carries no consumer_key_set")
        # (3) The carried version 1 as a chain, and KEY-21.
        carried = KeyChain.verify([unverified.consumer_key_set], now=now, limits=self.limits)
        party_id = carried.party_id
        await self._check_keyids_free(tuple(entry.key.keyid for entry in carried.latest.keys), party_id)
        # (4) The party's stored chain if it is the same chain (it may have rotated since).
        stored = await self._store.party_key_sets(party_id)
        chain = carried
        if stored and digest(_envelope(stored[0])) == carried.fingerprint:
            chain = await self._consumer_chain(party_id)
        # (5) The receive path against that chain.
        verified = open_envelope(
            envelope, (request_type,), sender_keys=chain, recipient=self.party_id, now=now, limits=self.limits
        )
        self.rate_limiter.admit_signer(verified.keyid, now, authenticates=False)  # anyone can make a key set
        inbound = _Inbound(verified, party_id)
        set_request_ids(inbound.header.thread_id, inbound.header.message_id)
        request = inbound.message
        # (6) Replay: a retry of the request that spent the code gets its confirmation (ENR-2).
        answer = await self._replayed(inbound)
        if answer is not None:
            return biller_service_pb2.EnrolResponse.FromString(answer)
        try:
            check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
            # (7) The code checks, and (8) the party id.
            code_hash = await self._check_code(request.account_id, request.code, now)
            if party_id == self.party_id or (stored and digest(_envelope(stored[0])) != carried.fingerprint):
                raise RemoteProtocolError(Reason.PARTY_ID_TAKEN, f"party id {party_id!r} is taken")

            confirmation = enrolment_pb2.EnrolmentConfirmation(
                header=self._header(party_id, inbound.header.thread_id, 1, verified.digest, now),
                account_id=request.account_id,
                consumer_party_id=party_id,
            )
            response = biller_service_pb2.EnrolResponse(
                confirmation=seal(confirmation, self._key), biller_key_sets=self.key_chain.envelopes
            )
            key_set = KeySetRecord(
                party_id,
                1,
                unverified.consumer_key_set.SerializeToString(),
                tuple(e.key.keyid for e in carried.latest.keys),
            )
            enrolment = Enrolment(
                request.account_id,
                code_hash,
                party_id,
                carried.fingerprint,
                key_set,
                now,
                self._replay_record(inbound, answer=response.SerializeToString()),
            )
            await self._store.enrol(enrolment)
            self.metrics.enrolments.inc()
            log_step(
                logger,
                "enrolled",
                account=request.account_id,
                party=party_id,
                thread_id=inbound.header.thread_id,
                message_id=inbound.header.message_id,
            )
            return response
        except RemoteProtocolError as error:
            answer = await self._answer_of_copy(inbound, error)
        return biller_service_pb2.EnrolResponse.FromString(answer)

    async def list_bills(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.ListBillsResponse:
        """The account's signed bills, oldest first."""
        query = await self._query(envelope, "ListBills")
        bills = await self._store.list_bills(query.account_id)
        self._log_read("ListBills", query.account_id, bills=len(bills))
        return biller_service_pb2.ListBillsResponse(bills=[_envelope(bill.envelope) for bill in bills])

    async def get_bill(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetBillResponse:
        """One signed bill of the account (NOT_FOUND if it is not on the account, AUZ-3)."""
        query = await self._query(envelope, "GetBill")
        bill = await self._store.get_bill(query.bill_id)
        if bill is None or bill.account_id != query.account_id:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no bill {query.bill_id!r} on the account")
        self._log_read("GetBill", query.account_id, bill=query.bill_id)
        return biller_service_pb2.GetBillResponse(bill=_envelope(bill.envelope))

    async def get_thread(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetThreadResponse:
        """NEG-22: every recorded message of a thread, sequence 0 first, with its current outcome."""
        query = await self._query(envelope, "GetThread")
        thread = await self._store.get_thread(query.thread_id)
        if thread is None or thread.account_id != query.account_id:
            raise RemoteProtocolError(Reason.NOT_FOUND, "no such thread on the account")
        negotiation = await self._rebuild(thread)
        self._log_read("GetThread", query.account_id, thread=query.thread_id, outcome=negotiation.state.value)
        return biller_service_pb2.GetThreadResponse(
            messages=[_envelope(message.envelope) for message in thread.messages],
            outcome=negotiation.state.outcome,
        )

    async def negotiate(
        self, envelope: envelope_pb2.Envelope, disclosure: bytes = b""
    ) -> biller_service_pb2.NegotiateResponse:
        """One consumer move, answered in the same call with the biller's move if the thread is open (NEG-11)."""
        inbound = await self._receive(envelope, NEGOTIATION_TYPES)
        thread_id = inbound.header.thread_id
        thread, bill = await self._locate_thread(inbound)
        answer = await self._replayed(inbound)  # NEG-18: the original reply (or error) to a retry
        if answer is not None:
            return await self._negotiate_retry(answer, thread_id)
        try:
            now = self.clock.now()
            message = thread_message(inbound.verified, Role.CONSUMER)
            self._moves.put((message.digest, Role.CONSUMER), message)  # replayed with the thread's next move
            disclosed = self._check_disclosure(inbound.message, disclosure)
            if thread is None:
                hardship = disclosed is not None and disclosed.circumstances.hardship
                negotiation = Negotiation(
                    bill=_bill_facts(bill),
                    bill_digest=bill.digest,
                    role=Role.BILLER,
                    limits=self.limits,
                    hardship_disclosed=hardship,
                )
            else:
                negotiation = self._replay_thread(thread, bill)
                if thread.disclosure is not None:
                    disclosed = negotiation_pb2.Disclosure.FromString(thread.disclosure)
            records = [self._message_record(inbound.verified, inbound.sender, now)]
            try:
                negotiation.receive(message, now)
            except RemoteProtocolError as error:
                await self._record_refusal(negotiation, thread, inbound, records[0], error=error, now=now)
                raise
            new_thread = None
            if isinstance(message.move, Open):
                await self._check_can_open(bill, now)
                new_thread = NewThread(
                    consumer_party_id=inbound.sender,
                    deadline=message.move.deadline,
                    disclosure=disclosure if disclosed is not None else None,
                    hardship_disclosed=negotiation.hardship_disclosed,
                    max_open_threads=self.limits.max_open_threads_per_account,
                )
            reply = None
            if negotiation.state is State.BILLER_TO_MOVE:
                circumstances = disclosed.circumstances if disclosed is not None else None
                reply = self._answer(negotiation, bill, inbound.sender, thread_id, circumstances=circumstances, now=now)
                records.append(self._message_record(reply, self.party_id, now))

            response = biller_service_pb2.NegotiateResponse(
                reply=reply.envelope if reply is not None else None, outcome=negotiation.state.outcome
            )
            step = NegotiationStep(
                account_id=bill.account_id,
                bill_id=bill.bill_id,
                thread_id=thread_id,
                messages=tuple(records),
                outcome=_thread_outcome(negotiation.state),
                now=now,
                replay=self._replay_record(inbound, answer=response.SerializeToString()),
                new_thread=new_thread,
                agreement=self._agreement_facts(negotiation),
                events=self._agreement_events(negotiation, bill, inbound.sender, thread_id, now),
            )
            self._wakeups.notify(await self._store.record_negotiation_step(step))
            if new_thread is not None:
                self.metrics.negotiations_opened.inc()
            self._count_outcome(negotiation)
            log_step(
                logger,
                "negotiate",
                account=bill.account_id,
                bill=bill.bill_id,
                thread_id=thread_id,
                message_id=inbound.header.message_id,
                seq=inbound.header.sequence,
                move=type(message.move).__name__,
                reply=type(negotiation.history[-1].move).__name__ if reply is not None else None,
                outcome=negotiation.state.value,
            )
            return response
        except RemoteProtocolError as error:
            answer = await self._answer_of_copy(inbound, error)
        return await self._negotiate_retry(answer, thread_id)

    async def create_payment_intent(
        self, envelope: envelope_pb2.Envelope
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        """A payment intent, answered with signed instructions; idempotent by intent_id (PAY-1..PAY-4)."""
        inbound = await self._receive(envelope, (payment_pb2.PaymentIntent,))
        intent = inbound.message
        if not _INTENT_ID.fullmatch(intent.intent_id):
            raise _malformed("intent_id must be 1 to 64 characters of [A-Za-z0-9_-]")
        await self._authorize(inbound.sender, intent.account_id)
        bill = await self._store.get_bill(intent.bill_id)
        if bill is None or bill.account_id != intent.account_id:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no bill {intent.bill_id!r} on the account")
        answer = await self._replayed(inbound)
        if answer is not None:
            return biller_service_pb2.CreatePaymentIntentResponse.FromString(answer)
        try:
            check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
            content_hash = self._intent_content_hash(intent)
            existing = await self._store.get_payment_intent(intent.account_id, intent.intent_id)
            if existing is not None:
                return await self._same_intent(inbound, existing, content_hash)

            amount = self._money(intent.amount, "amount") if intent.HasField("amount") else None
            owed, due = await self._amount_owed(intent, bill)
            if amount != owed:
                raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, f"the amount owed is {owed}")
            details = self._rail.instructions(intent.account_id, intent.intent_id, owed)
            if not details.payment_reference:
                raise ValueError("the payment rail gave an empty payment reference (PAY-4)")
            now = self.clock.now()
            instructions = payment_pb2.PaymentInstructions(
                header=self._header(inbound.sender, inbound.header.thread_id, 1, inbound.verified.digest, now),
                intent_id=intent.intent_id,
                amount=owed.to_proto(),
                rail=details.rail,
                payee_name=details.payee_name,
                payee_account=details.payee_account,
                payment_reference=details.payment_reference,
                pay_by_time=to_timestamp(max(_end_of(due), now + timedelta(days=1))),
            )
            response = biller_service_pb2.CreatePaymentIntentResponse(instructions=seal(instructions, self._key))
            record = PaymentIntentRecord(
                account_id=intent.account_id,
                intent_id=intent.intent_id,
                content_hash=content_hash,
                bill_id=intent.bill_id,
                agreement_digest=intent.agreement_digest,
                instalment_index=intent.instalment_index,
                amount_minor=owed.minor,
                currency=owed.currency.code,
                payment_reference=details.payment_reference,
                intent=envelope.SerializeToString(),
                instructions=response.instructions.SerializeToString(),
                created_at=now,
            )
            try:
                await self._store.insert_payment_intent(
                    record, self._replay_record(inbound, answer=response.SerializeToString())
                )
            except StoreConflict:  # PAY-2: another message with this intent id was applied meanwhile
                existing = await self._store.get_payment_intent(intent.account_id, intent.intent_id)
                if existing is None:
                    raise
                return await self._same_intent(inbound, existing, content_hash)
            self.metrics.payment_intents.inc()
            log_step(
                logger,
                "payment-intent",
                account=intent.account_id,
                bill=intent.bill_id,
                intent=intent.intent_id,
                amount=owed,
                thread_id=inbound.header.thread_id,
                message_id=inbound.header.message_id,
            )
            return response
        except RemoteProtocolError as error:
            answer = await self._answer_of_copy(inbound, error)
        return biller_service_pb2.CreatePaymentIntentResponse.FromString(answer)

    async def get_receipt(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetReceiptResponse:
        """The signed receipt of a settled intent (PAY-5)."""
        query = await self._query(envelope, "GetReceipt")
        if await self._store.get_payment_intent(query.account_id, query.intent_id) is None:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no intent {query.intent_id!r} on the account")
        settlement = await self._store.get_settlement(query.account_id, query.intent_id)
        if settlement is None:
            raise RemoteProtocolError(Reason.PAYMENT_NOT_SETTLED, f"intent {query.intent_id!r} is not settled yet")
        self._log_read("GetReceipt", query.account_id, intent=query.intent_id)
        return biller_service_pb2.GetReceiptResponse(receipt=_envelope(settlement.receipt))

    async def watch_events(self, envelope: envelope_pb2.Envelope) -> AsyncIterator[envelope_pb2.Envelope]:
        """EVT-3, EVT-4: check the query now, then stream the log from start_sequence and follow it live.

        Await this to validate the query (errors are raised here, before anything is
        streamed), then iterate the result; the stream ends only when the caller stops.
        """
        query = await self._query(envelope, "WatchEvents")
        length = await self._store.event_count(query.account_id)
        if query.start_sequence > length:
            raise RemoteProtocolError(
                Reason.CURSOR_OUT_OF_RANGE, f"start_sequence {query.start_sequence} is beyond the log's end {length}"
            )
        self._log_read("WatchEvents", query.account_id, start_sequence=query.start_sequence)
        return self._follow(query.account_id, query.start_sequence)

    async def request_erasure(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.RequestErasureResponse:
        """PRV-4: erase every disclosure held for the account; the signed messages stay."""
        inbound = await self._receive(envelope, (account_pb2.ErasureRequest,))
        account_id = inbound.message.account_id
        await self._authorize(inbound.sender, account_id)
        answer = await self._replayed(inbound)
        if answer is not None:
            return biller_service_pb2.RequestErasureResponse.FromString(answer)
        try:
            check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
            now = self.clock.now()
            responses: list[biller_service_pb2.RequestErasureResponse] = []

            def confirm(count: int) -> ReplayRecord:
                confirmation = account_pb2.ErasureConfirmation(
                    header=self._header(inbound.sender, inbound.header.thread_id, 1, inbound.verified.digest, now),
                    account_id=account_id,
                    erased_count=count,
                )
                response = biller_service_pb2.RequestErasureResponse(confirmation=seal(confirmation, self._key))
                responses.append(response)
                return self._replay_record(inbound, answer=response.SerializeToString())

            count = await self._store.erase_disclosures(account_id, confirm)
            log_step(
                logger,
                "erasure",
                account=account_id,
                erased=count,
                thread_id=inbound.header.thread_id,
                message_id=inbound.header.message_id,
            )
            return responses[-1]
        except RemoteProtocolError as error:
            answer = await self._answer_of_copy(inbound, error)
        return biller_service_pb2.RequestErasureResponse.FromString(answer)

    # === The receive path ============================================================================

    async def _receive(self, envelope: envelope_pb2.Envelope, expected: tuple[type[M], ...]) -> _Inbound[M]:
        """§3.8 steps 1-10 for a request from an enrolled consumer."""
        signature = check_envelope_form(envelope, self.limits)
        names = {cls.DESCRIPTOR.full_name for cls in expected}
        if envelope.payload_type not in names:
            raise RemoteProtocolError(
                Reason.WRONG_PAYLOAD_TYPE, f"payloadType {envelope.payload_type!r} is not one of {sorted(names)}"
            )
        party_id = await self._party_of(signature.keyid)
        chain = await self._consumer_chain(party_id)
        now = self.clock.now()
        verified = open_envelope(
            envelope, expected, sender_keys=chain, recipient=self.party_id, now=now, limits=self.limits
        )
        set_request_ids(verified.header.thread_id, verified.header.message_id)
        chain.check_fresh(now)  # KEY-13
        self.rate_limiter.admit_signer(verified.keyid, now)  # LIM-8: only a verified request costs its key
        return _Inbound(verified, party_id)

    async def _party_of(self, keyid: str) -> str:
        """AUZ-2: the enrolled party whose chain lists the keyid (at most one, KEY-21)."""
        party_id = self._keyid_parties.get(keyid) or await self._store.party_with_keyid(keyid)
        if party_id is None:
            raise RemoteProtocolError(Reason.NOT_ENROLLED, f"no enrolled party has key {keyid}")
        self._keyid_parties.put(keyid, party_id)
        return party_id

    async def _consumer_chain(self, party_id: str) -> KeyChain:
        """The party's stored chain, verified once per version (cached with the bytes it was verified from:
        read on every request, so a version published through another replica counts at once)."""
        stored = await self._store.party_key_sets(party_id)
        if not stored:
            raise RemoteProtocolError(Reason.NOT_ENROLLED, f"{party_id!r} is not enrolled")
        cached = self._chains.get(party_id)
        if cached is not None and cached[0] == stored:
            return cached[1]
        chain = KeyChain.verify([_envelope(data) for data in stored], limits=self.limits)
        self._chains.put(party_id, (stored, chain))
        return chain

    async def _check_keyids_free(self, keyids: Sequence[str], party_id: str) -> None:
        """KEY-21: no keyid of a new key set may be listed by another party's chain."""
        for keyid in keyids:
            owner = await self._store.party_with_keyid(keyid)
            if owner is not None and owner != party_id:
                raise RemoteProtocolError(Reason.KEYSET_INVALID, f"keyid {keyid} is another party's")

    async def _authorize(
        self, sender: str, account_id: str, reason: Reason = Reason.ACCOUNT_ACCESS_DENIED
    ) -> AccountRecord:
        """AUZ-1: the signer is bound to the account (the same answer when the account does not exist)."""
        account = await self._store.get_account(account_id) if account_id else None
        if account is None or account.consumer_party_id != sender:
            what = "the account" if reason is Reason.ACCOUNT_ACCESS_DENIED else "it"
            raise RemoteProtocolError(reason, f"the signer is not bound to {what}")
        return account

    async def _replayed(self, inbound: _Inbound[M]) -> bytes | None:
        """HDR-8, HDR-12: the stored answer to an identical earlier copy of this message, if any.

        Raises REPLAYED_MESSAGE for a different message with the same id, and the
        stored error when the original was answered with one.
        """
        entry = await self._store.replay_lookup(inbound.sender, inbound.header.message_id)
        if entry is None:
            return None
        if entry.digest != inbound.verified.digest:
            raise RemoteProtocolError(Reason.REPLAYED_MESSAGE, "message id already used for another message")
        if entry.error_reason is not None:
            raise RemoteProtocolError(Reason[entry.error_reason], entry.error_detail)
        return entry.answer

    async def _answer_of_copy(self, inbound: _Inbound[M], error: RemoteProtocolError) -> bytes:
        """HDR-12 under concurrency: `error` ended a request after its replay check found nothing.

        When a copy of the same message, received at the same time (a retry on another connection, or
        at another replica), was applied meanwhile, its effect is what this request ran into: the copy's
        stored answer (or error) is this request's answer too. Otherwise `error` stands.
        """
        answer = await self._replayed(inbound)
        if answer is None:
            raise error
        return answer

    def _replay_record(
        self, inbound: _Inbound[M], *, answer: bytes | None = None, error: RemoteProtocolError | None = None
    ) -> ReplayRecord:
        """LIM-12: kept until the message could no longer be accepted anyway."""
        expire_time = inbound.header.expire_time.ToDatetime(tzinfo=UTC)
        return ReplayRecord(
            sender=inbound.sender,
            message_id=inbound.header.message_id,
            digest=inbound.verified.digest,
            expires_at=expire_time + self.limits.max_clock_skew,
            answer=answer,
            error_reason=None if error is None else error.reason.name,
            error_detail="" if error is None else error.detail,
        )

    def _log_read(self, rpc: str, account_id: str, **fields: object) -> None:
        thread_id, message_id = request_ids()
        log_step(logger, "read", rpc=rpc, account=account_id, thread_id=thread_id, message_id=message_id, **fields)

    def _count_outcome(self, negotiation: Negotiation) -> None:
        """Metrics for a step that ended the thread: its outcome, and the agreement's kind."""
        if not negotiation.state.terminal:
            return
        self.metrics.negotiations.labels(negotiation.state.value).inc()
        terms = negotiation.agreed_terms
        if terms is not None:
            self.metrics.agreements.labels(terms.kind.name.lower()).inc()

    async def _query(self, envelope: envelope_pb2.Envelope, rpc: str) -> account_pb2.AccountQuery:
        """A signed read: receive path, query shape (AUZ-4), authorization (AUZ-1).

        Reads have no effect, so they are neither recorded nor looked up in the
        replay cache (HDR-11): a retry is answered afresh.
        """
        inbound = await self._receive(envelope, (account_pb2.AccountQuery,))
        query = inbound.message
        check_sequence(inbound.header, expected_sequence=0, expected_previous=b"")
        _check_query_shape(query, rpc)
        await self._authorize(inbound.sender, query.account_id)
        return query

    # === Negotiation helpers ===========================================================================

    async def _locate_thread(self, inbound: _Inbound[NegotiationPayload]) -> tuple[ThreadRecord | None, BillRecord]:
        """AUZ-3: the move's thread (None for a new one) and its bill, on an account bound to the signer."""
        thread = await self._store.get_thread(inbound.header.thread_id)
        if thread is not None:
            await self._authorize(inbound.sender, thread.account_id, Reason.NOT_FOUND)
            return thread, await self._stored_bill(thread.bill_id)
        payload = inbound.message
        if not isinstance(payload, negotiation_pb2.ThreadOpen):
            raise RemoteProtocolError(Reason.NOT_FOUND, "no such thread on the signer's accounts")
        bill = await self._store.get_bill(payload.bill_id)
        if bill is None:
            raise RemoteProtocolError(Reason.NOT_FOUND, f"no bill {payload.bill_id!r} on the signer's accounts")
        await self._authorize(inbound.sender, bill.account_id, Reason.NOT_FOUND)
        return None, bill

    def _check_disclosure(self, payload: NegotiationPayload, disclosure: bytes) -> negotiation_pb2.Disclosure | None:
        """PRV-3: the disclosure beside an opening matches its digest and parses strictly."""
        committed = payload.disclosure_digest if isinstance(payload, negotiation_pb2.ThreadOpen) else b""
        if not committed:
            if disclosure:
                raise _malformed("a disclosure travels only beside a ThreadOpen that commits to it")
            return None
        if not disclosure:
            raise _malformed("the opening commits to a disclosure that was not sent")
        if not hmac.compare_digest(hashlib.sha256(disclosure).digest(), committed):
            raise _malformed("the disclosure is not the one the opening commits to")
        try:
            parsed = parse_payload(negotiation_pb2.Disclosure, disclosure)
        except RemoteProtocolError as error:
            raise _malformed(f"the disclosure does not parse: {error.detail}") from error
        circumstances = parsed.circumstances
        purposes = (
            negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_ARRANGEMENT,
            negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP,
        )
        if len(parsed.salt) != _DISCLOSURE_SALT_BYTES:
            raise _malformed(f"the disclosure salt must be {_DISCLOSURE_SALT_BYTES} bytes")
        if not parsed.HasField("circumstances") or circumstances.purpose not in purposes:
            raise _malformed("the disclosure must state circumstances with a defined purpose")
        if circumstances.next_pay_date:
            try:
                parse_date(circumstances.next_pay_date)
            except LocalProtocolError as error:
                raise _malformed("next_pay_date is not a YYYY-MM-DD date") from error
        if len(circumstances.note) > MAX_NOTE_CHARS:
            raise _malformed(f"the disclosure note is longer than {MAX_NOTE_CHARS} characters")
        return parsed

    async def _stored_bill(self, bill_id: str) -> BillRecord:
        bill = await self._store.get_bill(bill_id)
        assert bill is not None, "threads reference existing bills"
        return bill

    async def _rebuild(self, thread: ThreadRecord) -> Negotiation:
        """The thread's state now: replayed from its log, with the deadline applied (NEG-6)."""
        negotiation = self._replay_thread(thread, await self._stored_bill(thread.bill_id))
        negotiation.expire(self.clock.now())
        return negotiation

    def _replay_thread(self, thread: ThreadRecord, bill: BillRecord) -> Negotiation:
        """Rebuild the core's state by replaying the stored (already verified) thread.

        Each message is judged at the time it was received, as it was then.
        """
        negotiation = Negotiation(
            bill=_bill_facts(bill),
            bill_digest=bill.digest,
            role=Role.BILLER,
            limits=self.limits,
            hardship_disclosed=thread.hardship_disclosed,
        )
        for record in thread.messages:
            if record.sender == self.party_id:
                negotiation.send(self._stored_move(record, Role.BILLER), record.received_at)
            else:
                with contextlib.suppress(RemoteProtocolError):  # a stored violation: the thread ends there
                    negotiation.receive(self._stored_move(record, Role.CONSUMER), record.received_at)
        if thread.outcome is ThreadOutcome.EXPIRED:  # ended by a move past the deadline: closed for good (NEG-14)
            negotiation.close_as_expired()
        return negotiation

    def _stored_move(self, record: MessageRecord, sender: Role) -> ThreadMessage:
        """A stored (already verified) message as the core sees it; RemoteProtocolError if it is not a move."""
        message = self._moves.get((record.digest, sender))
        if message is None:
            envelope = _envelope(record.envelope)
            verified = Verified(_stored_payload(envelope), envelope, record.digest, envelope.signatures[0].keyid)
            message = thread_message(verified, sender)
            self._moves.put((record.digest, sender), message)
        return message

    async def _record_refusal(
        self,
        negotiation: Negotiation,
        thread: ThreadRecord | None,
        inbound: _Inbound[NegotiationPayload],
        record: MessageRecord,
        *,
        error: RemoteProtocolError,
        now: datetime,
    ) -> None:
        """§9.5: a violation is stored as evidence (with its error, for retries); a late move expires the thread.

        A move on a thread that already ended (THREAD_CLOSED) is refused and changes nothing, even when
        the thread ended in a protocol error: only the move that broke a rule is evidence.
        """
        if thread is None:
            return
        if negotiation.state is State.PROTOCOL_ERROR and thread.outcome is ThreadOutcome.OPEN:
            log_step(
                logger,
                "negotiate-violation",
                logging.WARNING,
                account=thread.account_id,
                thread_id=record.thread_id,
                message_id=inbound.header.message_id,
                seq=record.sequence,
                reason=error.reason.name,
            )
            step = NegotiationStep(
                account_id=thread.account_id,
                bill_id=thread.bill_id,
                thread_id=thread.thread_id,
                messages=(record,),
                outcome=ThreadOutcome.PROTOCOL_ERROR,
                now=now,
                replay=self._replay_record(inbound, error=error),
            )
            await self._store.record_negotiation_step(step)
            self._count_outcome(negotiation)
        elif negotiation.state is State.EXPIRED:
            await self._store.mark_thread_expired(thread.thread_id)
            if thread.outcome is ThreadOutcome.OPEN:
                self._count_outcome(negotiation)
                log_step(logger, "negotiate-expired", account=thread.account_id, thread_id=thread.thread_id)

    async def _check_can_open(self, bill: BillRecord, now: datetime) -> None:
        """NEG-3 then LIM-7, after the opening passed the core's checks (re-checked when storing)."""
        open_bills = await self._store.open_thread_bills(bill.account_id, now)
        if bill.status is not BillStatus.OPEN or bill.bill_id in open_bills:
            raise RemoteProtocolError(Reason.BILL_NOT_NEGOTIABLE, f"bill {bill.bill_id!r} is not open to negotiation")
        if len(open_bills) >= self.limits.max_open_threads_per_account:
            raise RemoteProtocolError(
                Reason.TOO_MANY_OPEN_THREADS, f"the account has {len(open_bills)} open threads already"
            )

    def _answer(
        self,
        negotiation: Negotiation,
        bill: BillRecord,
        consumer: str,
        thread_id: bytes,
        *,
        circumstances: negotiation_pb2.Circumstances | None,
        now: datetime,
    ) -> Verified[NegotiationPayload]:
        """The biller's signed move: Accept inside the options (NEG-12), else the policy's decision."""
        pending = negotiation.pending
        assert pending is not None, "the biller moves only when the consumer made an offer"
        if within_options(pending.terms, negotiation.bill, hardship_disclosed=negotiation.hardship_disclosed):
            move: Move = Accept(pending.digest)
        else:
            offers = [m.move.terms for m in negotiation.history[:-1] if isinstance(m.move, Open | Offer)]
            context = OfferContext(
                bill=negotiation.bill,
                account_id=bill.account_id,
                offer=pending.terms,
                round=negotiation.rounds,
                max_rounds=negotiation.max_rounds,
                previous_offers=tuple(offers),
                circumstances=circumstances,
                now=now,
            )
            move = self._decision_move(self._policy.decide(context), pending.digest)
        try:
            return self._sign_move(negotiation, move, consumer, thread_id, now)
        except LocalProtocolError as refused:
            log_step(
                logger,
                "policy-answer-refused",
                logging.WARNING,
                thread_id=thread_id,
                answer=type(move).__name__,
                reason=refused.reason.name,
                instead="Reject",
            )
            fallback = Reject(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY)
            return self._sign_move(negotiation, fallback, consumer, thread_id, now)

    @staticmethod
    def _decision_move(decision: Decision, pending_digest: bytes) -> Move:
        if isinstance(decision, AcceptOffer):
            return Accept(pending_digest)
        if isinstance(decision, CounterOffer):
            return Offer(decision.terms)
        return Reject(decision.reason, decision.note)

    def _sign_move(
        self, negotiation: Negotiation, move: Move, consumer: str, thread_id: bytes, now: datetime
    ) -> Verified[NegotiationPayload]:
        """Sign our move through the core, which refuses one the rules would not allow (NEG-16)."""
        if isinstance(move, Reject) and (
            move.reason not in negotiation_pb2.RejectReason.values()
            or move.reason == negotiation_pb2.REJECT_REASON_UNSPECIFIED
            or len(move.note) > MAX_TEXT_CHARS
        ):
            raise LocalProtocolError(Reason.MALFORMED_PAYLOAD, "a Reject needs a defined reason and a short note")
        envelope, message = sign_move(
            negotiation,
            move,
            key=self._key,
            sender=self.party_id,
            recipient=consumer,
            thread_id=thread_id,
            now=now,
            lifetime=self._lifetime,
        )
        self._moves.put((message.digest, Role.BILLER), message)  # replayed with the thread's next move
        return Verified(_stored_payload(envelope), envelope, message.digest, self._key.keyid)

    def _message_record(self, verified: Verified[NegotiationPayload], sender: str, now: datetime) -> MessageRecord:
        header = verified.header
        return MessageRecord(
            thread_id=header.thread_id,
            sequence=header.sequence,
            envelope=verified.envelope.SerializeToString(),
            digest=verified.digest,
            sender=sender,
            payload_type=verified.envelope.payload_type,
            message_id=header.message_id,
            received_at=now,
        )

    @staticmethod
    def _agreement_facts(negotiation: Negotiation) -> AgreementFacts | None:
        agreement, terms = negotiation.agreement, negotiation.agreed_terms
        if agreement is None or terms is None:
            return None
        offer, accept = agreement
        return AgreementFacts(offer.digest, accept.digest, terms.total.minor)

    def _agreement_events(
        self, negotiation: Negotiation, bill: BillRecord, consumer: str, thread_id: bytes, now: datetime
    ) -> tuple[PendingEvent, ...]:
        """EVT-2: ARRANGEMENT_ACTIVE when the thread ends AGREED."""
        agreement, terms = negotiation.agreement, negotiation.agreed_terms
        if agreement is None or terms is None:
            return ()
        count = len(terms.schedule)
        text = f"Arrangement agreed: {terms.total} in {count} payment{'s' if count > 1 else ''}"
        text += f", first on {terms.schedule[0].due_date.isoformat()}."
        event = self._event(
            bill.account_id,
            consumer,
            event_pb2.EVENT_KIND_ARRANGEMENT_ACTIVE,
            now,
            bill_id=bill.bill_id,
            thread_id=thread_id,
            amount=terms.total,
            related_digest=agreement[1].digest,
            message=text,
        )
        return (event,)

    async def _negotiate_retry(self, answer: bytes, thread_id: bytes) -> biller_service_pb2.NegotiateResponse:
        """NEG-18: the stored reply, with the thread's current outcome."""
        response = biller_service_pb2.NegotiateResponse.FromString(answer)
        thread = await self._store.get_thread(thread_id)
        if thread is not None:
            response.outcome = (await self._rebuild(thread)).state.outcome
        return response

    # === Payment helpers ===========================================================================

    @staticmethod
    def _intent_content_hash(intent: payment_pb2.PaymentIntent) -> bytes:
        """PAY-2: what makes two intents with one intent_id the same (everything but the header)."""
        content = payment_pb2.PaymentIntent()
        content.CopyFrom(intent)
        content.ClearField("header")
        return hashlib.sha256(content.SerializeToString(deterministic=True)).digest()

    async def _same_intent(
        self, inbound: _Inbound[payment_pb2.PaymentIntent], existing: PaymentIntentRecord, content_hash: bytes
    ) -> biller_service_pb2.CreatePaymentIntentResponse:
        """PAY-2: a later intent with the same id and content gets the first one's instructions."""
        if not hmac.compare_digest(existing.content_hash, content_hash):
            raise RemoteProtocolError(
                Reason.IDEMPOTENCY_CONFLICT, f"intent {existing.intent_id!r} was created with other content"
            )
        response = biller_service_pb2.CreatePaymentIntentResponse(instructions=_envelope(existing.instructions))
        with contextlib.suppress(StoreConflict):  # a concurrent identical retry recorded it first
            await self._store.record_replay(self._replay_record(inbound, answer=response.SerializeToString()))
        return response

    async def _amount_owed(self, intent: payment_pb2.PaymentIntent, bill: BillRecord) -> tuple[Money, date]:
        """PAY-3: the amount (and due date) of the instalment or bill the intent pays."""
        if not intent.agreement_digest:
            if intent.instalment_index != 0:
                raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, "instalment_index is 0 without an agreement")
            if bill.status is not BillStatus.OPEN:
                raise RemoteProtocolError(
                    Reason.PAYMENT_AMOUNT_MISMATCH, "the bill is paid or under an arrangement: pay its instalments"
                )
            return Money.of(bill.amount_minor, bill.currency), bill.due_date
        record = await self._store.get_arrangement(intent.account_id, intent.agreement_digest)
        if record is None or record.bill_id != bill.bill_id:
            raise RemoteProtocolError(Reason.NOT_FOUND, "no such agreement on the bill")
        arrangement = self._arrangement(record)
        schedule = arrangement.terms.schedule
        if intent.instalment_index >= len(schedule):
            raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, f"the schedule has {len(schedule)} instalments")
        if intent.instalment_index in arrangement.paid_instalments:
            raise RemoteProtocolError(Reason.PAYMENT_AMOUNT_MISMATCH, "that instalment is already paid")
        instalment = schedule[intent.instalment_index]
        return instalment.amount, instalment.due_date

    @staticmethod
    def _money(pb: terms_pb2.Money, field: str) -> Money:
        try:
            return Money.from_proto(pb)
        except LocalProtocolError as error:
            raise RemoteProtocolError(error.reason, f"{field}: {error.detail}") from error

    @staticmethod
    def _arrangement(record: ArrangementRecord) -> Arrangement:
        offer = _stored_payload(_envelope(record.offer_envelope))
        assert isinstance(offer, negotiation_pb2.ThreadOpen | negotiation_pb2.Offer)
        return Arrangement(
            account_id=record.account_id,
            bill_id=record.bill_id,
            thread_id=record.thread_id,
            agreement_digest=record.accept_digest,
            terms=Terms.from_proto(offer.terms),
            agreed_at=record.agreed_at,
            active=record.bill_status is BillStatus.UNDER_ARRANGEMENT,
            payments=record.payments,
        )

    # === Events ======================================================================================

    async def _follow(self, account_id: str, cursor: int) -> AsyncIterator[envelope_pb2.Envelope]:
        """Stream the log from `cursor`, in order without gaps, then each new event (EVT-4)."""
        while True:
            wakeup = self._wakeups.event(account_id)  # taken before reading, so no append is missed
            batch = await self._store.events(account_id, cursor, _WATCH_BATCH)
            for record in batch:
                yield _envelope(record.envelope)
                cursor = record.sequence + 1
            if not batch:
                # Appends by this process set the event; other processes' are found by polling.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), self._watch_poll)

    def _event(
        self,
        account_id: str,
        recipient: str,
        kind: event_pb2.EventKind.ValueType,
        now: datetime,
        *,
        bill_id: str = "",
        thread_id: bytes = b"",
        amount: Money | None = None,
        day: date | None = None,
        reminder_level: int = 0,
        message: str = "",
        related_digest: bytes = b"",
    ) -> PendingEvent:
        """An event, signed by the store once its cursor position is known (EVT-1)."""
        log_id = events_thread_id(self.party_id, account_id)

        def seal_at(sequence: int, previous_digest: bytes) -> envelope_pb2.Envelope:
            event = event_pb2.Event(
                header=self._header(recipient, log_id, sequence, previous_digest, now),
                account_id=account_id,
                kind=kind,
                bill_id=bill_id,
                thread_id=thread_id,
                amount=None if amount is None else amount.to_proto(),
                date="" if day is None else day.isoformat(),
                reminder_level=reminder_level,
                message=message,
                related_digest=related_digest,
            )
            return seal(event, self._key)

        return PendingEvent(account_id, kind, seal_at)

    # === Small helpers ===============================================================================

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

    async def _bound_consumer(self, account_id: str) -> str:
        account = await self._store.get_account(account_id)
        if account is None:
            raise LookupError(f"no account {account_id!r}")
        if account.consumer_party_id is None:
            raise ValueError(f"account {account_id!r} has no enrolled consumer yet")
        return account.consumer_party_id

    async def _check_code(self, account_id: str, code: str, now: datetime) -> bytes:
        """ENR-3, ENR-5, ENR-2, ENR-4 in the order of ENR-1 step 7; returns the matching code's hash."""
        account = await self._store.get_account(account_id) if account_id else None
        if account is None:
            raise RemoteProtocolError(Reason.ENROLMENT_CODE_INVALID, "wrong account or code")
        if account.enrolment_locked:
            raise RemoteProtocolError(Reason.ENROLMENT_LOCKED, "too many wrong codes; ask the biller for a new one")
        match = None
        for record in await self._store.enrolment_codes(account_id):
            if hmac.compare_digest(_code_hash(record.salt, code), record.code_hash):
                match = record
        if match is None:
            await self._store.record_failed_enrolment(account_id, self.limits.enrolment_max_attempts)
            log_step(logger, "enrolment-code-mismatch", logging.WARNING, account=account_id)  # never the code
            raise RemoteProtocolError(Reason.ENROLMENT_CODE_INVALID, "wrong account or code")
        if match.used:
            raise RemoteProtocolError(Reason.ENROLMENT_CODE_USED, "the code was already used")
        if now >= match.expires_at:
            raise RemoteProtocolError(Reason.ENROLMENT_CODE_EXPIRED, "the code has expired")
        return match.code_hash


__all__ = [
    "FEATURES",
    "AcceptOffer",
    "Arrangement",
    "AwaitedPayment",
    "BillerAgent",
    "CounterOffer",
    "Decision",
    "OfferContext",
    "PaymentDetails",
    "PaymentRail",
    "Policy",
    "RejectOffer",
    "events_thread_id",
    "normalize_enrolment_code",
]
