"""Red team issue 13 item 9: store files and private keys are the owner's only (docs/SECURITY.md, "Files at rest")."""

from __future__ import annotations

import asyncio
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.protocol.keys import InsecureKeyFileError
from agent.stores.biller_sqlite import SqliteBillerStore
from agent.stores.files import check_private_file, load_or_create_secret

SUFFIXES = ("", "-wal", "-shm", "-lock")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _write_once(path: Path, account_id: str = "acct-1") -> None:
    store = await SqliteBillerStore.open(path)
    try:
        await store.create_account(account_id, "Alice", datetime(2026, 1, 1, tzinfo=UTC))
        for suffix in SUFFIXES:  # while open, SQLite's companions exist
            assert mode(Path(f"{path}{suffix}")) == 0o600, suffix
    finally:
        await store.close()


def test_sqlite_files_are_created_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        asyncio.run(_write_once(tmp_path / "biller.sqlite"))
    finally:
        os.umask(previous)


def test_sqlite_files_left_world_readable_are_tightened_on_open(tmp_path: Path) -> None:
    path = tmp_path / "biller.sqlite"
    asyncio.run(_write_once(path))
    for suffix in SUFFIXES:
        file = Path(f"{path}{suffix}")
        if file.exists():
            file.chmod(0o644)
    asyncio.run(_write_once(path, "acct-2"))
    assert mode(path) == 0o600


def test_a_private_key_file_open_to_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "tls.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)
    with pytest.raises(InsecureKeyFileError, match="chmod 600"):
        check_private_file(key)
    key.chmod(0o600)
    assert check_private_file(key).startswith(b"-----BEGIN")


def test_the_enrolment_secret_is_made_once_owner_only_and_refused_when_shared(tmp_path: Path) -> None:
    path = tmp_path / "enrolment.secret"
    secret = load_or_create_secret(path)
    assert len(secret) == 32
    assert mode(path) == 0o600
    assert load_or_create_secret(path) == secret
    assert [p.name for p in tmp_path.iterdir()] == ["enrolment.secret"]  # no temporary file left behind
    path.chmod(0o640)
    with pytest.raises(InsecureKeyFileError):
        load_or_create_secret(path)
