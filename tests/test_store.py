"""BillerStore on both back ends (SQLite and PostgreSQL): schema, constraints, atomic steps, races.

Every test taking `backend` runs once per back end; the SQLite durability settings
are checked on SQLite only. Races are run from several store instances (several
connections; for PostgreSQL, several pools) so the database, not the process,
has to settle them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import psycopg
import pytest

from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.protocol.terms import Terms
from agent.stores import open_biller_store
from agent.stores.base import (
    AlreadyExists,
    BillRecord,
    BillStatus,
    Enrolment,
    EnrolmentCodeRecord,
    EventLog,
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
    StoreConflict,
    ThreadOutcome,
)
from agent.stores.biller_postgres import PostgresBillerStore
from agent.stores.biller_sql import SqlBillerStore
from agent.stores.biller_sqlite import MIGRATIONS, SqliteBillerStore
from parley.v1 import envelope_pb2, event_pb2, negotiation_pb2
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    GetReceiptRequest,
    NegotiateRequest,
    WatchEventsRequest,
)
from reference_biller.config import ServerSettings
from reference_biller.settings import SettingsError, resolve_serve, resolve_store
from tests import fixtures
from tests.fixtures import eur
from tests.helpers.db import Dump, dump
from tests.helpers.peer import BILLER_ID, counter_terms, outside_options, running_biller

NOW = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
ACCOUNT, PARTY, BILL = "acct-1", "consumer:alice", "bill-1"
THREAD = b"t" * 16


@dataclass(frozen=True)
class Backend:
    """Where a test's store lives, and how to look at it from outside the store."""

    name: str
    location: str  # a SQLite path or a PostgreSQL URL, as `open_biller_store` takes them

    def dump(self) -> Dump:
        """Every row of every table, read through a separate connection, in a stable order."""
        if self.name == "sqlite":
            return dump(Path(self.location))
        with psycopg.connect(self.location) as db:
            tables = [
                row[0]
                for row in db.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
                )
            ]
            return {table: sorted(db.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr) for table in tables}

    def execute(self, sql: str, *args: object) -> None:
        """Run one statement outside the store (qmark parameters), committed."""
        if self.name == "sqlite":
            with sqlite3.connect(self.location) as db:
                db.execute(sql, args)
        else:
            with psycopg.connect(self.location) as db:
                db.execute(sql.replace("?", "%s"), args)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "biller.sqlite"))
    return Backend("postgres", request.getfixturevalue("postgres_dsn"))


def run(test: Callable[[SqlBillerStore], Awaitable[None]], location: str) -> None:
    """Open the store at `location`, run `test` with it, and always close it."""

    async def main() -> None:
        store = await open_biller_store(location)
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


async def on_several_stores(location: str, count: int, race: Callable[[list[SqlBillerStore]], Awaitable[None]]) -> None:
    """Run `race` with `count` separately opened stores on one database, always closing them."""
    stores: list[SqlBillerStore] = []
    try:
        for _ in range(count):
            stores.append(await open_biller_store(location))
        await race(stores)
    finally:
        for store in stores:
            await store.close()


def replay(message_id: bytes, content: bytes = b"m", answer: bytes | None = None) -> ReplayRecord:
    return ReplayRecord(PARTY, message_id, digest_of(content), NOW + timedelta(hours=1), answer)


def digest_of(content: bytes) -> bytes:
    return digest(envelope_pb2.Envelope(payload=content, payload_type="test"))


def event(account_id: str = ACCOUNT, fail: bool = False) -> PendingEvent:
    def seal(recipient: str, sequence: int, previous: bytes) -> envelope_pb2.Envelope:
        if fail:
            raise RuntimeError("signing failed")
        return envelope_pb2.Envelope(payload=b"%d|" % sequence + previous, payload_type="parley.v1.Event")

    return PendingEvent(account_id, 1, seal)


def message(sequence: int, content: bytes) -> MessageRecord:
    return MessageRecord(
        THREAD, sequence, content, digest_of(content), PARTY, "parley.v1.Offer", content[:16].ljust(16), NOW
    )


def assert_gapless_and_chained(events: list[EventRecord], count: int) -> None:
    assert [e.sequence for e in events] == list(range(count))
    for previous, current in pairwise(events):
        payload = envelope_pb2.Envelope.FromString(current.envelope).payload
        assert payload == b"%d|" % current.sequence + previous.digest


