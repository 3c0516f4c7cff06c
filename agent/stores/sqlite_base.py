"""The SQLite foundation shared by the biller's and the consumer's stores.

Durability and concurrency choices, the same for every Parley SQLite store:

- WAL journal with `synchronous=FULL`: a step is on disk when its commit
  returns, so an acceptance or a payment acknowledged survives a power cut.
- Writes (and migrations, checkpoints) run on a dedicated writer thread that
  owns the writing connection; the event loop only awaits them, because a
  write waits for fsync and for the write lock. The hand-over is a queue and
  one `call_soon_threadsafe` back, not an executor (docs/PERFORMANCE.md).
- Reads run on the event loop itself, on a second, query-only connection:
  they are short indexed lookups of a consistent WAL snapshot (tens of
  microseconds from the page cache), and handing each to a thread and back
  cost more CPU than the query (docs/PERFORMANCE.md). WAL never makes them
  wait for a writer, and a write is acknowledged only once committed, so a
  read that follows it sees it.
- Writes use `BEGIN IMMEDIATE`, so every step's reads and writes see one
  consistent database. Processes sharing the file (workers, replicas) first
  queue on an advisory `flock` of `<file>-lock`, which wakes the next writer
  the moment the lock is released; SQLite's own busy handler, left to
  settle it, sleeps up to 100 ms between tries and made p99 latency at half
  load 5–10× worse with two workers (docs/PERFORMANCE.md). The busy timeout
  still covers other programs holding SQLite's lock.
- Group commit: the writes that arrive while the worker thread is busy are
  committed together, one `COMMIT` (one fsync) for all of them. Each runs in
  its own `SAVEPOINT` (a write alone needs none: its transaction is its own),
  so a step that fails rolls back alone and the others still commit; each
  caller hears of its result only after the `COMMIT` that made it durable,
  so the guarantee above is unchanged.
- `secure_delete` is on, so deleted rows (disclosures) are overwritten, not
  just unlinked (PRV-4).
- The schema is a list of migrations (the subclass's `MIGRATIONS`), applied in
  order, all pending ones in one transaction, and recorded in `schema_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Self, TypeVar

from agent.stores.files import create_private, tighten

T = TypeVar("T")
Row = tuple[Any, ...]
Migrations = Sequence[Sequence[str]]

BUSY_TIMEOUT_MS = 10_000
_COMPANION_SUFFIXES = ("-wal", "-shm", "-journal", "-lock")  # SQLite's and our writer lock


def ts(moment: datetime) -> str:
    """A sortable text form of a UTC instant (fixed width, so text order is time order)."""
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def dt(text: str) -> datetime:
    """The instant written by `ts`."""
    return datetime.fromisoformat(text)


def is_constraint(error: sqlite3.IntegrityError, *columns: str) -> bool:
    """Whether the integrity error is the UNIQUE/PRIMARY KEY violation on exactly these columns."""
    return str(error).endswith(": " + ", ".join(columns))


def migrate(db: sqlite3.Connection, migrations: Migrations) -> None:
    """Apply the migrations not yet recorded in `schema_version` (inside the caller's transaction)."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    current = row[0] or 0
    if current > len(migrations):
        raise RuntimeError(f"database schema version {current} is newer than this code ({len(migrations)})")
    for version, statements in enumerate(migrations[current:], start=current + 1):
        for statement in statements:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


def _resolve(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    """On the event loop: hand a worker-thread outcome to its caller (unless the caller was cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]  # a T whenever there is no error


def _hand_back(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    """From the worker thread: resolve `future` on its own event loop."""
    with contextlib.suppress(RuntimeError):  # that loop is closed: no one is waiting for the outcome
        future.get_loop().call_soon_threadsafe(_resolve, future, result, error)


class _WorkerThread:
    """The one thread that owns a store's connection, running the jobs queued to it in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stopped = False
        # A daemon: a store left open never holds the interpreter up, and what it acknowledged is committed.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        if self._stopped:
            raise RuntimeError("the store is closed")
        self._jobs.put(job)

    def stop(self, *, wait: bool) -> None:
        """Run the jobs already queued, then end; idempotent."""
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


@dataclass
class _QueuedWrite(Generic[T]):
    """A write waiting for the next group commit, and its outcome once the batch is over."""

    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    result: T | None = None
    error: BaseException | None = None

    def release(self) -> None:
        """Hand the outcome to the waiting caller (from the worker thread, after the COMMIT)."""
        _hand_back(self.future, self.result, self.error)


class _WriterLock:
    """An advisory lock on `<database>-lock` that the writers of one SQLite file take around each transaction."""

    def __init__(self, database: str) -> None:
        self._fd = os.open(database + "-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks this (writer) thread only; the GIL is released

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def _configure(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA secure_delete=ON")
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def _in_transaction(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], *, immediate: bool) -> T:
    db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        result = fn(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


class SqliteStore:
    """One SQLite file behind a single worker thread. Subclasses set `MIGRATIONS` and add methods.

    Create a store with `await Subclass.open(path)` and release it with `await store.close()`; use it from
    one event loop (reads run on it).
    """

    MIGRATIONS: ClassVar[Migrations] = ()

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._worker = _WorkerThread("parley-sqlite")
        self._writer_lock: _WriterLock | None = None
        self._db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None
        self._queued: list[_QueuedWrite[Any]] = []  # writes for the next group commit
        self._queue_lock = threading.Lock()  # `_queued` is appended on the loop, taken on the worker thread

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Self:
        """Open (creating if needed) the database at `path` and bring its schema up to date."""
        store = cls(path)
        try:
            await store._call(store._connect)
            store._connect_reader()
        except BaseException:
            if store._db is not None:
                await store._call(store._close)
            store._worker.stop(wait=False)
            raise
        return store

    async def close(self) -> None:
        """Fold the WAL into the database (a checkpoint) and release the connection; the store is unusable
        afterwards. A checkpoint that cannot complete (another process is reading) is left to SQLite."""
        if self._read_db is not None:
            self._read_db.close()
            self._read_db = None
        if self._db is not None:
            await self._call(self._close)
            self._db = None
        self._worker.stop(wait=True)

    def _close(self) -> None:
        db = self._connection()
        try:
            # Busy (another process reads)? The data is safe in the WAL; the last connection to close folds it.
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
            if self._writer_lock is not None:
                self._writer_lock.close()

    # --- plumbing: everything below `_call` runs on the writer thread; `_read` runs on the event loop ---

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the writer thread (which owns `_connection()`)."""
        return await self._on(self._worker, fn)

    @staticmethod
    async def _on(thread: _WorkerThread, fn: Callable[[], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def job() -> None:
            try:
                result = fn()
            except BaseException as error:  # handed to the caller, as an executor would
                _hand_back(future, None, error)
            else:
                _hand_back(future, result, None)

        thread.submit(job)
        return await future

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the store is closed")
        return self._db

    def _connect(self) -> None:
        # Private data: the database is made 0600 before SQLite opens it, so the -wal and -shm files SQLite
        # creates take the same mode; files left wider by an older version are tightened.
        if self._path != ":memory:":
            create_private(self._path)
            for suffix in _COMPANION_SUFFIXES:
                tighten(self._path + suffix)
        # isolation_level=None: transactions are begun and ended explicitly below.
        db = sqlite3.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise RuntimeError(f"SQLite refused WAL mode (journal_mode={mode}) for {self._path}")
            _configure(db)
            self._writer_lock = _WriterLock(self._path)
            with self._writer_lock:
                _in_transaction(db, lambda connection: migrate(connection, self.MIGRATIONS), immediate=True)
        except BaseException:
            db.close()
            if self._writer_lock is not None:
                self._writer_lock.close()
            raise
        self._db = db

    def _connect_reader(self) -> None:
        # check_same_thread=False: opened here, used by whichever thread runs the store's event loop.
        db = sqlite3.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        _configure(db)  # the same settings on both connections, so no read depends on which one runs it
        db.execute("PRAGMA query_only=ON")  # reads only, whatever a read function tries
        self._read_db = db

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a write transaction: all of it commits, or none of it; returns once it is durable.

        `fn` may share its transaction with other writes queued meanwhile (group commit), each in its own
        savepoint: its own failure rolls back only its changes.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        write = _QueuedWrite(fn, future)
        with self._queue_lock:
            self._queued.append(write)
            first = len(self._queued) == 1
        if first:  # otherwise a commit job is already queued and will take this write too
            try:
                self._worker.submit(self._group_commit)
            except RuntimeError:  # closed
                with self._queue_lock:
                    self._queued.remove(write)
                raise
        return await write.future

    def _group_commit(self) -> None:
        """Run every queued write in one transaction, each in a savepoint; release them after the COMMIT."""
        with self._queue_lock:
            batch, self._queued = self._queued, []
        try:
            db = self._connection()
            assert self._writer_lock is not None  # connected together with `_db`
            with self._writer_lock:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if len(batch) == 1:
                        self._run_alone(db, batch[0])
                    else:
                        for write in batch:
                            self._run_in_savepoint(db, write)
                        db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # a failed COMMIT (a deferred constraint) leaves the transaction open
                        db.execute("ROLLBACK")
                    raise
        except BaseException as error:  # nothing of the batch is stored: every write fails with the cause
            for write in batch:
                write.error = error
        for write in batch:
            write.release()

    @staticmethod
    def _run_alone(db: sqlite3.Connection, write: _QueuedWrite[Any]) -> None:
        """A batch of one: the transaction is the write's own, so it needs no savepoint. It commits, or its
        failure rolls the transaction back (nothing to commit, no sync); `_run_in_savepoint` otherwise."""
        try:
            write.result = write.fn(db)
        except Exception as error:
            if db.in_transaction:  # else SQLite rolled it back already (I/O error, disk full...)
                db.execute("ROLLBACK")
            write.error = error
            return
        db.execute("COMMIT")

    @staticmethod
    def _run_in_savepoint(db: sqlite3.Connection, write: _QueuedWrite[Any]) -> None:
        db.execute("SAVEPOINT step")
        try:
            write.result = write.fn(db)
        except Exception as error:
            if not db.in_transaction:  # SQLite rolled the whole transaction back (I/O error, disk full...)
                raise
            db.execute("ROLLBACK TO step")
            write.error = error
        db.execute("RELEASE step")

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one read transaction (a consistent snapshot of what was committed), on the event loop."""
        return _in_transaction(self._reader_connection(), fn, immediate=False)

    async def _statement(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn`, ONE statement, on the event loop: the statement is its own snapshot, so no BEGIN/COMMIT."""
        return fn(self._reader_connection())

    def _reader_connection(self) -> sqlite3.Connection:
        if self._read_db is None:
            raise RuntimeError("the store is closed")
        return self._read_db

    async def _one(self, sql: str, *args: object) -> Row | None:
        return await self._statement(lambda db: db.execute(sql, args).fetchone())

    async def _all(self, sql: str, *args: object) -> list[Row]:
        return await self._statement(lambda db: db.execute(sql, args).fetchall())

    def _checkpoint(self) -> bool:
        """Fold the WAL into the database and truncate it, so deleted data leaves the journal (PRV-4).

        False when it could not complete within the busy timeout (another
        connection still reads an older snapshot): the WAL then keeps its frames.
        """
        busy, _, _ = self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy
