"""The back-office commands of the reference biller: `parley biller backoffice | settle | import-statement |
accounts | issue-bill | import`.

    parley biller backoffice --listen HOST:PORT (--token-file FILE | --tls-client-ca FILE)
                             [--tls-cert FILE --tls-key FILE | --insecure] [--config FILE] [--state-dir DIR]
                             [--store PATH|URL]
                                    serve parley.backoffice.v1.BackOfficeService for billing systems
    parley biller settle --reference REF --amount 12.34 --currency EUR [--date YYYY-MM-DD]
                         [--bank-reference TEXT] [--config FILE] [--state-dir DIR] [--store PATH|URL]
                                    record the settlement of the awaited payment with that reference
    parley biller import-statement FILE [--dry-run] [--json] [--config FILE] [--state-dir DIR] [--store PATH|URL]
                                    settle from an ISO 20022 camt.054 / camt.053 file
    parley biller accounts add ID --holder NAME [--segment NAME] | list | show ID  [--json] [state options]
                                    the biller's accounts (reference_biller/accounts.py)
    parley biller issue-bill --account ID --amount 123.45 --due YYYY-MM-DD --description TEXT [--id BILL]
                             [--period TEXT] [--issue-date YYYY-MM-DD] [--dry-run] [--json] [state options]
    parley biller import FILE [--format csv|jsonl] [--dry-run] [--json] [state options]
                                    the biller's own bills in (reference_biller/intake.py: all or none,
                                    idempotent by bill id, every bad row reported with its line number)

Each opens the biller's store beside a running `parley biller serve` (SQLite in
WAL mode takes writers from several processes in turn; PostgreSQL is shared by
design), so the serving biller need not stop. A consumer watching its events from
the serving process sees what these commands append within its watch poll
interval (5 s by default). docs/BACKOFFICE.md is the operator guide.

Exit codes: 0 done (for `import`/`issue-bill`: issued or unchanged; 1 if any row
is invalid, and then nothing was issued; for `import-statement`: the file was read, whatever each
credit's outcome; the report lists them), 1 refused or failed (`settle`: nothing
matched or the agent refused; `import-statement`: the file is not a usable
statement, nothing recorded), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from agent.clock import SystemClock
from agent.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from agent.protocol.errors import ProtocolError
from agent.protocol.terms import Money, parse_date
from agent.stores.files import check_private_file
from reference_biller.accounts import AccountError, AccountView, account_views, add_account, check_id
from reference_biller.backoffice import read_token_file, serve_backoffice
from reference_biller.config import SAMPLE, BillerConfig, ConfigError, load_config
from reference_biller.intake import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    IntakeError,
    IntakeReport,
    RowOutcome,
    intake,
    read_records,
)
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
        tls = None if args.tls_cert is None else (Path(args.tls_cert).read_bytes(), check_private_file(args.tls_key))
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


# --- parley biller accounts add | list | show -------------------------------------------------------


def _account_document(view: AccountView) -> dict[str, object]:
    record = view.record
    return {
        "account_id": record.account_id,
        "holder": record.holder_name,
        "segment": view.segment,
        "configured": view.configured,
        "created_at": record.created_at.isoformat(),
        "consumer_party_id": record.consumer_party_id,
        "enrolment_locked": record.enrolment_locked,
    }


def _accounts(args: argparse.Namespace, out: Console) -> int:
    try:
        place = _place(args)
        if args.accounts_command == "add":
            check_id("account id", args.account_id)
    except (_Unusable, AccountError) as error:
        _failed(out, str(error))
        return EXIT_UNUSABLE

    async def run() -> list[AccountView]:
        biller = await place.open()
        try:
            if args.accounts_command == "add":
                await add_account(
                    biller.agent, biller.store, biller.config, args.account_id, holder=args.holder, segment=args.segment
                )
            views = await account_views(biller.config, biller.store)
        finally:
            await biller.close()
        if args.accounts_command in ("add", "show"):
            views = [view for view in views if view.record.account_id == args.account_id]
            if not views:
                raise AccountError(f"no account {args.account_id!r}")
        return views

    try:
        views = asyncio.run(run())
    except AccountError as error:
        _failed(out, str(error))
        return EXIT_FAILED
    except (OSError, ValueError) as error:
        _failed(out, f"the accounts command failed: {error}")
        return EXIT_FAILED
    if args.json:
        documents = [_account_document(view) for view in views]
        print(json.dumps(documents if args.accounts_command == "list" else documents[0], indent=2))
        return EXIT_OK
    if args.accounts_command == "add":
        print(f"added       {args.account_id} ({args.holder}, segment {args.segment})")
        print(f"next        parley biller codes --account {args.account_id} --endpoint HOST:PORT [--qr]")
        return EXIT_OK
    for view in views:
        record = view.record
        enrolled = record.consumer_party_id or ("locked" if record.enrolment_locked else "not enrolled")
        source = "config" if view.configured else "added"
        out.print(
            f"{escape(record.account_id):<24} {escape(view.segment):<12} {source:<6} {escape(enrolled):<32} "
            f"{escape(record.holder_name)}",
            highlight=False,
            soft_wrap=True,
        )
    if args.accounts_command == "list":
        print(f"total       {len(views)} account(s)")
    return EXIT_OK


# --- parley biller issue-bill | import --------------------------------------------------------------


def _issue_bill(args: argparse.Namespace, out: Console) -> int:
    fields = {
        "bill_id": args.id or f"bill-{secrets.token_hex(8)}",
        "account_id": args.account,
        "amount": args.amount,
        "due_date": args.due,
        "description": args.description,
        "period": args.period or "",
        "issue_date": args.issue_date or "",
    }
    return _intake(args, out, [(0, fields)], "the command line")


def _import(args: argparse.Namespace, out: Console) -> int:
    path = Path(args.file)
    json_lines = args.format == "jsonl" or (args.format is None and path.suffix.lower() in (".jsonl", ".ndjson"))
    try:
        records = list(read_records(path.read_bytes(), json_lines=json_lines))
    except OSError as error:
        _failed(out, f"cannot read {error.filename}: {error.strerror}")
        return EXIT_UNUSABLE
    except IntakeError as error:
        _failed(out, f"{args.file}: {error} (nothing issued)")
        return EXIT_FAILED
    return _intake(args, out, records, args.file)


def _intake(
    args: argparse.Namespace, out: Console, records: list[tuple[int, Mapping[str, object]]], source: str
) -> int:
    try:
        place = _place(args)
    except _Unusable as error:
        _failed(out, str(error))
        return EXIT_UNUSABLE

    async def run() -> IntakeReport:
        biller = await place.open()
        try:
            return await intake(biller.agent, biller.store, biller.config, records, dry_run=args.dry_run)
        finally:
            await biller.close()

    try:
        report = asyncio.run(run())
    except IntakeError as error:
        _failed(out, f"{source}: {error} (nothing issued)")
        return EXIT_FAILED
    except (OSError, ValueError) as error:
        _failed(out, f"the intake failed: {error}")
        return EXIT_FAILED
    if args.json:
        document = {
            "source": source,
            "dry_run": report.dry_run,
            "refused": report.refused,
            "rows": [
                {"line": row.line or None, "bill_id": row.bill_id, "outcome": str(row.outcome), "detail": row.detail}
                for row in report.rows
            ],
        }
        print(json.dumps(document, indent=2))
        return EXIT_FAILED if report.refused else EXIT_OK
    for row in report.rows:
        where = f"line {row.line}" if row.line else source
        line = f"{row.outcome:<11} {where:<10} {row.bill_id}" + (f": {row.detail}" if row.detail else "")
        if row.outcome is RowOutcome.INVALID:
            _failed(out, line)
        else:
            out.print(escape(line), highlight=False, soft_wrap=True)
    counts = ", ".join(f"{outcome}: {report.count(outcome)}" for outcome in RowOutcome if report.count(outcome))
    if report.refused:
        _failed(out, f"refused     {source}: nothing issued ({counts}); correct the rows above and run it again")
        return EXIT_FAILED
    suffix = " (dry run: nothing issued)" if report.dry_run else ""
    print(f"total       {len(report.rows)} bill(s); {counts or 'none'}{suffix}")
    return EXIT_OK


# --- Registration ------------------------------------------------------------------------------------


def _state_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="reference biller configuration (TOML; env PARLEY_CONFIG)")
    parser.add_argument("--state-dir", help="the biller's state directory (env PARLEY_STATE_DIR)")
    parser.add_argument("--store", metavar="PATH|URL", help="the biller's store, if not in the state directory")


def add_backoffice_commands(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `backoffice`, `settle`, `import-statement`, `accounts`, `issue-bill` and `import` to `parley biller`."""
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
    _add_intake_commands(actions)


