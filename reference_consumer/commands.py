"""The household's commands beside `run`: look, answer, enrol by link, take the proof away.

    parley consumer status  --profile FILE [--state-dir DIR] [--json]
    parley consumer approve ID [--state-dir DIR] [--note TEXT]
    parley consumer decline ID [--state-dir DIR] [--reason TEXT]
    parley consumer retry-payment ID [--state-dir DIR]
    parley consumer resolve-payment ID (--paid --bank-reference REF | --not-paid) [--state-dir DIR]
    parley consumer enrol 'parley:enrol?...' --profile FILE [--state-dir DIR] [--ca-file PEM]
    parley consumer export-agreements --profile FILE [--state-dir DIR] --out DIR
    parley consumer serve   --profile FILE [--state-dir DIR] [--listen 127.0.0.1:PORT]

`status`, `approve`, `decline`, `retry-payment`, `resolve-payment` and `export-agreements` read and
write the state directory only:
they never contact a biller. `serve` runs the bot as `run` does and serves the household's space
(reference_consumer/web) beside it, opened by the link it prints.
`enrol` enrols with the biller the link names (ENR-8), pins it, and
adds the biller to the profile (target, fingerprint, account; never the one-time code) unless the
profile already has it.

Exit status: 0 done; 1 a request that cannot be answered (unknown id, already answered, lapsed), a
payment that cannot be decided on (unknown id, not refused or not in doubt), or a biller that refused
the enrolment; 2 a bad link, profile or state directory (an empty `--state-dir`, a file, a biller's
directory: `household_state_dir`), or a biller that cannot be reached. A failure changes nothing and is
said in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent.clock import SystemClock
from agent.consumer import (
    ApprovalBook,
    ApprovalClosed,
    ConsumerAgent,
    EnrolmentLink,
    InvalidEnrolmentLink,
    UnknownApproval,
    parse_enrolment_uri,
)
from agent.listen import is_loopback
from agent.protocol.errors import ParleyError
from agent.protocol.keys import InsecureKeyFileError
from agent.protocol.terms import Money, Terms
from agent.stores import open_consumer_store
from agent.stores.base import ApprovalRecord, ConsumerStore, IntentRecord
from agent.stores.consumer_sqlite import SqliteConsumerStore
from agent.transport.client import ClientTls, is_transient
from agent.transport.diagnosis import Remedies, connection_hint
from agent.transport.status import CallError
from parley.v1 import terms_pb2
from reference_consumer.agent_strategy import ReferenceStrategy, agent_mandate
from reference_consumer.profile import Profile, ProfileError, load_profile
from reference_consumer.runner import (
    DEFAULT_INTERVAL,
    DEFAULT_STATE_DIR,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNUSABLE,
    INTERVAL,
    STORE_FILE,
    RunOptions,
    StateError,
    agreement_file,
    agreements_reached,
    household_state_dir,
    load_identity,
    run_household,
    write_agreement_files,
)
from reference_consumer.status import UnreadableState, household_status, reading_household, status_json
from reference_consumer.stuck_payments import PaymentDecisionRefused, resolve_in_doubt, retry_refused
from reference_consumer.words import ACTION_WORDS, describe_terms

if TYPE_CHECKING:
    from agent.web import WebConfig

logger = logging.getLogger("parley.reference_consumer")


def _fail(out: Console, message: str, code: int) -> int:
    out.print(Text(message, style="red"), soft_wrap=True)
    return code


def _profile(args: argparse.Namespace, out: Console) -> Profile | int:
    try:
        return load_profile(args.config)
    except ProfileError as error:
        return _fail(out, f"invalid profile {error}", EXIT_UNUSABLE)
    except OSError as error:
        return _fail(out, f"cannot read {args.config}: {error.strerror}", EXIT_UNUSABLE)


def _state_dir(args: argparse.Namespace, out: Console) -> Path | int:
    """The --state-dir given, checked before anything reads or writes it (`household_state_dir`), or the exit
    status after saying why not."""
    try:
        return household_state_dir(args.state_dir)
    except StateError as error:
        return _fail(out, f"unusable state: {error}", EXIT_UNUSABLE)


# --- status ---------------------------------------------------------------------------------------------


def status_command(args: argparse.Namespace, out: Console) -> int:
    profile = _profile(args, out)
    if isinstance(profile, int):
        return profile
    state_dir = _state_dir(args, out)
    if isinstance(state_dir, int):
        return state_dir
    try:
        document = asyncio.run(household_status(profile, state_dir))
    except (UnreadableState, OSError) as error:
        return _fail(out, f"unusable state: {error}", EXIT_UNUSABLE)
    if args.json:  # the document alone on standard output (the CLI's console is standard error with --json)
        sys.stdout.write(status_json(document))
        sys.stdout.flush()
        return EXIT_OK
    render_status(document, out)
    return EXIT_OK


def _money(value: object) -> str:
    return str(value["text"]) if isinstance(value, dict) else ""


def _rows(document: dict[str, object], key: str) -> list[dict[str, object]]:
    rows = document.get(key)
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def _text(value: object) -> Text:
    """Text that came from a biller: shown literally, without markup or control characters."""
    return Text("".join(c if c.isprintable() else " " for c in str(value if value is not None else "")))


def render_status(document: dict[str, object], out: Console) -> None:
    """The status document as tables a person reads."""
    household = document.get("household")
    party = household.get("party_id") if isinstance(household, dict) else ""
    out.print(f"[bold]Your bills[/bold] — {party}, {document.get('generated_at')}", highlight=False, soft_wrap=True)
    if document.get("state") == "empty":
        out.print("Nothing yet: run `parley consumer run --profile FILE` to fetch your bills.", highlight=False)

    def table(title: str, columns: Sequence[str], rows: list[list[object]]) -> None:
        if not rows:
            return
        grid = Table(title=title, title_justify="left")
        for column in columns:
            grid.add_column(column, overflow="fold")
        for row in rows:
            grid.add_row(*(_text(cell) for cell in row))
        out.print(grid)

    table(
        "Bills",
        ("biller", "bill", "amount", "due", "what", "state"),
        [
            [r["biller_name"], r["bill_id"], _money(r["amount"]), r["due_date"], r["description"], r["state_text"]]
            for r in _rows(document, "bills")
        ],
    )
    pending = [r for r in _rows(document, "approvals") if r["state"] == "pending"]
    table(
        "Waiting for your approval",
        ("id", "biller", "bill", "the bot would", "terms", "why it needs you"),
        [
            [r["id"], r["biller_name"], r["bill_id"], r["action_text"], _terms_text(r["terms"]), "; ".join(r["why"])]  # type: ignore[arg-type]
            for r in pending
        ],
    )
    if pending:
        out.print(
            "Answer with: parley consumer approve ID  |  parley consumer decline ID --reason TEXT", highlight=False
        )
    table(
        "Agreements (your proof)",
        ("biller", "bill", "terms", "file", "verifies"),
        [
            [
                r["biller_name"],
                r["bill_id"],
                _terms_text(r["terms"]),
                r["file"] or "missing",
                "yes" if r["verifies"] else f"NO: {r['problem']}",
            ]
            for r in _rows(document, "agreements")
        ],
    )
    table(
        "Coming up",
        ("due", "biller", "bill", "instalment", "amount"),
        [
            [
                f"{r['due_date']}{' (overdue)' if r['overdue'] else ''}",
                r["biller_name"],
                r["bill_id"],
                f"{r['instalment']} of {r['of']}",
                _money(r["amount"]),
            ]
            for r in _rows(document, "upcoming")
        ],
    )
    table(
        "Payments and receipts",
        ("biller", "bill", "instalment", "amount", "state", "bank ref", "receipt"),
        [
            [
                r["biller_name"],
                r["bill_id"],
                f"{r['instalment']} of {r['of']}",
                _money(r["amount"]),
                r["state_text"],
                r["bank_reference"],
                _receipt_text(r["receipt"]),
            ]
            for r in _rows(document, "payments")
        ],
    )
    for r in _rows(document, "payments"):
        if r.get("next_step"):
            where = f"{r['biller_name']}, bill {r['bill_id']} #{r['instalment']}"
            out.print(Text(f"{where}: ", style="bold") + _text(f"{r['next_step']} {r['next_command']}"), soft_wrap=True)
    table(
        "News from your billers",
        ("biller", "what", "bill", "amount", "date", "message"),
        [
            [r["biller_name"], r["text"], r["bill_id"], _money(r["amount"]), r["date"] or "", r["message"]]
            for r in _rows(document, "events")
        ],
    )
    problems = document.get("problems")
    for problem in problems if isinstance(problems, list) else []:
        out.print(Text("problem: ", style="bold red") + _text(problem), soft_wrap=True)


def _terms_text(terms: object) -> str:
    return str(terms.get("text", "")) if isinstance(terms, dict) else ""


def _receipt_text(receipt: object) -> str:
    if not isinstance(receipt, dict):
        return ""
    if receipt.get("disputed"):
        return f"DISPUTED: {receipt.get('dispute')}"
    return f"{_money(receipt.get('amount_received'))} received"


# --- approve / decline ----------------------------------------------------------------------------------


T = TypeVar("T")


def _on_household_store(
    args: argparse.Namespace,
    out: Console,
    use: Callable[[SqliteConsumerStore], Awaitable[T]],
    refusals: tuple[type[Exception], ...],
    missing: str,
) -> T | int:
    """Run `use` on the state directory's store (no key, no biller); an exception of `refusals` is said in
    one line (exit 1), a missing or unusable state directory too (exit 2)."""
    state_dir = _state_dir(args, out)
    if isinstance(state_dir, int):
        return state_dir
    if not (state_dir / STORE_FILE).exists():
        return _fail(out, f"no household state in {state_dir}: {missing}", EXIT_UNUSABLE)

    async def run() -> T:
        store = await open_consumer_store(state_dir / STORE_FILE)
        try:
            return await use(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except refusals as error:
        return _fail(out, str(error), EXIT_FAILED)  # as written: none is a KeyError, whose str() adds quotes
    except OSError as error:
        return _fail(out, f"unusable state directory: {error}", EXIT_UNUSABLE)


def _answer_command(args: argparse.Namespace, out: Console, *, approved: bool) -> int:
    def answer(store: SqliteConsumerStore) -> Awaitable[ApprovalRecord]:
        return ApprovalBook(store, SystemClock()).answer(args.request_id, approved, note=args.note or "")

    record = _on_household_store(args, out, answer, (UnknownApproval, ApprovalClosed), "nothing to answer")
    if isinstance(record, int):
        return record
    terms = describe_terms(Terms.from_proto(terms_pb2.Terms.FromString(record.terms)))
    what = f"{ACTION_WORDS.get(record.action, record.action)} {terms} (bill {record.bill_id}, {record.biller_party_id})"
    if approved:
        out.print(f"approved {record.request_id}: {what}. The next run sends exactly this.", highlight=False)
    else:
        out.print(f"declined {record.request_id}: {what}. The bot will not send it.", highlight=False)
    return EXIT_OK


def approve_command(args: argparse.Namespace, out: Console) -> int:
    return _answer_command(args, out, approved=True)


def decline_command(args: argparse.Namespace, out: Console) -> int:
    return _answer_command(args, out, approved=False)


# --- retry-payment / resolve-payment ---------------------------------------------------------------------


def _decide_payment(
    args: argparse.Namespace, out: Console, decide: Callable[[ConsumerStore], Awaitable[IntentRecord]]
) -> IntentRecord | int:
    return _on_household_store(args, out, decide, (PaymentDecisionRefused,), "no payment to decide on")


def _payment_text(intent: IntentRecord) -> str:
    amount = Money.of(intent.amount_minor, intent.currency)
    return f"payment {intent.intent_id} ({amount} for bill {intent.bill_id}, {intent.biller_party_id})"


def retry_payment_command(args: argparse.Namespace, out: Console) -> int:
    now = SystemClock().now()
    intent = _decide_payment(args, out, lambda store: retry_refused(store, args.intent_id, now))
    if isinstance(intent, int):
        return intent
    out.print(
        f"set aside the refused instructions of {_payment_text(intent)}; they are kept as evidence. The next run "
        "asks the biller for new instructions and pays them if they verify (the biller may wait until the refused "
        "ones' pay-by time has passed).",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK


def resolve_payment_command(args: argparse.Namespace, out: Console) -> int:
    now = SystemClock().now()
    reference = args.bank_reference or ""
    intent = _decide_payment(
        args,
        out,
        lambda store: resolve_in_doubt(store, args.intent_id, paid=args.paid, bank_reference=reference, now=now),
    )
    if isinstance(intent, int):
        return intent
    if args.paid:
        out.print(f"recorded {_payment_text(intent)} as paid, bank reference {intent.payment_proof}.", highlight=False)
    else:
        out.print(
            f"recorded that the bank did not pay {_payment_text(intent)}. The next run pays it under its instructions "
            "if their pay-by time allows, and otherwise asks the biller for new ones.",
            highlight=False,
            soft_wrap=True,
        )
    return EXIT_OK


# --- enrol by link --------------------------------------------------------------------------------------


def enrol_command(args: argparse.Namespace, out: Console) -> int:
    try:
        link = parse_enrolment_uri(args.uri)
    except InvalidEnrolmentLink as error:
        return _fail(out, f"not a usable enrolment link: {error}", EXIT_UNUSABLE)
    profile = _profile(args, out)
    if isinstance(profile, int):
        return profile
    state_dir = _state_dir(args, out)
    if isinstance(state_dir, int):
        return state_dir
    existing = next((b for b in profile.billers if b.biller_id == link.biller_party_id), None)
    connection = None if existing is None else existing.connection
    if connection is not None and connection.fingerprint != link.fingerprint:
        return _fail(
            out,
            f"the link's fingerprint for {link.biller_party_id} is not the one in your profile: "
            "a biller's identity never changes (KEY-12); nothing was done",
            EXIT_UNUSABLE,
        )
    host = link.target.rpartition(":")[0].removeprefix("[").removesuffix("]")
    insecure = is_loopback(host) and args.ca_file is None
    roots = None
    if args.ca_file is not None:
        try:
            roots = Path(args.ca_file).read_bytes()
        except OSError as error:
            return _fail(out, f"cannot read {args.ca_file}: {error.strerror}", EXIT_UNUSABLE)
    tls = None if insecure else ClientTls(roots, None)
    try:
        asyncio.run(_enrol(profile, state_dir, link, tls=tls, insecure=insecure))
    except CallError as error:
        if is_transient(error):
            remedies = Remedies(
                to_plaintext="leave out --ca-file (a loopback target is then reached in plaintext, TRN-3)",
                to_tls="give the CA of its certificate with --ca-file FILE",
                trust="give the CA that issued its certificate with --ca-file FILE",
                client_certificate="add the biller, with its code, to your profile, with household.client_certificate "
                "and household.client_key, and let `parley consumer run` enrol",
            )
            hint = connection_hint(
                link.target, error.detail, insecure=insecure, client_certificate=False, remedies=remedies
            )
            said = f"{link.target} cannot be reached: {error.code.name}; nothing was done"
            return _fail(out, said + (f"\nhint: {hint}" if hint else ""), EXIT_UNUSABLE)
        return _fail(out, f"the biller refused the enrolment: {error.reason.name} {error.detail}", EXIT_FAILED)
    except ParleyError as error:
        return _fail(out, f"the biller's answer does not verify: {error}", EXIT_FAILED)
    except (StateError, InsecureKeyFileError, ProfileError, OSError, ValueError) as error:
        return _fail(out, f"cannot enrol: {error}", EXIT_UNUSABLE)
    name = profile.biller_name(link.biller_party_id)
    out.print(f"enrolled account {link.account_id} with {name}; its identity is pinned.", highlight=False)
    if existing is None:
        _add_biller(Path(args.config), profile, link, insecure=insecure, ca_file=args.ca_file)
        out.print(f"added {link.biller_party_id} to {args.config}", highlight=False)
    elif existing.connection is None:
        out.print(
            f'add to [billers."{link.biller_party_id}"] in {args.config}: target = "{link.target}", '
            f'fingerprint = "{link.fingerprint.hex()}", account_id = "{link.account_id}"'
            + (", insecure = true" if insecure else ""),
            highlight=False,
            soft_wrap=True,
        )
    return EXIT_OK


async def _enrol(
    profile: Profile, state_dir: Path, link: EnrolmentLink, *, tls: ClientTls | None, insecure: bool
) -> None:
    clock = SystemClock()
    key, chain = await asyncio.to_thread(load_identity, state_dir, profile.party_id, clock.now())
    store = await open_consumer_store(state_dir / STORE_FILE)
    try:
        agent = ConsumerAgent(
            party_id=profile.party_id,
            signing_key=key,
            key_sets=chain,
            store=store,
            strategy=ReferenceStrategy(profile),
            mandate=agent_mandate(profile),
            clock=clock,
        )
        async with agent:
            await agent.enrol(
                link.target,
                biller_party_id=link.biller_party_id,
                fingerprint=link.fingerprint,
                account_id=link.account_id,
                code=link.code,
                tls=tls,
                insecure=insecure,
            )
    finally:
        await store.close()


def _add_biller(path: Path, profile: Profile, link: EnrolmentLink, *, insecure: bool, ca_file: str | None) -> None:
    """Append the biller's table to the profile: how to reach it, never the code (used now)."""
    priority = max((b.priority for b in profile.billers), default=0) + 1
    lines = [
        "",
        f"[billers.{json.dumps(link.biller_party_id)}]  # added by `parley consumer enrol`",
        f"priority = {priority}",
        f"target = {json.dumps(link.target)}",
        f"fingerprint = {json.dumps(link.fingerprint.hex())}",
        f"account_id = {json.dumps(link.account_id)}",
    ]
    if insecure:
        lines.append("insecure = true")
    elif ca_file is not None:
        lines.append(f"ca_file = {json.dumps(str(Path(ca_file).resolve()))}")
    text = path.read_text(encoding="utf-8")
    path.write_text(text + ("" if text.endswith("\n") else "\n") + "\n".join(lines) + "\n", encoding="utf-8")


