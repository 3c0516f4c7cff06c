"""The biller's store in SQL, written once for every back end (SQLite and PostgreSQL).

Every rule of `BillerStore` — what each protocol step writes, in one
transaction, and how a race is settled by a UNIQUE or PRIMARY KEY constraint
rather than by process memory — lives here, in SQL that both databases accept.
A back end supplies only the plumbing:

- `_in_write(fn)` / `_in_read(fn)`: run `fn(db)` in one transaction, where `db`
  follows `Db` (qmark `?` parameters) and turns a constraint violation into
  `IntegrityViolation`, naming the constraint as PostgreSQL does by default;
  `_in_statement(fn)` runs a one-statement read without BEGIN/COMMIT;
- `_erased()`: what makes erased disclosures leave the storage for good (PRV-4).

Concurrency: a step that reads an account's state to decide what to write locks
the account first (`_lock_account`, a no-op where the write transaction already
excludes other writers); keys shared between accounts are settled by constraints.

Encodings are the same in both: instants are fixed-width UTC ISO-8601 text
(`ts`), so text order is time order; dates ISO text; money integer minor units
(64-bit); digests and ids bytes; `rowid` breaks ties in insertion order.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.protocol.limits import (
    ENROLMENT_GUESS_MEMORY,
    MAX_ENROLMENT_GUESSES,
    MAX_PAYMENT_INTENTS_PER_BILL,
    MAX_THREADS_PER_BILL,
)
from agent.stores.base import (
    AccountRecord,
    AlreadyExists,
    ArrangementRecord,
    BillRecord,
    BillStatus,
    BindingChanged,
    Enrolment,
    EnrolmentAttempt,
    EnrolmentAttemptOutcome,
    EnrolmentCodeRecord,
    EventLog,
    EventRecord,
    KeySetRecord,
    MessageRecord,
    NegotiationStep,
    PaymentContext,
    PaymentIntentRecord,
    PendingEvent,
    ReadContext,
    ReplayRecord,
    Settle,
    SettledPayment,
    SettlementRecord,
    StoreConflict,
    ThreadContext,
    ThreadOutcome,
    ThreadRecord,
    WebhookCursor,
)
from agent.stores.sqlite_base import dt, ts

T = TypeVar("T")
Row = tuple[Any, ...]

_BILL_COLUMNS = (
    "b.bill_id, b.account_id, b.envelope, b.digest, b.amount_minor, b.currency, b.due_date, b.status, b.issued_at"
)
# A bill as presented to one party (ENR-12): the presentation's envelope and digest, and the party.
_PRESENTED_COLUMNS = (
    "b.bill_id, b.account_id, p.envelope, p.digest, b.amount_minor, b.currency, b.due_date, b.status, b.issued_at,"
    " p.party_id"
)


# The schema, once for both back ends: `{blob}`, `{time}`... are filled in by `ColumnTypes`.
# Each migration is a list of statements, applied in order inside one transaction.
_SCHEMA: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE accounts (
            account_id TEXT PRIMARY KEY,
            holder_name TEXT NOT NULL,
            created_at {time} NOT NULL,
            failed_enrolment_attempts {integer} NOT NULL DEFAULT 0,
            enrolment_locked {boolean} NOT NULL DEFAULT {false}
        )""",
        """CREATE TABLE parties (
            party_id TEXT PRIMARY KEY,
            fingerprint {blob} NOT NULL,
            enrolled_at {time} NOT NULL
        )""",
        """CREATE TABLE party_key_sets (
            party_id TEXT NOT NULL REFERENCES parties (party_id),
            version {integer} NOT NULL CHECK (version >= 1),
            envelope {blob} NOT NULL,
            PRIMARY KEY (party_id, version)
        )""",
        # KEY-21: a keyid resolves to one party only.
        """CREATE TABLE party_keyids (
            keyid TEXT PRIMARY KEY,
            party_id TEXT NOT NULL REFERENCES parties (party_id)
        )""",
        """CREATE TABLE bindings (
            account_id TEXT PRIMARY KEY REFERENCES accounts (account_id),
            party_id TEXT NOT NULL REFERENCES parties (party_id),
            bound_at {time} NOT NULL
        )""",
        "CREATE INDEX bindings_party ON bindings (party_id)",
        """CREATE TABLE enrolment_codes (
            code_hash {blob} PRIMARY KEY,
            salt {blob} NOT NULL,
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            created_at {time} NOT NULL,
            expires_at {time} NOT NULL,
            used_at {time}
        )""",
        "CREATE INDEX enrolment_codes_account ON enrolment_codes (account_id)",
        """CREATE TABLE bills (
            bill_id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            envelope {blob} NOT NULL,
            digest {blob} NOT NULL UNIQUE,
            amount_minor {integer} NOT NULL,
            currency TEXT NOT NULL,
            due_date {time} NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('open', 'under_arrangement', 'paid')),
            issued_at {time} NOT NULL{rowid}
        )""",
        "CREATE INDEX bills_account ON bills (account_id)",
        """CREATE TABLE threads (
            thread_id {blob} PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            bill_id TEXT NOT NULL REFERENCES bills (bill_id),
            consumer_party_id TEXT NOT NULL REFERENCES parties (party_id),
            outcome TEXT NOT NULL CHECK (
                outcome IN ('open', 'agreed', 'rejected', 'withdrawn', 'expired', 'protocol_error')
            ),
            deadline {time} NOT NULL,
            opened_at {time} NOT NULL,
            hardship_disclosed {boolean} NOT NULL,
            offer_digest {blob},
            accept_digest {blob} UNIQUE,
            agreed_total_minor {integer},
            agreed_at {time}{rowid}
        )""",
        "CREATE INDEX threads_account_outcome ON threads (account_id, outcome)",
        "CREATE INDEX threads_bill_outcome ON threads (bill_id, outcome)",
        """CREATE TABLE messages (
            thread_id {blob} NOT NULL REFERENCES threads (thread_id),
            sequence {integer} NOT NULL CHECK (sequence >= 0),
            envelope {blob} NOT NULL,
            digest {blob} NOT NULL UNIQUE,
            sender TEXT NOT NULL,
            payload_type TEXT NOT NULL,
            message_id {blob} NOT NULL,
            account_id TEXT NOT NULL,
            bill_id TEXT NOT NULL,
            received_at {time} NOT NULL,
            PRIMARY KEY (thread_id, sequence)
        )""",
        """CREATE TABLE disclosures (
            thread_id {blob} PRIMARY KEY REFERENCES threads (thread_id),
            account_id TEXT NOT NULL,
            content {blob} NOT NULL,
            received_at {time} NOT NULL
        )""",
        "CREATE INDEX disclosures_account ON disclosures (account_id)",
        """CREATE TABLE replay_cache (
            sender TEXT NOT NULL,
            message_id {blob} NOT NULL,
            digest {blob} NOT NULL,
            answer {blob},
            error_reason TEXT,
            error_detail TEXT NOT NULL DEFAULT '',
            expires_at {time} NOT NULL,
            PRIMARY KEY (sender, message_id)
        )""",
        "CREATE INDEX replay_cache_expiry ON replay_cache (expires_at)",
        """CREATE TABLE payment_intents (
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            intent_id TEXT NOT NULL,
            content_hash {blob} NOT NULL,
            bill_id TEXT NOT NULL REFERENCES bills (bill_id),
            agreement_digest {blob} NOT NULL,
            instalment_index {integer} NOT NULL,
            amount_minor {integer} NOT NULL,
            currency TEXT NOT NULL,
            payment_reference TEXT NOT NULL UNIQUE,
            intent {blob} NOT NULL,
            instructions {blob} NOT NULL,
            created_at {time} NOT NULL,
            PRIMARY KEY (account_id, intent_id)
        )""",
        # One intent never yields two payments: at most one settlement per intent.
        """CREATE TABLE settlements (
            account_id TEXT NOT NULL,
            intent_id TEXT NOT NULL,
            amount_minor {integer} NOT NULL,
            rail_reference TEXT NOT NULL,
            settled_at {time} NOT NULL,
            receipt {blob} NOT NULL{rowid},
            PRIMARY KEY (account_id, intent_id),
            FOREIGN KEY (account_id, intent_id) REFERENCES payment_intents (account_id, intent_id)
        )""",
        """CREATE TABLE events (
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            sequence {integer} NOT NULL CHECK (sequence >= 0),
            envelope {blob} NOT NULL,
            digest {blob} NOT NULL,
            kind {integer} NOT NULL,
            PRIMARY KEY (account_id, sequence)
        )""",
    ),
    (
        # Leases: one holder at a time across the processes sharing the store (the scheduler's passes).
        """CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            expires_at {time} NOT NULL
        )""",
    ),
    (
        # The reference biller's back office (reference_biller/accounts.py, webhooks.py): an account's
        # segment when it was added by the operator rather than listed in the configuration, and one
        # outbound-webhook cursor per (endpoint, account): the next event sequence to deliver and the
        # retry state of the one being delivered. Webhooks are derived from the signed event log, so a
        # protocol step writes nothing here; a restart resumes from these rows.
        """CREATE TABLE account_segments (
            account_id TEXT PRIMARY KEY REFERENCES accounts (account_id),
            segment TEXT NOT NULL
        )""",
        """CREATE TABLE webhook_cursors (
            endpoint TEXT NOT NULL,
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            next_sequence {integer} NOT NULL CHECK (next_sequence >= 0),
            attempts {integer} NOT NULL DEFAULT 0,
            next_attempt_at {time},
            last_error TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (endpoint, account_id)
        )""",
    ),
    (
        # ENR-3, ENR-5: the wrong-code counter and lock of an account id that does not exist, keyed by the
        # id's SHA-256 (fixed size, whatever an attacker sends); bounded by ENROLMENT_GUESS_MEMORY and
        # MAX_ENROLMENT_GUESSES (LIM-12).
        """CREATE TABLE enrolment_guesses (
            account_hash {blob} PRIMARY KEY,
            failed_attempts {integer} NOT NULL,
            locked {boolean} NOT NULL,
            last_attempt_at {time} NOT NULL
        )""",
        "CREATE INDEX enrolment_guesses_age ON enrolment_guesses (last_attempt_at)",
        # PAY-14: an intent blocks the bill's next one until it is settled or its pay-by time has passed.
        "ALTER TABLE payment_intents ADD COLUMN pay_by {time}",
        "CREATE INDEX payment_intents_bill ON payment_intents (bill_id)",
    ),
    (
        # ENR-12: each binding (account, party) has its own event log from sequence 0, and a bill is
        # presented (signed) to each party bound to its account while it is unpaid. `bills.envelope` stays
        # the first presentation. Rows written before this migration are the current binding's: a log or
        # bill signed to an earlier party of an account re-bound before it stays as it was (unverifiable
        # for the current party, as it already was: issue 14); a re-enrolment presents the bills again.
        """CREATE TABLE bill_presentations (
            bill_id TEXT NOT NULL REFERENCES bills (bill_id),
            party_id TEXT NOT NULL REFERENCES parties (party_id),
            envelope {blob} NOT NULL,
            digest {blob} NOT NULL UNIQUE,
            presented_at {time} NOT NULL,
            PRIMARY KEY (bill_id, party_id)
        )""",
        """INSERT INTO bill_presentations (bill_id, party_id, envelope, digest, presented_at)
           SELECT b.bill_id, g.party_id, b.envelope, b.digest, b.issued_at
           FROM bills b JOIN bindings g ON g.account_id = b.account_id""",
        """CREATE TABLE binding_events (
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            party_id TEXT NOT NULL REFERENCES parties (party_id),
            sequence {integer} NOT NULL CHECK (sequence >= 0),
            envelope {blob} NOT NULL,
            digest {blob} NOT NULL,
            kind {integer} NOT NULL,
            PRIMARY KEY (account_id, party_id, sequence)
        )""",
        """INSERT INTO binding_events (account_id, party_id, sequence, envelope, digest, kind)
           SELECT e.account_id, g.party_id, e.sequence, e.envelope, e.digest, e.kind
           FROM events e JOIN bindings g ON g.account_id = e.account_id""",
        "DROP TABLE events",
    ),
    (
        # ENR-12 for the outbound webhooks: a log per binding, so a cursor per (endpoint, binding) — the
        # log of (account_id, party_id) — where `webhook_cursors` kept one per account, which carried an
        # earlier holder's position over into the new holder's log (its first events never sent) and never
        # went back to the earlier holder's log (its payment_received settled later never sent).
        # An account cursor moves to the log it followed when the account has one log (every account of
        # a store upgraded from migration 4, and every one not re-bound since migration 5): as it was,
        # nothing sent again or skipped. An account with several logs was re-bound while its cursor was
        # kept per account, so which of their events were sent is not recorded: its cursors are dropped
        # and each of its logs is delivered from its beginning (at least once: the receiver drops the ids
        # it has seen) rather than leaving an event unsent. A cursor of an account with no events points
        # at nothing and goes too.
        """CREATE TABLE webhook_log_cursors (
            endpoint TEXT NOT NULL,
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            party_id TEXT NOT NULL REFERENCES parties (party_id),
            next_sequence {integer} NOT NULL CHECK (next_sequence >= 0),
            attempts {integer} NOT NULL DEFAULT 0,
            next_attempt_at {time},
            last_error TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (endpoint, account_id, party_id)
        )""",
        """INSERT INTO webhook_log_cursors (endpoint, account_id, party_id, next_sequence, attempts,
                                            next_attempt_at, last_error)
           SELECT c.endpoint, c.account_id, l.party_id, c.next_sequence, c.attempts, c.next_attempt_at,
                  c.last_error
           FROM webhook_cursors c
           JOIN (SELECT account_id, MIN(party_id) AS party_id FROM binding_events GROUP BY account_id
                 HAVING COUNT(DISTINCT party_id) = 1) l ON l.account_id = c.account_id""",
        "DROP TABLE webhook_cursors",
    ),
    (
        # Every binding's log with its length, kept in the same transaction as each append
        # (`_append_events`), so that listing the logs (`event_logs`, every webhook dispatcher pass) reads
        # one row per log instead of grouping the whole of binding_events: its cost follows the number of
        # logs, not of events. Filled once here from the logs as they are.
        """CREATE TABLE event_log_lengths (
            account_id TEXT NOT NULL REFERENCES accounts (account_id),
            party_id TEXT NOT NULL REFERENCES parties (party_id),
            length {integer} NOT NULL CHECK (length > 0),
            PRIMARY KEY (account_id, party_id)
        )""",
        """INSERT INTO event_log_lengths (account_id, party_id, length)
           SELECT account_id, party_id, MAX(sequence) + 1 FROM binding_events GROUP BY account_id, party_id""",
    ),
)


