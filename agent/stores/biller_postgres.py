"""The PostgreSQL back end of `BillerStore`: several stateless biller replicas on one database.

Open it with `await PostgresBillerStore.open("postgresql://user@host/db")` (any
libpq connection string), or through `agent.stores.open_biller_store`. The
store's rules are the SQL shared with SQLite in `agent.stores.biller_sql`; this
module adds the schema and the plumbing:

- **Encodings**: the same as SQLite's, so one set of SQL serves both: instants
  are fixed-width UTC ISO-8601 TEXT with `COLLATE "C"` (byte order is time order
  whatever the database's locale), money and sequences BIGINT, digests, ids and
  envelopes BYTEA, flags BOOLEAN; `rowid` identity columns keep insertion order
  where SQLite uses its rowid.
- **Migrations**: the schema shared with SQLite (`biller_sql.migrations`) in
  PostgreSQL's column types, applied in order in one transaction under an
  advisory lock (replicas starting together migrate once) and recorded in
  `schema_version`.
- **Connections**: a small pool (`POOL_SIZE`), each connection owned by one
  worker thread at a time; the event loop only awaits them. A connection the
  server dropped while idle (a restart, a failover) is replaced when its next
  step begins; one lost during a step fails that step, which is never rerun
  blindly (its COMMIT may have landed).
- **Isolation**: a write step runs at READ COMMITTED and first locks its
  account's row (`SELECT ... FOR UPDATE`, `biller_sql._lock_account`): one
  writer per account at a time, as SQLite's single writer, but replicas writing
  to different accounts never wait for or abort each other (SERIALIZABLE, tried
  first, aborted about one append in two between *different* accounts sharing
  an index page). Every statement after the lock sees the latest committed
  state. Keys shared between accounts (parties, keyids, payment references,
  leases) are settled by their UNIQUE and PRIMARY KEY constraints; a step that
  loses such a race on a key it had read as free (the constraint error escapes
  the step's own handling), or a deadlock, is run again from the start, up to
  `MAX_ATTEMPTS` times with jittered backoff: steps are functions of the
  database state (signing is deterministic), so a rerun writes what a serial
  run would have. Reads run at REPEATABLE READ, READ ONLY: one snapshot each.
- **Erasure** (PRV-4): after disclosures are deleted the table is rewritten
  (`VACUUM FULL disclosures`), so the erased rows leave its files; WAL segments
  and backups keep them until the operator's retention removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, ClassVar, Self, TypeVar

import psycopg
from psycopg import errors

from agent.stores.biller_sql import ColumnTypes, Db, IntegrityViolation, SqlBillerStore, migrations

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

POOL_SIZE = 4
MAX_ATTEMPTS = 30
RETRY_BACKOFF_SECONDS = 0.002  # doubled per attempt, capped, with jitter
MAX_RETRY_BACKOFF_SECONDS = 0.1
_MIGRATION_LOCK = 0x7061726C6579  # pg_advisory_xact_lock key: "parley"

MIGRATIONS = migrations(
    ColumnTypes(
        blob="BYTEA",
        time='TEXT COLLATE "C"',  # byte order whatever the database's locale
        boolean="BOOLEAN",
        false="FALSE",
        integer="BIGINT",
        rowid=",\n rowid BIGINT GENERATED ALWAYS AS IDENTITY",
    )
)


@lru_cache(maxsize=1024)
def _pyformat(sql: str) -> str:
    """The shared qmark SQL in psycopg's placeholder style (the shared SQL has no `?` or `%` in literals)."""
    return sql.replace("?", "%s")


class PostgresDb:
    """A `Db` over an open PostgreSQL transaction: constraint errors become `IntegrityViolation`."""

    for_update = " FOR UPDATE"

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[tuple[Any, ...]]:
        try:
            return self._connection.execute(_pyformat(sql), parameters)
        except errors.IntegrityError as error:
            raise IntegrityViolation(error.diag.constraint_name, str(error)) from error


class _StaleConnection(psycopg.OperationalError):
    """A pooled connection found dead before anything that must not run twice reached the server: at a step's
    BEGIN, or during a one-statement read. The caller replaces the connection and sends it again."""


@contextlib.contextmanager
def _stale_if_broken(connection: Connection) -> Iterator[None]:
    """Turn an OperationalError that left `connection` broken into `_StaleConnection`."""
    try:
        yield
    except psycopg.OperationalError as error:
        if connection.broken:
            raise _StaleConnection(str(error)) from error
        raise


