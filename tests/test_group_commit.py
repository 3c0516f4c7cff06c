"""Group commit, the writer lock and the reader connection in the SQLite foundation (agent/stores/sqlite_base.py):
writes queued together share one COMMIT, a failing one rolls back alone, no caller hears of its write before the
COMMIT that made it durable, writers of one file queue on its `-lock` file, and reads run on the event loop beside
the writer without waiting for it."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from agent.stores.sqlite_base import SqliteStore

T = TypeVar("T")


class NotesStore(SqliteStore):
    MIGRATIONS = (
        (
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",
            # Checked at COMMIT, not per statement: a way to make a whole batch's COMMIT fail.
            """CREATE TABLE links (
                id INTEGER PRIMARY KEY,
                note_id INTEGER NOT NULL REFERENCES notes (id) DEFERRABLE INITIALLY DEFERRED
            )""",
        ),
    )

    async def add(self, note_id: int, text: str) -> int:
        def insert(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO notes (id, text) VALUES (?, ?)", (note_id, text))
            return note_id

        return await self._write(insert)

    async def add_then_fail(self, note_id: int) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO notes (id, text) VALUES (?, 'doomed')", (note_id,))
            raise LookupError("the step's rule refused it after its first statement")

        await self._write(insert)

    async def notes(self) -> list[tuple[int, str]]:
        return [(row[0], row[1]) for row in await self._all("SELECT id, text FROM notes ORDER BY id")]

    async def dangling_link(self) -> None:
        await self._write(lambda db: db.execute("INSERT INTO links (note_id) VALUES (999999)"))

    async def hold_worker(self, release: threading.Event) -> None:
        """Keep the store's worker thread busy until `release` is set, so writes queue up behind it."""
        await self._call(release.wait)


def with_store(path: Path, body: Callable[[NotesStore], Awaitable[None]]) -> None:
    """Run `body` on a freshly opened store at `path`, always closing it."""

    async def run() -> None:
        store = await NotesStore.open(path)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(run())


async def _commits(store: NotesStore) -> list[str]:
    """Start recording the COMMITs the store's connection executes (set on the thread that owns it)."""
    seen: list[str] = []

    def record(sql: str) -> None:
        if sql == "COMMIT":
            seen.append(sql)

    await store._call(lambda: store._connection().set_trace_callback(record))
    return seen


def _stored(path: Path) -> list[tuple[int, str]]:
    """The notes as another connection sees them: only what was committed."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT id, text FROM notes ORDER BY id").fetchall()
    finally:
        db.close()


async def queued_together(
    store: NotesStore, *writes: Awaitable[T], meanwhile: Callable[[list[asyncio.Task[T]]], object] | None = None
) -> list[asyncio.Task[T]]:
    """Queue `writes` while the store's worker is busy, so they form one batch; `meanwhile` sees them queued."""
    release = threading.Event()
    holding = asyncio.create_task(store.hold_worker(release))
    tasks = [asyncio.ensure_future(write) for write in writes]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in tasks)  # nothing is answered before its COMMIT
    if meanwhile is not None:
        meanwhile(tasks)
    release.set()
    await holding
    await asyncio.wait(tasks)
    return tasks


def test_queued_writes_share_one_commit_and_a_failing_one_rolls_back_alone(tmp_path: Path) -> None:
    async def body(store: NotesStore) -> None:
        commits = await _commits(store)
        *writes, doomed, duplicate = await queued_together(
            store,
            *(store.add(i, f"note {i}") for i in range(10)),
            store.add_then_fail(100),
            store.add(3, "a second note 3"),  # PRIMARY KEY violation
        )

        assert [write.result() for write in writes] == list(range(10))
        with pytest.raises(LookupError, match="refused it"):
            await doomed
        with pytest.raises(sqlite3.IntegrityError):
            await duplicate
        assert commits == ["COMMIT"]  # twelve writes, one fsync
        assert _stored(tmp_path / "notes.db") == [(i, f"note {i}") for i in range(10)]

    with_store(tmp_path / "notes.db", body)


def test_a_write_is_visible_to_other_connections_when_its_caller_resumes(tmp_path: Path) -> None:
    async def body(store: NotesStore) -> None:
        for i in range(5):
            await store.add(i, "durable")
            assert (i, "durable") in _stored(tmp_path / "notes.db")

    with_store(tmp_path / "notes.db", body)


