"""The storage interfaces: `BillerStore` (the biller agent's) and `ConsumerStore` (the consumer agent's).

The signed message log is the source of truth. A store keeps envelopes as the
serialized bytes that were received or sent, plus derived columns to find them
(thread id, sequence, digest, sender, payload type, account, bill); the agent
rebuilds negotiation state by replaying a stored thread through the protocol
core. Rows such as a thread's outcome or a bill's status are indexes derived
from that log, kept in step with it by writing them in the same transaction.

Rules every back end follows:

- Each write method is ONE transaction: a protocol step (messages, outcome,
  replay-cache entry, events...) is stored entirely or not at all.
- Concurrency is settled by the database, never by process memory: two writers
  racing for one thread position, one enrolment code, one intent id or one
  event cursor are told apart by unique constraints, and the loser gets a
  `StoreConflict` carrying the protocol reason to answer with.
- Event envelopes are signed inside the transaction that appends them
  (`PendingEvent.seal` gets the recipient, the cursor and the previous event's
  digest), so each log is a gapless chain even with several writers.
- Each binding (account, party) has its own event log from sequence 0, and each
  bill is presented (signed) once to each party bound to its account while it
  is unpaid (ENR-12): an event is appended to the log of the party bound when
  its transaction commits, and a re-enrolment presents the account's unpaid
  bills to the new party, with their BILL_ISSUED events, atomically.
- Methods are coroutines; a back end never makes the event loop wait for a lock or a disk sync (the SQLite
  back end runs its short indexed reads on the loop itself: cheaper than a thread hand-over).

Times are timezone-aware UTC datetimes; money is integer minor units plus an
ISO 4217 code; envelopes are serialized `parley.v1.Envelope` bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from agent.protocol.errors import RemoteProtocolError
from parley.v1 import envelope_pb2


class StoreConflict(RemoteProtocolError):
    """A write lost to a constraint (another writer got there first); nothing was written."""


class AlreadyExists(ValueError):
    """An embedding-API call named an id (account, bill) that is already taken."""


class BillStatus(enum.StrEnum):
    """Where a bill stands; only an OPEN bill can be negotiated (NEG-3) or paid as presented."""

    OPEN = "open"
    UNDER_ARRANGEMENT = "under_arrangement"
    PAID = "paid"


class ThreadOutcome(enum.StrEnum):
    """A negotiation thread's state as indexed by the store (NEG-13)."""

    OPEN = "open"
    AGREED = "agreed"
    REJECTED = "rejected"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"
    PROTOCOL_ERROR = "protocol_error"


# --- Records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRecord:
    """A biller account, its bound consumer (if enrolled) and its enrolment lock state (ENR-5)."""

    account_id: str
    holder_name: str
    created_at: datetime
    consumer_party_id: str | None
    failed_enrolment_attempts: int
    enrolment_locked: bool


@dataclass(frozen=True)
class EnrolmentCodeRecord:
    """An enrolment code, kept only as a hash (ENR-8): HMAC-SHA-256 under the biller's secret when `salt`
    is empty; SHA-256(salt || normalized code) for codes issued before the secret (verified until they expire)."""

    account_id: str
    salt: bytes
    code_hash: bytes
    expires_at: datetime
    used: bool


class EnrolmentAttemptOutcome(enum.Enum):
    LOCKED = "locked"  # ENR-5: refused without comparing
    MISMATCH = "mismatch"  # counted against the account id (ENR-3)
    MATCHED = "matched"  # not counted


@dataclass(frozen=True)
class EnrolmentAttempt:
    """What one `Enrol` attempt found, decided atomically with its count (ENR-3, ENR-5)."""

    outcome: EnrolmentAttemptOutcome
    match: EnrolmentCodeRecord | None = None


@dataclass(frozen=True)
class WebhookCursor:
    """Where an outbound webhook endpoint stands in one binding's event log (reference_biller/webhooks.py):
    the log of (`account_id`, `party_id`), since each binding has its own log from sequence 0 (ENR-12).

    `next_sequence` is the first event not yet delivered (or skipped); `attempts`,
    `next_attempt_at` and `last_error` are the retry state of delivering that event.
    """

    account_id: str
    party_id: str
    next_sequence: int
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str = ""


@dataclass(frozen=True)
class KeySetRecord:
    """One version of a consumer's key set chain, with the keyids it introduces (for sender lookup)."""

    party_id: str
    version: int
    envelope: bytes
    keyids: tuple[str, ...]


@dataclass(frozen=True)
class ReplayRecord:
    """A received message id (HDR-8) and what was answered to it.

    An identical retry (same sender, message id and digest) gets `answer` back, or
    the same error when `error_reason` is set; a retry with neither (a read) is
    answered afresh. A different message with the same id is REPLAYED_MESSAGE.
    """

    sender: str
    message_id: bytes
    digest: bytes
    expires_at: datetime
    answer: bytes | None = None
    error_reason: str | None = None
    error_detail: str = ""


