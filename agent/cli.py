"""The `parley` command line: it only composes the commands, each defined beside what it runs.

    parley --version                print Parley's version (agent/version.py)
    parley demo [--out DIR] [--json FILE]
                                    two billers, six households, three simulated months over gRPC + TLS;
                                    every agreement bundle written and verified offline (agent/tools/demo.py)
    parley keygen --out FILE        make an Ed25519 signing key, mode 0600 (agent/tools/keygen.py)
    parley certs --out DIR [--host NAME] [--ip ADDRESS] [--client NAME]
                                    make a development CA and TLS certificates (agent/tools/certs.py)
    parley verify BUNDLE.json [--pin PARTY=FINGERPRINT] [--json]
                                    verify an agreement bundle offline (agent/tools/verify.py)
    parley vectors [--out FILE] [--json]
                                    judge the shipped test vectors, or write them out (agent/tools/vectors_command.py)
    parley biller serve | codes | rotate-key | check-config
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
status. The library (agent/protocol, biller, consumer, stores, transport) never
imports this module, the tools or the reference apps: they sit above it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from agent.conformance import add_conformance_commands
from agent.tools.bench import add_bench_command
from agent.tools.certs import add_certs_command
from agent.tools.chaos import add_chaos_command
from agent.tools.demo import add_demo_command
from agent.tools.fuzz_command import add_fuzz_command
from agent.tools.keygen import add_keygen_command
from agent.tools.mutate import add_mutate_command
from agent.tools.vectors_command import add_vectors_command
from agent.tools.verify import add_verify_command
from agent.version import __version__
from reference_biller.cli import add_biller_commands
from reference_consumer.runner import add_consumer_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley: bots settling bills with bots.")
    parser.add_argument("--version", action="version", version=f"parley {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_keygen_command(commands)  # parley keygen
    add_verify_command(commands)  # parley verify
    add_vectors_command(commands)  # parley vectors
    add_demo_command(commands)  # parley demo
    add_certs_command(commands)  # parley certs
    add_biller_commands(commands)  # parley biller serve | codes | rotate-key | check-config
    add_consumer_commands(commands)  # parley consumer run
    add_conformance_commands(commands)  # parley conformance biller | consumer
    add_bench_command(commands)  # parley bench
    add_chaos_command(commands)  # parley chaos
    add_fuzz_command(commands)  # parley fuzz
    add_mutate_command(commands)  # parley mutate (agent/tools/mutate.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad usage, which is our "unusable input" too
        return int(exit_.code or 0)
    status: int = args.handler(args, Console(stderr=bool(getattr(args, "json", False))))
    return status


__all__ = ["build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