async def seed(store: SqlBillerStore) -> None:
    """An account with an enrolled consumer and one open bill."""
    await store.create_account(ACCOUNT, "Alice", NOW)
    code = EnrolmentCodeRecord(ACCOUNT, b"s" * 16, b"h" * 32, NOW + timedelta(days=30), used=False)
    await store.add_enrolment_code(code, NOW)
    await store.enrol(
        Enrolment(
            ACCOUNT,
            code.code_hash,
            PARTY,
            b"f" * 32,
            KeySetRecord(PARTY, 1, b"keyset-v1", ("k1",)),
            NOW,
            replay(b"enrol-msg-id-000"),
        )
    )
    bill = BillRecord(
        BILL, ACCOUNT, b"bill", digest_of(b"bill"), 12000, "EUR", date(2026, 3, 31), BillStatus.OPEN, NOW, PARTY
    )
    await store.insert_bill(bill, [event()])


def open_step(**changes: object) -> NegotiationStep:
    fields: dict[str, object] = {
        "account_id": ACCOUNT,
        "bill_id": BILL,
        "thread_id": THREAD,
        "messages": (message(0, b"open"), message(1, b"counter")),
        "outcome": ThreadOutcome.OPEN,
        "now": NOW,
        "replay": replay(b"open-msg-id-0000"),
        "new_thread": NewThread(PARTY, NOW + timedelta(hours=1), b"disclosure", True, max_open_threads=3),
    }
    fields.update(changes)
    return NegotiationStep(**fields)  # type: ignore[arg-type]


def next_step(content: bytes, outcome: ThreadOutcome) -> NegotiationStep:
    """A step writing the thread's position 2 (after `open_step`)."""
    return open_step(
        messages=(message(2, content),),
        new_thread=None,
        outcome=outcome,
        replay=replay(content.ljust(16, b"-")),
    )


def intent(intent_id: str = "intent-1", reference: str = "REF-1") -> PaymentIntentRecord:
    return PaymentIntentRecord(
        account_id=ACCOUNT,
        intent_id=intent_id,
        content_hash=b"c" * 32,
        bill_id=BILL,
        agreement_digest=b"",
        instalment_index=0,
        amount_minor=12000,
        currency="EUR",
        payment_reference=reference,
        intent=b"intent-envelope",
        instructions=b"instructions-envelope",
        created_at=NOW,
    )


def settlement(rail_reference: str) -> Settle:
    def seal(remaining: int) -> SealedSettlement:
        receipt = envelope_pb2.Envelope(payload=b"receipt|%d" % remaining, payload_type="parley.v1.Receipt")
        return SealedSettlement(receipt, (event(), event()))

    return Settle(ACCOUNT, "intent-1", 12000, rail_reference, NOW, seal)


# --- schema and durability ----------------------------------------------------------------------


def test_migrations_apply_once_and_data_survives_reopen(backend: Backend) -> None:
    run(seed, backend.location)
    before = backend.dump()

    async def reopened(store: SqlBillerStore) -> None:
        account = await store.get_account(ACCOUNT)
        assert account is not None
        assert account.consumer_party_id == PARTY
        assert [bill.bill_id for bill in await store.list_bills(ACCOUNT)] == [BILL]
        assert await store.party_key_sets(PARTY) == [b"keyset-v1"]
        assert await store.party_with_keyid("k1") == PARTY
        assert await store.event_count(ACCOUNT) == 1

    run(reopened, backend.location)
    assert backend.dump() == before
    versions = len(MIGRATIONS if backend.name == "sqlite" else PostgresBillerStore.MIGRATIONS)
    assert before["schema_version"] == [(version,) for version in range(1, versions + 1)]


def test_wal_journal_and_full_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "biller.sqlite"

    async def settings() -> None:
        store = await SqliteBillerStore.open(path)
        try:
            synchronous = await store._read(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])
            foreign_keys = await store._read(lambda db: db.execute("PRAGMA foreign_keys").fetchone()[0])
        finally:
            await store.close()
        assert (synchronous, foreign_keys) == (2, 1)  # FULL, ON

    asyncio.run(settings())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused(backend: Backend) -> None:
    run(seed, backend.location)
    backend.execute("INSERT INTO schema_version (version) VALUES (?)", 99)
    with pytest.raises(RuntimeError, match="newer than this code"):
        run(seed, backend.location)


def test_replicas_opening_a_new_database_together_migrate_it_once(postgres_dsn: str) -> None:
    async def open_at_once() -> None:
        opened = await asyncio.gather(*(PostgresBillerStore.open(postgres_dsn) for _ in range(4)))
        for store in opened:
            await store.close()

    asyncio.run(open_at_once())
    versions = len(PostgresBillerStore.MIGRATIONS)
    assert Backend("postgres", postgres_dsn).dump()["schema_version"] == [(v,) for v in range(1, versions + 1)]