@dataclass(frozen=True)
class Enrolment:
    """A successful enrolment (ENR-*): code used, party and key set v1 stored, account bound."""

    account_id: str
    code_hash: bytes
    party_id: str
    fingerprint: bytes
    key_set: KeySetRecord
    bound_at: datetime
    replay: ReplayRecord
    # ENR-12: the account's unpaid bills not yet presented to the party, presented to it (a new `Bill`
    # signed to it: same bill id and terms) with its BILL_ISSUED event, inside the enrolment's transaction.
    present: Callable[[BillRecord], tuple[BillRecord, PendingEvent]] | None = None


@dataclass(frozen=True)
class BillRecord:
    """A signed bill and its derived columns.

    `envelope` and `digest` are one presentation of the bill (BIL-1): the one to `party_id` where a read
    names a party, else the first one made (at issue).
    """

    bill_id: str
    account_id: str
    envelope: bytes
    digest: bytes
    amount_minor: int
    currency: str
    due_date: date
    status: BillStatus
    issued_at: datetime
    party_id: str = ""  # the party `envelope` is addressed to (ENR-12); "" where the read named none


class BindingChanged(Exception):
    """The account was bound to another party between signing something to its party and storing it."""


@dataclass(frozen=True)
class MessageRecord:
    """One signed message of a negotiation thread, as received or sent, with its derived columns."""

    thread_id: bytes
    sequence: int
    envelope: bytes
    digest: bytes
    sender: str
    payload_type: str
    message_id: bytes
    received_at: datetime


@dataclass(frozen=True)
class ThreadRecord:
    """A negotiation thread: its index row, every message in order, and the disclosure if not erased."""

    thread_id: bytes
    account_id: str
    bill_id: str
    consumer_party_id: str
    outcome: ThreadOutcome
    deadline: datetime
    opened_at: datetime
    hardship_disclosed: bool  # NEG-12; kept after erasure while the thread is open (PRV-4)
    messages: tuple[MessageRecord, ...]
    disclosure: bytes | None


@dataclass(frozen=True)
class ThreadContext:
    """What one negotiation step reads, in one store call: the thread (None if new), its bill and account.

    The bill is the thread's, or for a new thread the one the opening names; the account is the bill's.
    Each is None when it does not exist. For a new thread whose bill exists (an opening), also what the
    opening is judged against: `received_minor`, everything received for the bill (TRM-11, PAY-16),
    `open_threads`, the account's threads indexed OPEN, as (bill id, deadline), for NEG-3 and LIM-7 at
    the step's time, and `threads_on_bill`, every thread the bill has had, for LIM-16. `replay` is the
    replay cache's entry under the key asked for (HDR-8), if any.
    """

    thread: ThreadRecord | None
    bill: BillRecord | None
    account: AccountRecord | None
    received_minor: int = 0
    open_threads: tuple[tuple[str, datetime], ...] = ()
    replay: ReplayRecord | None = None
    threads_on_bill: int = 0


@dataclass(frozen=True)
class NewThread:
    """What a ThreadOpen step adds beside its messages."""

    consumer_party_id: str
    deadline: datetime
    disclosure: bytes | None
    hardship_disclosed: bool
    max_open_threads: int  # LIM-7, checked inside the transaction


@dataclass(frozen=True)
class AgreementFacts:
    """Derived facts of an agreement reached in a step (indexes for payments and schedulers)."""

    offer_digest: bytes
    accept_digest: bytes
    total_minor: int


@dataclass(frozen=True)
class PendingEvent:
    """An event to append to the log of the party bound to the account, signed once its position is known.

    `seal(recipient, sequence, previous_digest)` returns the signed Event envelope
    addressed to that party at that cursor position of its log (ENR-12); the store
    calls it inside the appending transaction, after reading the binding.
    """

    account_id: str
    kind: int
    seal: Callable[[str, int, bytes], envelope_pb2.Envelope]
    # The log of this party rather than of the party bound when the event is appended: an event about a
    # party's own thread or payment stays in its log, whoever holds the account meanwhile (ENR-12).
    party_id: str | None = None


@dataclass(frozen=True)
class EventRecord:
    """One signed event of a binding's log (EVT-*, ENR-12)."""

    account_id: str
    sequence: int
    envelope: bytes
    digest: bytes
    party_id: str = ""


@dataclass(frozen=True)
class EventLog:
    """One binding's event log (ENR-12): its account, its party (the events' recipient) and its length."""

    account_id: str
    party_id: str
    length: int


@dataclass(frozen=True)
class NegotiationStep:
    """Everything one Negotiate call writes, in one transaction.

    With `new_thread`, the thread row is created: the bill must still be OPEN with
    no other thread on it open at `now` (NEG-3), and the account under its
    open-thread limit (LIM-7); otherwise `messages[0]`
    must be the next position of the existing thread. With `agreement`, the bill
    goes from OPEN to UNDER_ARRANGEMENT (BILL_NOT_NEGOTIABLE if it no longer is OPEN).
    """

    account_id: str
    bill_id: str
    thread_id: bytes
    messages: tuple[MessageRecord, ...]
    outcome: ThreadOutcome
    now: datetime
    replay: ReplayRecord
    new_thread: NewThread | None = None
    agreement: AgreementFacts | None = None
    events: tuple[PendingEvent, ...] = ()