# --- export-agreements ----------------------------------------------------------------------------------


def export_command(args: argparse.Namespace, out: Console) -> int:
    profile = _profile(args, out)
    if isinstance(profile, int):
        return profile
    state_dir = _state_dir(args, out)
    if isinstance(state_dir, int):
        return state_dir
    target = Path(args.out)

    async def export() -> list[Path]:
        async with reading_household(profile, state_dir, SystemClock()) as (agent, store):
            await write_agreement_files(agent, store, state_dir)
            files = [agreement_file(state_dir, *found) for found in await agreements_reached(agent, store)]
        target.mkdir(parents=True, exist_ok=True)
        copied = []
        for source in files:
            shutil.copyfile(source, target / source.name)
            copied.append(target / source.name)
        return copied

    try:
        copied = asyncio.run(export())
    except (UnreadableState, OSError) as error:
        return _fail(out, f"cannot export: {error}", EXIT_UNUSABLE)
    for path in copied:
        out.print(str(path), highlight=False, soft_wrap=True)
    out.print(f"{len(copied)} agreement file(s) in {target}", highlight=False)
    return EXIT_OK


# --- serve: the bot and the household's space in a browser ---------------------------------------------


def serve_command(args: argparse.Namespace, out: Console) -> int:
    """`parley consumer serve`: `run`'s loop and the web pages on one event loop, until Ctrl-C."""
    profile = _profile(args, out)
    if isinstance(profile, int):
        return profile
    state_dir = _state_dir(args, out)
    if isinstance(state_dir, int):
        return state_dir
    host, _, port_text = args.listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        return _fail(out, f"--listen wants HOST:PORT, e.g. 127.0.0.1:8080, not {args.listen!r}", EXIT_UNUSABLE)
    tls = {
        name: Path(getattr(args, name)) if getattr(args, name) else None
        for name in ("tls_cert", "tls_key", "client_ca")
    }
    # The pages and their server (aiohttp) are loaded only by this command: `run`, which the conformance suite
    # starts for every client run, does without them.
    from reference_consumer.web import space_config  # noqa: PLC0415

    try:
        config = space_config(f"{profile.party_id}: your bills", host=host, **tls)
    except ValueError as error:
        return _fail(out, f"cannot serve: {error}", EXIT_UNUSABLE)
    options = RunOptions(state_dir, interval=args.interval)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(profile, options, config, int(port_text), out))
    except KeyboardInterrupt:
        return 130
    except ProfileError as error:
        return _fail(out, f"invalid profile {error}", EXIT_UNUSABLE)
    except (StateError, InsecureKeyFileError, OSError) as error:
        return _fail(out, f"unusable state: {error}", EXIT_UNUSABLE)


