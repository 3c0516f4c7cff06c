"""The reference biller's commands: `parley biller init | serve | codes | rotate-key | check-config`.

    parley biller init --state-dir DIR [--config FILE]
                                    create the biller's identity (key and key set version 1) without serving

    parley biller serve --listen HOST:PORT [--config FILE] [--state-dir DIR] [--store PATH|URL]
                        [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE] | --insecure]
                        [--conformance-control]
                        [--metrics-listen HOST:PORT] [--log-format json|text] [--log-level LEVEL]
                        [--shutdown-grace SECONDS] [--otel] [--max-connections N]
                        [--max-connections-per-address N] [--idle-timeout SECONDS] [--handshake-timeout SECONDS]
                                    run the reference biller (built-in sample config without --config);
                                    PARLEY_* variables and the config's [server] table set the same options
    parley biller codes --state-dir DIR [--store PATH|URL] [--config FILE] [--account ID]... [--revoke]
                        [--endpoint HOST:PORT [--qr] [--qr-svg FILE] [--qr-png FILE]] [--json]
                                    issue enrolment codes (--account, else every configured account), each
                                    superseding the account's unspent ones; --revoke only revokes them
    parley biller rotate-key --state-dir DIR [--config FILE]
                                    replace the biller's signing key, keeping its identity; refused while a
                                    biller serves the directory (its serve.lock is held)
    parley biller check-config FILE validate a reference biller configuration (and read the files it names:
                                    TLS, webhook secrets), as `serve` would

    accounts, issue-bill, import, backoffice, settle, import-statement: reference_biller/backoffice_cli.py

Serve options: flag > PARLEY_* environment variable > the config file's [server]
table > default (reference_biller/settings.py, docs/OPERATIONS.md).

`check-config` exits 0 (OK) or 1 (the error names the key); the others exit 2
on an invalid configuration or bad usage and 1 when the biller fails; `serve`
runs until SIGTERM or SIGINT and exits 0. Only `serve` and `init` create an
identity, and only in a directory that holds none: `codes` and `rotate-key` refuse a state directory
without one (exit 2), and every command refuses one that holds a part of one (a key without its key
set version 1: restore it), so a mistyped `--state-dir` or a lost file never prints codes under a new
fingerprint. A household's state directory, or an empty `--state-dir`, is refused too (exit 2).
`codes` checks everything it was given (the accounts, `--endpoint` by the rule the
consumer reads the link with, the QR files' directories, an explicit store that must exist) before it
issues anything, so a refusal supersedes no code. `agent/cli.py` composes these
commands into `parley`, as it does the reference consumer's
(`reference_consumer/runner.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import segno
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.markup import escape

from agent.clock import Clock, SystemClock
from agent.identity import IdentityError, NoIdentityError
from agent.listen import is_endpoint, is_loopback
from agent.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from agent.protocol.keys import InsecureKeyFileError
from agent.stores import POSTGRES_SCHEMES, SQLITE_SCHEME, open_biller_store
from agent.stores.files import check_private_file
from agent.tools.paths import output_file_argument
from agent.tracing import TracingUnavailable, server_interceptors
from agent.transport.server import DEFAULT_CONNECTION_LIMITS, install_uvloop
from reference_biller import accounts, sample
from reference_biller.backoffice_cli import add_backoffice_commands
from reference_biller.config import SAMPLE, BillerConfig, ConfigError, load_config
from reference_biller.console.cli import add_console_command
from reference_biller.service import (
    STORE_FILE,
    RunningBiller,
    SteppableClock,
    exclusive_lock,
    identity_dir,
    open_biller,
    run_biller,
)
from reference_biller.settings import (
    ServeSettings,
    SettingsError,
    check_server_table,
    config_file,
    resolve_serve,
    resolve_state_dir,
    resolve_store,
)
from reference_biller.webhooks import Endpoint

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


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
        check_server_table(config.server)  # resolve_serve's own rules on the table alone: what serve refuses
        _check_server_files(config)
    except (ConfigError, SettingsError) as error:
        out.print(f"[bold red]INVALID[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return EXIT_FAILED
    out.print(
        f"OK {args.file}: {config.name} ({config.party_id}), {len(config.segments)} segment(s), "
        f"{len(config.accounts)} account(s), {len(config.webhooks)} webhook(s)"
        f"{', sample bills' if config.simulation.sample_bills else ''}",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK


def _check_server_files(config: BillerConfig) -> None:
    """ConfigError unless the [server] table's TLS files are what `serve` would load (paths as serve reads them:
    relative to the working directory)."""
    server = config.server
    try:
        if server.tls_cert is not None and server.tls_key is not None:
            cert, key = Path(server.tls_cert), Path(server.tls_key)
            _check_tls_pair(cert, cert.read_bytes(), key, check_private_file(key))  # as `_tls_files` reads it
        if server.tls_client_ca is not None:
            client_ca = Path(server.tls_client_ca)
            _certificates(client_ca, client_ca.read_bytes())
    except InsecureKeyFileError as error:  # a PermissionError, but no unreadable file: say what serve says
        raise ConfigError(f"server.tls_key: {error}") from error
    except OSError as error:
        raise ConfigError(f"[server]: cannot read {error.filename}: {error.strerror}") from error
    except ValueError as error:
        raise ConfigError(f"[server]: {error}") from error
    _webhook_endpoints(config)


def _webhook_endpoints(config: BillerConfig) -> list[Endpoint]:
    """The [[webhooks]] with their secrets read (paths as serve reads them: relative to the working directory);
    ConfigError naming the webhook if a secret file is unreadable or too short."""
    endpoints = []
    for index, webhook in enumerate(config.webhooks):
        try:
            endpoints.append(Endpoint.load(webhook))
        except OSError as error:
            raise ConfigError(
                f"webhooks[{index}].secret_files: cannot read {error.filename}: {error.strerror}"
            ) from error
        except ValueError as error:
            raise ConfigError(f"webhooks[{index}].secret_files: {error}") from error
    return endpoints


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
    certificate, key = settings.tls_cert.read_bytes(), check_private_file(settings.tls_key)
    _check_tls_pair(settings.tls_cert, certificate, settings.tls_key, key)
    return certificate, key


def _certificates(path: Path, pem: bytes) -> list[x509.Certificate]:
    """The PEM certificates in `pem`; ValueError naming `path` if there are none (gRPC would only say
    "Failed to bind to address")."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError(f"{path} is not a readable certificate: expected PEM (-----BEGIN CERTIFICATE-----)") from None


