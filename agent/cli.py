"""The `parley` command line.

    parley demo [--out DIR] [--json FILE]
                                    two billers, six households, three simulated months over gRPC + TLS;
                                    every agreement bundle written and verified offline
    parley keygen --out FILE        make an Ed25519 signing key (file mode 0600)
    parley certs --out DIR [--host NAME] [--ip ADDRESS] [--client NAME]
                                    make a development CA and TLS certificates (agent/tools/certs.py)
    parley verify BUNDLE.json       verify an agreement bundle offline
    parley biller serve --listen HOST:PORT [--config FILE] [--state-dir DIR] [--store PATH|URL]
                        [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE] | --insecure]
                        [--conformance-control]
                        [--metrics-listen HOST:PORT] [--log-format json|text] [--log-level LEVEL]
                        [--shutdown-grace SECONDS] [--otel]
                                    run the reference biller (built-in sample config without --config);
                                    PARLEY_* variables and the config's [server] table set the same options
    parley biller codes --state-dir DIR [--store PATH|URL] [--config FILE] [--endpoint HOST:PORT] [--json]
                                    issue enrolment codes for the configured accounts
    parley biller rotate-key --state-dir DIR [--config FILE]
                                    replace the biller's signing key, keeping its identity (biller stopped)
    parley biller check-config FILE validate a reference biller configuration
    parley conformance biller --target HOST:PORT [--tls-ca FILE | --insecure] [--only IDS] [--skip IDS]
                        [--known-failing FILE] [--timeout S] [--junit FILE] [--json FILE]
                                    run the conformance suite against a biller implementation
    parley conformance consumer --client-cmd "CMD" [--jobs N] [--only IDS] [--skip IDS] [...]
                                    run scripted hostile billers against a consumer implementation
    parley consumer run --config FILE [--state-dir DIR] [--once] [--approve-all | --deny-all]
                                    run the reference consumer bot for one household profile
    parley chaos [--kills N] [--clients C] [--seed S] [--seconds-between-kills MIN:MAX]
                 [--state-dir DIR] [--json FILE]
                                    SIGKILL a loaded reference biller N times; check nothing acknowledged was lost
    parley fuzz [--seconds N] [--seed S] [--rpc NAME] [--json FILE]
                                    fuzz every BillerService RPC on a live biller; exit 1 on any finding
    parley bench [--seconds N] [--concurrency C] [--workers W] [--store sqlite|postgres] [--prefill N]
                 [--rate R] [--json FILE]
                                    complete negotiations/s against a bare signed-RPC baseline (docs/PERFORMANCE.md)

Serve options: flag > PARLEY_* environment variable > the config file's [server]
table > default (reference_biller/settings.py, docs/OPERATIONS.md).

`verify` exits 0 when the bundle is valid, 1 when it is invalid (the reason is
printed), 2 when the input is unusable (unreadable, not a bundle, bad usage).
`biller check-config` exits 0 (OK) or 1 (the error names the key); `biller
serve` and `biller codes` exit 2 on an invalid configuration or bad usage and
1 when the biller fails; `serve` runs until SIGTERM or SIGINT and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.clock import Clock, SystemClock
from agent.conformance import add_conformance_commands
from agent.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from agent.protocol.agreement import Agreement, Bundle, UnusableBundleError, verify_bundle
from agent.protocol.errors import ProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.terms import format_date
from agent.tools.bench import add_bench_command
from agent.tools.certs import add_certs_command
from agent.tools.chaos import add_chaos_command
from agent.tools.demo import run as run_demo
from agent.tools.fuzz_command import add_fuzz_command
from agent.tracing import TracingUnavailable, server_interceptors
from agent.transport.server import install_uvloop, is_loopback
from agent.vectors import add_vectors_command
from reference_biller import sample
from reference_biller.config import SAMPLE, BillerConfig, ConfigError, load_config
from reference_biller.service import RunningBiller, SteppableClock, open_biller, rotate_identity, run_biller
from reference_biller.settings import (
    ServeSettings,
    SettingsError,
    config_file,
    resolve_serve,
    resolve_state_dir,
    resolve_store,
)
from reference_consumer.runner import add_consumer_commands

EXIT_VALID, EXIT_INVALID, EXIT_UNUSABLE = 0, 1, 2


def _keygen(args: argparse.Namespace, out: Console) -> int:
    key = SigningKey.generate()
    try:
        key.save(args.out)
    except FileExistsError:
        out.print(f"[red]refusing to overwrite {args.out}[/red]")
        return EXIT_UNUSABLE
    public = base64.b64encode(key.public_key.raw).decode()
    out.print(f"wrote {args.out} (mode 0600)\nkeyid      {key.keyid}\npublic key {public}")
    return EXIT_VALID


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


def _demo(args: argparse.Namespace, out: Console) -> int:
    return run_demo(Path(args.out), out, summary=Path(args.summary) if args.summary else None)


# --- parley biller ----------------------------------------------------------------------------------


def _biller_config(args: argparse.Namespace, out: Console) -> BillerConfig | None:
    """The --config file (else PARLEY_CONFIG, else the built-in sample), or None after printing why it is invalid."""
    path, _ = config_file(args.config)
    try:
        return load_config(path or SAMPLE)
    except ConfigError as error:
        out.print(f"[bold red]invalid configuration[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return None


def _check_config(args: argparse.Namespace, out: Console) -> int:
    try:
        config = load_config(Path(args.file))
    except ConfigError as error:
        out.print(f"[bold red]INVALID[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    out.print(
        f"OK {args.file}: {config.name} ({config.party_id}), {len(config.segments)} segment(s), "
        f"{len(config.accounts)} account(s)",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_VALID


def _failed(out: Console, message: str) -> None:
    """An error line, printed as is (no Rich markup: messages quote [server], [::1], parley[otel]...)."""
    out.print(message, style="red", markup=False, highlight=False, soft_wrap=True)


def _tls_files(settings: ServeSettings, insecure: bool) -> tuple[bytes, bytes] | None:
    """(certificate chain, key) from the TLS settings; ValueError on bad usage, OSError if unreadable."""
    if settings.tls_cert and insecure:
        raise ValueError("choose --tls-cert/--tls-key or --insecure, not both")
    if settings.tls_cert is None or settings.tls_key is None:
        if not insecure:
            raise ValueError(
                "TLS is required (TRN-2): give --tls-cert and --tls-key, or --insecure to serve plaintext on loopback"
            )
        host = settings.listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
        if not is_loopback(host):
            raise ValueError(f"plaintext is allowed only on a loopback address (TRN-2), not {host!r}: use TLS")
        return None
    return settings.tls_cert.read_bytes(), settings.tls_key.read_bytes()


def _print_ready(running: RunningBiller) -> None:
    agent = running.biller.agent
    transport = ("mutual TLS" if running.mutual_tls else "TLS") if running.tls else "plaintext, loopback only"
    print(f"biller      {agent.party_id}", flush=True)
    print(f"fingerprint {agent.key_chain.fingerprint.hex()}", flush=True)
    print(f"state       {running.biller.state_dir}", flush=True)
    if "conformance-control" in agent.features:
        print("conformance-control ENABLED: test fixtures only, never in production", flush=True)
    if running.metrics is not None:
        print(f"metrics     {running.metrics.url}", flush=True)
    print(f"listening   {running.address} ({transport})", flush=True)


async def _serve_until_signalled(
    args: argparse.Namespace,
    config: BillerConfig,
    settings: ServeSettings,
    tls: tuple[bytes, bytes] | None,
    client_ca: bytes | None,
) -> None:
    clock: Clock = SteppableClock() if args.conformance_control else SystemClock()
    serving = asyncio.create_task(
        run_biller(
            config,
            listen=settings.listen,
            state_dir=settings.state_dir,
            clock=clock,
            tls=tls,
            tls_client_ca=client_ca,
            insecure=args.insecure,
            conformance_control=args.conformance_control,
            on_ready=_print_ready,
            shutdown_grace=settings.shutdown_grace,
            metrics_listen=settings.metrics_listen,
            interceptors=server_interceptors() if settings.otel else (),
            store_location=settings.store,
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((serving, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not serving.done():
        serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving  # re-raises a failure to start


def _serve(args: argparse.Namespace, out: Console) -> int:
    config = _biller_config(args, out)
    if config is None:
        return EXIT_UNUSABLE
    try:
        settings = resolve_serve(vars(args), config.server)
        tls = _tls_files(settings, args.insecure)
        client_ca = None if settings.tls_client_ca is None else settings.tls_client_ca.read_bytes()
        if settings.otel:
            server_interceptors()  # TracingUnavailable now, before anything is opened
    except (TracingUnavailable, ValueError) as error:
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except OSError as error:
        _failed(out, f"cannot read {error.filename}: {error.strerror}")
        return EXIT_UNUSABLE
    configure_logging(settings.log_format, settings.log_level)
    install_uvloop()
    try:
        asyncio.run(_serve_until_signalled(args, config, settings, tls, client_ca))
    except ValueError as error:  # TRN-2 and other refusals before serving
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except (OSError, RuntimeError) as error:  # e.g. the port is taken
        _failed(out, f"the biller failed: {error}")
        return EXIT_INVALID
    return EXIT_VALID


async def _issue_codes(
    args: argparse.Namespace, config: BillerConfig, state_dir: Path, store_location: str | None
) -> None:
    biller = await open_biller(config, state_dir, SystemClock(), store_location=store_location)
    try:
        codes = await sample.issue_codes(biller.agent, config)
    finally:
        await biller.close()
    fingerprint = biller.fingerprint
    if args.json:
        accounts = []
        for account in config.accounts:
            code = codes[account.account_id]
            entry = {"account_id": account.account_id, "holder": account.holder, "code": code}
            if args.endpoint:
                entry["enrolment_uri"] = sample.enrolment_uri(
                    args.endpoint, config.party_id, fingerprint, account.account_id, code
                )
            accounts.append(entry)
        document = {
            "biller": config.party_id,
            "name": config.name,
            "fingerprint": fingerprint.hex(),
            "endpoint": args.endpoint,
            "accounts": accounts,
        }
        print(json.dumps(document, indent=2))
        return
    print(f"biller      {config.name} ({config.party_id})")
    print(f"fingerprint {fingerprint.hex()}")
    if args.endpoint:
        print(f"endpoint    {args.endpoint}")
    for account in config.accounts:
        code = codes[account.account_id]
        print(f"account     {account.account_id}  code {code}  holder {account.holder}")
        if args.endpoint:
            uri = sample.enrolment_uri(args.endpoint, config.party_id, fingerprint, account.account_id, code)
            print(f"            {uri}")


def _biller_state(args: argparse.Namespace, out: Console) -> tuple[BillerConfig, Path] | None:
    """The configuration and state directory of an offline biller command; None once it said why not."""
    config = _biller_config(args, out)
    if config is None:
        return None
    try:
        return config, resolve_state_dir(args.state_dir, config.server)
    except SettingsError as error:
        _failed(out, str(error))
        return None


def _codes(args: argparse.Namespace, out: Console) -> int:
    resolved = _biller_state(args, out)
    if resolved is None:
        return EXIT_UNUSABLE
    config, state_dir = resolved
    try:
        store_location = resolve_store(args.store, config.server)
    except SettingsError as error:
        _failed(out, str(error))
        return EXIT_UNUSABLE
    try:
        asyncio.run(_issue_codes(args, config, state_dir, store_location))
    except (OSError, ValueError) as error:
        _failed(out, f"cannot issue codes: {error}")
        return EXIT_INVALID
    return EXIT_VALID


def _rotate_key(args: argparse.Namespace, out: Console) -> int:
    resolved = _biller_state(args, out)
    if resolved is None:
        return EXIT_UNUSABLE
    config, state_dir = resolved
    try:
        key, chain = rotate_identity(state_dir, config.party_id, SystemClock().now())
    except (OSError, ValueError) as error:
        _failed(out, f"cannot rotate the key: {error}")
        return EXIT_INVALID
    print(f"biller      {config.party_id}")
    print(f"fingerprint {chain.fingerprint.hex()} (unchanged)")
    print(f"new key     {key.keyid} in key set version {chain.latest.version}")
    print("restart the biller (every replica, with this state directory's biller.key and key set files)")
    return EXIT_VALID


def _add_biller_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    biller = commands.add_parser("biller", help="run the reference biller")
    actions = biller.add_subparsers(dest="biller_command", required=True, metavar="COMMAND")
    config_help = (
        "reference biller configuration (TOML; env PARLEY_CONFIG; default: the built-in sample, "
        "reference_biller/sample.toml)"
    )
    store_help = (
        "the store: a SQLite path or sqlite:///PATH, or postgresql://... shared by replicas "
        "(env PARLEY_STORE; default: biller.sqlite in the state directory)"
    )

    serve = actions.add_parser(
        "serve",
        help="serve the reference biller over gRPC until SIGTERM",
        description="Serve the reference biller over gRPC until SIGTERM or SIGINT, then stop gracefully. "
        "Each option can also come from its PARLEY_* variable or the config's [server] table; "
        "precedence: flag > environment > config file > default.",
    )
    serve.add_argument("--config", help=config_help)
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="address to listen on, port 0: any (env PARLEY_LISTEN; required)"
    )
    serve.add_argument(
        "--state-dir", help="keys and database; created if missing (env PARLEY_STATE_DIR; default: parley-biller)"
    )
    serve.add_argument("--store", metavar="PATH|URL", help=store_help)
    serve.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain, PEM (env PARLEY_TLS_CERT)")
    serve.add_argument("--tls-key", metavar="FILE", help="TLS private key, PEM (env PARLEY_TLS_KEY)")
    serve.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="mutual TLS: require client certificates issued by this CA, PEM (env PARLEY_TLS_CLIENT_CA)",
    )
    serve.add_argument("--insecure", action="store_true", help="serve plaintext (loopback addresses only)")
    serve.add_argument(
        "--conformance-control",
        action="store_true",
        help="also serve the ConformanceControlService test fixtures (never in production)",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (env PARLEY_METRICS_LISTEN; default: off)",
    )
    serve.add_argument(
        "--log-format", choices=LOG_FORMATS, help="log lines as text or JSON (env PARLEY_LOG_FORMAT; default: text)"
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="least severe level logged (env PARLEY_LOG_LEVEL)")
    serve.add_argument(
        "--shutdown-grace",
        metavar="SECONDS",
        help="on SIGTERM, how long calls in flight may take to finish (env PARLEY_SHUTDOWN_GRACE; default: 10)",
    )
    serve.add_argument(
        "--otel",
        action="store_true",
        help="OpenTelemetry tracing of gRPC calls; needs the otel extra (env PARLEY_OTEL)",
    )
    serve.set_defaults(handler=_serve)

    codes = actions.add_parser("codes", help="issue enrolment codes for the configured accounts")
    codes.add_argument("--config", help=config_help)
    codes.add_argument("--state-dir", help="the serving biller's state directory (env PARLEY_STATE_DIR)")
    codes.add_argument("--store", metavar="PATH|URL", help=store_help)
    codes.add_argument("--endpoint", metavar="HOST:PORT", help="the biller's address, to print enrolment URIs too")
    codes.add_argument("--json", action="store_true", help="print the codes as one JSON document on stdout")
    codes.set_defaults(handler=_codes)

    rotate = actions.add_parser(
        "rotate-key",
        help="replace the biller's signing key, keeping its identity (KEY-17); run it while the biller is stopped",
    )
    rotate.add_argument("--config", help=config_help)
    rotate.add_argument("--state-dir", help="the biller's state directory (env PARLEY_STATE_DIR)")
    rotate.set_defaults(handler=_rotate_key)

    check = actions.add_parser("check-config", help="validate a reference biller configuration")
    check.add_argument("file", help="a TOML configuration file")
    check.set_defaults(handler=_check_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley: bots settling bills with bots.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="make an Ed25519 signing key")
    keygen.add_argument("--out", required=True, help="private key file to create (PKCS#8 PEM, mode 0600)")
    keygen.set_defaults(handler=_keygen)

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

    demo = commands.add_parser(
        "demo", help="two billers and six households over gRPC for three simulated months; bundles verified offline"
    )
    demo.add_argument("--out", default="parley-demo", help="directory for the agreement bundles (default: %(default)s)")
    demo.add_argument(
        "--json", dest="summary", metavar="FILE", help="also write the outcome (per household and bundle) as JSON"
    )
    demo.set_defaults(handler=_demo)

    add_certs_command(commands)  # parley certs
    _add_biller_commands(commands)
    add_consumer_commands(commands)  # parley consumer run
    add_conformance_commands(commands)  # parley conformance biller
    add_bench_command(commands)  # parley bench
    add_chaos_command(commands)  # parley chaos
    add_fuzz_command(commands)  # parley fuzz
    add_vectors_command(commands)  # parley vectors
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad usage, which is our "unusable input" too
        return int(exit_.code or 0)
    status: int = args.handler(args, Console(stderr=bool(getattr(args, "json", False))))
    return status


if __name__ == "__main__":
    sys.exit(main())
