"""Storage: the `BillerStore` and `ConsumerStore` interfaces (`base`), their SQLite back ends, and the
biller's PostgreSQL back end (`postgres`, needing the `postgres` extra); `open_biller_store` picks one.

The interfaces and back ends are loaded on first use, so a consumer does not pay for the biller's SQL
at start-up (each name is served from its module by `__getattr__`)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from agent.lazy import served_lazily

if TYPE_CHECKING:
    from agent.stores.base import AlreadyExists, BillerStore, BillStatus, ConsumerStore, StoreConflict, ThreadOutcome
    from agent.stores.biller_sql import SqlBillerStore
    from agent.stores.biller_sqlite import SqliteBillerStore
    from agent.stores.consumer_sqlite import SqliteConsumerStore

_HOMES = {
    "AlreadyExists": "agent.stores.base",
    "BillStatus": "agent.stores.base",
    "BillerStore": "agent.stores.base",
    "ConsumerStore": "agent.stores.base",
    "StoreConflict": "agent.stores.base",
    "ThreadOutcome": "agent.stores.base",
    "SqlBillerStore": "agent.stores.biller_sql",
    "SqliteBillerStore": "agent.stores.biller_sqlite",
    "SqliteConsumerStore": "agent.stores.consumer_sqlite",
}


__getattr__ = served_lazily(__name__, _HOMES)


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"


class StoreOpenError(OSError):
    """The store could not be opened: the database is unreachable, refuses us, or the file is not a database.

    One line naming the store (a URL without its password) and the cause, for a person to act on."""


def _redacted(location: str) -> str:
    """`location` without a password, to quote it in a message."""
    scheme, separator, rest = location.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not separator or not at or ":" not in credentials:
        return location
    return f"{scheme}://{credentials.partition(':')[0]}:***@{host}"


def check_store_location(location: str) -> str:
    """`location` if `open_biller_store` can open it (a path, sqlite:/// or postgresql://); else ValueError."""
    if "://" in location and not location.startswith((*POSTGRES_SCHEMES, SQLITE_SCHEME)):
        scheme = location.partition("://")[0]
        raise ValueError(f"unknown store URL scheme {scheme!r}: use a path, sqlite:///PATH or postgresql://...")
    return location


async def open_biller_store(location: str | os.PathLike[str]) -> SqlBillerStore:
    """Open the biller store at `location`, bringing its schema up to date; close it with `await store.close()`.

    - `postgresql://user:password@host:port/db` (or `postgres://`; any libpq URL, e.g. `?host=/socket/dir`):
      PostgreSQL, which several biller replicas may share (`agent.stores.biller_postgres`);
    - `sqlite:///relative/path`, `sqlite:////absolute/path`, or a plain path: one SQLite file.

    ValueError for any other URL scheme; StoreOpenError (an OSError) when the store cannot be opened.
    """
    text = check_store_location(os.fspath(location))
    if text.startswith(POSTGRES_SCHEMES):
        try:
            from psycopg import OperationalError  # noqa: PLC0415 - psycopg only when asked for

            from agent.stores.biller_postgres import PostgresBillerStore  # noqa: PLC0415
        except ImportError as error:
            missing = "a PostgreSQL store needs the postgres extra: pip install 'parley[postgres]'"
            raise StoreOpenError(f"{missing} ({error})") from error

        try:
            return await PostgresBillerStore.open(text)
        except OperationalError as error:  # unreachable, refused, wrong password, no such database
            cause = " ".join(str(error).split())  # libpq's message spans lines
            raise StoreOpenError(f"cannot open the PostgreSQL store {_redacted(text)}: {cause}") from error
    from agent.stores.biller_sqlite import SqliteBillerStore  # noqa: PLC0415 - see the module docstring

    path = Path(text.removeprefix(SQLITE_SCHEME))
    try:
        return await SqliteBillerStore.open(path)
    except sqlite3.DatabaseError as error:  # "file is not a database", "unable to open database file"...
        raise StoreOpenError(f"cannot open the SQLite store {path}: {error}") from error


async def open_consumer_store(path: str | os.PathLike[str]) -> SqliteConsumerStore:
    """Open the consumer store (one SQLite file), bringing its schema up to date.

    StoreOpenError (an OSError) naming the file when it is not a usable database: nothing in it is changed.
    """
    from agent.stores.consumer_sqlite import SqliteConsumerStore  # noqa: PLC0415 - see the module docstring

    try:
        return await SqliteConsumerStore.open(path)
    except sqlite3.DatabaseError as error:  # "file is not a database", "database disk image is malformed"...
        raise StoreOpenError(
            f"cannot open the SQLite store {os.fspath(path)}: {error}; restore it from a backup (it holds the "
            "household's agreements, payments and enrolments)"
        ) from error


__all__ = [
    "AlreadyExists",
    "BillStatus",
    "BillerStore",
    "ConsumerStore",
    "SqlBillerStore",
    "SqliteBillerStore",
    "SqliteConsumerStore",
    "StoreConflict",
    "StoreOpenError",
    "ThreadOutcome",
    "check_store_location",
    "open_biller_store",
    "open_consumer_store",
]