@dataclass(frozen=True)
class ColumnTypes:
    """How a back end spells the schema's column types."""

    blob: str
    time: str  # holds `ts` text: must compare byte by byte, so that text order is time order
    boolean: str
    false: str
    integer: str  # 64-bit
    rowid: str  # a column definition adding an insertion-order `rowid`, or "" where the database has one


def migrations(types: ColumnTypes) -> tuple[tuple[str, ...], ...]:
    """The biller store's migrations in one back end's column types."""
    fields = asdict(types)
    return tuple(tuple(statement.format(**fields) for statement in migration) for migration in _SCHEMA)


class Cursor(Protocol):
    """What the transaction bodies use of a DB-API cursor."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """One open transaction: `execute` takes qmark (`?`) SQL and raises `IntegrityViolation` on a constraint.

    `for_update` ends a SELECT that must lock the rows it reads until the transaction ends
    (" FOR UPDATE"), or is "" where a write transaction already excludes every other writer (SQLite).
    """

    for_update: str

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...


class IntegrityViolation(Exception):
    """A write refused by a constraint. `constraint` is PostgreSQL's default name for it
    (`unique_key(...)` for a UNIQUE column), or None when the database does not say."""

    def __init__(self, constraint: str | None, detail: str) -> None:
        super().__init__(detail)
        self.constraint = constraint


def unique_key(table: str, *columns: str) -> str:
    """The name PostgreSQL gives the UNIQUE constraint on these columns (SQLite errors are mapped to it)."""
    return f"{table}_{'_'.join(columns)}_key"


@runtime_checkable
class Leases(Protocol):
    """Named, expiring leases: mutual exclusion between processes sharing one store."""

    async def claim_lease(self, name: str, holder: str, now: datetime, until: datetime) -> bool:
        """Hold `name` for `holder` until `until`; False if another holder's lease is still running at `now`."""
        ...

    async def release_lease(self, name: str, holder: str) -> None:
        """Give `name` up, if `holder` still holds it."""
        ...