def test_store_locations(tmp_path: Path, postgres_dsn: str) -> None:
    async def open_each() -> None:
        for location, kind in [
            (str(tmp_path / "plain.sqlite"), SqliteBillerStore),
            (f"sqlite:///{tmp_path / 'url.sqlite'}", SqliteBillerStore),
            (postgres_dsn, PostgresBillerStore),
        ]:
            store = await open_biller_store(location)
            try:
                assert isinstance(store, kind)
            finally:
                await store.close()
        with pytest.raises(ValueError, match="unknown store URL scheme"):
            await open_biller_store("mysql://biller@db/parley")

    asyncio.run(open_each())
    assert (tmp_path / "plain.sqlite").exists()
    assert (tmp_path / "url.sqlite").exists()


# --- constraints and atomic steps ---------------------------------------------------------------


def test_duplicate_ids_from_the_embedding_api(backend: Backend) -> None:
    async def duplicates(store: SqlBillerStore) -> None:
        await seed(store)
        with pytest.raises(AlreadyExists):
            await store.create_account(ACCOUNT, "Someone else", NOW)
        bill = await store.get_bill(BILL)
        assert bill is not None
        with pytest.raises(AlreadyExists):
            await store.insert_bill(dataclasses.replace(bill, party_id=PARTY), [])

    run(duplicates, backend.location)


def test_a_thread_position_is_taken_once(backend: Backend) -> None:
    async def race(store: SqlBillerStore) -> None:
        await seed(store)
        await store.record_negotiation_step(open_step())
        await store.record_negotiation_step(next_step(b"accept", ThreadOutcome.AGREED))
        before = backend.dump()
        with pytest.raises(StoreConflict) as lost:
            await store.record_negotiation_step(next_step(b"withdraw", ThreadOutcome.WITHDRAWN))
        assert lost.value.reason is Reason.SEQUENCE_MISMATCH
        assert backend.dump() == before
        thread = await store.get_thread(THREAD)
        assert thread is not None
        assert [m.envelope for m in thread.messages] == [b"open", b"counter", b"accept"]
        assert thread.outcome is ThreadOutcome.AGREED
        assert thread.disclosure == b"disclosure"

    run(race, backend.location)


def test_thread_context_reads_thread_bill_and_account_together(backend: Backend) -> None:
    async def read(store: SqlBillerStore) -> None:
        await seed(store)
        opening = await store.thread_context(THREAD, BILL, PARTY)  # no thread yet: the bill the opening names
        assert opening.thread is None
        assert opening.bill == await store.get_presented_bill(BILL, PARTY)  # as presented to the opener
        assert (await store.thread_context(THREAD, BILL, "consumer:other")).bill is None  # ENR-12: never presented
        assert opening.account == await store.get_account(ACCOUNT)
        await store.record_negotiation_step(open_step())
        later = await store.thread_context(THREAD, "")  # a thread: its own bill, whatever the move names
        assert later.thread == await store.get_thread(THREAD)
        assert later.bill == opening.bill
        assert later.account is not None
        assert later.account.consumer_party_id == PARTY
        unknown = await store.thread_context(b"u" * 16, "no-such-bill")
        assert (unknown.thread, unknown.bill, unknown.account) == (None, None, None)

    run(read, backend.location)


def test_step_contexts_carry_what_the_step_is_judged_with(backend: Backend) -> None:
    """One store read per step: an opening's balance and the account's open threads, and the replay entry."""

    async def read(store: SqlBillerStore) -> None:
        await seed(store)
        key = (PARTY, b"open-msg-id-0000")
        opening = await store.thread_context(THREAD, BILL, PARTY, replay_key=key)
        assert (opening.received_minor, opening.open_threads, opening.replay) == (0, (), None)
        await store.record_negotiation_step(open_step())
        later = await store.thread_context(THREAD, "", replay_key=key)
        assert later.replay is not None
        assert later.replay == await store.replay_lookup(*key)
        assert (later.received_minor, later.open_threads) == (0, ())  # not an opening: not read
        await store.insert_payment_intent(intent(), replay(b"intent-msg-id-01"))
        await store.settle(settlement("RAIL-1"))
        again = await store.thread_context(b"u" * 16, BILL, PARTY)  # another opening on the bill
        assert again.received_minor == await store.received_minor(BILL) == 12000
        assert again.open_threads == ((BILL, NOW + timedelta(hours=1)),)
        assert [bill for bill, _ in again.open_threads] == await store.open_thread_bills(ACCOUNT, NOW)
        assert again.replay is None
        paying = await store.payment_context(ACCOUNT, BILL, "intent-1", b"", replay_key=(PARTY, b"intent-msg-id-01"))
        assert paying.replay == await store.replay_lookup(PARTY, b"intent-msg-id-01")
        assert paying.replay is not None
        assert (await store.payment_context(ACCOUNT, BILL, "intent-1", b"")).replay is None

    run(read, backend.location)