@dataclass(frozen=True)
class PaymentIntentRecord:
    """A payment intent (PAY-2: unique per account by intent_id) and the instructions answered."""

    account_id: str
    intent_id: str
    content_hash: bytes
    bill_id: str
    agreement_digest: bytes
    instalment_index: int
    amount_minor: int
    currency: str
    payment_reference: str
    intent: bytes
    instructions: bytes
    created_at: datetime
    pay_by: datetime | None = None  # the instructions' pay_by_time (None: stored before it was kept)


@dataclass(frozen=True)
class SettlementRecord:
    """The settlement of one intent (at most one per intent) and its signed receipt."""

    account_id: str
    intent_id: str
    amount_minor: int
    rail_reference: str
    settled_at: datetime
    receipt: bytes


@dataclass(frozen=True)
class SealedSettlement:
    """What `Settle.seal` returns: the signed receipt and the events to append with it."""

    receipt: envelope_pb2.Envelope
    events: tuple[PendingEvent, ...]


@dataclass(frozen=True)
class Settle:
    """A settlement to record; `seal(remaining_minor)` signs the receipt inside the transaction.

    remaining_minor is what is still owed after this payment (PAY-16): for an intent
    under an agreement, the agreement's total minus every settlement under it; for
    an intent without one, the bill's amount due minus every settlement for the
    bill — this one included either way. When it is zero the bill becomes PAID; a
    settlement that would make it negative is refused (ValueError, nothing
    written): receipts never add up to more than is owed.
    """

    account_id: str
    intent_id: str
    amount_minor: int
    rail_reference: str
    settled_at: datetime
    seal: Callable[[int], SealedSettlement]


@dataclass(frozen=True)
class SettledPayment:
    """A settled payment towards an agreement, for schedulers."""

    intent_id: str
    instalment_index: int
    amount_minor: int
    settled_at: datetime


@dataclass(frozen=True)
class ArrangementRecord:
    """An agreed thread with the accepted offer's envelope and the payments settled under it."""

    thread_id: bytes
    account_id: str
    bill_id: str
    consumer_party_id: str
    offer_envelope: bytes
    accept_digest: bytes
    agreed_at: datetime
    bill_status: BillStatus
    payments: tuple[SettledPayment, ...]


# --- The interface ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadContext:
    """What a signed read of one bill or one receipt needs, in one store call: the account named (with its
    bound party, AUZ-1), and the bill as presented to the reader or the intent's settlement."""

    account: AccountRecord | None
    bill: BillRecord | None = None  # the bill as presented to the reader (ENR-12), whatever its account
    intent: bytes | None = None  # the intent's stored envelope, if one is stored under the id on the account
    settlement: SettlementRecord | None = None  # the intent's settlement, if settled


@dataclass(frozen=True)
class PaymentContext:
    """What a payment intent's step reads, in one store call: the account, the bill, an intent already
    stored under the intent id, and the arrangement the intent names (each None when absent)."""

    account: AccountRecord | None
    bill: BillRecord | None
    intent: PaymentIntentRecord | None
    arrangement: ArrangementRecord | None
    received_minor: int = 0  # every settlement for the bill, under any agreement or none (PAY-16)
    current_agreement: bytes | None = None  # the bill's arrangement in force: its latest, if under one
    replay: ReplayRecord | None = None  # the replay cache's entry under the key asked for (HDR-8), if any