# An account with its bound party: `accounts a LEFT JOIN bindings ab` (6 columns, `_account`).
_ACCOUNT_COLUMNS = (
    "a.account_id, a.holder_name, a.created_at, ab.party_id, a.failed_enrolment_attempts, a.enrolment_locked"
)
_ACCOUNT_JOIN = "accounts a LEFT JOIN bindings ab ON ab.account_id = a.account_id"


def _account(row: Row) -> AccountRecord:
    return AccountRecord(row[0], row[1], dt(row[2]), row[3], row[4], bool(row[5]))


def _read_account(db: Db, account_id: str) -> AccountRecord | None:
    row = db.execute(
        f"SELECT {_ACCOUNT_COLUMNS} FROM {_ACCOUNT_JOIN} WHERE a.account_id = ?",  # noqa: S608
        (account_id,),
    ).fetchone()
    return None if row is None else _account(row)


def _read_thread(db: Db, thread_id: bytes) -> ThreadRecord | None:
    row = db.execute(
        """SELECT account_id, bill_id, consumer_party_id, outcome, deadline, opened_at, hardship_disclosed
           FROM threads WHERE thread_id = ?""",
        (thread_id,),
    ).fetchone()
    if row is None:
        return None
    messages = db.execute(
        """SELECT sequence, envelope, digest, sender, payload_type, message_id, received_at
           FROM messages WHERE thread_id = ? ORDER BY sequence""",
        (thread_id,),
    ).fetchall()
    disclosure = db.execute("SELECT content FROM disclosures WHERE thread_id = ?", (thread_id,)).fetchone()
    return ThreadRecord(
        thread_id=thread_id,
        account_id=row[0],
        bill_id=row[1],
        consumer_party_id=row[2],
        outcome=ThreadOutcome(row[3]),
        deadline=dt(row[4]),
        opened_at=dt(row[5]),
        hardship_disclosed=bool(row[6]),
        messages=tuple(MessageRecord(thread_id, m[0], m[1], m[2], m[3], m[4], m[5], dt(m[6])) for m in messages),
        disclosure=None if disclosure is None else disclosure[0],
    )


