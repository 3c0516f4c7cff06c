"""Storage: the `BillerStore` and `ConsumerStore` interfaces (`base`), their SQLite back ends, and the
biller's PostgreSQL back end (`postgres`, needing the `postgres` extra); `open_biller_store` picks one."""

from __future__ import annotations

import os
from pathlib import Path

from agent.stores.base import AlreadyExists, BillerStore, BillStatus, ConsumerStore, StoreConflict, ThreadOutcome
from agent.stores.biller_sql import SqlBillerStore
from agent.stores.biller_sqlite import SqliteBillerStore
from agent.stores.consumer_sqlite import SqliteConsumerStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"


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

    ValueError for any other URL scheme.
    """
    text = check_store_location(os.fspath(location))
    if text.startswith(POSTGRES_SCHEMES):
        from agent.stores.biller_postgres import PostgresBillerStore  # noqa: PLC0415 - psycopg only when asked for

        return await PostgresBillerStore.open(text)
    return await SqliteBillerStore.open(Path(text.removeprefix(SQLITE_SCHEME)))


__all__ = [
    "AlreadyExists",
    "BillStatus",
    "BillerStore",
    "ConsumerStore",
    "SqlBillerStore",
    "SqliteBillerStore",
    "SqliteConsumerStore",
    "StoreConflict",
    "ThreadOutcome",
    "check_store_location",
    "open_biller_store",
]
