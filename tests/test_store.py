"""The SQLite back end of BillerStore: schema, durability settings, constraints and atomic steps."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from agent.crypto import digest
from agent.errors import Reason
from agent.stores.base import (
    AlreadyExists,
    BillRecord,
    BillStatus,
    Enrolment,
    EnrolmentCodeRecord,
    KeySetRecord,
    MessageRecord,
    NegotiationStep,
    NewThread,
    PendingEvent,
    ReplayRecord,
    StoreConflict,
    ThreadOutcome,
)
from agent.stores.sqlite import MIGRATIONS, SqliteBillerStore
from parley.v1 import envelope_pb2
from tests.helpers.db import dump

NOW = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
ACCOUNT, PARTY, BILL = "acct-1", "consumer:alice", "bill-1"
THREAD = b"t" * 16


def run(test: Callable[[SqliteBillerStore], Awaitable[None]], path: Path) -> None:
    """Open a store at `path`, run `test` with it, and always close it."""

    async def main() -> None:
        store = await SqliteBillerStore.open(path)
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


def replay(message_id: bytes, content: bytes = b"m", answer: bytes | None = None) -> ReplayRecord:
    return ReplayRecord(PARTY, message_id, digest_of(content), NOW + timedelta(hours=1), answer)


def digest_of(content: bytes) -> bytes:
    return digest(envelope_pb2.Envelope(payload=content, payload_type="test"))


def event(account_id: str = ACCOUNT, fail: bool = False) -> PendingEvent:
    def seal(sequence: int, previous: bytes) -> envelope_pb2.Envelope:
        if fail:
            raise RuntimeError("signing failed")
        return envelope_pb2.Envelope(payload=b"%d|" % sequence + previous, payload_type="parley.v1.Event")

    return PendingEvent(account_id, 1, seal)


def message(sequence: int, content: bytes) -> MessageRecord:
    return MessageRecord(
        THREAD, sequence, content, digest_of(content), PARTY, "parley.v1.Offer", content[:16].ljust(16), NOW
    )


async def seed(store: SqliteBillerStore) -> None:
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
    bill = BillRecord(BILL, ACCOUNT, b"bill", digest_of(b"bill"), 12000, "EUR", date(2026, 3, 31), BillStatus.OPEN, NOW)
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


def test_migrations_apply_once_and_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "biller.sqlite"
    run(seed, path)
    before = dump(path)

    async def reopened(store: SqliteBillerStore) -> None:
        account = await store.get_account(ACCOUNT)
        assert account is not None
        assert account.consumer_party_id == PARTY
        assert [bill.bill_id for bill in await store.list_bills(ACCOUNT)] == [BILL]
        assert await store.party_key_sets(PARTY) == [b"keyset-v1"]
        assert await store.party_with_keyid("k1") == PARTY
        assert await store.event_count(ACCOUNT) == 1

    run(reopened, path)
    assert dump(path) == before
    assert before["schema_version"] == [(len(MIGRATIONS),)]


def test_wal_journal_and_full_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "biller.sqlite"

    async def settings(store: SqliteBillerStore) -> None:
        synchronous = await store._read(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])
        foreign_keys = await store._read(lambda db: db.execute("PRAGMA foreign_keys").fetchone()[0])
        assert (synchronous, foreign_keys) == (2, 1)  # FULL, ON

    run(settings, path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "biller.sqlite"
    run(seed, path)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS) + 1,))
    with pytest.raises(RuntimeError, match="newer than this code"):
        run(seed, path)


def test_duplicate_ids_from_the_embedding_api(tmp_path: Path) -> None:
    async def duplicates(store: SqliteBillerStore) -> None:
        await seed(store)
        with pytest.raises(AlreadyExists):
            await store.create_account(ACCOUNT, "Someone else", NOW)
        bill = await store.get_bill(BILL)
        assert bill is not None
        with pytest.raises(AlreadyExists):
            await store.insert_bill(bill, [])

    run(duplicates, tmp_path / "biller.sqlite")


def test_a_thread_position_is_taken_once(tmp_path: Path) -> None:
    path = tmp_path / "biller.sqlite"

    async def race(store: SqliteBillerStore) -> None:
        await seed(store)
        await store.record_negotiation_step(open_step())
        follow = open_step(
            messages=(message(2, b"accept"),),
            new_thread=None,
            outcome=ThreadOutcome.AGREED,
            replay=replay(b"accept-msg-id-00"),
        )
        rival = open_step(
            messages=(message(2, b"withdraw"),),
            new_thread=None,
            outcome=ThreadOutcome.WITHDRAWN,
            replay=replay(b"withdraw-msg-id0"),
        )
        await store.record_negotiation_step(follow)
        before = dump(path)
        with pytest.raises(StoreConflict) as lost:
            await store.record_negotiation_step(rival)
        assert lost.value.reason is Reason.SEQUENCE_MISMATCH
        assert dump(path) == before
        thread = await store.get_thread(THREAD)
        assert thread is not None
        assert [m.envelope for m in thread.messages] == [b"open", b"counter", b"accept"]
        assert thread.outcome is ThreadOutcome.AGREED
        assert thread.disclosure == b"disclosure"

    run(race, path)


def test_a_step_that_fails_midway_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "biller.sqlite"

    async def failing(store: SqliteBillerStore) -> None:
        await seed(store)
        before = dump(path)
        with pytest.raises(RuntimeError, match="signing failed"):
            await store.record_negotiation_step(open_step(events=(event(), event(fail=True))))
        assert dump(path) == before
        assert await store.get_thread(THREAD) is None
        assert await store.replay_lookup(PARTY, b"open-msg-id-0000") is None

    run(failing, path)


def test_open_thread_limit_and_bill_status_are_checked_in_the_transaction(tmp_path: Path) -> None:
    async def limits(store: SqliteBillerStore) -> None:
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

    run(limits, tmp_path / "biller.sqlite")


def test_replay_cache(tmp_path: Path) -> None:
    async def cache(store: SqliteBillerStore) -> None:
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

    run(cache, tmp_path / "biller.sqlite")


def test_concurrent_appenders_keep_the_event_log_gapless_and_chained(tmp_path: Path) -> None:
    path = tmp_path / "biller.sqlite"
    run(seed, path)

    async def two_writers() -> None:
        stores = [await SqliteBillerStore.open(path) for _ in range(2)]
        try:
            await asyncio.gather(*(store.append_events([event(), event()]) for store in stores for _ in range(5)))
            events = await stores[0].events(ACCOUNT, 0, 100)
        finally:
            for store in stores:
                await store.close()
        assert [e.sequence for e in events] == list(range(21))
        for previous, current in pairwise(events):
            payload = envelope_pb2.Envelope.FromString(current.envelope).payload
            assert payload == b"%d|" % current.sequence + previous.digest

    asyncio.run(two_writers())