class SqlBillerStore(abc.ABC):
    """`BillerStore` (and `Leases`) in dialect-neutral SQL over a back end's transactions."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection(s); the store is unusable afterwards."""

    @abc.abstractmethod
    async def _in_write(self, fn: Callable[[Db], T]) -> T:
        """Run `fn` in one write transaction: all of it commits, or none of it."""

    @abc.abstractmethod
    async def _in_read(self, fn: Callable[[Db], T]) -> T:
        """Run `fn` in one read transaction (a consistent snapshot)."""

    @abc.abstractmethod
    async def _in_statement(self, fn: Callable[[Db], T]) -> T:
        """Run `fn`, which executes ONE statement, as its own implicit transaction (no BEGIN/COMMIT: a single
        statement sees one consistent snapshot anyway, and most reads are one statement)."""

    @abc.abstractmethod
    async def _erased(self) -> None:
        """Called after disclosures were deleted: make the deleted rows unrecoverable (PRV-4)."""

    async def _one(self, sql: str, *args: object) -> Row | None:
        return await self._in_statement(lambda db: db.execute(sql, args).fetchone())

    async def _all(self, sql: str, *args: object) -> list[Row]:
        return await self._in_statement(lambda db: db.execute(sql, args).fetchall())

    # --- leases (the reference scheduler's one-pass-at-a-time across replicas) ---

    async def claim_lease(self, name: str, holder: str, now: datetime, until: datetime) -> bool:
        # The primary key settles racing claims; the conditional upsert takes over only an expired lease.
        return await self._in_write(
            lambda db: (
                db.execute(
                    """INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                   WHERE leases.expires_at < ? OR leases.holder = excluded.holder""",
                    (name, holder, ts(until), ts(now)),
                ).rowcount
                == 1
            )
        )

    async def release_lease(self, name: str, holder: str) -> None:
        await self._in_write(lambda db: db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)))

    # --- accounts and enrolment ---

    async def create_account(self, account_id: str, holder_name: str, created_at: datetime) -> None:
        def insert(db: Db) -> None:
            try:
                db.execute(
                    "INSERT INTO accounts (account_id, holder_name, created_at) VALUES (?, ?, ?)",
                    (account_id, holder_name, ts(created_at)),
                )
            except IntegrityViolation as error:
                raise AlreadyExists(f"account {account_id!r} already exists") from error

        await self._in_write(insert)

    async def get_account(self, account_id: str) -> AccountRecord | None:
        return await self._in_statement(lambda db: _read_account(db, account_id))

    async def add_enrolment_code(self, code: EnrolmentCodeRecord, created_at: datetime) -> None:
        def add(db: Db) -> None:
            db.execute(
                """INSERT INTO enrolment_codes (code_hash, salt, account_id, created_at, expires_at)
                   VALUES (?, ?, ?, ?, ?)""",
                (code.code_hash, code.salt, code.account_id, ts(created_at), ts(code.expires_at)),
            )
            # ENR-5: a new code issued out of band lifts the lock.
            db.execute(
                "UPDATE accounts SET failed_enrolment_attempts = 0, enrolment_locked = FALSE WHERE account_id = ?",
                (code.account_id,),
            )

        await self._in_write(add)

    async def enrolment_codes(self, account_id: str) -> list[EnrolmentCodeRecord]:
        return await self._in_statement(lambda db: _enrolment_codes(db, account_id))

    async def revoke_enrolment_codes(self, account_id: str, now: datetime) -> int:
        def revoke(db: Db) -> int:
            return db.execute(
                """UPDATE enrolment_codes SET expires_at = ?
                   WHERE account_id = ? AND used_at IS NULL AND expires_at > ?""",
                (ts(now), account_id, ts(now)),
            ).rowcount

        return await self._in_write(revoke)

    async def list_accounts(self) -> list[AccountRecord]:
        rows = await self._all(
            """SELECT a.account_id, a.holder_name, a.created_at, b.party_id,
                      a.failed_enrolment_attempts, a.enrolment_locked
               FROM accounts a LEFT JOIN bindings b ON b.account_id = a.account_id
               ORDER BY a.account_id"""
        )
        return [AccountRecord(row[0], row[1], dt(row[2]), row[3], row[4], bool(row[5])) for row in rows]

    async def set_account_segment(self, account_id: str, segment: str) -> None:
        await self._in_write(
            lambda db: db.execute(
                """INSERT INTO account_segments (account_id, segment) VALUES (?, ?)
                   ON CONFLICT (account_id) DO UPDATE SET segment = excluded.segment""",
                (account_id, segment),
            )
        )

    async def account_segments(self) -> dict[str, str]:
        rows = await self._all("SELECT account_id, segment FROM account_segments")
        return {row[0]: row[1] for row in rows}

    async def webhook_cursors(self, endpoint: str) -> dict[tuple[str, str], WebhookCursor]:
        rows = await self._all(
            """SELECT account_id, party_id, next_sequence, attempts, next_attempt_at, last_error
               FROM webhook_log_cursors WHERE endpoint = ?""",
            endpoint,
        )
        cursors = (
            WebhookCursor(row[0], row[1], row[2], row[3], None if row[4] is None else dt(row[4]), row[5])
            for row in rows
        )
        return {(cursor.account_id, cursor.party_id): cursor for cursor in cursors}

    async def save_webhook_cursor(self, endpoint: str, cursor: WebhookCursor) -> None:
        attempt_at = None if cursor.next_attempt_at is None else ts(cursor.next_attempt_at)
        await self._in_write(
            lambda db: db.execute(
                """INSERT INTO webhook_log_cursors (endpoint, account_id, party_id, next_sequence, attempts,
                                                    next_attempt_at, last_error)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (endpoint, account_id, party_id) DO UPDATE SET
                       next_sequence = excluded.next_sequence, attempts = excluded.attempts,
                       next_attempt_at = excluded.next_attempt_at, last_error = excluded.last_error""",
                (
                    endpoint,
                    cursor.account_id,
                    cursor.party_id,
                    cursor.next_sequence,
                    cursor.attempts,
                    attempt_at,
                    cursor.last_error,
                ),
            )
        )

    async def attempt_enrolment_code(
        self,
        account_id: str,
        matches: Callable[[EnrolmentCodeRecord], bool],
        max_attempts: int,
        now: datetime,
    ) -> EnrolmentAttempt:
        def attempt(db: Db) -> EnrolmentAttempt:
            # The counter's row is held (FOR UPDATE / SQLite's one writer) from the lock check to the commit,
            # so concurrent attempts are counted one after another and none is compared past the limit (ENR-5).
            counter = _enrolment_counter(db, account_id, now)
            failed, locked = counter.read()
            if locked:
                return EnrolmentAttempt(EnrolmentAttemptOutcome.LOCKED)
            counter.write(failed + 1, failed + 1 >= max_attempts)  # count first...
            match = None
            for record in _enrolment_codes(db, account_id):  # ...then compare every code (no early exit)
                if matches(record):
                    match = record
            if match is None:
                return EnrolmentAttempt(EnrolmentAttemptOutcome.MISMATCH)
            counter.write(failed, locked)  # ...and take the count back for the right code
            return EnrolmentAttempt(EnrolmentAttemptOutcome.MATCHED, match)

        return await self._in_write(attempt)

    async def enrol(self, enrolment: Enrolment) -> list[EventRecord]:
        def enrol(db: Db) -> None:
            events.clear()  # a back end may run the step again
            _lock_account(db, enrolment.account_id)
            used = db.execute(
                "UPDATE enrolment_codes SET used_at = ? WHERE code_hash = ? AND account_id = ? AND used_at IS NULL",
                (ts(enrolment.bound_at), enrolment.code_hash, enrolment.account_id),
            )
            if used.rowcount != 1:
                raise StoreConflict(Reason.ENROLMENT_CODE_USED, "the code was used meanwhile")
            known = db.execute("SELECT fingerprint FROM parties WHERE party_id = ?", (enrolment.party_id,)).fetchone()
            if known is None:
                db.execute(
                    "INSERT INTO parties (party_id, fingerprint, enrolled_at) VALUES (?, ?, ?)",
                    (enrolment.party_id, enrolment.fingerprint, ts(enrolment.bound_at)),
                )
                _insert_key_set(db, enrolment.key_set)
            elif known[0] != enrolment.fingerprint:
                raise StoreConflict(Reason.PARTY_ID_TAKEN, f"{enrolment.party_id!r} is another key set chain's")
            # ENR-11: one consumer per account; a new enrolment replaces the binding.
            db.execute(
                """INSERT INTO bindings (account_id, party_id, bound_at) VALUES (?, ?, ?)
                   ON CONFLICT (account_id) DO UPDATE SET party_id = excluded.party_id, bound_at = excluded.bound_at""",
                (enrolment.account_id, enrolment.party_id, ts(enrolment.bound_at)),
            )
            # No other code of the account stays usable to take the binding over.
            db.execute(
                "UPDATE enrolment_codes SET used_at = ? WHERE account_id = ? AND used_at IS NULL",
                (ts(enrolment.bound_at), enrolment.account_id),
            )
            _insert_replay(db, enrolment.replay)
            # ENR-12: the unpaid bills the party was not presented yet, presented to it, each with its
            # BILL_ISSUED event in the party's own log (the binding above makes it the log appended to).
            if enrolment.present is not None:
                rows = db.execute(
                    f"""SELECT {_BILL_COLUMNS} FROM bills b
                        WHERE b.account_id = ? AND b.status <> 'paid' AND NOT EXISTS (
                            SELECT 1 FROM bill_presentations p WHERE p.bill_id = b.bill_id AND p.party_id = ?)
                        ORDER BY b.issued_at, b.rowid""",  # noqa: S608
                    (enrolment.account_id, enrolment.party_id),
                ).fetchall()
                for row in rows:
                    presentation, event = enrolment.present(_bill(row))
                    _insert_presentation(db, presentation, enrolment.bound_at)
                    events.extend(_append_events(db, [event]))

        events: list[EventRecord] = []
        await self._in_write(enrol)
        return events

    # --- parties and key sets ---

    async def party_with_keyid(self, keyid: str) -> str | None:
        row = await self._one("SELECT party_id FROM party_keyids WHERE keyid = ?", keyid)
        return None if row is None else str(row[0])

    async def party_key_sets(self, party_id: str, *, after_version: int = 0) -> list[bytes]:
        rows = await self._all(
            "SELECT envelope FROM party_key_sets WHERE party_id = ? AND version > ? ORDER BY version",
            party_id,
            after_version,
        )
        return [row[0] for row in rows]

    async def append_key_set(self, record: KeySetRecord) -> None:
        await self._in_write(lambda db: _insert_key_set(db, record))

    # --- replay cache ---

    async def replay_lookup(self, sender: str, message_id: bytes) -> ReplayRecord | None:
        return await self._in_statement(lambda db: _replay_entry(db, sender, message_id))

    async def record_replay(self, record: ReplayRecord) -> None:
        await self._in_write(lambda db: _insert_replay(db, record))

    async def purge_replay_cache(self, now: datetime) -> int:
        return await self._in_write(
            lambda db: db.execute("DELETE FROM replay_cache WHERE expires_at < ?", (ts(now),)).rowcount
        )

    # --- bills ---

    async def insert_bill(self, bill: BillRecord, events: Sequence[PendingEvent]) -> list[EventRecord]:
        def insert(db: Db) -> list[EventRecord]:
            _lock_account(db, bill.account_id)
            if _bound_party(db, bill.account_id) != bill.party_id:  # ENR-12: signed to the party bound now
                raise BindingChanged(f"account {bill.account_id!r} is no longer bound to {bill.party_id!r}")
            try:
                db.execute(
                    """INSERT INTO bills (bill_id, account_id, envelope, digest, amount_minor, currency,
                                          due_date, status, issued_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        bill.bill_id,
                        bill.account_id,
                        bill.envelope,
                        bill.digest,
                        bill.amount_minor,
                        bill.currency,
                        bill.due_date.isoformat(),
                        bill.status.value,
                        ts(bill.issued_at),
                    ),
                )
            except IntegrityViolation as error:
                raise AlreadyExists(f"bill {bill.bill_id!r} already exists") from error
            _insert_presentation(db, bill, bill.issued_at)
            return _append_events(db, events)

        return await self._in_write(insert)

    async def received_minor(self, bill_id: str) -> int:
        return await self._in_statement(lambda db: _received_minor(db, bill_id))

    async def get_bill(self, bill_id: str) -> BillRecord | None:
        row = await self._one(f"SELECT {_BILL_COLUMNS} FROM bills b WHERE bill_id = ?", bill_id)  # noqa: S608
        return None if row is None else _bill(row)

    async def reopen_bill(self, bill_id: str, events: Sequence[PendingEvent]) -> list[EventRecord]:
        def reopen(db: Db) -> list[EventRecord]:
            moved = db.execute(
                "UPDATE bills SET status = 'open' WHERE bill_id = ? AND status = 'under_arrangement'", (bill_id,)
            )
            if moved.rowcount != 1:
                raise LookupError(f"no bill {bill_id!r} under an arrangement")
            return _append_events(db, events)

        return await self._in_write(reopen)

    async def list_bills(self, account_id: str, party_id: str | None = None) -> list[BillRecord]:
        if party_id is None:
            rows = await self._all(
                f"SELECT {_BILL_COLUMNS} FROM bills b WHERE account_id = ? ORDER BY issued_at, rowid",  # noqa: S608
                account_id,
            )
        else:
            rows = await self._all(
                f"""SELECT {_PRESENTED_COLUMNS} FROM bills b
                    JOIN bill_presentations p ON p.bill_id = b.bill_id AND p.party_id = ?
                    WHERE b.account_id = ? ORDER BY b.issued_at, b.rowid""",  # noqa: S608
                party_id,
                account_id,
            )
        return [_bill(row) for row in rows]

    async def accounts_owing(self) -> list[str]:
        rows = await self._all("SELECT DISTINCT account_id FROM bills WHERE status <> 'paid' ORDER BY account_id")
        return [row[0] for row in rows]

    async def get_presented_bill(self, bill_id: str, party_id: str) -> BillRecord | None:
        return await self._in_statement(lambda db: _presented_bill(db, bill_id, party_id))  # one SELECT

    async def bill_read_context(self, account_id: str, bill_id: str, party_id: str) -> ReadContext:
        # One statement: the account, and the bill (of any account) as presented to the party.
        row = await self._one(
            f"""SELECT {_ACCOUNT_COLUMNS}, {_PRESENTED_COLUMNS}
                FROM {_ACCOUNT_JOIN}
                LEFT JOIN (bills b JOIN bill_presentations p ON p.bill_id = b.bill_id AND p.party_id = ?)
                       ON b.bill_id = ?
                WHERE a.account_id = ?""",  # noqa: S608
            party_id,
            bill_id,
            account_id,
        )
        if row is None:  # no such account; the bill is not the reader's to see on it anyway (AUZ-1)
            return ReadContext(None)
        return ReadContext(_account(row), bill=None if row[6] is None else _bill(row[6:]))

    # --- negotiation ---

    async def get_thread(self, thread_id: bytes) -> ThreadRecord | None:
        return await self._in_read(lambda db: _read_thread(db, thread_id))

    async def thread_context(
        self,
        thread_id: bytes,
        opened_bill_id: str,
        party_id: str = "",
        *,
        replay_key: tuple[str, bytes] | None = None,
    ) -> ThreadContext:
        def read(db: Db) -> ThreadContext:
            thread = _read_thread(db, thread_id)
            if thread is not None:  # as presented to its party; else (a row migrated over) as first presented
                bill = _presented_bill(db, thread.bill_id, thread.consumer_party_id)
                if bill is None:
                    row = db.execute(
                        f"SELECT {_BILL_COLUMNS} FROM bills b WHERE bill_id = ?",  # noqa: S608
                        (thread.bill_id,),
                    ).fetchone()
                    bill = None if row is None else _bill(row)
            else:
                bill = _presented_bill(db, opened_bill_id, party_id)
            account = None if bill is None else _read_account(db, bill.account_id)
            received = 0
            open_threads: tuple[tuple[str, datetime], ...] = ()
            threads_on_bill = 0
            if thread is None and bill is not None:  # an opening: what it is judged against
                received = _received_minor(db, bill.bill_id)
                open_threads = tuple(
                    (row[0], dt(row[1]))
                    for row in db.execute(
                        "SELECT bill_id, deadline FROM threads WHERE account_id = ? AND outcome = 'open'",
                        (bill.account_id,),
                    )
                )
                threads_on_bill = _threads_on_bill(db, bill.bill_id)
            replay = None if replay_key is None else _replay_entry(db, *replay_key)
            return ThreadContext(thread, bill, account, received, open_threads, replay, threads_on_bill)

        return await self._in_read(read)

    async def record_negotiation_step(self, step: NegotiationStep) -> list[EventRecord]:
        return await self._in_write(lambda db: _negotiation_step(db, step))

    async def open_thread_bills(self, account_id: str, now: datetime) -> list[str]:
        rows = await self._all(
            "SELECT bill_id FROM threads WHERE account_id = ? AND outcome = 'open' AND deadline >= ?",
            account_id,
            ts(now),
        )
        return [row[0] for row in rows]

    async def mark_thread_expired(self, thread_id: bytes) -> None:
        await self._in_write(
            lambda db: db.execute(
                "UPDATE threads SET outcome = 'expired' WHERE thread_id = ? AND outcome = 'open'", (thread_id,)
            )
        )

    async def arrangements(self, account_id: str | None, *, active_only: bool) -> list[ArrangementRecord]:
        where, args = "", []
        if account_id is not None:
            where, args = " AND t.account_id = ?", [account_id]
        if active_only:
            where += " AND b.status = 'under_arrangement'"
        # One statement (the arrangements with their payments): on PostgreSQL one round trip, not a transaction's
        # three or more, and the reference scheduler reads this for every owing account on every round.
        return await self._in_statement(lambda db: _arrangements(db, where, args))

    async def get_arrangement(self, account_id: str, accept_digest: bytes) -> ArrangementRecord | None:
        found = await self._in_statement(
            lambda db: _arrangements(db, " AND t.account_id = ? AND t.accept_digest = ?", [account_id, accept_digest])
        )
        return found[0] if found else None

    # --- privacy ---

    async def erase_disclosures(self, account_id: str, answer: Callable[[int], ReplayRecord]) -> int:
        def erase(db: Db) -> int:
            count = _erase_disclosures(db, "account_id = ?", account_id)
            _insert_replay(db, answer(count))
            return count

        count = await self._in_write(erase)
        await self._erased()
        return count

    async def erase_disclosures_before(self, cutoff: datetime) -> int:
        count = await self._in_write(lambda db: _erase_disclosures(db, "received_at < ?", ts(cutoff)))
        await self._erased()
        return count

    # --- payments ---

    _INTENT_COLUMNS = """account_id, intent_id, content_hash, bill_id, agreement_digest, instalment_index,
                         amount_minor, currency, payment_reference, intent, instructions, created_at, pay_by"""

    async def payment_context(
        self,
        account_id: str,
        bill_id: str,
        intent_id: str,
        agreement_digest: bytes,
        *,
        replay_key: tuple[str, bytes] | None = None,
    ) -> PaymentContext:
        def read(db: Db) -> PaymentContext:
            bill = db.execute(f"SELECT {_BILL_COLUMNS} FROM bills b WHERE bill_id = ?", (bill_id,)).fetchone()  # noqa: S608
            intent = db.execute(
                f"SELECT {self._INTENT_COLUMNS} FROM payment_intents WHERE account_id = ? AND intent_id = ?",  # noqa: S608
                (account_id, intent_id),
            ).fetchone()
            arrangement = None
            if agreement_digest:
                found = _arrangements(
                    db, " AND t.account_id = ? AND t.accept_digest = ?", [account_id, agreement_digest]
                )
                arrangement = found[0] if found else None
            current = db.execute(
                """SELECT t.accept_digest FROM threads t JOIN bills b ON b.bill_id = t.bill_id
                   WHERE t.bill_id = ? AND t.outcome = 'agreed' AND b.status = 'under_arrangement'
                   ORDER BY t.agreed_at DESC, t.rowid DESC LIMIT 1""",
                (bill_id,),
            ).fetchone()
            return PaymentContext(
                account=_read_account(db, account_id),
                bill=None if bill is None else _bill(bill),
                intent=None if intent is None else _intent(intent),
                arrangement=arrangement,
                received_minor=_received_minor(db, bill_id),
                current_agreement=None if current is None else current[0],
                replay=None if replay_key is None else _replay_entry(db, *replay_key),
            )

        return await self._in_read(read)

    async def get_payment_intent(self, account_id: str, intent_id: str) -> PaymentIntentRecord | None:
        row = await self._one(
            f"SELECT {self._INTENT_COLUMNS} FROM payment_intents WHERE account_id = ? AND intent_id = ?",  # noqa: S608
            account_id,
            intent_id,
        )
        return None if row is None else _intent(row)

    async def unsettled_payment_intents(self) -> list[PaymentIntentRecord]:
        rows = await self._all(
            f"""SELECT {self._INTENT_COLUMNS} FROM payment_intents p
                WHERE NOT EXISTS (SELECT 1 FROM settlements s
                                  WHERE s.account_id = p.account_id AND s.intent_id = p.intent_id)
                ORDER BY created_at, account_id, intent_id"""  # noqa: S608
        )
        return [_intent(row) for row in rows]

    async def insert_payment_intent(self, intent: PaymentIntentRecord, replay: ReplayRecord) -> None:
        def insert(db: Db) -> None:
            _lock_account(db, intent.account_id)
            # Checked before inserting, so the answer never depends on which UNIQUE index a database checks
            # first; an insert that still collides raced a concurrent writer, and the back end reruns it.
            holders = db.execute(
                """SELECT account_id, intent_id FROM payment_intents
                   WHERE (account_id = ? AND intent_id = ?) OR payment_reference = ?""",
                (intent.account_id, intent.intent_id, intent.payment_reference),
            ).fetchall()
            if (intent.account_id, intent.intent_id) in [tuple(holder) for holder in holders]:
                raise StoreConflict(Reason.IDEMPOTENCY_CONFLICT, f"intent {intent.intent_id!r} was created meanwhile")
            if holders:
                raise ValueError(f"payment reference {intent.payment_reference!r} is not unique")
            _check_no_payment_in_progress(db, intent)
            db.execute(
                f"INSERT INTO payment_intents ({self._INTENT_COLUMNS}) VALUES ({', '.join('?' * 13)})",  # noqa: S608
                (
                    intent.account_id,
                    intent.intent_id,
                    intent.content_hash,
                    intent.bill_id,
                    intent.agreement_digest,
                    intent.instalment_index,
                    intent.amount_minor,
                    intent.currency,
                    intent.payment_reference,
                    intent.intent,
                    intent.instructions,
                    ts(intent.created_at),
                    None if intent.pay_by is None else ts(intent.pay_by),
                ),
            )
            _insert_replay(db, replay)

        await self._in_write(insert)

    async def get_settlement(self, account_id: str, intent_id: str) -> SettlementRecord | None:
        return await self._in_statement(lambda db: _settlement(db, account_id, intent_id))  # one SELECT

    async def receipt_read_context(self, account_id: str, intent_id: str) -> ReadContext:
        # One statement: the account, the intent's envelope if stored, its settlement if settled.
        row = await self._one(
            f"""SELECT {_ACCOUNT_COLUMNS}, p.intent, s.amount_minor, s.rail_reference, s.settled_at, s.receipt
                FROM {_ACCOUNT_JOIN}
                LEFT JOIN payment_intents p ON p.account_id = a.account_id AND p.intent_id = ?
                LEFT JOIN settlements s ON s.account_id = p.account_id AND s.intent_id = p.intent_id
                WHERE a.account_id = ?""",  # noqa: S608
            intent_id,
            account_id,
        )
        if row is None:
            return ReadContext(None)
        settlement = None
        if row[7] is not None:
            settlement = SettlementRecord(account_id, intent_id, row[7], row[8], dt(row[9]), row[10])
        return ReadContext(_account(row), intent=None if row[6] is None else bytes(row[6]), settlement=settlement)

    async def settle(self, settle: Settle) -> tuple[SettlementRecord, list[EventRecord]]:
        return await self._in_write(lambda db: _settle(db, settle))

    # --- events ---

    async def append_events(self, events: Sequence[PendingEvent]) -> list[EventRecord]:
        return await self._in_write(lambda db: _append_events(db, events))

    async def events(self, account_id: str, start: int, limit: int, party_id: str | None = None) -> list[EventRecord]:
        # One statement, the bound party found inside it: on PostgreSQL one round trip instead of a transaction's
        # four (a stream's every read, and the reference scheduler's for every owing account on every round).
        party, args = _log_party_sql(party_id, account_id)
        rows = await self._all(
            f"""SELECT sequence, envelope, digest, party_id FROM binding_events
                WHERE account_id = ? AND party_id = {party} AND sequence >= ? ORDER BY sequence LIMIT ?""",  # noqa: S608
            account_id,
            *args,
            start,
            limit,
        )
        return [EventRecord(account_id, row[0], row[1], row[2], row[3]) for row in rows]

    async def event_logs(self, account_id: str | None = None) -> list[EventLog]:
        if account_id is None:
            rows = await self._all(
                "SELECT account_id, party_id, length FROM event_log_lengths ORDER BY account_id, party_id"
            )
        else:
            rows = await self._all(
                """SELECT account_id, party_id, length FROM event_log_lengths WHERE account_id = ?
                   ORDER BY party_id""",
                account_id,
            )
        return [EventLog(row[0], row[1], int(row[2])) for row in rows]

    async def event_count(self, account_id: str, party_id: str | None = None) -> int:
        party, args = _log_party_sql(party_id, account_id)
        row = await self._one(
            f"""SELECT COALESCE(MAX(sequence) + 1, 0) FROM binding_events
                WHERE account_id = ? AND party_id = {party}""",  # noqa: S608
            account_id,
            *args,
        )
        assert row is not None  # an aggregate always has its row
        return int(row[0])


# --- transaction bodies (on a worker thread, inside one transaction) ------------------------------


def _insert_key_set(db: Db, record: KeySetRecord) -> None:
    for keyid in record.keyids:
        owner = db.execute("SELECT party_id FROM party_keyids WHERE keyid = ?", (keyid,)).fetchone()
        if owner is None:
            db.execute("INSERT INTO party_keyids (keyid, party_id) VALUES (?, ?)", (keyid, record.party_id))
        elif owner[0] != record.party_id:
            raise StoreConflict(Reason.KEYSET_INVALID, f"keyid {keyid} belongs to another party")
    try:
        db.execute(
            "INSERT INTO party_key_sets (party_id, version, envelope) VALUES (?, ?, ?)",
            (record.party_id, record.version, record.envelope),
        )
    except IntegrityViolation as error:
        raise StoreConflict(
            Reason.KEYSET_ROLLBACK, f"version {record.version} of {record.party_id!r} is already stored"
        ) from error


def _replay_entry(db: Db, sender: str, message_id: bytes) -> ReplayRecord | None:
    row = db.execute(
        """SELECT digest, expires_at, answer, error_reason, error_detail
           FROM replay_cache WHERE sender = ? AND message_id = ?""",
        (sender, message_id),
    ).fetchone()
    if row is None:
        return None
    return ReplayRecord(sender, message_id, row[0], dt(row[1]), row[2], row[3], row[4])


def _insert_replay(db: Db, record: ReplayRecord) -> None:
    try:
        db.execute(
            """INSERT INTO replay_cache (sender, message_id, digest, answer, error_reason, error_detail, expires_at)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (
                record.sender,
                record.message_id,
                record.digest,
                record.answer,
                record.error_reason,
                record.error_detail,
                ts(record.expires_at),
            ),
        )
    except IntegrityViolation as error:
        raise StoreConflict(Reason.REPLAYED_MESSAGE, "the message id was received meanwhile") from error


