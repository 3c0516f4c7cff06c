"""The embedded SQLite back end of `BillerStore`.

The durability and concurrency choices (WAL with `synchronous=FULL`, one worker
thread owning the connection, `BEGIN IMMEDIATE` writes, migrations recorded in
`schema_version`) are those of every Parley SQLite store: see
`agent.stores.sqlite_base`. The store's rules, in SQL shared with the
PostgreSQL back end, are in `agent.stores.biller_sql`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from agent.stores.biller_sql import ColumnTypes, Db, IntegrityViolation, SqlBillerStore, migrations, unique_key
from agent.stores.sqlite_base import SqliteStore

T = TypeVar("T")

logger = logging.getLogger("parley.store")

MIGRATIONS = migrations(
    ColumnTypes(blob="BLOB", time="TEXT", boolean="INTEGER", false="0", integer="INTEGER", rowid="")
)


class SqliteDb:
    """A `Db` over an open SQLite transaction: constraint errors become `IntegrityViolation`."""

    for_update = ""  # BEGIN IMMEDIATE: the write transaction already excludes every other writer

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> sqlite3.Cursor:
        try:
            return self._connection.execute(sql, parameters)
        except sqlite3.IntegrityError as error:
            raise IntegrityViolation(_constraint_name(str(error)), str(error)) from error


def _constraint_name(message: str) -> str | None:
    """PostgreSQL's name for the UNIQUE constraint in SQLite's "UNIQUE constraint failed: t.a, t.b"."""
    prefix = "UNIQUE constraint failed: "
    if not message.startswith(prefix):
        return None
    qualified = [column.strip().split(".") for column in message.removeprefix(prefix).split(",")]
    return unique_key(qualified[0][0], *(column for _, column in qualified))


class SqliteBillerStore(SqliteStore, SqlBillerStore):
    """`BillerStore` on one SQLite file. Create it with `await SqliteBillerStore.open(path)`."""

    MIGRATIONS = MIGRATIONS

    async def _in_write(self, fn: Callable[[Db], T]) -> T:
        return await self._write(lambda connection: fn(SqliteDb(connection)))

    async def _in_read(self, fn: Callable[[Db], T]) -> T:
        return await self._read(lambda connection: fn(SqliteDb(connection)))

    async def _in_statement(self, fn: Callable[[Db], T]) -> T:
        return await self._statement(lambda connection: fn(SqliteDb(connection)))

    async def _erased(self) -> None:
        # secure_delete overwrote the rows in the WAL; the checkpoint truncates the WAL itself.
        if not await self._call(self._checkpoint):
            # A reader pinned the WAL for the whole busy timeout; the next complete checkpoint (the next
            # retention purge, or closing the store) removes the erased bytes. Operators should know.
            logger.warning(
                "erasure: WAL checkpoint incomplete (a reader holds the WAL); erased data stays in %s-wal "
                "until the next complete checkpoint",
                self._path,
            )