class BillerStore(Protocol):
    """Persistent state of one biller. See the module docstring for the rules every back end keeps."""

    async def close(self) -> None:
        """Release the connection(s); the store is unusable afterwards."""
        ...

    # Accounts and enrolment (ENR-*)

    async def create_account(self, account_id: str, holder_name: str, created_at: datetime) -> None:
        """Add an account; AlreadyExists if the id is taken."""
        ...

    async def get_account(self, account_id: str) -> AccountRecord | None: ...

    async def add_enrolment_code(self, code: EnrolmentCodeRecord, created_at: datetime) -> None:
        """Store a new code's hash for an existing account, resetting its enrolment lock (ENR-5)."""
        ...

    async def enrolment_codes(self, account_id: str) -> list[EnrolmentCodeRecord]: ...

    async def revoke_enrolment_codes(self, account_id: str, now: datetime) -> int:
        """Expire the account's unspent codes at `now` (superseded by a new one, or revoked); returns how many."""
        ...

    async def list_accounts(self) -> list[AccountRecord]:
        """Every account, by id."""
        ...

    async def set_account_segment(self, account_id: str, segment: str) -> None:
        """Record the policy segment of an account the operator added (replacing an earlier one)."""
        ...

    async def account_segments(self) -> dict[str, str]:
        """The recorded segments, by account id."""
        ...

    async def webhook_cursors(self, endpoint: str) -> dict[tuple[str, str], WebhookCursor]:
        """An outbound webhook endpoint's cursors, by log: (account id, party id) (none yet: start at 0)."""
        ...

    async def save_webhook_cursor(self, endpoint: str, cursor: WebhookCursor) -> None:
        """Store an endpoint's cursor for one binding's log (insert or replace)."""
        ...

    async def attempt_enrolment_code(
        self,
        account_id: str,
        matches: Callable[[EnrolmentCodeRecord], bool],
        max_attempts: int,
        now: datetime,
    ) -> EnrolmentAttempt:
        """One Enrol attempt on `account_id`, in ONE write transaction holding the account id's counter:
        LOCKED if its enrolment is locked (nothing compared); else the attempt is counted first, the codes
        compared with `matches`, and the count taken back on a match (ENR-3, ENR-5). An account id that
        does not exist has a counter and a lock too (kept for `ENROLMENT_GUESS_MEMORY`, at most
        `MAX_ENROLMENT_GUESSES` of them), so the lock does not tell which accounts exist."""
        ...

    async def enrol(self, enrolment: Enrolment) -> list[EventRecord]:
        """Spend the account's codes, store the party (or check it is the same chain), bind the account.

        A binding to another party is replaced (ENR-11), and the account's unpaid bills not yet presented
        to the party are presented to it with `enrolment.present`, their BILL_ISSUED events appended to
        the party's own log (ENR-12). StoreConflict(ENROLMENT_CODE_USED)
        if the code was spent meanwhile; StoreConflict(PARTY_ID_TAKEN) if the party id
        belongs to another chain; StoreConflict(KEYSET_INVALID) if a keyid belongs to
        another party (KEY-21). Returns the events appended (ENR-12).
        """
        ...

    # Parties and key sets (KEY-*)

    async def party_with_keyid(self, keyid: str) -> str | None:
        """The enrolled party whose chain lists this keyid; at most one (KEY-21)."""
        ...

    async def party_key_sets(self, party_id: str, *, after_version: int = 0) -> list[bytes]:
        """The party's key set envelopes above `after_version`, oldest first; empty if unknown. A reader that
        verified the chain up to version N asks for those after N - 1: its tip (to see it unchanged) and
        anything newer, which is all it has to verify (LIM-14)."""
        ...

    async def append_key_set(self, record: KeySetRecord) -> None:
        """Add the next version; StoreConflict(KEYSET_ROLLBACK) if that version is already stored,
        StoreConflict(KEYSET_INVALID) if one of its keyids belongs to another party (KEY-21)."""
        ...

    # Replay cache (HDR-8)

    async def replay_lookup(self, sender: str, message_id: bytes) -> ReplayRecord | None: ...

    async def record_replay(self, record: ReplayRecord) -> None:
        """Remember a message id on its own (reads); StoreConflict(REPLAYED_MESSAGE) if already there."""
        ...

    async def purge_replay_cache(self, now: datetime) -> int:
        """Forget message ids whose messages can no longer be accepted anyway; returns how many."""
        ...

    # Bills

    async def insert_bill(self, bill: BillRecord, events: Sequence[PendingEvent]) -> list[EventRecord]:
        """Store a signed bill, as its first presentation (to `bill.party_id`), with its events;
        AlreadyExists if the bill id is taken, BindingChanged if the account is no longer bound to
        `bill.party_id` (nothing stored: sign it again for the party now bound)."""
        ...

    async def received_minor(self, bill_id: str) -> int:
        """Every settlement for the bill, under any agreement or none: what makes its outstanding balance
        (amount due less this, PAY-16)."""
        ...

    async def get_bill(self, bill_id: str) -> BillRecord | None: ...

    async def reopen_bill(self, bill_id: str, events: Sequence[PendingEvent]) -> list[EventRecord]:
        """Make a bill under an arrangement negotiable again, with its events (EVT-7, NEG-3).

        LookupError unless the bill exists and is UNDER_ARRANGEMENT.
        """
        ...

    async def list_bills(self, account_id: str, party_id: str | None = None) -> list[BillRecord]:
        """The account's bills, oldest first: with `party_id`, only those presented to that party, as
        presented to it (ENR-12); without, every bill as first presented."""
        ...

    async def accounts_owing(self) -> list[str]:
        """In one read, the accounts with a bill not paid yet (open, or under an arrangement), in account
        id order: the only accounts a collections pass has anything to do on. (A bill is only ever issued
        to a bound consumer, ENR-12, and a binding is never removed, so each of them has one.)"""
        ...

    async def get_presented_bill(self, bill_id: str, party_id: str) -> BillRecord | None:
        """The bill as presented to `party_id` (None if it never was, ENR-12)."""
        ...

    async def bill_read_context(self, account_id: str, bill_id: str, party_id: str) -> ReadContext:
        """The account and the bill as presented to `party_id` (`get_presented_bill`), in one read: GetBill."""
        ...

    # Negotiation

    async def get_thread(self, thread_id: bytes) -> ThreadRecord | None: ...

    async def thread_context(
        self,
        thread_id: bytes,
        opened_bill_id: str,
        party_id: str = "",
        *,
        replay_key: tuple[str, bytes] | None = None,
    ) -> ThreadContext:
        """The thread, its bill (or `opened_bill_id`'s when there is no such thread) and the bill's account,
        read in one transaction: what a negotiation step or a thread read needs, in one call. The bill is
        as presented to the thread's party, or, for a thread not yet opened, to `party_id` (no bill if
        it was never presented to that party, ENR-12); for such a bill, also what an opening is judged
        against (see ThreadContext). `replay_key` (sender, message id): the replay cache's entry too."""
        ...

    async def record_negotiation_step(self, step: NegotiationStep) -> list[EventRecord]:
        """Store one Negotiate step atomically (see NegotiationStep).

        StoreConflict(SEQUENCE_MISMATCH) when another writer took the thread position;
        StoreConflict(BILL_NOT_NEGOTIABLE) or StoreConflict(TOO_MANY_OPEN_THREADS)
        when the bill or the account changed meanwhile.
        """
        ...

    async def open_thread_bills(self, account_id: str, now: datetime) -> list[str]:
        """The bill of each thread of the account still open at `now` (deadline not passed)."""
        ...

    async def mark_thread_expired(self, thread_id: bytes) -> None:
        """Index an OPEN thread whose deadline passed as EXPIRED (NEG-6)."""
        ...

    async def arrangements(self, account_id: str | None, *, active_only: bool) -> list[ArrangementRecord]:
        """Agreed threads (of one account, or all), oldest first; active = the bill is under the arrangement."""
        ...

    async def get_arrangement(self, account_id: str, accept_digest: bytes) -> ArrangementRecord | None: ...

    # Privacy (PRV-4)

    async def erase_disclosures(self, account_id: str, answer: Callable[[int], ReplayRecord]) -> int:
        """Erase the account's disclosures for good (PRV-4) and record the request's answer.

        `answer(count)` builds the replay record, inside the transaction, from the
        number erased. The fact that hardship was disclosed stays on open threads only.
        """
        ...

    async def erase_disclosures_before(self, cutoff: datetime) -> int:
        """Retention (PRV-6): erase, as PRV-4 does, disclosures received before `cutoff`; returns how many."""
        ...

    # Payments (PAY-*)

    async def get_payment_intent(self, account_id: str, intent_id: str) -> PaymentIntentRecord | None: ...

    async def payment_context(
        self,
        account_id: str,
        bill_id: str,
        intent_id: str,
        agreement_digest: bytes,
        *,
        replay_key: tuple[str, bytes] | None = None,
    ) -> PaymentContext:
        """The account, the bill, the intent stored under `intent_id` and the arrangement `agreement_digest`
        names (b"": none), read in one transaction: what a CreatePaymentIntent step needs, in one call.
        `replay_key` (sender, message id): the replay cache's entry too."""
        ...

    async def unsettled_payment_intents(self) -> list[PaymentIntentRecord]:
        """Every intent with instructions but no settlement yet, oldest first (what a payment rail must still match)."""
        ...

    async def insert_payment_intent(self, intent: PaymentIntentRecord, replay: ReplayRecord) -> None:
        """Store a new intent with its instructions; StoreConflict(IDEMPOTENCY_CONFLICT) if the id is taken.

        ValueError if the payment reference is not unique (PAY-4: a rail bug).
        """
        ...

    async def get_settlement(self, account_id: str, intent_id: str) -> SettlementRecord | None: ...

    async def receipt_read_context(self, account_id: str, intent_id: str) -> ReadContext:
        """The account, whether it has an intent `intent_id`, and the intent's settlement, in one read:
        GetReceipt."""
        ...

    async def settle(self, settle: Settle) -> tuple[SettlementRecord, list[EventRecord]]:
        """Record the intent's settlement, its receipt and events, or return the existing one unchanged.

        LookupError if the intent does not exist. When the intent was already
        settled, the stored record is returned with no events and nothing is written.
        """
        ...

    # Events (EVT-*)

    async def append_events(self, events: Sequence[PendingEvent]) -> list[EventRecord]: ...

    async def events(self, account_id: str, start: int, limit: int, party_id: str | None = None) -> list[EventRecord]:
        """Up to `limit` events of a binding's log from cursor `start`, in order: the log of (account,
        `party_id`), or, without `party_id`, of the party bound now (ENR-12)."""
        ...

    async def event_count(self, account_id: str, party_id: str | None = None) -> int:
        """The length of a binding's log (the next cursor), as `events` chooses it."""
        ...

    async def event_logs(self, account_id: str | None = None) -> list[EventLog]:
        """Every binding's log that has events — the current holders' and earlier ones' — by account id, then
        party id, with its length; only `account_id`'s when given. Reads one row per log (a table of log
        lengths kept with each append), whatever the number of events."""
        ...