def _enrolment_codes(db: Db, account_id: str) -> list[EnrolmentCodeRecord]:
    rows = db.execute(
        "SELECT salt, code_hash, expires_at, used_at FROM enrolment_codes WHERE account_id = ?", (account_id,)
    ).fetchall()
    return [EnrolmentCodeRecord(account_id, row[0], row[1], dt(row[2]), row[3] is not None) for row in rows]


@dataclass(frozen=True)
class _EnrolmentCounter:
    """The wrong-code counter and lock of one account id, its row held for the transaction: the account's
    own columns if it exists, else its row in `enrolment_guesses` (ENR-3: both behave the same)."""

    db: Db
    account_id: str
    account_hash: bytes | None  # None: an existing account
    now: datetime

    def read(self) -> tuple[int, bool]:
        if self.account_hash is None:
            row = self.db.execute(
                "SELECT failed_enrolment_attempts, enrolment_locked FROM accounts WHERE account_id = ?",
                (self.account_id,),
            ).fetchone()
        else:
            row = self.db.execute(
                "SELECT failed_attempts, locked FROM enrolment_guesses WHERE account_hash = ?", (self.account_hash,)
            ).fetchone()
        return int(row[0]), bool(row[1])

    def write(self, failed: int, locked: bool) -> None:
        if self.account_hash is None:
            self.db.execute(
                "UPDATE accounts SET failed_enrolment_attempts = ?, enrolment_locked = ? WHERE account_id = ?",
                (failed, locked, self.account_id),
            )
        else:
            self.db.execute(
                "UPDATE enrolment_guesses SET failed_attempts = ?, locked = ?, last_attempt_at = ? "
                "WHERE account_hash = ?",
                (failed, locked, ts(self.now), self.account_hash),
            )