def test_read_contexts_bring_the_account_with_the_bill_or_the_receipt(backend: Backend) -> None:
    async def read(store: SqlBillerStore) -> None:
        await seed(store)
        account = await store.get_account(ACCOUNT)
        bill = await store.bill_read_context(ACCOUNT, BILL, PARTY)
        assert (bill.account, bill.bill) == (account, await store.get_presented_bill(BILL, PARTY))
        assert (await store.bill_read_context(ACCOUNT, BILL, "consumer:other")).bill is None  # ENR-12
        assert (await store.bill_read_context(ACCOUNT, "no-such-bill", PARTY)).bill is None
        assert (await store.bill_read_context("acct-none", BILL, PARTY)).account is None
        await store.create_account("acct-2", "Bob", NOW)
        elsewhere = await store.bill_read_context("acct-2", BILL, PARTY)  # another account named: its bill as is
        assert elsewhere.account is not None
        assert elsewhere.account.consumer_party_id is None
        assert elsewhere.bill is not None
        assert elsewhere.bill.account_id == ACCOUNT
        unpaid = await store.receipt_read_context(ACCOUNT, "intent-1")
        assert (unpaid.account, unpaid.intent, unpaid.settlement) == (account, None, None)
        await store.insert_payment_intent(intent(), replay(b"intent-msg-id-01"))
        instructed = await store.receipt_read_context(ACCOUNT, "intent-1")
        assert (instructed.intent is not None, instructed.settlement) == (True, None)
        await store.settle(settlement("RAIL-1"))
        settled = await store.receipt_read_context(ACCOUNT, "intent-1")
        assert settled.intent is not None
        assert settled.settlement == await store.get_settlement(ACCOUNT, "intent-1")
        assert settled.settlement is not None
        assert (await store.receipt_read_context("acct-2", "intent-1")).intent is None  # not its intent
        assert (await store.receipt_read_context("acct-none", "intent-1")).account is None

    run(read, backend.location)


def test_a_step_that_fails_midway_leaves_nothing(backend: Backend) -> None:
    async def failing(store: SqlBillerStore) -> None:
        await seed(store)
        before = backend.dump()
        with pytest.raises(RuntimeError, match="signing failed"):
            await store.record_negotiation_step(open_step(events=(event(), event(fail=True))))
        assert backend.dump() == before
        assert await store.get_thread(THREAD) is None
        assert await store.replay_lookup(PARTY, b"open-msg-id-0000") is None

    run(failing, backend.location)


def test_open_thread_limit_and_bill_status_are_checked_in_the_transaction(backend: Backend) -> None:
    async def limits(store: SqlBillerStore) -> None:
        await seed(store)
        with pytest.raises(StoreConflict) as full:
            await store.record_negotiation_step(
                open_step(new_thread=NewThread(PARTY, NOW + timedelta(hours=1), None, False, max_open_threads=0))
            )
        assert full.value.reason is Reason.TOO_MANY_OPEN_THREADS
        await store.record_negotiation_step(open_step())
        # An open thread past its deadline no longer counts.
        later = NOW + timedelta(hours=2)
        second = open_step(
            thread_id=b"u" * 16,
            messages=(),
            now=later,
            replay=replay(b"second-open-id-0"),
            new_thread=NewThread(PARTY, later + timedelta(hours=1), None, False, max_open_threads=1),
        )
        await store.record_negotiation_step(second)

    run(limits, backend.location)


def test_replay_cache(backend: Backend) -> None:
    async def cache(store: SqlBillerStore) -> None:
        await seed(store)
        first = replay(b"read-message-id0", b"query", answer=b"answer")
        await store.record_replay(first)
        assert await store.replay_lookup(PARTY, first.message_id) == first
        with pytest.raises(StoreConflict) as again:
            await store.record_replay(replay(b"read-message-id0", b"other query"))
        assert again.value.reason is Reason.REPLAYED_MESSAGE
        assert await store.purge_replay_cache(NOW) == 0
        assert await store.purge_replay_cache(NOW + timedelta(hours=2)) == 2  # with the enrolment's
        assert await store.replay_lookup(PARTY, first.message_id) is None

    run(cache, backend.location)