# === The consumer's store ===========================================================================
#
# A consumer agent keeps, per biller it enrolled with: the link (endpoint, TLS
# settings, pinned fingerprint) and the biller's verified key set chain; the
# enrolled accounts; every verified bill (envelope bytes as received); every
# negotiation thread with its messages, ours as signed and the biller's as
# received (including a violation's evidence, NEG-17); payment intents with
# their state, our signed intent envelopes, the instructions and receipts; and
# each account's event log with its cursor. The same rules as for the biller's
# store hold: one transaction per step, concurrency settled by the database
# (unique keys and conditional updates), coroutines only.


class IntentState(enum.StrEnum):
    """Where a payment intent stands on the consumer's side (PAY-7, PAY-8).

    CREATED: signed and stored, no verified instructions yet (safe to resend).
    INSTRUCTED: verified instructions stored; not handed to the bank yet.
    SENDING: handed to the bank; until the bank answers, the payment is in doubt
    and is never handed over again (a crash here leaves it SENDING).
    PAID: the bank executed the payment. REFUSED: the instructions failed PAY-8;
    never paid.
    LAPSED: instructions stored, never handed to the bank, and their pay_by_time
    has passed (the bank was down, or the household's run came late, or they only
    arrived after it, as a retried intent's stored answer): never paid
    and never payable (PAY-8). Only an INSTRUCTED intent lapses — never a SENDING
    one, which is in doubt (PAY-7). It is kept as history; the same payment may
    then have a new intent (PAY-17), and a lapsed one counts as no payment.
    """

    CREATED = "created"
    INSTRUCTED = "instructed"
    SENDING = "sending"
    PAID = "paid"
    REFUSED = "refused"
    LAPSED = "lapsed"