def _enrolment_counter(db: Db, account_id: str, now: datetime) -> _EnrolmentCounter:
    """The account id's counter, its row locked until the transaction ends (made for an unknown id)."""
    exists = db.execute(
        "SELECT 1 FROM accounts WHERE account_id = ?" + db.for_update,  # noqa: S608
        (account_id,),
    ).fetchone()
    if exists is not None:
        return _EnrolmentCounter(db, account_id, None, now)
    account_hash = hashlib.sha256(account_id.encode()).digest()
    # Forget what is older than the memory, then the least recently tried beyond the cap (LIM-12).
    db.execute("DELETE FROM enrolment_guesses WHERE last_attempt_at < ?", (ts(now - ENROLMENT_GUESS_MEMORY),))
    oldest_kept = db.execute(
        "SELECT last_attempt_at FROM enrolment_guesses ORDER BY last_attempt_at DESC LIMIT 1 OFFSET ?",
        (MAX_ENROLMENT_GUESSES - 1,),
    ).fetchone()
    if oldest_kept is not None:
        db.execute("DELETE FROM enrolment_guesses WHERE last_attempt_at <= ?", (oldest_kept[0],))
    db.execute(
        """INSERT INTO enrolment_guesses (account_hash, failed_attempts, locked, last_attempt_at)
           VALUES (?, 0, FALSE, ?) ON CONFLICT (account_hash) DO NOTHING""",
        (account_hash, ts(now)),
    )
    db.execute("SELECT 1 FROM enrolment_guesses WHERE account_hash = ?" + db.for_update, (account_hash,))  # noqa: S608
    return _EnrolmentCounter(db, account_id, account_hash, now)