def test_erased_disclosures_are_gone_and_the_answer_recorded(backend: Backend) -> None:
    async def erase(store: SqlBillerStore) -> None:
        await seed(store)
        await store.record_negotiation_step(open_step())
        count = await store.erase_disclosures(ACCOUNT, lambda erased: replay(b"erase-msg-id-000", b"%d" % erased))
        assert count == 1
        thread = await store.get_thread(THREAD)
        assert thread is not None
        assert (thread.disclosure, thread.hardship_disclosed) == (None, True)  # open: the fact stays (PRV-4)
        assert await store.replay_lookup(PARTY, b"erase-msg-id-000") == replay(b"erase-msg-id-000", b"1")

    run(erase, backend.location)
    assert backend.dump()["disclosures"] == []


def test_a_payment_reference_is_unique(backend: Backend) -> None:
    async def references(store: SqlBillerStore) -> None:
        await seed(store)
        await store.insert_payment_intent(intent(), replay(b"intent-msg-id-01"))
        with pytest.raises(ValueError, match="not unique"):
            await store.insert_payment_intent(intent("intent-2", "REF-1"), replay(b"intent-msg-id-02"))
        assert await store.get_payment_intent(ACCOUNT, "intent-2") is None
        assert await store.replay_lookup(PARTY, b"intent-msg-id-02") is None

    run(references, backend.location)


def test_payment_context_reads_account_bill_intent_and_arrangement_together(backend: Backend) -> None:
    async def read(store: SqlBillerStore) -> None:
        await seed(store)
        before = await store.payment_context(ACCOUNT, BILL, "intent-1", b"")
        assert before.account == await store.get_account(ACCOUNT)
        assert before.bill == await store.get_bill(BILL)
        assert (before.intent, before.arrangement) == (None, None)
        await store.insert_payment_intent(intent(), replay(b"intent-msg-id-01"))
        after = await store.payment_context(ACCOUNT, BILL, "intent-1", b"a" * 32)  # no such agreement
        assert after.intent == await store.get_payment_intent(ACCOUNT, "intent-1")
        assert after.arrangement is None
        elsewhere = await store.payment_context("acct-none", "bill-none", "intent-1", b"")
        assert (elsewhere.account, elsewhere.bill, elsewhere.intent) == (None, None, None)

    run(read, backend.location)


def test_accounts_owing_are_the_bound_ones_with_a_bill_not_paid(backend: Backend) -> None:
    async def owing(store: SqlBillerStore) -> None:
        assert await store.accounts_owing() == []
        await seed(store)  # acct-1: bound, one open bill
        await store.create_account("acct-0", "Bob", NOW)  # no bill
        assert await store.accounts_owing() == [ACCOUNT]
        backend.execute("UPDATE bills SET status = 'under_arrangement' WHERE bill_id = ?", BILL)
        assert await store.accounts_owing() == [ACCOUNT]
        backend.execute("UPDATE bills SET status = 'paid' WHERE bill_id = ?", BILL)
        assert await store.accounts_owing() == []

    run(owing, backend.location)


def test_leases_are_exclusive_until_released_or_expired(backend: Backend) -> None:
    async def leases(store: SqlBillerStore) -> None:
        until = NOW + timedelta(minutes=5)
        assert await store.claim_lease("scheduler:acct-1", "a", NOW, until)
        assert not await store.claim_lease("scheduler:acct-1", "b", NOW, until)
        assert await store.claim_lease("scheduler:acct-2", "b", NOW, until)  # another name
        assert await store.claim_lease("scheduler:acct-1", "a", NOW, until)  # renewed by its holder
        await store.release_lease("scheduler:acct-1", "b")  # not b's: nothing happens
        assert not await store.claim_lease("scheduler:acct-1", "b", NOW, until)
        assert await store.claim_lease("scheduler:acct-1", "b", until + timedelta(seconds=1), until)  # expired
        await store.release_lease("scheduler:acct-1", "b")
        assert await store.claim_lease("scheduler:acct-1", "c", NOW, until)

    run(leases, backend.location)


# --- races between store instances (several connections, several pools) ----------------------------


def test_concurrent_appenders_keep_the_event_log_gapless_and_chained(backend: Backend) -> None:
    run(seed, backend.location)

    async def appenders(stores: list[SqlBillerStore]) -> None:
        await asyncio.gather(*(store.append_events([event(), event()]) for store in stores for _ in range(8)))
        assert_gapless_and_chained(await stores[0].events(ACCOUNT, 0, 100), 1 + 3 * 8 * 2)

    asyncio.run(on_several_stores(backend.location, 3, appenders))


