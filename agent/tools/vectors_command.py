"""`parley vectors [--out FILE] [--schema] [--json]`: judge every shipped test vector, or hand them out.

The vectors (docs/VECTORS.md, `agent/vectors.py`) are what an implementation in
another language checks itself against; `--out FILE` writes the document shipped
in this package, byte for byte, so it can be taken from an installed Parley.
Without `--out`, each case is judged by the code paths the agents use and
compared with its expected verdict: exit 0 when all agree, 1 otherwise (each
disagreement printed). `--schema` writes the document's JSON Schema
(agent/data/vectors.schema.json) instead. `--json` also prints the counts as one JSON line: it is
refused with `--out` and `--schema`, which judge nothing, so print no counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from agent import vectors
from agent.tools.paths import output_file_argument

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def _write(out_path: Path, out: Console, *, schema: bool) -> int:
    data = (vectors.schema_text() if schema else vectors.document_text()).encode()
    try:
        with out_path.open("xb") as file:  # never overwrites
            file.write(data)
    except OSError as error:
        out.print(f"[red]cannot write {escape(str(out_path))}: {escape(str(error))}[/red]")
        return EXIT_UNUSABLE
    what = "its JSON Schema" if schema else f"{vectors.SCHEMA}, {len(vectors.load()['tests'])} cases"
    out.print(f"wrote {escape(str(out_path))} ({what})")
    return EXIT_OK


def _vectors(args: argparse.Namespace, out: Console) -> int:
    if args.json and (args.out is not None or args.schema):
        out.print(
            "--json prints the counts of judging the vectors; --out and --schema judge nothing: leave out --json",
            style="red",
            markup=False,
            highlight=False,
        )
        return EXIT_UNUSABLE
    if args.out is not None:
        return _write(args.out, out, schema=args.schema)
    if args.schema:
        print(vectors.schema_text(), end="")
        return EXIT_OK
    document = vectors.load()
    disagreements = []
    for case in document["tests"]:
        verdict = vectors.judge(case, document)
        if verdict != (case["expected"], case["reason"]):
            disagreements.append(case["id"])
            out.print(
                f"[red]DISAGREES[/red] {escape(case['id'])} ({case['requirement']}): expected "
                f"{case['expected']} {case['reason'] or ''}, judged {verdict[0]} {verdict[1] or ''}",
                highlight=False,
            )
    total = len(document["tests"])
    out.print(f"{total - len(disagreements)} of {total} vectors judged as expected", highlight=False)
    if args.json:
        print(json.dumps({"cases": total, "agreed": total - len(disagreements), "disagreed": disagreements}))
    return EXIT_FAILED if disagreements else EXIT_OK


def add_vectors_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `parley vectors` on the `parley` command's subparsers."""
    command = commands.add_parser(
        "vectors",
        help="judge every shipped test vector with this library, or write them out for another implementation",
    )
    command.add_argument(
        "--out", type=output_file_argument, metavar="FILE", help="write the shipped vectors (JSON) to FILE instead"
    )
    command.add_argument("--schema", action="store_true", help="the JSON Schema of the vectors document instead")
    command.add_argument("--json", action="store_true", help="also print the counts as one JSON line on stdout")
    command.set_defaults(handler=_vectors)


__all__ = ["add_vectors_command"]
