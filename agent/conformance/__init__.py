"""Parley conformance suites: check an implementation, case by case, against docs/PROTOCOL.md.

    parley conformance biller --target HOST:PORT [--tls-ca FILE | --insecure]
                              [--tls-client-cert FILE --tls-client-key FILE] [--idle-timeout SECONDS]
                              [--handshake-timeout SECONDS] [--max-connections N]
                              [--max-connections-per-address N]
                              [--only IDS] [--skip IDS]
                              [--known-failing FILE] [--timeout S] [--junit FILE] [--json | --json-out FILE]
    parley conformance consumer --client-cmd "CMD" [--jobs N] [--work-dir DIR] [--only IDS] [--skip IDS]
                              [--known-failing FILE] [--timeout S] [--junit FILE] [--json | --json-out FILE]

- `runner`: the generic framework (cases tagged with requirement ids, outcomes,
  selection, known-failing lists, JUnit and JSON reports, exit codes);
- `peers`: the test peers shared by the suites, the tests and the tools — a
  signed hostile party (every header, key set and envelope field under the
  caller's control, built independently of the library it judges), an
  identity, a policy, a rail, a hostile servicer, `free_port`;
- `client`: a connection that delivers what the peers sign and returns
  refusals as values;
- `biller`: the biller-side suite, run against a gRPC biller: one module of cases per spec
  section, in the running order its `SECTIONS` gives;
- `hostile_biller`: a scripted biller (the real agent behind a servicer that
  forges what it sends and observes what it receives);
- `consumer_cases`: the consumer-side suite, which runs a client command
  against a hostile biller per scenario;
- `control`: the conformance-control service (§16) over any biller shaped like
  `ControlledBiller`, for billers that want to offer the suite its fixtures.

docs/CONFORMANCE.md describes the suites, their cases and their reports.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from agent.conformance.runner import EXIT_NOT_RUN, add_run_arguments, run_options
from agent.listen import is_endpoint
from agent.tools.numbers import number_argument
from agent.tools.paths import directory_argument
from agent.transport.server import MAX_CONNECTIONS_LIMIT

# The bounds a biller is told to the suite: waited for (seconds) or filled (connections) by its cases.
MAX_TOLD_SECONDS = 3600.0
MAX_TOLD_CONNECTIONS = MAX_CONNECTIONS_LIMIT  # what the reference biller itself accepts


def _target(text: str) -> str:
    """`--target`'s type: HOST:PORT with a port from 1 to 65535, by the rule an enrolment link's endpoint follows
    (the address a client connects to). Checked here, before any case: gRPC wrapped port 99999 to 34463 and
    tested whatever listened there, and a target with no port was reported as a host of ''."""
    if not is_endpoint(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT with a port from 1 to 65535 (e.g. 127.0.0.1:7443, [::1]:7443)"
        )
    return text


def _run_biller(args: argparse.Namespace, out: Console) -> int:
    from agent.conformance.biller import connect, suite  # noqa: PLC0415 - only this command needs grpc's stack
    from agent.conformance.biller.target import ConnectionBounds  # noqa: PLC0415
    from agent.conformance.runner import run_suite  # noqa: PLC0415
    from agent.listen import is_loopback  # noqa: PLC0415
    from agent.transport.client import ClientTls, target_host  # noqa: PLC0415

    host = target_host(args.target)
    if args.insecure and not is_loopback(host):  # said now, not as "unreachable" by every case (TRN-3)
        out.print(
            f"--insecure (plaintext) is allowed only to a loopback target (TRN-3), not {host!r}: use --tls-ca FILE"
        )
        return EXIT_NOT_RUN
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        out.print("--tls-client-cert and --tls-client-key go together (the client certificate and its key)")
        return EXIT_NOT_RUN
    if args.insecure and args.tls_client_cert is not None:
        out.print("a client certificate needs TLS: choose --insecure or --tls-client-cert/--tls-client-key")
        return EXIT_NOT_RUN
    tls = None
    if args.tls_ca is not None or args.tls_client_cert is not None:
        files = {
            "--tls-ca": args.tls_ca,
            "--tls-client-cert": args.tls_client_cert,
            "--tls-client-key": args.tls_client_key,
        }
        read: dict[str, bytes | None] = {}
        for flag, name in files.items():
            try:
                read[flag] = None if name is None else Path(name).read_bytes()
            except OSError as error:
                why = escape(error.strerror or str(error))
                out.print(f"[bold red]cannot read {flag} {escape(name or '')}:[/] {why}")
                return EXIT_NOT_RUN
        tls = ClientTls(
            root_certificates=read["--tls-ca"],
            certificate_chain=read["--tls-client-cert"],
            private_key=read["--tls-client-key"],
        )
    options = run_options(args, args.target)
    bounds = ConnectionBounds(
        idle_timeout=args.idle_timeout,
        max_per_address=args.max_connections_per_address,
        handshake_timeout=args.handshake_timeout,
        max_connections=args.max_connections,
    )
    call_timeout = min(10.0, options.timeout) if options.timeout > 0 else 10.0
    return asyncio.run(
        run_suite(
            suite,
            lambda: connect(args.target, tls=tls, insecure=args.insecure, call_timeout=call_timeout, bounds=bounds),
            options,
            out,
        )
    )


def _run_consumer(args: argparse.Namespace, out: Console) -> int:
    from agent.conformance.consumer_cases import connect, suite  # noqa: PLC0415 - only this command needs them
    from agent.conformance.runner import run_suite  # noqa: PLC0415

    options = run_options(args, f"client command {args.client_cmd!r}")
    timeout = options.timeout if options.timeout > 0 else 1.0
    return asyncio.run(
        run_suite(suite, lambda: connect(args.client_cmd, timeout=timeout, work_dir=args.work_dir), options, out)
    )


def add_conformance_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`parley conformance biller` and `parley conformance consumer`."""
    conformance = commands.add_parser(
        "conformance",
        help="check an implementation against docs/PROTOCOL.md, case by case",
        description="Run a Parley conformance suite (docs/CONFORMANCE.md). Exit codes: 0 no case failed; 1 a case "
        "failed (or a known-failing case passed); 2 the target is unreachable, the options are unusable, or no "
        "case ran.",
    )
    suites = conformance.add_subparsers(dest="conformance_command", required=True, metavar="SUITE")
    biller = suites.add_parser(
        "biller",
        help="check a biller agent (a BillerService gRPC server)",
        description="Check a biller against every MUST and SHOULD a client can observe over the wire. Cases that need "
        "fixtures are skipped unless the biller announces conformance-control (e.g. `parley biller serve "
        "--conformance-control`); never run that flag in production.",
    )
    biller.add_argument("--target", required=True, type=_target, metavar="HOST:PORT", help="the biller's gRPC address")
    transport = biller.add_mutually_exclusive_group()
    transport.add_argument(
        "--tls-ca", metavar="FILE", help="PEM trust anchors for the biller's certificate (default: the system roots)"
    )
    transport.add_argument("--insecure", action="store_true", help="plaintext, to a loopback target only (TRN-3)")
    biller.add_argument(
        "--tls-client-cert",
        metavar="FILE",
        help="PEM client certificate chain, for a biller asking for mutual TLS (TRN-9)",
    )
    biller.add_argument("--tls-client-key", metavar="FILE", help="the client certificate's PEM private key")
    biller.add_argument(
        "--idle-timeout",
        type=number_argument(float, 0, MAX_TOLD_SECONDS, above_low=True),
        metavar="SECONDS",
        help="the biller's idle timeout, after which it closes a connection with no call in flight (TRN-10); "
        "without it TRN-10/idle-connections-reaped is skipped. Give --timeout above it",
    )
    biller.add_argument(
        "--handshake-timeout",
        type=number_argument(float, 0, MAX_TOLD_SECONDS, above_low=True),
        metavar="SECONDS",
        help="the biller's deadline for a new connection's TLS and HTTP/2 handshakes (TRN-10); without it "
        "TRN-10/handshake-deadline is skipped",
    )
    biller.add_argument(
        "--max-connections",
        type=number_argument(int, 1, MAX_TOLD_CONNECTIONS),
        metavar="N",
        help="the biller's total cap on the connections it holds (TRN-10); without it TRN-10/total-cap is skipped. "
        "The suite opens about N connections, from several loopback addresses",
    )
    biller.add_argument(
        "--max-connections-per-address",
        type=number_argument(int, 1, MAX_TOLD_CONNECTIONS),
        metavar="N",
        help="the biller's cap on connections from one address (TRN-11); without it TRN-11/per-address-cap is skipped",
    )
    add_run_arguments(biller)
    biller.set_defaults(handler=_run_biller)
    consumer = suites.add_parser(
        "consumer",
        help="check a consumer agent (a client command) against scripted hostile billers",
        description="Check a consumer: each scenario starts a scripted biller on 127.0.0.1 and runs the client "
        "command (a shell command) with PARLEY_TARGET, PARLEY_BILLER_PARTY_ID, PARLEY_FINGERPRINT, "
        "PARLEY_ACCOUNT_ID, PARLEY_ENROLMENT_CODE and PARLEY_STATE_DIR set; the client reports its payments in "
        "$PARLEY_STATE_DIR/bank-orders.jsonl (docs/CONFORMANCE.md). The reference consumer: --client-cmd "
        "'parley consumer run --from-env --once --approve-all'.",
    )
    consumer.add_argument(
        "--client-cmd", required=True, metavar="CMD", help="the client under test: one pass, then exit (run by sh)"
    )
    consumer.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="scenarios run at once, each with its own biller and state directory (default: %(default)s)",
    )
    consumer.add_argument(
        "--work-dir",
        type=directory_argument,
        metavar="DIR",
        help="keep each scenario's directory (client output, client state, the biller's database) under DIR "
        "(default: a temporary directory, removed at the end)",
    )
    add_run_arguments(consumer)
    consumer.set_defaults(handler=_run_consumer)


__all__ = ["add_conformance_commands"]
