"""The `parley` command line: it only composes the commands, each defined beside what it runs.

    parley --version                print Parley's version (agent/version.py)
    parley --debug COMMAND ...      show the full trace of an unexpected error (by default: one line, and
                                    the trace written to a file whose path that line names)
    parley demo [--out DIR] [--json | --json-out FILE]
                                    two billers, six households, three simulated months over gRPC + TLS;
                                    every agreement bundle written and verified offline (agent/tools/demo.py)
    parley keygen --out FILE        make an Ed25519 signing key, mode 0600 (agent/tools/keygen.py)
    parley certs --out DIR [--host NAME] [--ip ADDRESS] [--client NAME]
                                    make a development CA and TLS certificates (agent/tools/certs.py)
    parley verify BUNDLE.json [--pin PARTY=FINGERPRINT] [--json]
                                    verify an agreement bundle offline (agent/tools/verify.py)
    parley vectors [--out FILE] [--json]
                                    judge the shipped test vectors, or write them out (agent/tools/vectors_command.py)
    parley biller init | serve | codes | rotate-key | check-config
                                    the reference biller (reference_biller/cli.py)
    parley consumer run --config FILE [--state-dir DIR] [--once] [--approve-all | --deny-all]
                                    the reference consumer bot for one household (reference_consumer/runner.py)
    parley conformance biller | consumer
                                    the conformance suites (agent/conformance)
    parley chaos [--kills N] [...]  SIGKILL a loaded reference biller N times; nothing acknowledged is lost
                                    (agent/tools/chaos.py)
    parley fuzz [--seconds N] [...] fuzz every BillerService RPC on a live biller (agent/tools/fuzz_command.py)
    parley bench [--seconds N] [...]
                                    complete negotiations/s against a bare signed-RPC baseline
                                    (agent/tools/bench.py, docs/PERFORMANCE.md)

Each module registers its command with an `add_..._command(s)` function whose
handler takes the parsed arguments and a Rich console and returns the exit
status: 0 done, 1 failed (or the verdict is negative), 2 unusable input or bad
usage. A handler reports the mistakes it expects in one line; anything that
escapes it is caught here, said in one line with the path of a file holding the
full trace (exit 1), and shown whole only with `--debug`. `--json` means one
thing everywhere: JSON on stdout (the console then speaks on stderr);
`--json-out FILE` writes it to a file instead (agent/tools/json_output.py).
When the output is not a terminal it is not cut at 80 columns. A command that
will log JSON (`biller serve --log-format json`, reference_biller/preflight.py)
gets GRPC_VERBOSITY=NONE before gRPC is imported, unless the user set it or
GRPC_TRACE, so that gRPC's own text lines stay out of the JSON stream.

The library (agent/protocol, biller, consumer, stores, transport) never
imports this module, the tools or the reference apps: they sit above it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from agent.logs import quiet_grpc_core
from agent.tools.json_output import json_on_stdout
from agent.version import __version__
from reference_biller.preflight import logs_json

# The commands, in the order `parley --help` lists them: the module that registers each, and its function.
COMMANDS: dict[str, tuple[str, str]] = {
    "keygen": ("agent.tools.keygen", "add_keygen_command"),
    "verify": ("agent.tools.verify", "add_verify_command"),
    "vectors": ("agent.tools.vectors_command", "add_vectors_command"),
    "demo": ("agent.tools.demo", "add_demo_command"),
    "certs": ("agent.tools.certs", "add_certs_command"),
    "biller": ("reference_biller.cli", "add_biller_commands"),  # init | serve | codes | rotate-key | check-config
    "consumer": ("reference_consumer.runner", "add_consumer_commands"),  # run
    "conformance": ("agent.conformance", "add_conformance_commands"),  # biller | consumer
    "bench": ("agent.tools.bench", "add_bench_command"),
    "chaos": ("agent.tools.chaos", "add_chaos_command"),
    "fuzz": ("agent.tools.fuzz_command", "add_fuzz_command"),
    "mutate": ("agent.tools.mutate", "add_mutate_command"),  # agent/tools/mutate.py
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command` (one of COMMANDS), only that command, whose module alone is imported."""
    # The commands are imported here, not above, because they import gRPC: `main` first decides, from the
    # raw arguments, whether gRPC's C core must be quiet for a JSON log stream (agent/logs.py).
    parser = argparse.ArgumentParser(prog="parley", description="Parley: bots settling bills with bots.")
    parser.add_argument("--version", action="version", version=f"parley {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full trace of an unexpected error (also after the command)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, register) in COMMANDS.items():
        if command in (None, name):
            getattr(importlib.import_module(module), register)(commands)
    return parser


WIDE_OUTPUT_COLUMNS = 200
"""Console width when the output is a file or a pipe: Rich would otherwise cut lines at 80 columns, splitting
fingerprints and table cells that scripts and logs need whole."""

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


def _console(on_stderr: bool) -> Console:
    """Rich output on stdout, or on stderr when stdout carries JSON; wide and unwrapped when not a terminal."""
    console = Console(stderr=on_stderr)
    if console.is_terminal:
        return console
    return Console(stderr=on_stderr, width=WIDE_OUTPUT_COLUMNS, soft_wrap=True)


def _write_trace(error: BaseException) -> Path | None:
    """The full trace of `error` in a new file of the temporary directory; None if even that fails."""
    trace = "".join(traceback.format_exception(error))
    try:
        descriptor, name = tempfile.mkstemp(prefix="parley-error-", suffix=".txt")
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(f"parley {__version__}: {' '.join(sys.argv)}\n{trace}")
    except OSError:
        return None
    return Path(name)


def _unexpected(error: BaseException, debug: bool) -> int:
    """One line for an error no handler expected: what it was and where its trace went (or the trace itself)."""
    if debug:
        traceback.print_exception(error)
    summary = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
    if debug:
        print(f"parley: unexpected error: {summary}", file=sys.stderr)
        return EXIT_FAILED
    written = _write_trace(error)
    where = f"the full trace is in {written}" if written else "run again with --debug for the full trace"
    print(f"parley: unexpected error: {summary} ({where}; please report it)", file=sys.stderr)
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments  # accepted before or after the command
    arguments = [argument for argument in arguments if argument != "--debug"]
    if logs_json(arguments, os.environ):
        quiet_grpc_core()  # before build_parser imports gRPC: its core's text lines would break the JSON
    # Only the named command's module is imported: all of them cost a process ~0.5 s of CPU more, which every
    # client the consumer suite starts would pay. Help and an unknown command get the whole command line.
    parser = build_parser(arguments[0] if arguments and arguments[0] in COMMANDS else None)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:  # argparse exits 2 on bad usage, which is our "unusable input" too
        return int(exit_.code or 0)
    try:
        status: int = args.handler(args, _console(json_on_stdout(args)))
    except KeyboardInterrupt:
        print("parley: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # the last line of defence: one line, never a raw trace by default
        return _unexpected(error, debug)
    return status


__all__ = ["build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