def _lock_account(db: Db, account_id: str) -> None:
    """Hold the account's row until the transaction ends: one writer per account at a time.

    Every step that reads the account's state to decide what to write (the next event
    sequence, open threads, what is still owed, whether an intent exists) takes it first,
    so what it read stays true until it commits, whatever other processes do.
    """
    db.execute("SELECT 1 FROM accounts WHERE account_id = ?" + db.for_update, (account_id,))  # noqa: S608


def _log_party_sql(party_id: str | None, account_id: str) -> tuple[str, tuple[str, ...]]:
    """The SQL naming an event log's party in a statement, and its parameters: `party_id`, or the party bound to
    the account now (a subquery: NULL when none is, which matches no row)."""
    if party_id is not None:
        return "?", (party_id,)
    return "(SELECT party_id FROM bindings WHERE account_id = ?)", (account_id,)


def _bound_party(db: Db, account_id: str) -> str | None:
    row = db.execute("SELECT party_id FROM bindings WHERE account_id = ?", (account_id,)).fetchone()
    return None if row is None else str(row[0])


def _append_events(db: Db, events: Sequence[PendingEvent]) -> list[EventRecord]:
    """Append each event at the next cursor of the log of the party bound to its account, addressed to that
    party and chained to the log's previous event (EVT-1, ENR-12)."""
    records = []
    for event in events:
        _lock_account(db, event.account_id)
        party_id = _bound_party(db, event.account_id) if event.party_id is None else event.party_id
        if party_id is None:
            raise LookupError(f"account {event.account_id!r} has no enrolled consumer: no log to append to")
        last = db.execute(
            """SELECT sequence, digest FROM binding_events WHERE account_id = ? AND party_id = ?
               ORDER BY sequence DESC LIMIT 1""",
            (event.account_id, party_id),
        ).fetchone()
        sequence, previous = (0, b"") if last is None else (last[0] + 1, last[1])
        envelope = event.seal(party_id, sequence, previous)
        record = EventRecord(event.account_id, sequence, envelope.SerializeToString(), digest(envelope), party_id)
        db.execute(
            """INSERT INTO binding_events (account_id, party_id, sequence, envelope, digest, kind)
               VALUES (?, ?, ?, ?, ?, ?)""",
            (record.account_id, party_id, record.sequence, record.envelope, record.digest, event.kind),
        )
        db.execute(
            """INSERT INTO event_log_lengths (account_id, party_id, length) VALUES (?, ?, ?)
               ON CONFLICT (account_id, party_id) DO UPDATE SET length = excluded.length""",
            (record.account_id, party_id, sequence + 1),
        )
        records.append(record)
    return records


def _insert_presentation(db: Db, bill: BillRecord, presented_at: datetime) -> None:
    """Record a bill's presentation to `bill.party_id` (BIL-1: signed once, served byte for byte)."""
    db.execute(
        """INSERT INTO bill_presentations (bill_id, party_id, envelope, digest, presented_at)
           VALUES (?, ?, ?, ?, ?)""",
        (bill.bill_id, bill.party_id, bill.envelope, bill.digest, ts(presented_at)),
    )


def _presented_bill(db: Db, bill_id: str, party_id: str) -> BillRecord | None:
    row = db.execute(
        f"""SELECT {_PRESENTED_COLUMNS} FROM bills b
            JOIN bill_presentations p ON p.bill_id = b.bill_id AND p.party_id = ?
            WHERE b.bill_id = ?""",  # noqa: S608
        (party_id, bill_id),
    ).fetchone()
    return None if row is None else _bill(row)


def _threads_on_bill(db: Db, bill_id: str) -> int:
    """LIM-16: every thread the bill has had, whatever its outcome."""
    (count,) = db.execute("SELECT COUNT(*) FROM threads WHERE bill_id = ?", (bill_id,)).fetchone()
    return int(count)


def _negotiation_step(db: Db, step: NegotiationStep) -> list[EventRecord]:
    _lock_account(db, step.account_id)
    new = step.new_thread
    if new is not None:
        status = db.execute("SELECT status FROM bills WHERE bill_id = ?", (step.bill_id,)).fetchone()
        if status is None or status[0] != BillStatus.OPEN:
            raise StoreConflict(Reason.BILL_NOT_NEGOTIABLE, f"bill {step.bill_id!r} is not open")
        # NEG-3, LIM-7: threads past their deadline are EXPIRED (NEG-6) and do not count.
        (open_on_bill,) = db.execute(
            "SELECT COUNT(*) FROM threads WHERE bill_id = ? AND outcome = 'open' AND deadline >= ?",
            (step.bill_id, ts(step.now)),
        ).fetchone()
        if open_on_bill:
            raise StoreConflict(Reason.BILL_NOT_NEGOTIABLE, f"another thread on bill {step.bill_id!r} is open")
        (open_threads,) = db.execute(
            "SELECT COUNT(*) FROM threads WHERE account_id = ? AND outcome = 'open' AND deadline >= ?",
            (step.account_id, ts(step.now)),
        ).fetchone()
        if open_threads >= new.max_open_threads:
            raise StoreConflict(Reason.TOO_MANY_OPEN_THREADS, f"the account already has {open_threads} open threads")
        if _threads_on_bill(db, step.bill_id) >= MAX_THREADS_PER_BILL:
            raise StoreConflict(
                Reason.TOO_MANY_THREADS, f"bill {step.bill_id!r} has had {MAX_THREADS_PER_BILL} threads"
            )
        try:
            db.execute(
                """INSERT INTO threads (thread_id, account_id, bill_id, consumer_party_id, outcome, deadline,
                                        opened_at, hardship_disclosed)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    step.thread_id,
                    step.account_id,
                    step.bill_id,
                    new.consumer_party_id,
                    step.outcome.value,
                    ts(new.deadline),
                    ts(step.now),
                    new.hardship_disclosed,
                ),
            )
        except IntegrityViolation as error:
            raise StoreConflict(Reason.SEQUENCE_MISMATCH, "the thread was opened meanwhile") from error
        if new.disclosure is not None:
            db.execute(
                "INSERT INTO disclosures (thread_id, account_id, content, received_at) VALUES (?, ?, ?, ?)",
                (step.thread_id, step.account_id, new.disclosure, ts(step.now)),
            )
    else:
        db.execute("UPDATE threads SET outcome = ? WHERE thread_id = ?", (step.outcome.value, step.thread_id))
    for message in step.messages:
        try:
            db.execute(
                """INSERT INTO messages (thread_id, sequence, envelope, digest, sender, payload_type, message_id,
                                         account_id, bill_id, received_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    message.thread_id,
                    message.sequence,
                    message.envelope,
                    message.digest,
                    message.sender,
                    message.payload_type,
                    message.message_id,
                    step.account_id,
                    step.bill_id,
                    ts(message.received_at),
                ),
            )
        except IntegrityViolation as error:
            if error.constraint == unique_key("messages", "digest"):
                raise StoreConflict(Reason.REPLAYED_MESSAGE, "the message was stored meanwhile") from error
            raise StoreConflict(
                Reason.SEQUENCE_MISMATCH, f"position {message.sequence} of the thread was taken meanwhile"
            ) from error
    agreement = step.agreement
    if agreement is not None:
        moved = db.execute(
            "UPDATE bills SET status = 'under_arrangement' WHERE bill_id = ? AND status = 'open'", (step.bill_id,)
        )
        if moved.rowcount != 1:
            raise StoreConflict(Reason.BILL_NOT_NEGOTIABLE, f"bill {step.bill_id!r} is no longer open")
        db.execute(
            """UPDATE threads SET offer_digest = ?, accept_digest = ?, agreed_total_minor = ?, agreed_at = ?
               WHERE thread_id = ?""",
            (agreement.offer_digest, agreement.accept_digest, agreement.total_minor, ts(step.now), step.thread_id),
        )
    _insert_replay(db, step.replay)
    return _append_events(db, step.events)