def test_racing_steps_on_one_thread_position_one_wins(backend: Backend) -> None:
    async def prepare(store: SqlBillerStore) -> None:
        await seed(store)
        await store.record_negotiation_step(open_step())

    run(prepare, backend.location)

    async def racing(stores: list[SqlBillerStore]) -> None:
        steps = [next_step(b"accept", ThreadOutcome.AGREED), next_step(b"withdraw", ThreadOutcome.WITHDRAWN)]
        results = await asyncio.gather(
            *(store.record_negotiation_step(step) for store, step in zip(stores, steps, strict=True)),
            return_exceptions=True,
        )
        winners = [result for result in results if not isinstance(result, BaseException)]
        losers = [result for result in results if isinstance(result, BaseException)]
        assert len(winners) == 1
        assert len(losers) == 1
        assert isinstance(losers[0], StoreConflict)
        assert losers[0].reason is Reason.SEQUENCE_MISMATCH
        thread = await stores[0].get_thread(THREAD)
        assert thread is not None
        assert len(thread.messages) == 3
        assert thread.outcome is (
            ThreadOutcome.AGREED if thread.messages[2].envelope == b"accept" else ThreadOutcome.WITHDRAWN
        )

    asyncio.run(on_several_stores(backend.location, 2, racing))


def test_racing_intents_with_one_id_store_one(backend: Backend) -> None:
    run(seed, backend.location)

    async def racing(stores: list[SqlBillerStore]) -> None:
        results = await asyncio.gather(
            *(
                store.insert_payment_intent(intent(reference=f"REF-{n}"), replay(b"intent-msg-id-%02d" % n))
                for n, store in enumerate(stores)
            ),
            return_exceptions=True,
        )
        conflicts = [result for result in results if isinstance(result, StoreConflict)]
        assert results.count(None) == 1
        assert len(conflicts) == len(stores) - 1
        assert {conflict.reason for conflict in conflicts} == {Reason.IDEMPOTENCY_CONFLICT}

    asyncio.run(on_several_stores(backend.location, 4, racing))
    intents = backend.dump()["payment_intents"]
    assert len(intents) == 1


def test_racing_settlements_of_one_intent_pay_once(backend: Backend) -> None:
    async def prepare(store: SqlBillerStore) -> None:
        await seed(store)
        await store.insert_payment_intent(intent(), replay(b"intent-msg-id-01"))

    run(prepare, backend.location)

    async def racing(stores: list[SqlBillerStore]) -> None:
        results = await asyncio.gather(*(store.settle(settlement(f"RAIL-{n}")) for n, store in enumerate(stores)))
        assert len({record for record, _ in results}) == 1  # every caller sees the one settlement
        assert sorted(len(events) for _, events in results) == [0] * (len(stores) - 1) + [2]
        bill = await stores[0].get_bill(BILL)
        assert bill is not None
        assert bill.status is BillStatus.PAID
        assert_gapless_and_chained(await stores[0].events(ACCOUNT, 0, 100), 3)

    asyncio.run(on_several_stores(backend.location, 4, racing))
    assert len(backend.dump()["settlements"]) == 1


def test_racing_lease_claims_have_one_winner(backend: Backend) -> None:
    async def racing(stores: list[SqlBillerStore]) -> None:
        until = NOW + timedelta(minutes=5)
        won = await asyncio.gather(
            *(store.claim_lease("scheduler:acct-1", f"replica-{n}", NOW, until) for n, store in enumerate(stores))
        )
        assert won.count(True) == 1

    for _ in range(3):
        asyncio.run(on_several_stores(backend.location, 4, racing))
        backend.execute("DELETE FROM leases")


# --- the agent over gRPC on PostgreSQL -------------------------------------------------------------


