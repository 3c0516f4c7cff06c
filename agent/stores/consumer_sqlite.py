"""The embedded SQLite back end of `ConsumerStore`.

It stands on the same foundation as the biller's store (`agent.stores.sqlite_base`):
WAL with `synchronous=FULL`, one worker thread owning the connection, `BEGIN
IMMEDIATE` writes and recorded migrations. Each method is one transaction;
races (two processes paying one intent, two watchers on one log) are settled by
primary keys and conditional updates. Disclosures are deleted with
`secure_delete` and a WAL checkpoint once the opening they belong to is answered
(PRV-4).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime

from agent.protocol.errors import Reason
from agent.protocol.messages import read_time
from agent.stores.base import (
    ApprovalRecord,
    ApprovalState,
    BillerLinkRecord,
    ConsumerThreadRecord,
    EventCursor,
    IntentRecord,
    IntentState,
    LinkedAccountRecord,
    MessageRecord,
    NotificationRecord,
    ReceiptRecord,
    ReceivedBillRecord,
    ReceivedEventRecord,
    StoreConflict,
    ThreadOutcome,
    ThreadUpdate,
)
from agent.stores.sqlite_base import Row, SqliteStore, dt, ts
from parley.v1 import envelope_pb2, payment_pb2

# The tables of an intent's messages and receipt, as migration 1 made them and migration 3 remakes them.
_INTENT_MESSAGES_TABLE = """CREATE TABLE intent_messages (
            biller_party_id TEXT NOT NULL,
            intent_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            envelope BLOB NOT NULL,
            PRIMARY KEY (biller_party_id, intent_id, position),
            FOREIGN KEY (biller_party_id, intent_id) REFERENCES intents (biller_party_id, intent_id)
        )"""
_RECEIPTS_TABLE = """CREATE TABLE receipts (
            biller_party_id TEXT NOT NULL,
            intent_id TEXT NOT NULL,
            envelope BLOB NOT NULL,
            digest BLOB NOT NULL,
            amount_minor INTEGER NOT NULL,
            dispute TEXT,
            received_at TEXT NOT NULL,
            PRIMARY KEY (biller_party_id, intent_id),
            FOREIGN KEY (biller_party_id, intent_id) REFERENCES intents (biller_party_id, intent_id)
        )"""
_REBUILT_INTENT_COLUMNS = """biller_party_id, intent_id, account_id, bill_id, agreement_digest, instalment_index,
    amount_minor, currency, thread_id, state, created_at, updated_at, instructions, payment_proof, refusal_reason,
    refusal_detail"""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE links (
            biller_party_id TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            fingerprint BLOB NOT NULL,
            insecure INTEGER NOT NULL,
            root_certificates BLOB,
            server_name TEXT,
            enrolled_at TEXT NOT NULL
        )""",
        """CREATE TABLE link_key_sets (
            biller_party_id TEXT NOT NULL REFERENCES links (biller_party_id),
            version INTEGER NOT NULL CHECK (version >= 1),
            envelope BLOB NOT NULL,
            PRIMARY KEY (biller_party_id, version)
        )""",
        """CREATE TABLE accounts (
            biller_party_id TEXT NOT NULL REFERENCES links (biller_party_id),
            account_id TEXT NOT NULL,
            enrolled_at TEXT NOT NULL,
            request BLOB NOT NULL,
            confirmation BLOB NOT NULL,
            PRIMARY KEY (biller_party_id, account_id)
        )""",
        """CREATE TABLE bills (
            biller_party_id TEXT NOT NULL REFERENCES links (biller_party_id),
            bill_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            envelope BLOB NOT NULL,
            digest BLOB NOT NULL,
            received_at TEXT NOT NULL,
            PRIMARY KEY (biller_party_id, bill_id)
        )""",
        """CREATE TABLE threads (
            thread_id BLOB PRIMARY KEY,
            biller_party_id TEXT NOT NULL REFERENCES links (biller_party_id),
            account_id TEXT NOT NULL,
            bill_id TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (
                outcome IN ('open', 'agreed', 'rejected', 'withdrawn', 'expired', 'protocol_error')
            ),
            deadline TEXT NOT NULL,
            opened_at TEXT NOT NULL,
            hardship_disclosed INTEGER NOT NULL,
            awaiting_answer INTEGER NOT NULL,
            disclosure BLOB,
            violation_reason TEXT,
            violation_detail TEXT NOT NULL DEFAULT '',
            refusal_reason TEXT,
            refusal_detail TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX threads_bill ON threads (biller_party_id, bill_id)",
        """CREATE TABLE messages (
            thread_id BLOB NOT NULL REFERENCES threads (thread_id),
            sequence INTEGER NOT NULL CHECK (sequence >= 0),
            envelope BLOB NOT NULL,
            digest BLOB NOT NULL,
            sender TEXT NOT NULL,
            payload_type TEXT NOT NULL,
            message_id BLOB NOT NULL,
            received_at TEXT NOT NULL,
            PRIMARY KEY (thread_id, sequence)
        )""",
        # One payment, one intent: at most one intent per bill, agreement and instalment (PAY-7).
        """CREATE TABLE intents (
            biller_party_id TEXT NOT NULL REFERENCES links (biller_party_id),
            intent_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            bill_id TEXT NOT NULL,
            agreement_digest BLOB NOT NULL,
            instalment_index INTEGER NOT NULL,
            amount_minor INTEGER NOT NULL,
            currency TEXT NOT NULL,
            thread_id BLOB NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('created', 'instructed', 'sending', 'paid', 'refused')),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            instructions BLOB,
            payment_proof TEXT NOT NULL DEFAULT '',
            refusal_reason TEXT,
            refusal_detail TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (biller_party_id, intent_id),
            UNIQUE (biller_party_id, bill_id, agreement_digest, instalment_index)
        )""",
        _INTENT_MESSAGES_TABLE,
        _RECEIPTS_TABLE,
        """CREATE TABLE event_cursors (
            biller_party_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            next_sequence INTEGER NOT NULL,
            last_digest BLOB NOT NULL,
            PRIMARY KEY (biller_party_id, account_id)
        )""",
        """CREATE TABLE events (
            biller_party_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            sequence INTEGER NOT NULL CHECK (sequence >= 0),
            envelope BLOB NOT NULL,
            digest BLOB NOT NULL,
            kind INTEGER NOT NULL,
            received_at TEXT NOT NULL,
            PRIMARY KEY (biller_party_id, account_id, sequence)
        )""",
    ),
    (  # 2: the household's own records: requests for approval, the notification outbox
        """CREATE TABLE approvals (
            request_id TEXT PRIMARY KEY,
            biller_party_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            bill_id TEXT NOT NULL,
            thread_id BLOB,
            action TEXT NOT NULL,
            terms BLOB NOT NULL,
            terms_digest BLOB NOT NULL,
            violations TEXT NOT NULL,
            reason TEXT NOT NULL,
            deadline TEXT,
            state TEXT NOT NULL,
            created_at TEXT NOT NULL,
            answered_at TEXT,
            note TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX approvals_bill ON approvals (biller_party_id, bill_id)",
        """CREATE TABLE notifications (
            notification_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT,
            delivered_at TEXT,
            last_error TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX notifications_due ON notifications (delivered_at, next_attempt_at)",
    ),
    # 3: lapsed intents (PAY-17). Instructions that lapsed unpaid are kept as history, and the same payment gets a
    # new intent: one *live* intent per payment, a partial unique index instead of the table's UNIQUE. SQLite
    # cannot drop a table constraint, so `intents` is rebuilt; its children (intent_messages, receipts) reference
    # it, and with foreign keys on (they cannot be turned off inside the migration's transaction) dropping it
    # would orphan them, so they are held aside, dropped, and recreated as they were once it is back.
    (
        """CREATE TABLE intents_rebuilt (
            biller_party_id TEXT NOT NULL REFERENCES links (biller_party_id),
            intent_id TEXT NOT NULL,
            account_id TEXT NOT NULL,
            bill_id TEXT NOT NULL,
            agreement_digest BLOB NOT NULL,
            instalment_index INTEGER NOT NULL,
            amount_minor INTEGER NOT NULL,
            currency TEXT NOT NULL,
            thread_id BLOB NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('created', 'instructed', 'sending', 'paid', 'refused', 'lapsed')),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            instructions BLOB,
            payment_proof TEXT NOT NULL DEFAULT '',
            refusal_reason TEXT,
            refusal_detail TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (biller_party_id, intent_id)
        )""",
        f"""INSERT INTO intents_rebuilt ({_REBUILT_INTENT_COLUMNS})
            SELECT {_REBUILT_INTENT_COLUMNS} FROM intents ORDER BY rowid""",  # noqa: S608 - constant columns
        "CREATE TABLE intent_messages_held AS SELECT * FROM intent_messages",
        "CREATE TABLE receipts_held AS SELECT * FROM receipts",
        "DROP TABLE intent_messages",
        "DROP TABLE receipts",
        "DROP TABLE intents",
        "ALTER TABLE intents_rebuilt RENAME TO intents",
        # One payment, one live intent (PAY-7): lapsed ones are history, never paid (PAY-17).
        """CREATE UNIQUE INDEX intents_live_payment ON intents (biller_party_id, bill_id, agreement_digest,
            instalment_index) WHERE state != 'lapsed'""",
        _INTENT_MESSAGES_TABLE,
        _RECEIPTS_TABLE,
        """INSERT INTO intent_messages (biller_party_id, intent_id, position, envelope)
            SELECT biller_party_id, intent_id, position, envelope FROM intent_messages_held ORDER BY rowid""",
        """INSERT INTO receipts (biller_party_id, intent_id, envelope, digest, amount_minor, dispute, received_at)
            SELECT biller_party_id, intent_id, envelope, digest, amount_minor, dispute, received_at
            FROM receipts_held ORDER BY rowid""",
        "DROP TABLE intent_messages_held",
        "DROP TABLE receipts_held",
    ),
    # 4: refused instructions set aside by the household (PAY-8). A REFUSED intent stays refused, with its
    # instructions as evidence; once its user sets it aside it no longer holds the payment, which may get a new
    # intent. A column rather than a state: the refusal is still what happened to the intent.
    (
        "ALTER TABLE intents ADD COLUMN set_aside_at TEXT",
        "DROP INDEX intents_live_payment",
        """CREATE UNIQUE INDEX intents_live_payment ON intents (biller_party_id, bill_id, agreement_digest,
            instalment_index) WHERE state != 'lapsed' AND set_aside_at IS NULL""",
    ),
)

_LINK_COLUMNS = "biller_party_id, target, fingerprint, insecure, root_certificates, server_name, enrolled_at"
_BILL_COLUMNS = "biller_party_id, bill_id, account_id, envelope, digest, received_at"
_THREAD_COLUMNS = """thread_id, biller_party_id, account_id, bill_id, outcome, deadline, opened_at, hardship_disclosed,
                     awaiting_answer, disclosure, violation_reason, violation_detail, refusal_reason, refusal_detail"""
_INTENT_COLUMNS = """biller_party_id, intent_id, account_id, bill_id, agreement_digest, instalment_index, amount_minor,
                     currency, thread_id, state, created_at, instructions, payment_proof, refusal_reason,
                     refusal_detail, set_aside_at"""
_RECEIPT_COLUMNS = "biller_party_id, intent_id, envelope, digest, amount_minor, dispute, received_at"
_EVENT_COLUMNS = "biller_party_id, account_id, sequence, envelope, digest, kind, received_at"
_APPROVAL_COLUMNS = """request_id, biller_party_id, account_id, bill_id, thread_id, action, terms, terms_digest,
                       violations, reason, deadline, state, created_at, answered_at, note"""
_NOTIFICATION_COLUMNS = "notification_id, kind, body, created_at, attempts, next_attempt_at, delivered_at, last_error"


class SqliteConsumerStore(SqliteStore):
    """`ConsumerStore` on one SQLite file. Create it with `await SqliteConsumerStore.open(path)`."""

    MIGRATIONS = MIGRATIONS

    # --- links and enrolment ---

    async def save_enrolment(
        self, link: BillerLinkRecord, key_sets: Sequence[bytes], account: LinkedAccountRecord
    ) -> None:
        def save(db: sqlite3.Connection) -> None:
            known = db.execute(
                "SELECT fingerprint FROM links WHERE biller_party_id = ?", (link.biller_party_id,)
            ).fetchone()
            if known is not None and known[0] != link.fingerprint:
                raise ValueError(f"{link.biller_party_id!r} is pinned to another identity fingerprint (KEY-12)")
            db.execute(
                f"""INSERT INTO links ({_LINK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (biller_party_id) DO UPDATE SET target = excluded.target,
                        insecure = excluded.insecure, root_certificates = excluded.root_certificates,
                        server_name = excluded.server_name""",  # noqa: S608
                (
                    link.biller_party_id,
                    link.target,
                    link.fingerprint,
                    link.insecure,
                    link.root_certificates,
                    link.server_name,
                    ts(link.enrolled_at),
                ),
            )
            (stored,) = db.execute(
                "SELECT COUNT(*) FROM link_key_sets WHERE biller_party_id = ?", (link.biller_party_id,)
            ).fetchone()
            for version, envelope in enumerate(key_sets[stored:], start=stored + 1):
                db.execute(
                    "INSERT INTO link_key_sets (biller_party_id, version, envelope) VALUES (?, ?, ?)",
                    (link.biller_party_id, version, envelope),
                )
            db.execute(
                """INSERT INTO accounts (biller_party_id, account_id, enrolled_at, request, confirmation)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (biller_party_id, account_id) DO UPDATE SET enrolled_at = excluded.enrolled_at,
                       request = excluded.request, confirmation = excluded.confirmation""",
                (
                    account.biller_party_id,
                    account.account_id,
                    ts(account.enrolled_at),
                    account.request,
                    account.confirmation,
                ),
            )

        await self._write(save)

    async def get_link(self, biller_party_id: str) -> BillerLinkRecord | None:
        row = await self._one(f"SELECT {_LINK_COLUMNS} FROM links WHERE biller_party_id = ?", biller_party_id)  # noqa: S608
        return None if row is None else _link(row)

    async def links(self) -> list[BillerLinkRecord]:
        rows = await self._all(f"SELECT {_LINK_COLUMNS} FROM links ORDER BY enrolled_at, rowid")  # noqa: S608
        return [_link(row) for row in rows]

    async def link_key_sets(self, biller_party_id: str) -> list[bytes]:
        rows = await self._all(
            "SELECT envelope FROM link_key_sets WHERE biller_party_id = ? ORDER BY version", biller_party_id
        )
        return [row[0] for row in rows]

    async def append_link_key_sets(self, biller_party_id: str, first_version: int, key_sets: Sequence[bytes]) -> None:
        def append(db: sqlite3.Connection) -> None:
            for version, envelope in enumerate(key_sets, start=first_version):
                try:
                    db.execute(
                        "INSERT INTO link_key_sets (biller_party_id, version, envelope) VALUES (?, ?, ?)",
                        (biller_party_id, version, envelope),
                    )
                except sqlite3.IntegrityError as error:
                    raise StoreConflict(
                        Reason.KEYSET_ROLLBACK, f"version {version} of {biller_party_id!r} is already stored"
                    ) from error

        await self._write(append)

    async def linked_accounts(self, biller_party_id: str) -> list[LinkedAccountRecord]:
        rows = await self._all(
            """SELECT biller_party_id, account_id, enrolled_at, request, confirmation FROM accounts
               WHERE biller_party_id = ? ORDER BY rowid""",
            biller_party_id,
        )
        return [LinkedAccountRecord(row[0], row[1], dt(row[2]), row[3], row[4]) for row in rows]

    # --- bills ---

    async def save_bills(self, bills: Sequence[ReceivedBillRecord]) -> list[ReceivedBillRecord]:
        def save(db: sqlite3.Connection) -> list[ReceivedBillRecord]:
            stored = []
            for bill in bills:
                db.execute(
                    f"""INSERT INTO bills ({_BILL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)
                        ON CONFLICT (biller_party_id, bill_id) DO NOTHING""",  # noqa: S608
                    (
                        bill.biller_party_id,
                        bill.bill_id,
                        bill.account_id,
                        bill.envelope,
                        bill.digest,
                        ts(bill.received_at),
                    ),
                )
                row = db.execute(
                    f"SELECT {_BILL_COLUMNS} FROM bills WHERE biller_party_id = ? AND bill_id = ?",  # noqa: S608
                    (bill.biller_party_id, bill.bill_id),
                ).fetchone()
                stored.append(_bill(row))
            return stored

        return await self._write(save)

    async def get_bill(self, biller_party_id: str, bill_id: str) -> ReceivedBillRecord | None:
        row = await self._one(
            f"SELECT {_BILL_COLUMNS} FROM bills WHERE biller_party_id = ? AND bill_id = ?",  # noqa: S608
            biller_party_id,
            bill_id,
        )
        return None if row is None else _bill(row)

    async def list_bills(self, biller_party_id: str, account_id: str | None = None) -> list[ReceivedBillRecord]:
        rows = await self._all(
            f"""SELECT {_BILL_COLUMNS} FROM bills
                WHERE biller_party_id = ? AND (? IS NULL OR account_id = ?) ORDER BY rowid""",  # noqa: S608
            biller_party_id,
            account_id,
            account_id,
        )
        return [_bill(row) for row in rows]

    # --- negotiation ---

    async def create_thread(self, thread: ConsumerThreadRecord) -> None:
        def create(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    f"INSERT INTO threads ({_THREAD_COLUMNS}) VALUES ({', '.join('?' * 14)})",  # noqa: S608
                    (
                        thread.thread_id,
                        thread.biller_party_id,
                        thread.account_id,
                        thread.bill_id,
                        thread.outcome.value,
                        ts(thread.deadline),
                        ts(thread.opened_at),
                        thread.hardship_disclosed,
                        thread.awaiting_answer,
                        thread.disclosure,
                        *_pair(thread.violation),
                        *_pair(thread.refusal),
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise StoreConflict(Reason.SEQUENCE_MISMATCH, "the thread already exists") from error
            _insert_messages(db, thread.messages)

        await self._write(create)

    async def update_thread(self, update: ThreadUpdate) -> None:
        def apply(db: sqlite3.Connection) -> None:
            if update.drop_from is not None:
                db.execute(
                    "DELETE FROM messages WHERE thread_id = ? AND sequence >= ?", (update.thread_id, update.drop_from)
                )
            _insert_messages(db, update.messages)
            changed = db.execute(
                """UPDATE threads SET outcome = ?, awaiting_answer = ?,
                       violation_reason = COALESCE(?, violation_reason),
                       violation_detail = COALESCE(?, violation_detail),
                       refusal_reason = ?, refusal_detail = ?,
                       disclosure = CASE WHEN ? THEN NULL ELSE disclosure END
                   WHERE thread_id = ?""",
                (
                    update.outcome.value,
                    update.awaiting_answer,
                    update.violation[0] if update.violation else None,
                    update.violation[1] if update.violation else None,
                    *_pair(update.refusal),
                    update.clear_disclosure,
                    update.thread_id,
                ),
            )
            if changed.rowcount != 1:
                raise LookupError(f"no thread {update.thread_id.hex()}")

        await self._write(apply)
        if update.clear_disclosure:
            await self._call(self._checkpoint)  # PRV-4: the erased disclosure leaves the WAL too

    async def get_thread(self, thread_id: bytes) -> ConsumerThreadRecord | None:
        def read(db: sqlite3.Connection) -> ConsumerThreadRecord | None:
            row = db.execute(f"SELECT {_THREAD_COLUMNS} FROM threads WHERE thread_id = ?", (thread_id,)).fetchone()  # noqa: S608
            return None if row is None else _thread(db, row)

        return await self._read(read)

    async def threads(
        self, biller_party_id: str | None = None, bill_id: str | None = None, outcome: ThreadOutcome | None = None
    ) -> list[ConsumerThreadRecord]:
        outcome_value = None if outcome is None else outcome.value

        def read(db: sqlite3.Connection) -> list[ConsumerThreadRecord]:
            rows = db.execute(
                f"""SELECT {_THREAD_COLUMNS} FROM threads
                    WHERE (? IS NULL OR biller_party_id = ?) AND (? IS NULL OR bill_id = ?)
                      AND (? IS NULL OR outcome = ?)
                    ORDER BY opened_at, rowid""",  # noqa: S608
                (biller_party_id, biller_party_id, bill_id, bill_id, outcome_value, outcome_value),
            ).fetchall()
            return [_thread(db, row) for row in rows]

        return await self._read(read)

    # --- payments ---

    async def create_intent(self, intent: IntentRecord) -> IntentRecord:
        def create(db: sqlite3.Connection) -> IntentRecord:
            existing = _find_intent(
                db, intent.biller_party_id, intent.bill_id, intent.agreement_digest, intent.instalment_index
            )
            if existing is not None:
                return existing
            db.execute(
                f"INSERT INTO intents ({_INTENT_COLUMNS}, updated_at) VALUES ({', '.join('?' * 17)})",  # noqa: S608
                (
                    intent.biller_party_id,
                    intent.intent_id,
                    intent.account_id,
                    intent.bill_id,
                    intent.agreement_digest,
                    intent.instalment_index,
                    intent.amount_minor,
                    intent.currency,
                    intent.thread_id,
                    intent.state.value,
                    ts(intent.created_at),
                    intent.instructions,
                    intent.payment_proof,
                    *_pair(intent.refusal),
                    None if intent.set_aside_at is None else ts(intent.set_aside_at),
                    ts(intent.created_at),
                ),
            )
            for envelope in intent.messages:
                _insert_intent_message(db, intent.biller_party_id, intent.intent_id, envelope)
            created = _intent(db, intent.biller_party_id, intent.intent_id)
            assert created is not None
            return created

        return await self._write(create)

    async def get_intent(self, biller_party_id: str, intent_id: str) -> IntentRecord | None:
        return await self._read(lambda db: _intent(db, biller_party_id, intent_id))

    async def find_intent(
        self, biller_party_id: str, bill_id: str, agreement_digest: bytes, instalment_index: int
    ) -> IntentRecord | None:
        return await self._read(
            lambda db: _find_intent(db, biller_party_id, bill_id, agreement_digest, instalment_index)
        )

    async def intents(self, biller_party_id: str | None = None) -> list[IntentRecord]:
        def read(db: sqlite3.Connection) -> list[IntentRecord]:
            rows = db.execute(
                "SELECT biller_party_id, intent_id FROM intents WHERE ? IS NULL OR biller_party_id = ? ORDER BY rowid",
                (biller_party_id, biller_party_id),
            ).fetchall()
            return [record for row in rows if (record := _intent(db, row[0], row[1])) is not None]

        return await self._read(read)

    async def add_intent_message(self, biller_party_id: str, intent_id: str, envelope: bytes) -> None:
        await self._write(lambda db: _insert_intent_message(db, biller_party_id, intent_id, envelope))

    async def record_instructions(
        self, biller_party_id: str, intent_id: str, instructions: bytes, refusal: tuple[str, str] | None
    ) -> IntentRecord:
        state = IntentState.INSTRUCTED if refusal is None else IntentState.REFUSED

        def record(db: sqlite3.Connection) -> IntentRecord:
            db.execute(
                """UPDATE intents SET state = ?, instructions = ?, refusal_reason = ?, refusal_detail = ?
                   WHERE biller_party_id = ? AND intent_id = ? AND state = 'created'""",
                (state.value, instructions, *_pair(refusal), biller_party_id, intent_id),
            )
            intent = _intent(db, biller_party_id, intent_id)
            if intent is None:
                raise LookupError(f"no intent {intent_id!r} with {biller_party_id!r}")
            return intent

        return await self._write(record)

    async def begin_sending(self, biller_party_id: str, intent_id: str, now: datetime) -> bool:
        cursor = await self._write(
            lambda db: db.execute(
                """UPDATE intents SET state = 'sending', updated_at = ?
                   WHERE biller_party_id = ? AND intent_id = ? AND state = 'instructed'""",
                (ts(now), biller_party_id, intent_id),
            )
        )
        return cursor.rowcount == 1

    async def finish_sending(
        self, biller_party_id: str, intent_id: str, *, paid: bool, proof: str, now: datetime
    ) -> IntentRecord:
        state = IntentState.PAID if paid else IntentState.INSTRUCTED

        def finish(db: sqlite3.Connection) -> IntentRecord:
            changed = db.execute(
                """UPDATE intents SET state = ?, payment_proof = ?, updated_at = ?
                   WHERE biller_party_id = ? AND intent_id = ? AND state = 'sending'""",
                (state.value, proof, ts(now), biller_party_id, intent_id),
            )
            if changed.rowcount != 1:
                raise LookupError(f"intent {intent_id!r} is not being sent")
            intent = _intent(db, biller_party_id, intent_id)
            assert intent is not None
            return intent

        return await self._write(finish)

    async def lapse_intent(self, biller_party_id: str, intent_id: str, now: datetime) -> bool:
        def lapse(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT instructions FROM intents WHERE biller_party_id = ? AND intent_id = ? AND state = 'instructed'",
                (biller_party_id, intent_id),
            ).fetchone()
            if row is None or not _pay_by(row[0]) < now:
                return False
            changed = db.execute(
                """UPDATE intents SET state = 'lapsed', updated_at = ?
                   WHERE biller_party_id = ? AND intent_id = ? AND state = 'instructed'""",
                (ts(now), biller_party_id, intent_id),
            )
            return changed.rowcount == 1

        return await self._write(lapse)

    async def set_aside_intent(self, biller_party_id: str, intent_id: str, now: datetime) -> IntentRecord:
        def set_aside(db: sqlite3.Connection) -> IntentRecord:
            db.execute(
                """UPDATE intents SET set_aside_at = ?, updated_at = ?
                   WHERE biller_party_id = ? AND intent_id = ? AND state = 'refused' AND set_aside_at IS NULL""",
                (ts(now), ts(now), biller_party_id, intent_id),
            )
            intent = _intent(db, biller_party_id, intent_id)
            if intent is None:
                raise LookupError(f"no payment intent {intent_id!r} with {biller_party_id!r}")
            if intent.state is not IntentState.REFUSED:
                raise ValueError(
                    f"intent {intent_id!r} is {intent.state.value}: only refused instructions are set aside"
                )
            return intent

        return await self._write(set_aside)

    async def save_receipt(self, receipt: ReceiptRecord) -> ReceiptRecord:
        def save(db: sqlite3.Connection) -> ReceiptRecord:
            db.execute(
                f"""INSERT INTO receipts ({_RECEIPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (biller_party_id, intent_id) DO NOTHING""",  # noqa: S608
                (
                    receipt.biller_party_id,
                    receipt.intent_id,
                    receipt.envelope,
                    receipt.digest,
                    receipt.amount_minor,
                    receipt.dispute,
                    ts(receipt.received_at),
                ),
            )
            stored = _receipt(db, receipt.biller_party_id, receipt.intent_id)
            assert stored is not None
            return stored

        return await self._write(save)

    async def get_receipt(self, biller_party_id: str, intent_id: str) -> ReceiptRecord | None:
        return await self._read(lambda db: _receipt(db, biller_party_id, intent_id))

    # --- events ---

    async def event_cursor(self, biller_party_id: str, account_id: str) -> EventCursor:
        row = await self._one(
            "SELECT next_sequence, last_digest FROM event_cursors WHERE biller_party_id = ? AND account_id = ?",
            biller_party_id,
            account_id,
        )
        return EventCursor() if row is None else EventCursor(row[0], row[1])

    async def append_event(self, event: ReceivedEventRecord, previous_digest: bytes) -> None:
        def append(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT next_sequence, last_digest FROM event_cursors WHERE biller_party_id = ? AND account_id = ?",
                (event.biller_party_id, event.account_id),
            ).fetchone()
            cursor = EventCursor() if row is None else EventCursor(row[0], row[1])
            if event.sequence != cursor.next_sequence:
                raise StoreConflict(
                    Reason.SEQUENCE_MISMATCH, f"event {event.sequence}; the cursor is at {cursor.next_sequence}"
                )
            if previous_digest != cursor.last_digest:
                raise StoreConflict(Reason.PREVIOUS_DIGEST_MISMATCH, "the event does not chain to the last one stored")
            db.execute(
                f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    event.biller_party_id,
                    event.account_id,
                    event.sequence,
                    event.envelope,
                    event.digest,
                    event.kind,
                    ts(event.received_at),
                ),
            )
            db.execute(
                """INSERT INTO event_cursors (biller_party_id, account_id, next_sequence, last_digest)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT (biller_party_id, account_id) DO UPDATE SET
                       next_sequence = excluded.next_sequence, last_digest = excluded.last_digest""",
                (event.biller_party_id, event.account_id, event.sequence + 1, event.digest),
            )

        await self._write(append)

    async def stored_events(
        self, biller_party_id: str, account_id: str, start: int = 0, limit: int = 1000
    ) -> list[ReceivedEventRecord]:
        rows = await self._all(
            f"""SELECT {_EVENT_COLUMNS} FROM events
                WHERE biller_party_id = ? AND account_id = ? AND sequence >= ?
                ORDER BY sequence LIMIT ?""",  # noqa: S608
            biller_party_id,
            account_id,
            start,
            limit,
        )
        return [ReceivedEventRecord(row[0], row[1], row[2], row[3], row[4], row[5], dt(row[6])) for row in rows]

    # --- requests for the person's approval (NEG-20) ---

    async def save_approval(self, record: ApprovalRecord) -> ApprovalRecord:
        def save(db: sqlite3.Connection) -> ApprovalRecord:
            db.execute(
                f"INSERT INTO approvals ({_APPROVAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
                "ON CONFLICT (request_id) DO NOTHING",
                (
                    record.request_id,
                    record.biller_party_id,
                    record.account_id,
                    record.bill_id,
                    record.thread_id,
                    record.action,
                    record.terms,
                    record.terms_digest,
                    json.dumps(list(record.violations)),
                    record.reason,
                    None if record.deadline is None else ts(record.deadline),
                    record.state.value,
                    ts(record.created_at),
                    None if record.answered_at is None else ts(record.answered_at),
                    record.note,
                ),
            )
            row = db.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE request_id = ?",  # noqa: S608
                (record.request_id,),
            ).fetchone()
            return _approval(row)

        return await self._write(save)

    async def get_approval(self, request_id: str) -> ApprovalRecord | None:
        row = await self._one(f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE request_id = ?", request_id)  # noqa: S608
        return None if row is None else _approval(row)

    async def approvals(
        self, *, states: Sequence[ApprovalState] = (), biller_party_id: str | None = None, bill_id: str | None = None
    ) -> list[ApprovalRecord]:
        where: list[str] = ["1 = 1"]
        args: list[object] = []
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(state.value for state in states)
        if biller_party_id is not None:
            where.append("biller_party_id = ?")
            args.append(biller_party_id)
        if bill_id is not None:
            where.append("bill_id = ?")
            args.append(bill_id)
        rows = await self._all(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE {' AND '.join(where)} ORDER BY created_at, rowid",  # noqa: S608
            *args,
        )
        return [_approval(row) for row in rows]

    async def answer_approval(
        self,
        request_id: str,
        state: ApprovalState,
        when: datetime,
        note: str = "",
        *,
        only_from: Sequence[ApprovalState],
    ) -> ApprovalRecord | None:
        def answer(db: sqlite3.Connection) -> ApprovalRecord | None:
            changed = db.execute(
                f"UPDATE approvals SET state = ?, answered_at = ?, note = ? "  # noqa: S608
                f"WHERE request_id = ? AND state IN ({', '.join('?' for _ in only_from)})",
                (state.value, ts(when), note, request_id, *(s.value for s in only_from)),
            ).rowcount
            if not changed:
                return None
            row = db.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE request_id = ?",  # noqa: S608
                (request_id,),
            ).fetchone()
            return _approval(row)

        return await self._write(answer)

    # --- the notification outbox ---

    async def enqueue_notification(self, record: NotificationRecord) -> bool:
        def enqueue(db: sqlite3.Connection) -> bool:
            return (
                db.execute(
                    f"INSERT INTO notifications ({_NOTIFICATION_COLUMNS}) VALUES (?, ?, ?, ?, 0, ?, NULL, '') "  # noqa: S608
                    "ON CONFLICT (notification_id) DO NOTHING",
                    (
                        record.notification_id,
                        record.kind,
                        record.body,
                        ts(record.created_at),
                        ts(record.next_attempt_at or record.created_at),
                    ),
                ).rowcount
                == 1
            )

        return await self._write(enqueue)

    async def due_notifications(self, now: datetime, limit: int = 50) -> list[NotificationRecord]:
        rows = await self._all(
            f"""SELECT {_NOTIFICATION_COLUMNS} FROM notifications
                WHERE delivered_at IS NULL AND next_attempt_at <= ? ORDER BY created_at, rowid LIMIT ?""",  # noqa: S608
            ts(now),
            limit,
        )
        return [_notification(row) for row in rows]

    async def notification_attempted(
        self, notification_id: str, *, delivered_at: datetime | None, next_attempt_at: datetime | None, error: str
    ) -> None:
        def attempted(db: sqlite3.Connection) -> None:
            db.execute(
                """UPDATE notifications SET attempts = attempts + 1, delivered_at = ?,
                       next_attempt_at = COALESCE(?, next_attempt_at), last_error = ?
                   WHERE notification_id = ? AND delivered_at IS NULL""",
                (
                    None if delivered_at is None else ts(delivered_at),
                    None if next_attempt_at is None else ts(next_attempt_at),
                    error,
                    notification_id,
                ),
            )

        await self._write(attempted)

    async def notifications(self, *, undelivered_only: bool = False) -> list[NotificationRecord]:
        where = "WHERE delivered_at IS NULL" if undelivered_only else ""
        rows = await self._all(
            f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications {where} ORDER BY created_at, rowid"  # noqa: S608
        )
        return [_notification(row) for row in rows]


# --- row helpers (worker thread) -----------------------------------------------------------------


def _pair(value: tuple[str, str] | None) -> tuple[str | None, str]:
    return (None, "") if value is None else value


def _unpair(reason: str | None, detail: str) -> tuple[str, str] | None:
    return None if reason is None else (reason, detail)


def _link(row: Row) -> BillerLinkRecord:
    return BillerLinkRecord(row[0], row[1], row[2], bool(row[3]), row[4], row[5], dt(row[6]))


def _approval(row: Row) -> ApprovalRecord:
    return ApprovalRecord(
        request_id=row[0],
        biller_party_id=row[1],
        account_id=row[2],
        bill_id=row[3],
        thread_id=row[4],
        action=row[5],
        terms=row[6],
        terms_digest=row[7],
        violations=tuple(json.loads(row[8])),
        reason=row[9],
        deadline=None if row[10] is None else dt(row[10]),
        state=ApprovalState(row[11]),
        created_at=dt(row[12]),
        answered_at=None if row[13] is None else dt(row[13]),
        note=row[14],
    )


def _notification(row: Row) -> NotificationRecord:
    return NotificationRecord(
        notification_id=row[0],
        kind=row[1],
        body=row[2],
        created_at=dt(row[3]),
        attempts=row[4],
        next_attempt_at=None if row[5] is None else dt(row[5]),
        delivered_at=None if row[6] is None else dt(row[6]),
        last_error=row[7],
    )


def _bill(row: Row) -> ReceivedBillRecord:
    return ReceivedBillRecord(row[0], row[1], row[2], row[3], row[4], dt(row[5]))


def _insert_messages(db: sqlite3.Connection, messages: Sequence[MessageRecord]) -> None:
    for message in messages:
        try:
            db.execute(
                """INSERT INTO messages (thread_id, sequence, envelope, digest, sender, payload_type, message_id,
                                         received_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    message.thread_id,
                    message.sequence,
                    message.envelope,
                    message.digest,
                    message.sender,
                    message.payload_type,
                    message.message_id,
                    ts(message.received_at),
                ),
            )
        except sqlite3.IntegrityError as error:
            raise StoreConflict(
                Reason.SEQUENCE_MISMATCH, f"position {message.sequence} of the thread is already stored"
            ) from error


def _thread(db: sqlite3.Connection, row: Row) -> ConsumerThreadRecord:
    messages = db.execute(
        """SELECT thread_id, sequence, envelope, digest, sender, payload_type, message_id, received_at
           FROM messages WHERE thread_id = ? ORDER BY sequence""",
        (row[0],),
    ).fetchall()
    return ConsumerThreadRecord(
        thread_id=row[0],
        biller_party_id=row[1],
        account_id=row[2],
        bill_id=row[3],
        outcome=ThreadOutcome(row[4]),
        deadline=dt(row[5]),
        opened_at=dt(row[6]),
        hardship_disclosed=bool(row[7]),
        awaiting_answer=bool(row[8]),
        disclosure=row[9],
        violation=_unpair(row[10], row[11]),
        refusal=_unpair(row[12], row[13]),
        messages=tuple(MessageRecord(m[0], m[1], m[2], m[3], m[4], m[5], m[6], dt(m[7])) for m in messages),
    )


def _intent(db: sqlite3.Connection, biller_party_id: str, intent_id: str) -> IntentRecord | None:
    row = db.execute(
        f"SELECT {_INTENT_COLUMNS} FROM intents WHERE biller_party_id = ? AND intent_id = ?",  # noqa: S608
        (biller_party_id, intent_id),
    ).fetchone()
    if row is None:
        return None
    messages = db.execute(
        "SELECT envelope FROM intent_messages WHERE biller_party_id = ? AND intent_id = ? ORDER BY position",
        (biller_party_id, intent_id),
    ).fetchall()
    return IntentRecord(
        biller_party_id=row[0],
        intent_id=row[1],
        account_id=row[2],
        bill_id=row[3],
        agreement_digest=row[4],
        instalment_index=row[5],
        amount_minor=row[6],
        currency=row[7],
        thread_id=row[8],
        state=IntentState(row[9]),
        created_at=dt(row[10]),
        messages=tuple(message[0] for message in messages),
        instructions=row[11],
        payment_proof=row[12],
        refusal=_unpair(row[13], row[14]),
        set_aside_at=None if row[15] is None else dt(row[15]),
    )


def _find_intent(
    db: sqlite3.Connection, biller_party_id: str, bill_id: str, agreement_digest: bytes, instalment_index: int
) -> IntentRecord | None:
    row = db.execute(
        """SELECT intent_id FROM intents
           WHERE biller_party_id = ? AND bill_id = ? AND agreement_digest = ? AND instalment_index = ?
           AND state != 'lapsed' AND set_aside_at IS NULL""",
        (biller_party_id, bill_id, agreement_digest, instalment_index),
    ).fetchone()
    return None if row is None else _intent(db, biller_party_id, row[0])


def _pay_by(instructions: bytes) -> datetime:
    """The pay_by_time of an intent's stored instructions (verified when they were stored, PAY-8)."""
    body = payment_pb2.PaymentInstructions.FromString(envelope_pb2.Envelope.FromString(instructions).payload)
    return read_time(body, "pay_by_time", Reason.MALFORMED_PAYLOAD)


def _insert_intent_message(db: sqlite3.Connection, biller_party_id: str, intent_id: str, envelope: bytes) -> None:
    (position,) = db.execute(
        "SELECT COUNT(*) FROM intent_messages WHERE biller_party_id = ? AND intent_id = ?",
        (biller_party_id, intent_id),
    ).fetchone()
    db.execute(
        "INSERT INTO intent_messages (biller_party_id, intent_id, position, envelope) VALUES (?, ?, ?, ?)",
        (biller_party_id, intent_id, position, envelope),
    )


def _receipt(db: sqlite3.Connection, biller_party_id: str, intent_id: str) -> ReceiptRecord | None:
    row = db.execute(
        f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE biller_party_id = ? AND intent_id = ?",  # noqa: S608
        (biller_party_id, intent_id),
    ).fetchone()
    if row is None:
        return None
    return ReceiptRecord(row[0], row[1], row[2], row[3], row[4], row[5], dt(row[6]))