def test_a_failed_commit_fails_every_write_of_the_batch_and_stores_none(tmp_path: Path) -> None:
    async def body(store: NotesStore) -> None:
        batch = await queued_together(
            store,
            store.add(1, "would have been fine"),
            store.dangling_link(),  # the deferred foreign key fails the COMMIT
        )

        for task in batch:
            with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
                task.result()
        assert _stored(tmp_path / "notes.db") == []
        assert await store.add(2, "the next batch commits") == 2  # the connection is usable again
        assert _stored(tmp_path / "notes.db") == [(2, "the next batch commits")]

    with_store(tmp_path / "notes.db", body)


def test_a_cancelled_caller_does_not_disturb_the_batch(tmp_path: Path) -> None:
    async def body(store: NotesStore) -> None:
        cancelled, kept = await queued_together(
            store, store.add(1, "cancelled caller"), store.add(2, "kept"), meanwhile=lambda tasks: tasks[0].cancel()
        )

        assert kept.result() == 2
        assert cancelled.cancelled()
        # The write itself was already queued: like any write whose caller went away, it still commits.
        assert _stored(tmp_path / "notes.db") == [(1, "cancelled caller"), (2, "kept")]

    with_store(tmp_path / "notes.db", body)


def test_a_closed_store_refuses_calls_at_once(tmp_path: Path) -> None:
    async def closed() -> None:
        store = await NotesStore.open(tmp_path / "notes.db")
        await store.add(1, "before closing")
        await store.close()
        await store.close()  # closing twice is harmless
        with pytest.raises(RuntimeError, match="closed"):
            await store.add(2, "after closing")
        with pytest.raises(RuntimeError, match="closed"):
            await store.add(3, "and again: the refused write left nothing queued")

    asyncio.run(asyncio.wait_for(closed(), timeout=10))
    assert _stored(tmp_path / "notes.db") == [(1, "before closing")]


def test_reads_run_beside_a_busy_writer_and_see_what_was_committed(tmp_path: Path) -> None:
    async def body(store: NotesStore) -> None:
        await store.add(1, "committed")
        release = threading.Event()
        holding = asyncio.create_task(store.hold_worker(release))
        queued = asyncio.create_task(store.add(2, "queued behind the busy writer"))
        try:
            assert await asyncio.wait_for(store.notes(), timeout=5) == [(1, "committed")]
        finally:
            release.set()
        await holding
        await queued
        assert await store.notes() == [(1, "committed"), (2, "queued behind the busy writer")]

    with_store(tmp_path / "notes.db", body)


def test_the_reader_connection_cannot_write(tmp_path: Path) -> None:
    async def body(store: NotesStore) -> None:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await store._read(lambda db: db.execute("INSERT INTO notes (id, text) VALUES (1, 'sneaked in')"))
        assert await store.notes() == []

    with_store(tmp_path / "notes.db", body)


def test_a_write_waits_while_another_process_holds_the_writer_lock(tmp_path: Path) -> None:
    """Writers of one file queue on `<file>-lock` (flock), woken as soon as it is released, before SQLite's lock."""
    path = tmp_path / "notes.db"

    async def body(store: NotesStore) -> None:
        lock = os.open(f"{path}-lock", os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # as another worker process inside its transaction would
            write = asyncio.create_task(store.add(1, "waits for the lock"))
            await asyncio.sleep(0.2)
            assert not write.done()
            assert _stored(path) == []
            assert await store.notes() == []  # reads do not take the lock
            fcntl.flock(lock, fcntl.LOCK_UN)
            assert await asyncio.wait_for(write, timeout=5) == 1
        finally:
            os.close(lock)
        assert _stored(path) == [(1, "waits for the lock")]

    with_store(path, body)


def test_two_stores_on_one_file_interleave_their_writes(tmp_path: Path) -> None:
    """Two stores (as two worker processes have) writing at once: every write commits, none fails busy."""
    path = tmp_path / "notes.db"

    async def both() -> None:
        first, second = await NotesStore.open(path), await NotesStore.open(path)
        try:
            await asyncio.gather(*(store.add(i, f"from store {i % 2}") for i, store in enumerate([first, second] * 50)))
            assert await first.notes() == await second.notes() == [(i, f"from store {i % 2}") for i in range(100)]
        finally:
            await first.close()
            await second.close()

    asyncio.run(asyncio.wait_for(both(), timeout=60))
