"""`parley verify BUNDLE.json`: verify an agreement bundle offline and show what was agreed.

Exits 0 when the bundle is valid, 1 when it is invalid (the reason is printed),
2 when the input is unusable (unreadable, not a bundle, bad usage). `--pin
PARTY=FINGERPRINT` requires a party's key set chain to start at that identity;
`--json` also prints the verdict as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.protocol.agreement import Agreement, Bundle, UnusableBundleError, verify_bundle
from agent.protocol.errors import ProtocolError
from agent.protocol.terms import format_date

EXIT_VALID, EXIT_INVALID, EXIT_UNUSABLE = 0, 1, 2


def _parse_pins(pins: Sequence[str]) -> dict[str, bytes]:
    parsed = {}
    for pin in pins:
        party, _, fingerprint = pin.partition("=")
        try:
            parsed[party] = bytes.fromhex(fingerprint)
        except ValueError as error:
            raise UnusableBundleError(f"--pin {pin!r}: the fingerprint must be hex") from error
    return parsed


def _summary(agreement: Agreement, out: Console) -> None:
    bill, terms = agreement.bill, agreement.terms
    out.print("[bold green]VALID[/bold green] agreement, verified offline")
    parties = Table(title="Parties", show_header=True)
    for column in ("role", "party", "identity fingerprint", "key set version"):
        parties.add_column(column)
    for role, chain in (("biller", agreement.biller), ("consumer", agreement.consumer)):
        parties.add_row(role, chain.party_id, chain.fingerprint.hex(), str(chain.latest.version))
    out.print(parties)
    out.print(
        f"Bill [bold]{bill.bill_id}[/bold] on account {bill.account_id}: {bill.amount_due} "
        f"due {format_date(bill.due_date)} — {bill.description}"
    )
    offer, accept = agreement.offer.header, agreement.accept.header
    out.print(
        f"Terms: [bold]{terms.kind.name}[/bold], offered by {offer.sender} (message {offer.sequence}), "
        f"accepted by {accept.sender} (message {accept.sequence}) of {len(agreement.thread)}"
    )
    if terms.hardship_programme_id:
        out.print(f"Hardship programme: {terms.hardship_programme_id}")
    lines = Table(title="Amounts")
    lines.add_column("item")
    lines.add_column("amount", justify="right")
    lines.add_row("principal", str(terms.principal))
    for line in terms.lines:
        lines.add_row(f"{line.kind.name.lower()}: {line.description}", str(line.amount))
    lines.add_row("[bold]total[/bold]", f"[bold]{terms.total}[/bold]")
    out.print(lines)
    schedule = Table(title="Schedule")
    for column in ("#", "due date", "amount"):
        schedule.add_column(column, justify="right")
    for number, instalment in enumerate(terms.schedule, start=1):
        schedule.add_row(str(number), format_date(instalment.due_date), str(instalment.amount))
    out.print(schedule)


def _verify(args: argparse.Namespace, out: Console) -> int:
    try:
        bundle = Bundle.load(Path(args.bundle))
        agreement = verify_bundle(bundle, pins=_parse_pins(args.pin))
    except UnusableBundleError as error:
        out.print(f"[bold yellow]UNUSABLE[/bold yellow] {error}")
        if args.json:
            print(json.dumps({"verdict": "unusable", "detail": str(error)}))
        return EXIT_UNUSABLE
    except ProtocolError as error:
        out.print(f"[bold red]INVALID[/bold red] {error.reason.name}: {error.detail}")
        if args.json:
            print(json.dumps({"verdict": "invalid", "reason": error.reason.name, "detail": error.detail}))
        return EXIT_INVALID
    if args.json:
        print(
            json.dumps({"verdict": "valid", "bill_id": agreement.bill.bill_id, "accept": agreement.accept.digest.hex()})
        )
    else:
        _summary(agreement, out)
    return EXIT_VALID


def add_verify_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `parley verify` on the `parley` command's subparsers."""
    verify = commands.add_parser("verify", help="verify an agreement bundle offline")
    verify.add_argument("bundle", help="a parley-bundle/1 JSON file")
    verify.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="PARTY=FINGERPRINT",
        help="require PARTY's key set chain to start at this identity fingerprint (hex); repeatable",
    )
    verify.add_argument("--json", action="store_true", help="also print the verdict as one JSON line on stdout")
    verify.set_defaults(handler=_verify)


__all__ = ["EXIT_INVALID", "EXIT_UNUSABLE", "EXIT_VALID", "add_verify_command"]