def _add_intake_commands(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    accounts = actions.add_parser("accounts", help="add, list and show the biller's accounts")
    account_actions = accounts.add_subparsers(dest="accounts_command", required=True, metavar="COMMAND")
    add = account_actions.add_parser("add", help="add an account (then issue it a code: `codes --account ID`)")
    _state_options(add)
    add.add_argument("account_id", metavar="ID", help="the account id: 1-64 of A-Z a-z 0-9 . _ : -")
    add.add_argument("--holder", required=True, help="the account holder's name")
    add.add_argument("--segment", default="standard", help="the policy segment (default: standard)")
    add.add_argument("--json", action="store_true", help="print the account as JSON")
    add.set_defaults(handler=_accounts)
    listing = account_actions.add_parser("list", help="every account: segment, origin, enrolled party, holder")
    _state_options(listing)
    listing.add_argument("--json", action="store_true", help="print the accounts as a JSON array")
    listing.set_defaults(handler=_accounts)
    show = account_actions.add_parser("show", help="one account")
    _state_options(show)
    show.add_argument("account_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print the account as JSON")
    show.set_defaults(handler=_accounts)

    issue = actions.add_parser(
        "issue-bill", help="issue one bill to an enrolled account (idempotent by --id; docs/OPERATIONS.md)"
    )
    _state_options(issue)
    issue.add_argument("--account", required=True, metavar="ID", help="the account billed")
    issue.add_argument("--amount", required=True, help="exact decimal text in the biller's currency, e.g. 123.45")
    issue.add_argument("--due", required=True, metavar="YYYY-MM-DD", help="the due date")
    issue.add_argument("--description", required=True, help="what the bill is for, as the consumer will read it")
    issue.add_argument("--id", metavar="BILL", help="the bill id (default: a random one; give it to be idempotent)")
    issue.add_argument("--period", help='the period billed, appended to the description (e.g. "December 2026")')
    issue.add_argument("--issue-date", metavar="YYYY-MM-DD", help="the issue date (default: today)")
    issue.add_argument("--dry-run", action="store_true", help="check only; issue nothing")
    issue.add_argument("--json", action="store_true", help="print the report as JSON")
    issue.set_defaults(handler=_issue_bill)

    bills = actions.add_parser(
        "import", help="issue the bills of a CSV or JSON-lines file: all or none, idempotent by bill id"
    )
    _state_options(bills)
    bills.add_argument(
        "file", help=f"CSV with the header {','.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)} or JSON lines"
    )
    bills.add_argument(
        "--format", choices=("csv", "jsonl"), help="the file's format (default: jsonl for .jsonl/.ndjson, else csv)"
    )
    bills.add_argument("--dry-run", action="store_true", help="check every row and report; issue nothing")
    bills.add_argument("--json", action="store_true", help="print the report as JSON")
    bills.set_defaults(handler=_import)


__all__ = ["add_backoffice_commands"]