def test_negotiate_agree_pay_and_watch_over_grpc_on_postgres(tmp_path: Path, postgres_dsn: str) -> None:
    async def scenario() -> None:
        async with running_biller(tmp_path, store=postgres_dsn) as biller:
            alice = await biller.enrolled("acct-1001", "consumer:alice")
            bill = await biller.bill("acct-1001")
            opening = alice.open(bill, outside_options())
            countered = await biller.stub.Negotiate(NegotiateRequest(move=opening))
            assert countered.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_OPEN
            thread = [opening, countered.reply]
            accept = alice.next(thread, negotiation_pb2.Accept(offer_digest=digest(countered.reply)))
            agreed = await biller.stub.Negotiate(NegotiateRequest(move=accept))
            assert agreed.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_AGREED
            assert await biller.stub.Negotiate(NegotiateRequest(move=accept)) == agreed  # the stored answer
            thread.append(accept)
            bundle = Bundle({BILLER_ID: biller.chain.envelopes, alice.party_id: [alice.key_set]}, bill, thread)
            assert verify_bundle(bundle, pins={BILLER_ID: biller.chain.fingerprint}).terms == Terms.from_proto(
                counter_terms()
            )
            twenty = eur("20.00")
            intent = CreatePaymentIntentRequest(
                intent=alice.intent(
                    "acct-1001", fixtures.BILL.bill_id, "pay-1", twenty, agreement_digest=digest(accept)
                )
            )
            instructed = await biller.stub.CreatePaymentIntent(intent)
            assert await biller.stub.CreatePaymentIntent(intent) == instructed  # PAY-2
            receipt = await biller.agent.record_settlement("acct-1001", "pay-1", twenty, "RAIL-1")
            query = alice.query("acct-1001", intent_id="pay-1")
            assert (await biller.stub.GetReceipt(GetReceiptRequest(query=query))).receipt == receipt
            (arrangement,) = await biller.agent.arrangements("acct-1001")
            assert arrangement.paid_instalments == {0}
            watch = biller.stub.WatchEvents(WatchEventsRequest(query=alice.query("acct-1001", start_sequence=0)))
            kinds = []
            async for response in watch:
                kinds.append(biller.verify(response.event, alice, event_pb2.Event).message.kind)
                if len(kinds) == 3:
                    watch.cancel()
                    break
            assert kinds == [
                event_pb2.EVENT_KIND_BILL_ISSUED,
                event_pb2.EVENT_KIND_ARRANGEMENT_ACTIVE,
                event_pb2.EVENT_KIND_PAYMENT_RECEIVED,
            ]

    asyncio.run(scenario())


def test_the_store_option_by_precedence_and_refused_with_its_source() -> None:
    server = ServerSettings(listen="127.0.0.1:0", store="/var/lib/parley/from-file.sqlite")
    env = {"PARLEY_STORE": "postgresql://biller@db/from_env"}
    chosen = resolve_serve({"store": "sqlite:///from-flag.sqlite"}, server, env)
    assert (chosen.store, chosen.sources["store"]) == ("sqlite:///from-flag.sqlite", "--store")
    assert resolve_serve({}, server, env).store == "postgresql://biller@db/from_env"
    assert resolve_serve({}, server, {}).store == "/var/lib/parley/from-file.sqlite"
    assert resolve_serve({}, ServerSettings(listen="127.0.0.1:0"), {}).store is None  # biller.sqlite in state_dir
    assert resolve_store(None, server, env) == "postgresql://biller@db/from_env"
    with pytest.raises(SettingsError, match="PARLEY_STORE: unknown store URL scheme 'mysql'"):
        resolve_serve({}, server, {"PARLEY_STORE": "mysql://biller@db/parley"})


