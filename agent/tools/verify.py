"""`parley verify BUNDLE.json`: verify an agreement bundle offline and show what was agreed.

Exits 0 when the bundle is valid, 1 when it is invalid (the reason is printed),
2 when the input is unusable (unreadable, not a bundle, bad usage). `--pin
PARTY=FINGERPRINT` requires a party's key set chain to start at that identity
(the full 64-hex-digit fingerprint: a malformed or shortened one, or a PARTY
that is no party id, is a usage error, exit 2, never a "mismatch"); a real
mismatch shows the expected and the actual fingerprint in full. A file larger
than any bundle can be (MAX_BUNDLE_BYTES, agent/protocol/agreement.py) is
unusable input, refused unread. Without a pin for a party, the verdict says plainly
that its identity was not checked: the signatures are consistent with the key
sets carried in the bundle, but anyone can make a key set. `--json` prints the
verdict as one JSON line on stdout (the rest goes to stderr), with the parties
whose identity was and was not checked.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.protocol.agreement import Agreement, Bundle, UnusableBundleError, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import ProtocolError, Reason
from agent.protocol.limits import MAX_PARTY_ID_CHARS
from agent.protocol.messages import is_party_id
from agent.protocol.terms import format_date

EXIT_VALID, EXIT_INVALID, EXIT_UNUSABLE = 0, 1, 2
FINGERPRINT_BYTES = 32  # SHA-256 of key set version 1's PAE (KEY-12)
PLACEHOLDER_FINGERPRINT = bytes(FINGERPRINT_BYTES)
"""All zeros: what sample profiles carry until the biller's real fingerprint is filled in."""


class PinUsageError(ValueError):
    """A --pin that is not PARTY=FINGERPRINT with a full hex fingerprint: a typo, not a forged file."""


def _parse_pins(pins: Sequence[str]) -> dict[str, bytes]:
    parsed: dict[str, bytes] = {}
    expected = f"PARTY=FINGERPRINT, the fingerprint being {FINGERPRINT_BYTES * 2} hex digits"
    for pin in pins:
        party, separator, text = pin.partition("=")
        if not separator or not party:
            raise PinUsageError(f"--pin {pin!r}: expected {expected}")
        if not is_party_id(party):  # a typo can never match a bundle's party: say so, not PIN_MISMATCH
            raise PinUsageError(
                f"--pin {pin!r}: {party!r} is not a party id (1 to {MAX_PARTY_ID_CHARS} of A-Z a-z 0-9 . _ : -, HDR-13)"
            )
        try:
            fingerprint = bytes.fromhex(text)
        except ValueError:
            raise PinUsageError(f"--pin {pin!r}: the fingerprint is not hex; expected {expected}") from None
        if len(fingerprint) != FINGERPRINT_BYTES:
            raise PinUsageError(
                f"--pin {pin!r}: the fingerprint has {len(text)} hex digits, not {FINGERPRINT_BYTES * 2} "
                "(a shortened fingerprint checks nothing: give it whole)"
            )
        if parsed.get(party, fingerprint) != fingerprint:
            raise PinUsageError(f"--pin: two different fingerprints for {party!r}")
        parsed[party] = fingerprint
    return parsed


def _mismatches(bundle: Bundle, pins: dict[str, bytes]) -> list[str]:
    """For each pin that does not match: the party, the fingerprint expected and the one the bundle carries."""
    lines = []
    for party, expected in pins.items():
        chain = bundle.key_sets.get(party)
        if not chain:
            lines.append(f"{party}: no key set in the bundle (its parties: {', '.join(sorted(bundle.key_sets))})")
            continue
        actual = digest(chain[0])
        if actual != expected:
            placeholder = " (the all-zero placeholder: fill in the real fingerprint)" if not any(expected) else ""
            lines.append(f"{party}: expected {expected.hex()}{placeholder}\n  actual   {actual.hex()}")
    return lines


def _summary(agreement: Agreement, out: Console) -> None:
    bill, terms = agreement.bill, agreement.terms
    out.print("[bold green]VALID[/bold green] agreement, verified offline")
    parties = Table(title="Parties", show_header=True)
    for column in ("role", "party", "identity fingerprint", "key set version"):
        parties.add_column(column, overflow="fold")  # on a narrow terminal: folded, never cut with "…"
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
        pins = _parse_pins(args.pin)
    except PinUsageError as error:
        out.print(f"parley verify: {error}", markup=False, highlight=False)
        if args.json:
            print(json.dumps({"verdict": "unusable", "detail": str(error)}))
        return EXIT_UNUSABLE
    bundle: Bundle | None = None
    try:
        bundle = Bundle.load(Path(args.bundle))
        agreement = verify_bundle(bundle, pins=pins)
    except UnusableBundleError as error:
        out.print(f"[bold yellow]UNUSABLE[/bold yellow] {escape(str(error))}")
        if args.json:
            print(json.dumps({"verdict": "unusable", "detail": str(error)}))
        return EXIT_UNUSABLE
    except ProtocolError as error:
        out.print(f"[bold red]INVALID[/bold red] {error.reason.name}: {escape(error.detail)}")
        mismatches = _mismatches(bundle, pins) if bundle is not None and error.reason is Reason.PIN_MISMATCH else []
        for line in mismatches:
            out.print(line, markup=False, highlight=False)
        if args.json:
            refusal: dict[str, object] = {"verdict": "invalid", "reason": error.reason.name, "detail": error.detail}
            print(json.dumps(refusal | ({"pins": mismatches} if mismatches else {})))
        return EXIT_INVALID
    parties = [agreement.biller.party_id, agreement.consumer.party_id]
    unpinned = [party for party in parties if party not in pins]
    if args.json:
        verdict: dict[str, object] = {
            "verdict": "valid",
            "bill_id": agreement.bill.bill_id,
            "accept": agreement.accept.digest.hex(),
            "identities_checked": [party for party in parties if party in pins],
            "identities_not_checked": unpinned,
        }
        print(json.dumps(verdict))
    else:
        _summary(agreement, out)
    for party in parties:
        if party in pins:
            out.print(f"identity of {party}: checked against --pin", markup=False, highlight=False)
    if unpinned:
        out.print(
            f"[bold yellow]identity NOT checked[/bold yellow] for {escape(', '.join(unpinned))}: the signatures match "
            "the key sets inside the bundle, but anyone can make a key set. To check who signed, give "
            "--pin PARTY=FINGERPRINT with the fingerprint you trust (the biller's, as it printed it; your own)."
        )
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
        help="require PARTY's key set chain to start at this identity fingerprint (64 hex digits); repeatable; "
        "without it the party's identity is not checked",
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as one JSON line on stdout")
    verify.set_defaults(handler=_verify)


__all__ = ["EXIT_INVALID", "EXIT_UNUSABLE", "EXIT_VALID", "add_verify_command"]
