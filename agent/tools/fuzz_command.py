"""`parley fuzz` on the command line: its options here, the fuzzer itself (`agent.tools.fuzz`) only when it runs.

The fuzzer is built on hypothesis, which takes a tenth of a second to import:
kept out of the CLI's import path, every other `parley` command starts without it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from parley.v1 import biller_service_pb2

RPCS: tuple[str, ...] = tuple(m.name for m in biller_service_pb2.DESCRIPTOR.services_by_name["BillerService"].methods)


def add_fuzz_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`parley fuzz`."""
    fuzz = commands.add_parser(
        "fuzz", help="fuzz every BillerService RPC on a live biller with malformed and hostile inputs"
    )
    fuzz.add_argument("--seconds", type=float, default=20.0, help="how long to fuzz (default: %(default)s)")
    fuzz.add_argument("--seed", type=int, default=0, help="hypothesis seed (default: %(default)s)")
    fuzz.add_argument("--rpc", action="append", choices=RPCS, help="fuzz only this RPC; repeatable")
    fuzz.add_argument("--json", dest="json_path", type=Path, metavar="FILE", help="also write the report as JSON")
    fuzz.set_defaults(handler=_fuzz_command)


def _fuzz_command(args: argparse.Namespace, out: Console) -> int:
    from agent.tools.fuzz import fuzz_command  # noqa: PLC0415 - hypothesis is imported for this command only

    return fuzz_command(args, out)


__all__ = ["RPCS", "add_fuzz_command"]