@dataclass(frozen=True)
class BillerLinkRecord:
    """A biller the consumer enrolled with: where to reach it and the identity pinned out of band (KEY-12)."""

    biller_party_id: str
    target: str
    fingerprint: bytes
    insecure: bool
    root_certificates: bytes | None
    server_name: str | None
    enrolled_at: datetime


@dataclass(frozen=True)
class LinkedAccountRecord:
    """An account enrolled at a biller, with the enrolment exchange as evidence (ENR-9, ENR-10)."""

    biller_party_id: str
    account_id: str
    enrolled_at: datetime
    request: bytes
    confirmation: bytes


@dataclass(frozen=True)
class ReceivedBillRecord:
    """A bill that passed BIL-3, stored as the envelope bytes received."""

    biller_party_id: str
    bill_id: str
    account_id: str
    envelope: bytes
    digest: bytes
    received_at: datetime


@dataclass(frozen=True)
class ConsumerThreadRecord:
    """A negotiation thread as the consumer keeps it.

    `awaiting_answer`: our last message is stored but the biller's answer to it is
    not (it must be sent, or sent again byte for byte, NEG-18). `disclosure`: the
    serialized Disclosure of the opening, kept only until the opening is answered.
    `violation`: the biller's broken rule (reason name, detail), its evidence being
    the thread's last message (NEG-17). `refusal`: the biller refused our last
    message (reason name, detail) and the thread cannot go on.
    """

    thread_id: bytes
    biller_party_id: str
    account_id: str
    bill_id: str
    outcome: ThreadOutcome
    deadline: datetime
    opened_at: datetime
    hardship_disclosed: bool
    awaiting_answer: bool
    disclosure: bytes | None
    violation: tuple[str, str] | None
    refusal: tuple[str, str] | None
    messages: tuple[MessageRecord, ...]


@dataclass(frozen=True)
class ThreadUpdate:
    """One step of a thread, in one transaction: the new state and messages appended at their sequences.

    `drop_from` removes our messages from that sequence on first: a message the
    biller refused changed nothing there (NEG-15), so it leaves our copy too.
    `refusal` replaces the stored one (None clears it); `violation` is set once.
    `clear_disclosure` erases the opening's disclosure (PRV-7).
    """

    thread_id: bytes
    messages: tuple[MessageRecord, ...]
    outcome: ThreadOutcome
    awaiting_answer: bool
    violation: tuple[str, str] | None = None
    refusal: tuple[str, str] | None = None
    clear_disclosure: bool = False
    drop_from: int | None = None


@dataclass(frozen=True)
class IntentRecord:
    """A payment intent (PAY-1): what it pays, its state, and the signed messages of its thread.

    `messages` are our signed PaymentIntent envelopes for this intent_id, oldest
    first (a later one re-signs the same content when an earlier one expired
    unanswered, PAY-2); `instructions` the verified (or, when REFUSED, the refused)
    PaymentInstructions; `payment_proof` the bank's reference once PAID.
    """

    biller_party_id: str
    intent_id: str
    account_id: str
    bill_id: str
    agreement_digest: bytes
    instalment_index: int
    amount_minor: int
    currency: str
    thread_id: bytes
    state: IntentState
    created_at: datetime
    messages: tuple[bytes, ...]
    instructions: bytes | None = None
    payment_proof: str = ""
    refusal: tuple[str, str] | None = None
    set_aside_at: datetime | None = None  # REFUSED, and released by its user: no longer the payment's live intent

    @property
    def holds_payment(self) -> bool:
        """Whether this is its payment's live intent: every intent does, but one that lapsed (PAY-17) and refused
        instructions their user set aside (PAY-8)."""
        return self.state is not IntentState.LAPSED and self.set_aside_at is None


@dataclass(frozen=True)
class ReceiptRecord:
    """A verified receipt (PAY-9); `dispute` says why it does not match the instructions, if it does not."""

    biller_party_id: str
    intent_id: str
    envelope: bytes
    digest: bytes
    amount_minor: int
    dispute: str | None
    received_at: datetime


