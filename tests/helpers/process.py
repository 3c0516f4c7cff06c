"""`parley biller serve` as a child process, for tests that need the real command: started, read, always ended."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

BANNER_TIMEOUT = 30.0  # seconds for the child to print its "listening" line on a loaded 2-core machine


def lines_of(stream: object) -> queue.Queue[str]:
    """The lines of `stream`, read on a daemon thread so that a silent child cannot hang the test."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@contextmanager
def serving_process(
    arguments: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """Run `parley biller serve ARGUMENTS`; yield the process and its banner ("listening" -> "127.0.0.1:port (TLS)").

    stderr goes to `log`. The process is killed on the way out if the test has not stopped it.
    """
    command = [sys.executable, "-m", "agent.cli", "biller", "serve", *arguments]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        lines, banner = lines_of(process.stdout), {}
        while "listening" not in banner:
            name, _, value = lines.get(timeout=BANNER_TIMEOUT).partition(" ")
            banner[name] = value.strip()
        yield process, banner
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