async def _serve(profile: Profile, options: RunOptions, config: WebConfig, port: int, out: Console) -> int:
    from agent.web import start_site  # noqa: PLC0415 - see serve_command
    from reference_consumer.web import StateDirSource, create_space_app  # noqa: PLC0415

    wake = asyncio.Event()
    source = StateDirSource(profile, options.state_dir, wake=wake.set)
    app = create_space_app({"": source}, config)
    async with start_site(app, config.host, port) as site:
        # The link is the key to the space: printed once, to this terminal only (never logged).
        out.print(f"your household's space: {site.opening_url}", highlight=False, soft_wrap=True)
        out.print("open it in a browser on this computer; Ctrl-C stops the bot and the pages", highlight=False)
        return await run_household(profile, options, out, on_report=source.changed, wake=wake)


# --- registration ---------------------------------------------------------------------------------------


def _profile_option(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--profile", "--config", dest="config", metavar="FILE", required=required, help="the household's profile"
    )


def _state_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help=f"the household's state directory (default: {DEFAULT_STATE_DIR})"
    )


def add_household_commands(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register status, approve, decline, retry-payment, resolve-payment, enrol, serve and export-agreements
    under `parley consumer`."""
    status = actions.add_parser(
        "status", help="every bill, agreement, payment, approval and news, from the state directory; contacts nobody"
    )
    _profile_option(status, required=True)
    _state_option(status)
    status.add_argument("--json", action="store_true", help="the status document as JSON (docs/HOUSEHOLD.md)")
    status.set_defaults(handler=status_command)

    for name, handler, verb in (("approve", approve_command, "approve"), ("decline", decline_command, "decline")):
        parser = actions.add_parser(name, help=f"{verb} one request waiting for your approval, by its id")
        parser.add_argument("request_id", metavar="ID", help="the id `status` or `run` printed")
        _profile_option(parser, required=False)
        _state_option(parser)
        if name == "decline":
            parser.add_argument("--reason", dest="note", help="why (kept with the answer)")
        else:
            parser.add_argument("--note", help="a note kept with the answer")
        parser.set_defaults(handler=handler)

    retry = actions.add_parser(
        "retry-payment",
        help="set aside payment instructions the bot refused, so that the next run asks the biller for new ones",
    )
    retry.add_argument("intent_id", metavar="ID", help="the payment's id, as `run` or `status` printed it")
    _state_option(retry)
    retry.set_defaults(handler=retry_payment_command)

    resolve = actions.add_parser(
        "resolve-payment", help="say what your bank did with a payment in doubt (handed over, never answered)"
    )
    resolve.add_argument("intent_id", metavar="ID", help="the payment's id, as `run` or `status` printed it")
    said = resolve.add_mutually_exclusive_group(required=True)
    said.add_argument("--paid", action="store_true", help="the bank paid it (give --bank-reference)")
    said.add_argument("--not-paid", dest="paid", action="store_false", help="the bank certainly did not pay it")
    resolve.add_argument("--bank-reference", metavar="REF", help="the bank's reference of the payment (with --paid)")
    _state_option(resolve)
    resolve.set_defaults(handler=resolve_payment_command)

    enrol = actions.add_parser("enrol", help="enrol with a biller from the parley:enrol?... link it printed (ENR-8)")
    enrol.add_argument("uri", metavar="LINK", help="the parley:enrol?... link (quote it in the shell)")
    _profile_option(enrol, required=True)
    _state_option(enrol)
    enrol.add_argument("--ca-file", help="PEM trust anchors for the biller's TLS certificate (not for loopback)")
    enrol.set_defaults(handler=enrol_command)

    serve = actions.add_parser(
        "serve",
        help="run the bot (as `run` does) and serve your bills as web pages on this computer, opened by a link",
        description="Runs the bot's passes every --interval seconds and serves the household's space (bills, "
        "a tracker per bill, approvals, agreements, payments, cash flow) on --listen. It prints a link holding a "
        "secret token: open it in a browser. Only loopback addresses, unless --tls-cert, --tls-key and "
        "--client-ca (browsers with a client certificate) are all given. docs/HOUSEHOLD.md.",
    )
    _profile_option(serve, required=True)
    _state_option(serve)
    serve.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="default: a free loopback port")
    serve.add_argument(
        "--interval", type=INTERVAL, default=DEFAULT_INTERVAL, help="seconds between passes (default: %(default)s)"
    )
    serve.add_argument("--tls-cert", help="PEM certificate chain for the pages (needed off loopback)")
    serve.add_argument("--tls-key", help="its PEM private key")
    serve.add_argument("--client-ca", help="PEM CA whose client certificates browsers must present (off loopback)")
    serve.set_defaults(handler=serve_command)

    export = actions.add_parser("export-agreements", help="copy every agreement file (parley-bundle/1) to a directory")
    _profile_option(export, required=True)
    _state_option(export)
    export.add_argument("--out", required=True, metavar="DIR", help="where to copy them (created if missing)")
    export.set_defaults(handler=export_command)


__all__ = [
    "add_household_commands",
    "approve_command",
    "decline_command",
    "enrol_command",
    "export_command",
    "render_status",
    "serve_command",
    "status_command",
]