def test_a_connection_the_server_dropped_while_idle_is_replaced(postgres_dsn: str) -> None:
    async def dropped() -> None:
        store = await PostgresBillerStore.open(postgres_dsn, pool_size=1)
        try:
            await seed(store)
            with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                admin.execute(
                    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                       WHERE datname = current_database() AND pid <> pg_backend_pid()"""
                )
            assert await store.event_count(ACCOUNT) == 1
            await store.append_events([event()])
            assert await store.event_count(ACCOUNT) == 2
        finally:
            await store.close()

    asyncio.run(dropped())


def test_a_re_enrolment_presents_unpaid_bills_in_the_new_partys_own_log(backend: Backend) -> None:
    """ENR-12 on both back ends: a log per binding from 0, bills presented again atomically with the binding."""

    async def rebind(store: SqlBillerStore) -> None:
        await seed(store)  # PARTY bound, the bill presented to it, event 0 of its log
        other = "consumer:other"
        code = EnrolmentCodeRecord(ACCOUNT, b"t" * 16, b"i" * 32, NOW + timedelta(days=30), used=False)
        await store.add_enrolment_code(code, NOW)

        def present(bill: BillRecord) -> tuple[BillRecord, PendingEvent]:
            again = dataclasses.replace(bill, envelope=b"bill-again", digest=digest_of(b"bill-again"), party_id=other)
            return again, dataclasses.replace(event(), party_id=other)

        appended = await store.enrol(
            Enrolment(
                ACCOUNT,
                code.code_hash,
                other,
                b"g" * 32,
                KeySetRecord(other, 1, b"keyset-other", ("k2",)),
                NOW,
                replay(b"enrol-msg-id-001"),
                present=present,
            )
        )
        assert [(e.sequence, e.party_id) for e in appended] == [(0, other)]
        assert await store.event_count(ACCOUNT) == 1  # the bound party's log: the new one, from 0
        assert await store.event_count(ACCOUNT, PARTY) == 1  # the earlier one's, kept apart
        assert [e.envelope for e in await store.events(ACCOUNT, 0, 10, other)] == [appended[0].envelope]
        (listed,) = await store.list_bills(ACCOUNT, other)
        assert (listed.envelope, listed.party_id) == (b"bill-again", other)
        (first,) = await store.list_bills(ACCOUNT, PARTY)
        assert first.envelope == b"bill"
        assert await store.get_presented_bill(BILL, "consumer:nobody") is None

    run(rebind, backend.location)


async def bind_again(store: SqlBillerStore, party_id: str) -> None:
    """Re-bind ACCOUNT to `party_id` (a second code spent): the new binding's log starts empty (ENR-12)."""
    code = EnrolmentCodeRecord(ACCOUNT, b"t" * 16, digest_of(party_id.encode()), NOW + timedelta(days=30), used=False)
    await store.add_enrolment_code(code, NOW)
    key_set = KeySetRecord(party_id, 1, b"keyset-" + party_id.encode(), (f"key-of-{party_id}",))
    replay_record = ReplayRecord(party_id, party_id.encode()[:16].ljust(16), code.code_hash, NOW + timedelta(hours=1))
    await store.enrol(Enrolment(ACCOUNT, code.code_hash, party_id, b"g" * 32, key_set, NOW, replay_record))


def test_the_logs_and_their_lengths_are_kept_with_each_append(backend: Backend) -> None:
    """`event_logs` reads a table of log lengths written in each append's transaction (migration 7), so a
    listing costs a row per log, not a scan of every event: on both back ends it lists every binding's log,
    earlier holders' too, agrees with `event_count`, and a failed append changes nothing. Migration 7 fills
    the table from the logs a store already had."""
    other = "consumer:other"

    async def before(store: SqlBillerStore) -> None:
        await seed(store)  # PARTY's 0
        await store.append_events([event(), event()])  # PARTY's 1 and 2
        await bind_again(store, other)
        await store.append_events([event()])  # other's 0

    run(before, backend.location)
    # As a store at migration 6 had it: no lengths table yet, only the logs.
    backend.execute("DROP TABLE event_log_lengths")
    backend.execute("DELETE FROM schema_version WHERE version = 7")

    async def after(store: SqlBillerStore) -> None:
        assert await store.event_logs() == [EventLog(ACCOUNT, PARTY, 3), EventLog(ACCOUNT, other, 1)]  # filled
        await store.append_events([dataclasses.replace(event(), party_id=PARTY), event()])  # PARTY's 3, other's 1
        await store.create_account("acct-2", "Bob", NOW)
        assert await store.event_logs("acct-2") == []  # no binding, no log
        with pytest.raises(RuntimeError):
            await store.append_events([event(), event(fail=True)])  # rolled back whole: no length moves
        logs = [EventLog(ACCOUNT, PARTY, 4), EventLog(ACCOUNT, other, 2)]  # by party id
        assert await store.event_logs() == await store.event_logs(ACCOUNT) == logs
        for log in logs:
            assert await store.event_count(log.account_id, log.party_id) == log.length
            assert_gapless_and_chained(await store.events(ACCOUNT, 0, 10, log.party_id), log.length)

    run(after, backend.location)


def test_listing_the_logs_uses_the_lengths_key_and_never_reads_the_events(tmp_path: Path) -> None:
    """EXPLAIN QUERY PLAN (SQLite) of each statement `event_logs` runs, as run: the lengths table by its
    primary key, binding_events not at all (the grouping it replaced scanned that table's whole index)."""
    path = tmp_path / "biller.sqlite"

    async def plans(store: SqlBillerStore) -> list[str]:
        await seed(store)
        assert isinstance(store, SqliteBillerStore)
        statements: list[str] = []
        reader = store._reader_connection()
        reader.set_trace_callback(statements.append)
        try:
            assert await store.event_logs() == [EventLog(ACCOUNT, PARTY, 1)]
            assert await store.event_logs(ACCOUNT) == [EventLog(ACCOUNT, PARTY, 1)]
        finally:
            reader.set_trace_callback(None)
        with sqlite3.connect(path) as db:
            return [
                " ".join(str(row[3]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"))
                for sql in statements
                if sql.lstrip().upper().startswith("SELECT")
            ]

    async def main() -> list[str]:
        store = await open_biller_store(str(path))
        try:
            return await plans(store)
        finally:
            await store.close()

    assert asyncio.run(main()) == [
        "SCAN event_log_lengths USING INDEX sqlite_autoindex_event_log_lengths_1",  # in key order: no sort
        "SEARCH event_log_lengths USING INDEX sqlite_autoindex_event_log_lengths_1 (account_id=?)",
    ]
