"""The back-office commands of the reference biller: `parley biller backoffice | settle | import-statement`.

    parley biller backoffice --listen HOST:PORT (--token-file FILE | --tls-client-ca FILE)
                             [--tls-cert FILE --tls-key FILE | --insecure] [--config FILE] [--state-dir DIR]
                             [--store PATH|URL]
                                    serve parley.backoffice.v1.BackOfficeService for billing systems
    parley biller settle --reference REF --amount 12.34 --currency EUR [--date YYYY-MM-DD]
                         [--bank-reference TEXT] [--config FILE] [--state-dir DIR] [--store PATH|URL]
                                    record the settlement of the awaited payment with that reference
    parley biller import-statement FILE [--dry-run] [--json] [--config FILE] [--state-dir DIR] [--store PATH|URL]
                                    settle from an ISO 20022 camt.054 / camt.053 file

Each opens the biller's store beside a running `parley biller serve` (SQLite in
WAL mode takes writers from several processes in turn; PostgreSQL is shared by
design), so the serving biller need not stop. A consumer watching its events from
the serving process sees what these commands append within its watch poll
interval (5 s by default). docs/BACKOFFICE.md is the operator guide.

Exit codes: 0 done (for `import-statement`: the file was read, whatever each
credit's outcome; the report lists them), 1 refused or failed (`settle`: nothing
matched or the agent refused; `import-statement`: the file is not a usable
statement, nothing recorded), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from agent.clock import SystemClock
from agent.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from agent.protocol.errors import ProtocolError
from agent.protocol.terms import Money, parse_date
from reference_biller.backoffice import read_token_file, serve_backoffice
from reference_biller.config import SAMPLE, BillerConfig, ConfigError, load_config
from reference_biller.service import Biller, open_biller
from reference_biller.settings import SettingsError, config_file, resolve_state_dir, resolve_store
from reference_biller.statements import (
    Credit,
    ImportReport,
    Outcome,
    StatementError,
    import_statement,
    normalize_reference,
    settle_matched,
)

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2
MANUAL_REFERENCE_PREFIX = "manual:"


class _Unusable(Exception):
    """Bad usage or configuration, already worded for the operator (exit 2)."""


@dataclass(frozen=True)
class _Place:
    """Where the biller's state is: its configuration, state directory and store."""

    config: BillerConfig
    state_dir: Path
    store: str | None

    async def open(self) -> Biller:
        return await open_biller(self.config, self.state_dir, SystemClock(), store_location=self.store)


def _place(args: argparse.Namespace) -> _Place:
    path, _ = config_file(args.config)
    try:
        config = load_config(path or SAMPLE)
    except ConfigError as error:
        raise _Unusable(f"invalid configuration {error}") from None
    try:
        return _Place(
            config, resolve_state_dir(args.state_dir, config.server), resolve_store(args.store, config.server)
        )
    except SettingsError as error:
        raise _Unusable(str(error)) from None


def _failed(out: Console, message: str) -> None:
    out.print(message, style="red", markup=False, highlight=False, soft_wrap=True)


# --- parley biller backoffice ------------------------------------------------------------------------


