"""`--json` means one thing on every `parley` command: the command's JSON document on stdout.

`--json` prints the document on stdout, and the command's other output then goes
to stderr (agent/cli.py), so `parley bench --json | jq .` works; `--json-out
FILE` writes it to a file instead, beside the usual output. `--json FILE`, the
old form of demo, bench, chaos, fuzz, conformance and mutate, still writes FILE but says it is
deprecated: a script that used it keeps working and learns the new spelling.
Either file is checked when the arguments are parsed (agent/tools/paths.py): a
destination that cannot be written is refused before the command's work, not
after it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from agent.tools.paths import output_file_argument

STDOUT = "-"


def _json_value(text: str) -> str:
    """`--json`'s value: STDOUT, or the deprecated FILE, checked as --json-out FILE is."""
    if text != STDOUT:
        output_file_argument(text)
    return text


def add_json_options(parser: argparse.ArgumentParser, what: str) -> None:
    """`--json` (stdout; the deprecated `--json FILE` writes FILE) and `--json-out FILE`, for `what`."""
    parser.add_argument(
        "--json",
        nargs="?",
        const=STDOUT,
        type=_json_value,
        metavar="FILE",
        help=f"print {what} as JSON on stdout (other output goes to stderr); `--json FILE` is deprecated: use "
        "--json-out FILE",
    )
    parser.add_argument("--json-out", type=output_file_argument, metavar="FILE", help=f"write {what} as JSON to FILE")


def json_on_stdout(args: argparse.Namespace) -> bool:
    """Whether stdout carries JSON (`--json`: a switch on verify, codes and vectors, STDOUT here), so that the
    command's console must speak on stderr."""
    return getattr(args, "json", None) in (True, STDOUT)


def wants_json(args: argparse.Namespace) -> bool:
    """Whether the command was asked for its JSON document anywhere (so it must build one)."""
    return bool(args.json or args.json_out)


def emit_json(args: argparse.Namespace, document: object, out: Console) -> None:
    """Print and/or write `document` as the options say."""
    text = json.dumps(document, indent=2) + "\n"
    if args.json == STDOUT:
        print(text, end="", flush=True)
    elif args.json:
        Path(args.json).write_text(text, encoding="utf-8")
        out.print(
            f"note: --json FILE is deprecated, use --json-out {args.json} (--json alone prints JSON on stdout)",
            style="yellow",
            markup=False,
            highlight=False,
        )
    if args.json_out is not None:
        args.json_out.write_text(text, encoding="utf-8")


__all__ = ["STDOUT", "add_json_options", "emit_json", "json_on_stdout", "wants_json"]