def _retryable(error: BaseException) -> bool:
    """Whether PostgreSQL aborted the step only because a concurrent writer interleaved with it."""
    if isinstance(error, errors.DeadlockDetected):  # e.g. two steps locking the same accounts in turn
        return True
    # A unique key the step read as free and a concurrent writer then took; the step's own handling
    # (a StoreConflict) has already turned every race a caller must hear about into something else.
    return isinstance(error, IntegrityViolation) and isinstance(error.__cause__, errors.UniqueViolation)


def _migrate(connection: Connection, migrations: Sequence[Sequence[str]]) -> None:
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = 0 if row is None or row[0] is None else int(row[0])
        if current > len(migrations):
            raise RuntimeError(f"database schema version {current} is newer than this code ({len(migrations)})")
        for version, statements in enumerate(migrations[current:], start=current + 1):
            for statement in statements:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))


class PostgresBillerStore(SqlBillerStore):
    """`BillerStore` on a PostgreSQL database. Create it with `await PostgresBillerStore.open(dsn)`."""

    MIGRATIONS: ClassVar[Sequence[Sequence[str]]] = MIGRATIONS

    def __init__(self, dsn: str, pool_size: int = POOL_SIZE) -> None:
        self._dsn = dsn
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="parley-postgres")
        self._pool: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._pool_size = pool_size
        self._closed = False

    @classmethod
    async def open(cls, dsn: str, pool_size: int = POOL_SIZE) -> Self:
        """Connect to the database at `dsn` and bring its schema up to date."""
        store = cls(dsn, pool_size)
        try:
            await asyncio.get_running_loop().run_in_executor(store._executor, store._connect_all)
        except BaseException:
            store._close_all()
            raise
        return store

    async def close(self) -> None:
        """Close the pool's connections; the store is unusable afterwards."""
        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_all)
        self._executor.shutdown(wait=True)

    # --- plumbing: everything below `_call` runs on a worker thread ---

    def _connect(self) -> Connection:
        # autocommit: transactions are begun and ended explicitly, each at its own isolation level.
        return psycopg.connect(self._dsn, autocommit=True)

    def _connect_all(self) -> None:
        first = self._connect()
        self._pool.put(first)
        _migrate(first, self.MIGRATIONS)
        for _ in range(self._pool_size - 1):
            self._pool.put(self._connect())

    def _close_all(self) -> None:
        while not self._pool.empty():
            self._pool.get().close()

    async def _call(self, fn: Callable[[Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._with_connection, fn)

    def _with_connection(self, fn: Callable[[Connection], T]) -> T:
        # As many workers as connections: a worker always finds one free.
        connection = self._pool.get_nowait()
        try:
            if connection.broken or connection.closed:
                connection = self._reconnect(connection)
            try:
                return fn(connection)
            except _StaleConnection:  # the server restarted or dropped it while idle: nothing was sent
                connection = self._reconnect(connection)
                return fn(connection)
        finally:
            self._pool.put(connection)

    def _reconnect(self, connection: Connection) -> Connection:
        connection.close()
        return self._connect()

    def _transaction(self, connection: Connection, fn: Callable[[Db], T], *, write: bool) -> T:
        begin = "BEGIN ISOLATION LEVEL READ COMMITTED" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        attempt = 1
        while True:
            with _stale_if_broken(connection):
                connection.execute(begin)
            try:
                result = fn(PostgresDb(connection))
                connection.execute("COMMIT")
            except BaseException as error:
                if not connection.broken:
                    connection.execute("ROLLBACK")
                if attempt == MAX_ATTEMPTS or not _retryable(error):
                    raise
                backoff = min(MAX_RETRY_BACKOFF_SECONDS, RETRY_BACKOFF_SECONDS * 2**attempt)
                time.sleep(random.uniform(0, backoff))  # noqa: S311 - jitter, not secrecy
                attempt += 1
                continue
            return result

    async def _in_write(self, fn: Callable[[Db], T]) -> T:
        return await self._call(lambda connection: self._transaction(connection, fn, write=True))

    async def _in_read(self, fn: Callable[[Db], T]) -> T:
        return await self._call(lambda connection: self._transaction(connection, fn, write=False))

    async def _in_statement(self, fn: Callable[[Db], T]) -> T:
        return await self._call(lambda connection: self._statement(connection, fn))

    @staticmethod
    def _statement(connection: Connection, fn: Callable[[Db], T]) -> T:
        # Autocommit: the statement is its own transaction, one round trip instead of three.
        with _stale_if_broken(connection):
            return fn(PostgresDb(connection))

    async def _erased(self) -> None:
        # Rewrites the (small) table, so the deleted rows leave its files; outside any transaction.
        await self._call(lambda connection: connection.execute("VACUUM FULL disclosures"))


__all__ = ["MIGRATIONS", "POOL_SIZE", "PostgresBillerStore"]