def _backoffice(args: argparse.Namespace, out: Console) -> int:
    try:
        place = _place(args)
        token = None if args.token_file is None else read_token_file(Path(args.token_file))
        if token is not None and Path(args.token_file).stat().st_mode & 0o077:
            _failed(out, f"warning: {args.token_file} is readable by other users; chmod 600 it")
        if (args.tls_cert is None) != (args.tls_key is None):
            raise _Unusable("give --tls-cert and --tls-key together")
        tls = None if args.tls_cert is None else (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
        client_ca = None if args.tls_client_ca is None else Path(args.tls_client_ca).read_bytes()
    except _Unusable as error:
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except OSError as error:
        _failed(out, f"cannot read {error.filename}: {error.strerror}")
        return EXIT_UNUSABLE
    except ValueError as error:  # a token too short: said without the token itself
        _failed(out, str(error))
        return EXIT_UNUSABLE
    configure_logging(args.log_format or "text", args.log_level or "info")

    async def serve() -> None:
        biller = await place.open()
        try:
            server = await serve_backoffice(
                biller.agent,
                biller.store,
                args.listen,
                token=token,
                tls=tls,
                tls_client_ca=client_ca,
                insecure=args.insecure,
            )
            auth = " + ".join(name for name, on in (("bearer token", token), ("mutual TLS", client_ca)) if on)
            transport = "TLS" if tls else "plaintext, loopback only"
            host = args.listen.rpartition(":")[0]
            print(f"biller      {biller.agent.party_id}", flush=True)
            print(f"backoffice  {host}:{server.port} ({transport}; {auth})", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            await stop.wait()
            await server.stop()
        finally:
            await biller.close()

    try:
        asyncio.run(serve())
    except ValueError as error:  # never open, plaintext off loopback...
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except (OSError, RuntimeError) as error:
        _failed(out, f"the back office failed: {error}")
        return EXIT_FAILED
    return EXIT_OK


# --- parley biller settle ----------------------------------------------------------------------------


def _settle(args: argparse.Namespace, out: Console) -> int:
    try:
        place = _place(args)
        amount = Money.parse(args.amount, args.currency)
        booked = None if args.date is None else parse_date(args.date)
    except _Unusable as error:
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except ProtocolError as error:
        _failed(out, f"--amount/--currency/--date: {error.detail}")
        return EXIT_UNUSABLE
    bank_reference = args.bank_reference or normalize_reference(args.reference)
    credit = Credit(
        position="the command line",
        bank_reference=bank_reference,
        rail_reference=MANUAL_REFERENCE_PREFIX + bank_reference,
        amount=amount,
        is_credit=True,
        reversal=False,
        booked=True,
        booking_date=booked,
        references=(args.reference,),
        remittance=(),
    )

    async def settle() -> tuple[Outcome, str, str]:
        biller = await place.open()
        try:
            [line] = await settle_matched(biller.agent, [credit])
        finally:
            await biller.close()
        return line.outcome, line.detail, f"{line.account_id}/{line.intent_id}"

    try:
        outcome, detail, intent = asyncio.run(settle())
    except (OSError, ValueError) as error:
        _failed(out, f"cannot settle: {error}")
        return EXIT_FAILED
    if outcome is not Outcome.SETTLED:
        _failed(out, f"{outcome}: {detail}")
        return EXIT_FAILED
    print(f"settled     {intent} {amount} under {credit.rail_reference}")
    return EXIT_OK


# --- parley biller import-statement ------------------------------------------------------------------


def _import_statement(args: argparse.Namespace, out: Console) -> int:
    try:
        place = _place(args)
        data = Path(args.file).read_bytes()
    except _Unusable as error:
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except OSError as error:
        _failed(out, f"cannot read {error.filename}: {error.strerror}")
        return EXIT_UNUSABLE

    async def run() -> ImportReport:
        biller = await place.open()
        try:
            return await import_statement(biller.agent, data, dry_run=args.dry_run)
        finally:
            await biller.close()

    try:
        report = asyncio.run(run())
    except StatementError as error:
        _failed(out, f"{args.file}: {error} (nothing recorded)")
        return EXIT_FAILED
    except OSError as error:
        _failed(out, f"the import failed: {error}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(_report_document(report), indent=2))
        return EXIT_OK
    print(f"statement   {report.message_type} {report.message_id}{' (dry run: nothing recorded)' * report.dry_run}")
    for line in report.lines:
        amount = "" if line.credit.amount is None else str(line.credit.amount)
        out.print(
            f"{line.outcome:<17} {escape(line.credit.position):<24} {amount:>14}  {escape(line.detail)}",
            highlight=False,
            soft_wrap=True,
        )
    counts = ", ".join(f"{outcome}: {report.count(outcome)}" for outcome in Outcome if report.count(outcome))
    print(f"total       {len(report.lines)} movement(s); {counts or 'none'}")
    return EXIT_OK


def _report_document(report: ImportReport) -> dict[str, object]:
    return {
        "message_type": report.message_type,
        "message_id": report.message_id,
        "dry_run": report.dry_run,
        "movements": [
            {
                "position": line.credit.position,
                "outcome": str(line.outcome),
                "detail": line.detail,
                "bank_reference": line.credit.bank_reference,
                "rail_reference": line.credit.rail_reference,
                "currency": None if line.credit.amount is None else line.credit.amount.currency.code,
                "amount_minor": None if line.credit.amount is None else line.credit.amount.minor,
                "account_id": line.account_id,
                "intent_id": line.intent_id,
            }
            for line in report.lines
        ],
    }


# --- Registration ------------------------------------------------------------------------------------


def _state_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="reference biller configuration (TOML; env PARLEY_CONFIG)")
    parser.add_argument("--state-dir", help="the biller's state directory (env PARLEY_STATE_DIR)")
    parser.add_argument("--store", metavar="PATH|URL", help="the biller's store, if not in the state directory")


def add_backoffice_commands(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `backoffice`, `settle` and `import-statement` to `parley biller`."""
    backoffice = actions.add_parser(
        "backoffice",
        help="serve the back-office gRPC API for billing systems (docs/BACKOFFICE.md)",
        description="Serve parley.backoffice.v1.BackOfficeService on its own listener, beside `parley biller serve` "
        "on the same store, until SIGTERM. Never open: a bearer token file or mutual TLS is required.",
    )
    _state_options(backoffice)
    backoffice.add_argument("--listen", metavar="HOST:PORT", required=True, help="address to listen on (port 0: any)")
    backoffice.add_argument(
        "--token-file", metavar="FILE", help="bearer token (at least 32 characters), required of every call"
    )
    backoffice.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain, PEM")
    backoffice.add_argument("--tls-key", metavar="FILE", help="TLS private key, PEM")
    backoffice.add_argument(
        "--tls-client-ca", metavar="FILE", help="mutual TLS: require client certificates issued by this CA, PEM"
    )
    backoffice.add_argument("--insecure", action="store_true", help="serve plaintext (loopback addresses only)")
    backoffice.add_argument("--log-format", choices=LOG_FORMATS, help="log lines as text or JSON")
    backoffice.add_argument("--log-level", choices=LOG_LEVELS, help="least severe level")
    backoffice.set_defaults(handler=_backoffice)

    settle = actions.add_parser("settle", help="record the settlement of an awaited payment by its reference")
    _state_options(settle)
    settle.add_argument("--reference", required=True, help="the payment reference the payer quoted")
    settle.add_argument("--amount", required=True, help="the amount received, exact decimal text, e.g. 12.34")
    settle.add_argument("--currency", required=True, help="ISO 4217 code, e.g. EUR")
    settle.add_argument("--date", metavar="YYYY-MM-DD", help="the booking date (default: now)")
    settle.add_argument(
        "--bank-reference", help="the bank's reference for the credit; the settlement is recorded under it"
    )
    settle.set_defaults(handler=_settle)

    statement = actions.add_parser(
        "import-statement", help="settle from an ISO 20022 camt.054 or camt.053 file (docs/BACKOFFICE.md)"
    )
    _state_options(statement)
    statement.add_argument("file", help="the bank's camt.054 notification or camt.053 statement (XML)")
    statement.add_argument("--dry-run", action="store_true", help="match and report, record nothing")
    statement.add_argument("--json", action="store_true", help="print the report as one JSON document")
    statement.set_defaults(handler=_import_statement)


__all__ = ["add_backoffice_commands"]