@dataclass(frozen=True)
class EventCursor:
    """Where an account's event log resumes (EVT-5): the next sequence and the digest of the last event."""

    next_sequence: int = 0
    last_digest: bytes = b""


@dataclass(frozen=True)
class ReceivedEventRecord:
    """A verified event of an account's log, stored as received."""

    biller_party_id: str
    account_id: str
    sequence: int
    envelope: bytes
    digest: bytes
    kind: int
    received_at: datetime


class ConsumerStore(Protocol):
    """Persistent state of one consumer agent. See the comment above `IntentState` for what it keeps."""

    async def close(self) -> None:
        """Release the connection(s); the store is unusable afterwards."""
        ...

    # Links and enrolment (KEY-12, ENR-10)

    async def save_enrolment(
        self, link: BillerLinkRecord, key_sets: Sequence[bytes], account: LinkedAccountRecord
    ) -> None:
        """Store an enrolment in one transaction: the link (created, or its endpoint and TLS settings
        updated when the pin is the same), the biller's chain versions not stored yet (`key_sets` is the
        whole chain, version 1 first) and the account (replaced if enrolled before).

        ValueError if the biller is already pinned to another fingerprint (KEY-12).
        """
        ...

    async def get_link(self, biller_party_id: str) -> BillerLinkRecord | None: ...

    async def links(self) -> list[BillerLinkRecord]:
        """Every biller link, in enrolment order."""
        ...

    async def link_key_sets(self, biller_party_id: str) -> list[bytes]:
        """The biller's key set envelopes, version 1 first."""
        ...

    async def append_link_key_sets(self, biller_party_id: str, first_version: int, key_sets: Sequence[bytes]) -> None:
        """Store versions first_version, first_version + 1, ...; StoreConflict(KEYSET_ROLLBACK) if one is stored."""
        ...

    async def linked_accounts(self, biller_party_id: str) -> list[LinkedAccountRecord]:
        """The accounts enrolled at the biller, in enrolment order."""
        ...

    # Bills (BIL-3)

    async def save_bills(self, bills: Sequence[ReceivedBillRecord]) -> list[ReceivedBillRecord]:
        """Store verified bills in one transaction and return what is stored for each: a bill id
        already stored keeps its first envelope (BIL-1: a presented bill never changes)."""
        ...

    async def get_bill(self, biller_party_id: str, bill_id: str) -> ReceivedBillRecord | None: ...

    async def list_bills(self, biller_party_id: str, account_id: str | None = None) -> list[ReceivedBillRecord]:
        """The biller's bills (of one account, or all), in the order received."""
        ...

    # Negotiation (§9)

    async def create_thread(self, thread: ConsumerThreadRecord) -> None:
        """Store a new thread with its first message(s); StoreConflict(SEQUENCE_MISMATCH) if it exists."""
        ...

    async def update_thread(self, update: ThreadUpdate) -> None:
        """Apply one step; StoreConflict(SEQUENCE_MISMATCH) if a message's position is already taken."""
        ...

    async def get_thread(self, thread_id: bytes) -> ConsumerThreadRecord | None: ...

    async def threads(
        self, biller_party_id: str | None = None, bill_id: str | None = None, outcome: ThreadOutcome | None = None
    ) -> list[ConsumerThreadRecord]:
        """Threads matching every filter given, oldest first, each with its messages."""
        ...

    # Payments (PAY-*)

    async def create_intent(self, intent: IntentRecord) -> IntentRecord:
        """Store a new intent (state CREATED, with its first signed message) and return it, or return the
        live intent already stored for the same biller, bill, agreement and instalment (one payment, one live
        intent: LAPSED ones and refused ones set aside are history and do not count)."""
        ...

    async def get_intent(self, biller_party_id: str, intent_id: str) -> IntentRecord | None: ...

    async def find_intent(
        self, biller_party_id: str, bill_id: str, agreement_digest: bytes, instalment_index: int
    ) -> IntentRecord | None:
        """The payment's live intent (`IntentRecord.holds_payment`), if there is one."""
        ...

    async def intents(self, biller_party_id: str | None = None) -> list[IntentRecord]:
        """Intents (of one biller, or all), oldest first."""
        ...

    async def add_intent_message(self, biller_party_id: str, intent_id: str, envelope: bytes) -> None:
        """Keep another signed PaymentIntent for the same intent (the earlier one expired unanswered)."""
        ...

    async def record_instructions(
        self, biller_party_id: str, intent_id: str, instructions: bytes, refusal: tuple[str, str] | None
    ) -> IntentRecord:
        """CREATED -> INSTRUCTED (or REFUSED with `refusal`), keeping the instructions; returns the intent.

        An intent past CREATED is returned unchanged (the first instructions stay).
        """
        ...

    async def begin_sending(self, biller_party_id: str, intent_id: str, now: datetime) -> bool:
        """INSTRUCTED -> SENDING, atomically: True for the one caller that may hand the payment to the bank."""
        ...

    async def finish_sending(
        self, biller_party_id: str, intent_id: str, *, paid: bool, proof: str, now: datetime
    ) -> IntentRecord:
        """SENDING -> PAID (with the bank's proof) or back to INSTRUCTED (the bank certainly did not pay).

        LookupError unless the intent is SENDING.
        """
        ...

    async def lapse_intent(self, biller_party_id: str, intent_id: str, now: datetime) -> bool:
        """INSTRUCTED -> LAPSED, atomically, when its instructions' pay_by_time is before `now` (PAY-8, PAY-17):
        True for the one caller that lapsed it. Any other state (SENDING is in doubt, PAY-7) is left alone."""
        ...

    async def set_aside_intent(self, biller_party_id: str, intent_id: str, now: datetime) -> IntentRecord:
        """Release a REFUSED intent from its payment, on its user's word, and return it: it stays REFUSED with its
        instructions, and the payment may get a new intent. Already set aside: returned unchanged. LookupError for
        an unknown intent, ValueError for one not REFUSED."""
        ...

    async def save_receipt(self, receipt: ReceiptRecord) -> ReceiptRecord:
        """Store the intent's receipt, or return the one already stored (the first stays)."""
        ...

    async def get_receipt(self, biller_party_id: str, intent_id: str) -> ReceiptRecord | None: ...

    # Events (EVT-5)

    async def event_cursor(self, biller_party_id: str, account_id: str) -> EventCursor: ...

    async def append_event(self, event: ReceivedEventRecord, previous_digest: bytes) -> None:
        """Store the event and advance the cursor past it, in one transaction.

        StoreConflict(SEQUENCE_MISMATCH) unless `event.sequence` is the cursor's next
        sequence, StoreConflict(PREVIOUS_DIGEST_MISMATCH) unless `previous_digest` is
        its last digest: an event is stored once, in order, whatever the writers.
        """
        ...

    async def stored_events(
        self, biller_party_id: str, account_id: str, start: int = 0, limit: int = 1000
    ) -> list[ReceivedEventRecord]:
        """Up to `limit` stored events of the account's log from sequence `start`, in order."""
        ...