def _check_tls_pair(cert_path: Path, certificate: bytes, key_path: Path, key_pem: bytes) -> None:
    """ValueError unless the files hold a PEM certificate chain and the unencrypted PEM key that goes with it."""
    leaf = _certificates(cert_path, certificate)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise ValueError(f"{key_path} is not a readable private key: expected an unencrypted PEM key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError(f"{key_path} is not the key of the certificate in {cert_path}: give the matching pair")


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
    *,
    webhooks: list[Endpoint],
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
            webhooks=webhooks,
            connection_limits=replace(
                DEFAULT_CONNECTION_LIMITS,
                max_connections=settings.max_connections,
                max_connections_per_address=settings.max_connections_per_address,
                idle_timeout=timedelta(seconds=settings.idle_timeout),
                handshake_timeout=timedelta(seconds=settings.handshake_timeout),
            ),
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
        identity_dir(settings.state_dir).check()  # a file, a household's: refused before serve makes the directory
        tls = _tls_files(settings, args.insecure)
        client_ca = None if settings.tls_client_ca is None else settings.tls_client_ca.read_bytes()
        if settings.tls_client_ca is not None and client_ca is not None:
            _certificates(settings.tls_client_ca, client_ca)
        if settings.otel:
            server_interceptors()  # TracingUnavailable now, before anything is opened
        webhooks = _webhook_endpoints(config)
    except (TracingUnavailable, ValueError, InsecureKeyFileError) as error:  # ConfigError is a ValueError
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except OSError as error:
        _failed(out, f"cannot read {error.filename}: {error.strerror}")
        return EXIT_UNUSABLE
    configure_logging(settings.log_format, settings.log_level)
    install_uvloop()
    try:
        asyncio.run(_serve_until_signalled(args, config, settings, tls, client_ca, webhooks=webhooks))
    except IdentityError as error:  # another party's identity, a corrupt key or key set
        _failed(out, f"the biller cannot use its state directory: {error}")
        return EXIT_FAILED
    except ValueError as error:  # TRN-2 and other refusals before serving
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except (OSError, RuntimeError) as error:  # the port is taken, the store unreachable...
        _failed(out, f"the biller failed: {error}")
        return EXIT_FAILED
    return EXIT_OK


@dataclass(frozen=True)
class _Issued:
    """What `codes` did, per account (in the order asked): its holder, its new code, how many codes it revoked."""

    fingerprint: bytes
    holders: dict[str, str]
    codes: dict[str, str]  # empty with --revoke
    revoked: dict[str, int]  # superseded by the new code, or revoked by --revoke


class _UnknownAccounts(LookupError):
    """Accounts asked for that do not exist: bad input (exit 2), found before any code is issued."""


async def _issue_codes(
    args: argparse.Namespace, config: BillerConfig, state_dir: Path, store_location: str | None
) -> _Issued:
    ids = args.account or [account.account_id for account in config.accounts]
    await _check_accounts_exist(config, state_dir, store_location, ids)
    biller = await open_biller(config, state_dir, SystemClock(), store_location=store_location, create_identity=False)
    holders: dict[str, str] = {}
    codes: dict[str, str] = {}
    revoked: dict[str, int] = {}
    try:
        now = biller.clock.now()
        for account_id in ids:
            record = await biller.agent.account(account_id)
            holders[account_id] = "" if record is None else record.holder_name
            if args.revoke:
                revoked[account_id] = await accounts.revoke_codes(biller.agent, biller.store, account_id, now)
            else:
                codes[account_id], revoked[account_id] = await accounts.issue_code(
                    biller.agent, biller.store, account_id, now
                )
    finally:
        await biller.close()
    return _Issued(biller.fingerprint, holders, codes, revoked)


async def _check_accounts_exist(
    config: BillerConfig, state_dir: Path, store_location: str | None, ids: list[str]
) -> None:
    """_UnknownAccounts unless every account in `ids` is configured (opening the biller creates those) or
    stored. Without a store yet (a fresh `init`) only the configured ones can exist, and nothing is opened, so a
    refusal leaves the state directory as it was."""
    configured = [account.account_id for account in config.accounts]
    unknown = [account_id for account_id in ids if account_id not in configured]
    location = store_location or str(state_dir / STORE_FILE)
    path = _sqlite_path(location)
    if unknown and (path is None or path.exists()):  # PostgreSQL, or a SQLite file already made
        store = await open_biller_store(location)
        try:
            unknown = [account_id for account_id in unknown if await store.get_account(account_id) is None]
        finally:
            await store.close()
    if unknown:
        listed = ", ".join(configured) or "none"
        raise _UnknownAccounts(
            f"no account {', '.join(map(repr, unknown))}: the configuration's accounts are {listed}, and "
            "`parley biller accounts list` shows every account (`accounts add` adds one); nothing was issued"
        )


def _sqlite_path(location: str) -> Path | None:
    """The file of a SQLite store location (a path or sqlite:///PATH, as `open_biller_store` reads it); None for
    PostgreSQL."""
    return None if location.startswith(POSTGRES_SCHEMES) else Path(location.removeprefix(SQLITE_SCHEME))


def _print_codes(args: argparse.Namespace, config: BillerConfig, issued: _Issued) -> None:
    """What `codes` did: per account its new code (and the URI, QR code) or how many codes it revoked."""
    fingerprint, holders, codes, revoked = issued.fingerprint, issued.holders, issued.codes, issued.revoked

    def uri_of(account_id: str) -> str | None:
        if not args.endpoint or account_id not in codes:
            return None
        return sample.enrolment_uri(args.endpoint, config.party_id, fingerprint, account_id, codes[account_id])

    if args.json:
        entries = []
        for account_id, holder in holders.items():
            entry: dict[str, object] = {"account_id": account_id, "holder": holder}
            if args.revoke:
                entry["revoked"] = revoked[account_id]
            else:
                entry["code"] = codes[account_id]
                entry["superseded"] = revoked[account_id]
                if (uri := uri_of(account_id)) is not None:
                    entry["enrolment_uri"] = uri
            entries.append(entry)
        document = {
            "biller": config.party_id,
            "name": config.name,
            "fingerprint": fingerprint.hex(),
            "endpoint": args.endpoint,
            "accounts": entries,
        }
        print(json.dumps(document, indent=2))
        return
    print(f"biller      {config.name} ({config.party_id})")
    print(f"fingerprint {fingerprint.hex()}")
    if args.endpoint:
        print(f"endpoint    {args.endpoint}")
    for account_id, holder in holders.items():
        if args.revoke:
            print(f"account     {account_id}  {revoked[account_id]} unspent code(s) revoked  holder {holder}")
            continue
        superseded = f"  (superseded {revoked[account_id]} earlier code(s))" if revoked[account_id] else ""
        print(f"account     {account_id}  code {codes[account_id]}  holder {holder}{superseded}")
        uri = uri_of(account_id)
        if uri is None:
            continue
        print(f"            {uri}")
        if args.qr:
            segno.make(uri, error="m").terminal(out=sys.stdout, compact=True)


def _write_qr_files(args: argparse.Namespace, config: BillerConfig, issued: _Issued) -> list[str]:
    """Write the --qr-svg/--qr-png files of the one account asked for (in text and JSON mode alike); their
    paths. Their directories were checked as the arguments were parsed, before the code was issued."""
    paths = [(path, kind) for path, kind in ((args.qr_svg, "svg"), (args.qr_png, "png")) if path is not None]
    if not paths:
        return []
    (account_id, code), *_ = issued.codes.items()  # usage checks: exactly one --account, an --endpoint
    uri = sample.enrolment_uri(args.endpoint, config.party_id, issued.fingerprint, account_id, code)
    qr = segno.make(uri, error="m")
    for path, kind in paths:
        qr.save(str(path), kind=kind, scale=8, border=4)
    return [str(path) for path, _ in paths]


def _biller_state(args: argparse.Namespace, out: Console) -> tuple[BillerConfig, Path] | None:
    """The configuration and state directory of an offline biller command; None once it said why not."""
    config = _biller_config(args, out)
    if config is None:
        return None
    try:
        state_dir = resolve_state_dir(args.state_dir, config.server)
        identity_dir(state_dir).check()  # a file, a household's: refused before anything is read or made
    except (SettingsError, IdentityError) as error:
        _failed(out, str(error))
        return None
    return config, state_dir


def _codes(args: argparse.Namespace, out: Console) -> int:
    resolved = _biller_state(args, out)
    if resolved is None:
        return EXIT_UNUSABLE
    config, state_dir = resolved
    try:
        store_location = resolve_store(args.store, config.server)
        problem = _codes_usage(args) or _store_missing(store_location)
    except SettingsError as error:
        problem = str(error)
    if problem is not None:
        _failed(out, problem)
        return EXIT_UNUSABLE
    try:
        identity_dir(state_dir).require()  # NoIdentityError before any store is looked at
        issued = asyncio.run(_issue_codes(args, config, state_dir, store_location))
    except NoIdentityError as error:
        _no_identity(out, error)
        return EXIT_UNUSABLE
    except _UnknownAccounts as error:
        _failed(out, str(error))
        return EXIT_UNUSABLE
    except (OSError, ValueError, LookupError) as error:  # accounts.AccountError is a ValueError
        _failed(out, f"cannot issue codes: {error}")
        return EXIT_FAILED
    _print_codes(args, config, issued)
    try:
        written = _write_qr_files(args, config, issued)
    except OSError as error:
        _failed(out, f"cannot write the QR code: {error}; the code was issued all the same")
        return EXIT_FAILED
    for path in written:
        out.print(f"            QR code written to {path}", markup=False, highlight=False, soft_wrap=True)
    return EXIT_OK


def _codes_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the options of `codes`, or None; checked before any code is issued (a new code
    supersedes the account's earlier ones, so a refusal after issuing would have changed the store)."""
    qr_files = args.qr_svg is not None or args.qr_png is not None
    if (args.qr or qr_files) and not args.endpoint:
        return "a QR code carries the enrolment URI: give --endpoint HOST:PORT too"
    if qr_files and len(args.account or ()) != 1:
        return "--qr-svg/--qr-png write one account's QR code: give exactly one --account"
    if args.revoke and (args.qr or qr_files or args.endpoint is not None):
        return "--revoke issues no code: it takes no --endpoint or QR option"
    if args.revoke and not args.account:
        return "--revoke needs --account ID (revoking every account's codes at once is not offered)"
    if args.qr and args.json:
        return "--qr draws in the terminal, --json prints a document: leave --qr out (--qr-svg/--qr-png write files)"
    if args.endpoint is not None and not is_endpoint(args.endpoint):
        return (
            f"--endpoint {args.endpoint!r} is not HOST:PORT with a port from 1 to 65535 (e.g. biller.example:7443): "
            "consumers could not enrol with its link"
        )
    return None  # the QR files' directories: checked as the arguments were parsed (output_file_argument)


def _store_missing(location: str | None) -> str | None:
    """Why `codes` refuses the store it was given, or None. A SQLite path that names no file yet would open a new,
    empty store: its codes would print fine and never reach the serving biller. The state directory's own store
    (None) may be new: `init` makes no store, and a mistyped state directory has no identity."""
    path = None if location is None else _sqlite_path(location)
    if path is None or path.is_file():
        return None
    return (
        f"the store {path} {'is not a file' if path.exists() else 'does not exist'}: give the serving biller's "
        "store (--store, PARLEY_STORE or [server] store), or none for biller.sqlite in the state directory; "
        "nothing was issued"
    )


def _no_identity(out: Console, error: NoIdentityError) -> None:
    _failed(
        out,
        f"{error}; nothing was created. Give the serving biller's --state-dir (PARLEY_STATE_DIR), "
        "or create an identity with `parley biller init --state-dir DIR` (or `parley biller serve`)",
    )


def _init(args: argparse.Namespace, out: Console) -> int:
    resolved = _biller_state(args, out)
    if resolved is None:
        return EXIT_UNUSABLE
    config, state_dir = resolved
    identities = identity_dir(state_dir)
    try:
        if identities.exists():
            held = identities.load_existing(config.party_id, SystemClock().now())
            _failed(
                out,
                f"{state_dir} already holds {held.chain.party_id}'s identity "
                f"(fingerprint {held.chain.fingerprint.hex()}): nothing changed",
            )
            return EXIT_FAILED
        created = identities.load(config.party_id, SystemClock().now())
    except (OSError, ValueError) as error:
        _failed(out, f"cannot create the identity: {error}")
        return EXIT_FAILED
    print(f"biller      {config.party_id}")
    print(f"fingerprint {created.chain.fingerprint.hex()}")
    print(f"state       {state_dir} (biller.key, mode 0600, and key set version 1)")
    return EXIT_OK


def _rotate_key(args: argparse.Namespace, out: Console) -> int:
    resolved = _biller_state(args, out)
    if resolved is None:
        return EXIT_UNUSABLE
    config, state_dir = resolved
    identities = identity_dir(state_dir)
    try:
        identities.require()  # NoIdentityError before any file is made (the lock's included)
        with exclusive_lock(state_dir):  # StateDirInUse while a biller serves it; nothing written before
            rotated = identities.rotate(config.party_id, SystemClock().now())
    except NoIdentityError as error:
        _no_identity(out, error)
        return EXIT_UNUSABLE
    except (OSError, ValueError) as error:
        _failed(out, f"cannot rotate the key: {error}")
        return EXIT_FAILED
    print(f"biller      {config.party_id}")
    print(f"fingerprint {rotated.chain.fingerprint.hex()} (unchanged)")
    print(f"new key     {rotated.key.keyid} in key set version {rotated.chain.latest.version}")
    print("restart the biller (every replica, with this state directory's biller.key and key set files)")
    return EXIT_OK


def add_biller_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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

    init = actions.add_parser(
        "init",
        help="create the biller's identity (signing key and key set version 1) in a state directory, without serving",
    )
    init.add_argument("--config", help=config_help)
    init.add_argument("--state-dir", help="the new biller's state directory (env PARLEY_STATE_DIR)")
    init.set_defaults(handler=_init)

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
    serve.add_argument(
        "--max-connections",
        metavar="N",
        help="connections this process may hold in all; past it a new connection is closed in its handshake "
        "(TRN-10; env PARLEY_MAX_CONNECTIONS; default: 800)",
    )
    serve.add_argument(
        "--max-connections-per-address",
        metavar="N",
        help="connections one peer IP address may hold; past it the newest are closed (TRN-11; "
        "env PARLEY_MAX_CONNECTIONS_PER_ADDRESS; default: 64)",
    )
    serve.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        help="close a connection with no call in flight for this long (TRN-10; env PARLEY_IDLE_TIMEOUT; default: 300)",
    )
    serve.add_argument(
        "--handshake-timeout",
        metavar="SECONDS",
        help="close a new connection that has not finished its TLS and HTTP/2 handshakes in this long (TRN-10; "
        "env PARLEY_HANDSHAKE_TIMEOUT; default: 10)",
    )
    serve.set_defaults(handler=_serve)

    codes = actions.add_parser(
        "codes",
        help="issue enrolment codes (--account ID, else every configured account); each supersedes the "
        "account's earlier unspent codes",
    )
    codes.add_argument("--config", help=config_help)
    codes.add_argument("--state-dir", help="the serving biller's state directory (env PARLEY_STATE_DIR)")
    codes.add_argument("--store", metavar="PATH|URL", help=store_help)
    codes.add_argument(
        "--account", metavar="ID", action="append", help="this account only (repeatable; default: configured ones)"
    )
    codes.add_argument("--revoke", action="store_true", help="revoke the account's unspent codes; issue none")
    codes.add_argument("--endpoint", metavar="HOST:PORT", help="the biller's address, to print enrolment URIs too")
    codes.add_argument("--qr", action="store_true", help="print each enrolment URI as a QR code in the terminal")
    for kind in ("svg", "png"):  # a file that cannot be written is refused before any code is issued
        codes.add_argument(
            f"--qr-{kind}",
            metavar="FILE",
            type=output_file_argument,
            help=f"write the account's enrolment QR code as {kind.upper()}",
        )
    codes.add_argument("--json", action="store_true", help="print the codes as one JSON document on stdout")
    codes.set_defaults(handler=_codes)

    rotate = actions.add_parser(
        "rotate-key",
        help="replace the biller's signing key, keeping its identity (KEY-17); refused while a biller serves it",
    )
    rotate.add_argument("--config", help=config_help)
    rotate.add_argument("--state-dir", help="the biller's state directory (env PARLEY_STATE_DIR)")
    rotate.set_defaults(handler=_rotate_key)

    check = actions.add_parser("check-config", help="validate a reference biller configuration")
    check.add_argument("file", help="a TOML configuration file")
    check.set_defaults(handler=_check_config)

    add_backoffice_commands(actions)  # backoffice, settle, import-statement: reference_biller/backoffice_cli.py
    add_console_command(actions)  # the operator console: reference_biller/console/cli.py


__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNUSABLE", "add_biller_commands"]
