"""Files that hold secrets or private data: created 0600, refused when the group or others may read them.

Where this applies (docs/SECURITY.md, "Files at rest"): the SQLite store and its `-wal`, `-shm` and
`-lock` companions (`agent.stores.sqlite_base`), the biller's enrolment secret (ENR-8,
`load_or_create_secret`), and the TLS private key a reference agent loads (`check_private_file`). The
signing key has its own check with the same error (`SigningKey.load`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from agent.protocol.enrolment import SECRET_BYTES
from agent.protocol.keys import InsecureKeyFileError

PRIVATE_MODE = 0o600
_GROUP_OR_OTHER = 0o077


def _refuse_if_shared(path: Path, mode: int) -> None:
    if mode & _GROUP_OR_OTHER:
        raise InsecureKeyFileError(
            f"private file {path} has mode {stat.filemode(mode)}, open to group or others; run: chmod 600 {path}"
        )


def check_private_file(path: str | os.PathLike[str]) -> bytes:
    """The contents of a private file (a TLS private key, a secret); InsecureKeyFileError if the group or
    others have any access to it. The opened file is the one checked (fstat), so the check cannot be raced."""
    with open(path, "rb") as file:
        _refuse_if_shared(Path(path), os.fstat(file.fileno()).st_mode)
        return file.read()


def tighten(path: str | os.PathLike[str]) -> None:
    """Take the group's and others' access away from an existing file (no-op if it does not exist)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if mode & _GROUP_OR_OTHER:
        os.chmod(path, stat.S_IMODE(mode) & ~_GROUP_OR_OTHER)


def create_private(path: str | os.PathLike[str]) -> None:
    """Create `path` empty with mode 0600 if it does not exist, else tighten it to the owner only."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_MODE))
    except FileExistsError:
        tighten(path)


def load_or_create_secret(path: str | os.PathLike[str]) -> bytes:
    """The biller's enrolment secret (ENR-8): read from `path`, or made (32 random bytes, mode 0600) on
    first use. Kept outside the database, so a stolen database alone cannot test codes offline.
    InsecureKeyFileError if the file is open to group or others; ValueError if it is not a secret of ours.

    A new secret is written to a temporary file and linked into place, so two processes starting at once
    agree on one secret and neither reads a half-written file.
    """
    target = Path(path)
    if not target.exists():
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_MODE)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_bytes(SECRET_BYTES))
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
                os.link(temporary, target)
        finally:
            os.unlink(temporary)
    secret = check_private_file(target)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"{target} is not a {SECRET_BYTES}-byte secret")
    return secret


__all__ = [
    "PRIVATE_MODE",
    "check_private_file",
    "create_private",
    "load_or_create_secret",
    "tighten",
]