def _erase_disclosures(db: Db, where: str, *args: object) -> int:
    """Delete the disclosures matching `where`; their threads keep the hardship fact only while open (PRV-4)."""
    threads = [row[0] for row in db.execute(f"SELECT thread_id FROM disclosures WHERE {where}", args)]  # noqa: S608
    for thread_id in threads:
        db.execute("DELETE FROM disclosures WHERE thread_id = ?", (thread_id,))
        db.execute(
            "UPDATE threads SET hardship_disclosed = FALSE WHERE thread_id = ? AND outcome != 'open'", (thread_id,)
        )
    return len(threads)


def _intent(row: Row) -> PaymentIntentRecord:
    return PaymentIntentRecord(
        account_id=row[0],
        intent_id=row[1],
        content_hash=row[2],
        bill_id=row[3],
        agreement_digest=row[4],
        instalment_index=row[5],
        amount_minor=row[6],
        currency=row[7],
        payment_reference=row[8],
        intent=row[9],
        instructions=row[10],
        created_at=dt(row[11]),
        pay_by=None if row[12] is None else dt(row[12]),
    )


def _received_minor(db: Db, bill_id: str) -> int:
    """Every settlement for the bill, under any agreement or none (PAY-16)."""
    (received,) = db.execute(
        """SELECT COALESCE(SUM(s.amount_minor), 0)
           FROM settlements s JOIN payment_intents p USING (account_id, intent_id)
           WHERE p.bill_id = ?""",
        (bill_id,),
    ).fetchone()
    return int(received)  # int: PostgreSQL sums to NUMERIC


def _check_no_payment_in_progress(db: Db, intent: PaymentIntentRecord) -> None:
    """PAY-14, under the account's lock: at most MAX_PAYMENT_INTENTS_PER_BILL intents per bill, and no new
    one for a payment (the bill's balance, or one instalment of one agreement) while another for that same
    payment is instructed, unsettled and not past its pay-by time. Different instalments may be in flight
    together; what could still add up to more than is owed is refused at settlement (PAY-16)."""
    rows = db.execute(
        """SELECT p.intent_id, p.pay_by, s.intent_id, p.agreement_digest, p.instalment_index
           FROM payment_intents p LEFT JOIN settlements s USING (account_id, intent_id)
           WHERE p.bill_id = ?""",
        (intent.bill_id,),
    ).fetchall()
    if len(rows) >= MAX_PAYMENT_INTENTS_PER_BILL:
        raise StoreConflict(
            Reason.TOO_MANY_PAYMENT_INTENTS, f"the bill has {MAX_PAYMENT_INTENTS_PER_BILL} payment intents already"
        )
    payment = (bytes(intent.agreement_digest), intent.instalment_index)
    for intent_id, pay_by, settled, agreement_digest, instalment_index in rows:
        if (bytes(agreement_digest), instalment_index) != payment:
            continue
        if settled is None and pay_by is not None and dt(pay_by) > intent.created_at:
            raise StoreConflict(
                Reason.PAYMENT_IN_PROGRESS,
                f"intent {intent_id!r} for the same payment is instructed and not settled yet: pay that one",
            )


def _bill(row: Row) -> BillRecord:
    return BillRecord(
        bill_id=row[0],
        account_id=row[1],
        envelope=row[2],
        digest=row[3],
        amount_minor=row[4],
        currency=row[5],
        due_date=date.fromisoformat(row[6]),
        status=BillStatus(row[7]),
        issued_at=dt(row[8]),
        party_id=row[9] if len(row) > 9 else "",
    )


def _arrangements(db: Db, where: str, args: Sequence[object]) -> list[ArrangementRecord]:
    """The agreed threads matching `where` (conditions on `t`, the thread, and `b`, its bill), oldest first, each
    with the payments settled under it, in one statement: a row per intent under it (NULLs past the thread's
    columns where there is none, or no settlement yet)."""
    rows = db.execute(
        f"""SELECT t.thread_id, t.account_id, t.bill_id, t.consumer_party_id, m.envelope,
                   t.accept_digest, t.agreed_at, b.status,
                   p.intent_id, p.instalment_index, s.amount_minor, s.settled_at
            FROM threads t
            JOIN messages m ON m.digest = t.offer_digest
            JOIN bills b ON b.bill_id = t.bill_id
            LEFT JOIN payment_intents p ON p.account_id = t.account_id AND p.agreement_digest = t.accept_digest
            LEFT JOIN settlements s ON s.account_id = p.account_id AND s.intent_id = p.intent_id
            WHERE t.outcome = 'agreed'{where}
            ORDER BY t.agreed_at, t.rowid, s.settled_at, s.rowid""",  # noqa: S608 - `where` is ours, values are bound
        tuple(args),
    ).fetchall()
    found: dict[bytes, tuple[Row, list[SettledPayment]]] = {}  # by thread id, in the rows' order
    for row in rows:
        _, payments = found.setdefault(bytes(row[0]), (row, []))
        if row[11] is not None:  # a settled payment, not an unsettled intent's row nor the NULLs of no intent
            payments.append(SettledPayment(row[8], row[9], row[10], dt(row[11])))
    return [
        ArrangementRecord(
            thread_id=row[0],
            account_id=row[1],
            bill_id=row[2],
            consumer_party_id=row[3],
            offer_envelope=row[4],
            accept_digest=row[5],
            agreed_at=dt(row[6]),
            bill_status=BillStatus(row[7]),
            payments=tuple(payments),
        )
        for row, payments in found.values()
    ]


def _settlement(db: Db, account_id: str, intent_id: str) -> SettlementRecord | None:
    row = db.execute(
        """SELECT amount_minor, rail_reference, settled_at, receipt FROM settlements
           WHERE account_id = ? AND intent_id = ?""",
        (account_id, intent_id),
    ).fetchone()
    if row is None:
        return None
    return SettlementRecord(account_id, intent_id, row[0], row[1], dt(row[2]), row[3])


def _settle(db: Db, settle: Settle) -> tuple[SettlementRecord, list[EventRecord]]:
    _lock_account(db, settle.account_id)
    intent = db.execute(
        """SELECT p.bill_id, p.agreement_digest, b.amount_minor, t.agreed_total_minor
           FROM payment_intents p
           JOIN bills b ON b.bill_id = p.bill_id
           LEFT JOIN threads t ON t.accept_digest = p.agreement_digest
           WHERE p.account_id = ? AND p.intent_id = ?""",
        (settle.account_id, settle.intent_id),
    ).fetchone()
    if intent is None:
        raise LookupError(f"no payment intent {settle.intent_id!r} on account {settle.account_id!r}")
    existing = _settlement(db, settle.account_id, settle.intent_id)
    if existing is not None:
        return existing, []
    bill_id, agreement_digest, amount_due, agreed_total = intent
    if agreement_digest:  # PAY-16: under an agreement, its total less what was paid under it
        (paid_before,) = db.execute(
            """SELECT COALESCE(SUM(s.amount_minor), 0)
               FROM settlements s JOIN payment_intents p USING (account_id, intent_id)
               WHERE p.account_id = ? AND p.bill_id = ? AND p.agreement_digest = ?""",
            (settle.account_id, bill_id, agreement_digest),
        ).fetchone()
        remaining = agreed_total - int(paid_before) - settle.amount_minor  # int: PostgreSQL sums to NUMERIC
    else:  # without one, the outstanding balance: the amount due less everything received for the bill
        remaining = amount_due - _received_minor(db, bill_id) - settle.amount_minor
    if remaining < 0:
        raise ValueError(
            f"settling intent {settle.intent_id!r} would receive more than is owed for the bill: no receipt (PAY-16)"
        )
    sealed = settle.seal(remaining)
    record = SettlementRecord(
        settle.account_id,
        settle.intent_id,
        settle.amount_minor,
        settle.rail_reference,
        settle.settled_at,
        sealed.receipt.SerializeToString(),
    )
    db.execute(
        """INSERT INTO settlements (account_id, intent_id, amount_minor, rail_reference, settled_at, receipt)
           VALUES (?, ?, ?, ?, ?, ?)""",
        (
            record.account_id,
            record.intent_id,
            record.amount_minor,
            record.rail_reference,
            ts(record.settled_at),
            record.receipt,
        ),
    )
    if remaining == 0:
        db.execute("UPDATE bills SET status = 'paid' WHERE bill_id = ?", (bill_id,))
    return record, _append_events(db, sealed.events)
