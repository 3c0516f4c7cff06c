"""Read a store's SQLite file from outside, to check what a request did or did not write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

Dump = dict[str, list[tuple[object, ...]]]


def dump(path: Path, *, exclude: tuple[str, ...] = ()) -> Dump:
    """Every row of every table (but `exclude`), read through a separate connection, in a stable order."""
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {
            table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
            for table in tables
            if table not in exclude
        }