# --- The household's own records: approvals asked of the person, notifications to deliver -------------


class ApprovalState(enum.StrEnum):
    """Where a request for the person's approval stands (NEG-20)."""

    PENDING = "pending"
    """Asked; nothing outside the mandate is sent until the person answers."""
    APPROVED = "approved"
    """The person approved exactly these terms at exactly this point of the negotiation."""
    SENT = "sent"
    """Approved, and the bot made exactly that move."""
    DECLINED = "declined"
    LAPSED = "lapsed"
    """The situation changed before an answer was used (other terms planned, the thread moved, the deadline
    passed): the answer no longer applies and a new request is made when needed."""


@dataclass(frozen=True)
class ApprovalRecord:
    """A request for approval, stored so the person can answer it later and the bot find the answer.

    `request_id` is derived from everything the request binds (see `agent.consumer.approvals`), so the
    same move at the same point gets the same id on every pass. `terms` is the serialized
    `parley.v1.Terms` the bot would send (or accept), `terms_digest` its SHA-256.
    """

    request_id: str
    biller_party_id: str
    account_id: str
    bill_id: str
    thread_id: bytes | None
    action: str
    terms: bytes
    terms_digest: bytes
    violations: tuple[str, ...]
    reason: str
    deadline: datetime | None
    state: ApprovalState
    created_at: datetime
    answered_at: datetime | None = None
    note: str = ""


@dataclass(frozen=True)
class NotificationRecord:
    """A notification in the durable outbox: delivered at least once, identified for idempotency."""

    notification_id: str
    kind: str
    body: str
    """The JSON document delivered, as text."""
    created_at: datetime
    attempts: int = 0
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    last_error: str = ""


class HouseholdRecordStore(Protocol):
    """What the household's approvals and notification outbox need of a consumer store."""

    async def save_approval(self, record: ApprovalRecord) -> ApprovalRecord:
        """Store a new request, or return the one already stored under its id (the first stays)."""
        ...

    async def get_approval(self, request_id: str) -> ApprovalRecord | None: ...

    async def approvals(
        self, *, states: Sequence[ApprovalState] = (), biller_party_id: str | None = None, bill_id: str | None = None
    ) -> list[ApprovalRecord]:
        """Stored requests (of these states, biller and bill when given), oldest first."""
        ...

    async def answer_approval(
        self,
        request_id: str,
        state: ApprovalState,
        when: datetime,
        note: str = "",
        *,
        only_from: Sequence[ApprovalState],
    ) -> ApprovalRecord | None:
        """Move a request to `state` if it is in one of `only_from`; the updated record, or None if it was not."""
        ...

    async def enqueue_notification(self, record: NotificationRecord) -> bool:
        """Add a notification to the outbox; False when one with its id is already there (idempotent)."""
        ...

    async def due_notifications(self, now: datetime, limit: int = 50) -> list[NotificationRecord]:
        """Undelivered notifications whose next attempt is due, oldest first."""
        ...

    async def notification_attempted(
        self, notification_id: str, *, delivered_at: datetime | None, next_attempt_at: datetime | None, error: str
    ) -> None:
        """Record one delivery attempt: delivered, or failed with the time of the next try."""
        ...

    async def notifications(self, *, undelivered_only: bool = False) -> list[NotificationRecord]: ...
