"""Throwaway directories for whole conformance runs: on tmpfs (/dev/shm) when the machine has one.

The stores commit with `synchronous=FULL`; a suite run commits thousands of times (the reference biller's
upkeep claims a lease per account on every clock step; each consumer scenario has a biller store and a client
store of its own), and on a disk those fsyncs are a large part of its time: a biller suite run took 28 s on
disk and 17 s on tmpfs, a consumer suite run 79 s and 40 s (2 loaded cores). The stores, their transactions
and their settings are the same on tmpfs; only the disk under them is faster.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMPFS = Path("/dev/shm")  # a private directory under it per run, removed after the run


def scratch_root() -> str | None:
    """Where a run's throwaway directory goes: tmpfs when the machine has one, else the default."""
    return str(TMPFS) if TMPFS.is_dir() and os.access(TMPFS, os.W_OK) else None


@contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A new private directory under `scratch_root()`, removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=scratch_root()) as directory:
        yield Path(directory)
