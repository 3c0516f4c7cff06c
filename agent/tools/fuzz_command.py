"""`parley fuzz` on the command line: its options here, the fuzzer itself (`agent.tools.fuzz`) only when it runs.

The fuzzer is built on hypothesis, which takes a tenth of a second to import:
kept out of the CLI's import path, every other `parley` command starts without it.
hypothesis comes with the `fuzz` extra (`pip install 'parley[fuzz]'`; `dev` has
it too): without it, `parley fuzz` says how to install it.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from agent.tools.json_output import add_json_options
from agent.tools.numbers import number_argument
from parley.v1 import biller_service_pb2

EXIT_UNUSABLE = 2
MAX_FUZZ_SECONDS = 86_400.0  # a day
RPCS: tuple[str, ...] = tuple(m.name for m in biller_service_pb2.DESCRIPTOR.services_by_name["BillerService"].methods)


def add_fuzz_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`parley fuzz`."""
    fuzz = commands.add_parser(
        "fuzz", help="fuzz every BillerService RPC on a live biller with malformed and hostile inputs"
    )
    fuzz.add_argument(
        "--seconds",
        type=number_argument(float, 0, MAX_FUZZ_SECONDS, above_low=True),
        default=20.0,
        help="how long to fuzz (default: %(default)s)",
    )
    fuzz.add_argument("--seed", type=int, default=0, help="hypothesis seed (default: %(default)s)")
    fuzz.add_argument("--rpc", action="append", choices=RPCS, help="fuzz only this RPC; repeatable")
    add_json_options(fuzz, "the report")
    fuzz.set_defaults(handler=_fuzz_command)


def _fuzz_command(args: argparse.Namespace, out: Console) -> int:
    try:
        from agent.tools.fuzz import fuzz_command  # noqa: PLC0415 - hypothesis is imported for this command only
    except ModuleNotFoundError as error:
        if error.name != "hypothesis":
            raise
        out.print(
            "parley fuzz needs hypothesis, which the fuzz extra installs: pip install 'parley[fuzz]'",
            style="red",
            markup=False,
            highlight=False,
        )
        return EXIT_UNUSABLE
    return fuzz_command(args, out)


__all__ = ["RPCS", "add_fuzz_command"]
