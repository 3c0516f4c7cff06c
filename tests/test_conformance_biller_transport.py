"""The biller suite's transport cases (TRN-9, TRN-10, TRN-11), against billers set up for them.

The in-process reference run of tests/test_conformance_biller.py is plaintext and tells the suite no connection
bounds, so there these cases are skipped (`REFERENCE_SKIPS`). Here the reference biller is served over mutual TLS
with a short idle timeout, a short handshake deadline, a small total cap and a smaller per-address cap, the suite is
told them, and each case PASSes; each broken setup — mutual TLS left out, idle connections never reaped, no handshake
deadline, keepalive pings not policed, no total cap, no per-address cap — fails exactly its case.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
from rich.console import Console

from agent.conformance import biller as biller_suite
from agent.conformance.biller.target import ConnectionBounds
from agent.conformance.runner import RunOptions, run_suite
from agent.tools.certs import issue_client_cert, issue_server_cert, make_dev_ca
from agent.transport.client import ClientTls
from agent.transport.server import ConnectionLimits
from reference_biller.config import load_config
from reference_biller.service import SteppableClock, serving_biller
from tests.helpers.scratch import scratch_directory

TRANSPORT_CASES = (
    "TRN-9/client-certificate-required",
    "TRN-10/idle-connections-reaped",
    "TRN-10/handshake-deadline",
    "TRN-10/keepalive-pings-policed",
    "TRN-10/total-cap",
    "TRN-11/per-address-cap",
)
IDLE_TIMEOUT = timedelta(seconds=4)
HANDSHAKE_TIMEOUT = timedelta(seconds=2)
PER_ADDRESS = 8
TOTAL = 14  # above PER_ADDRESS, so that the per-address case reaches its own cap first
BOUNDED = ConnectionLimits(
    max_connections=TOTAL,
    idle_timeout=IDLE_TIMEOUT,
    handshake_timeout=HANDSHAKE_TIMEOUT,
    max_connections_per_address=PER_ADDRESS,
    connection_check_interval=timedelta(milliseconds=100),
)
TOLD = ConnectionBounds(
    idle_timeout=IDLE_TIMEOUT.total_seconds(),
    max_per_address=PER_ADDRESS,
    handshake_timeout=HANDSHAKE_TIMEOUT.total_seconds(),
    max_connections=TOTAL,
)


@dataclass(frozen=True)
class PingsNotPoliced(ConnectionLimits):
    """TRN-10's keepalive policing left out: pings at any rate, with no call in flight too, and never a strike."""

    def grpc_options(self) -> list[tuple[str, int]]:
        lenient = {
            "grpc.http2.max_ping_strikes": 0,
            "grpc.keepalive_permit_without_calls": 1,
            "grpc.http2.min_ping_interval_without_data_ms": 0,
        }
        return [(name, lenient.get(name, value)) for name, value in super().grpc_options()]


def outcomes(failing: Sequence[str] = (), outcome: str = "FAIL") -> dict[str, str]:
    """Every transport case PASSes but `failing`, which report `outcome`."""
    return {case: outcome if case in failing else "PASS" for case in TRANSPORT_CASES}


@dataclass(frozen=True)
class Setup:
    """How the reference biller is served: with mutual TLS or TLS alone, and its connection limits."""

    name: str
    mutual_tls: bool
    limits: ConnectionLimits
    outcomes: dict[str, str]  # what the suite must report for each transport case


SETUPS = (
    Setup("reference", True, BOUNDED, outcomes()),
    Setup("mutual TLS left out", False, BOUNDED, outcomes(["TRN-9/client-certificate-required"])),
    Setup(
        "idle connections never reaped",
        True,
        dataclasses.replace(BOUNDED, idle_timeout=timedelta(hours=1)),
        outcomes(["TRN-10/idle-connections-reaped"]),
    ),
    Setup(
        "no handshake deadline",  # over TLS, gRPC's idle timeout does not reach a connection still in its handshake
        True,
        dataclasses.replace(BOUNDED, handshake_timeout=timedelta(hours=1)),
        outcomes(["TRN-10/handshake-deadline"]),
    ),
    Setup(
        "keepalive pings not policed",
        True,
        PingsNotPoliced(**{f.name: getattr(BOUNDED, f.name) for f in dataclasses.fields(BOUNDED)}),
        outcomes(["TRN-10/keepalive-pings-policed"]),
    ),
    Setup(
        "no total cap",  # none that a suite could reach
        True,
        dataclasses.replace(BOUNDED, max_connections=10_000),
        outcomes(["TRN-10/total-cap"]),
    ),
    Setup(
        "no per-address cap",  # a SHOULD: a WARN
        True,
        dataclasses.replace(BOUNDED, max_connections_per_address=0),
        outcomes(["TRN-11/per-address-cap"], "WARN"),
    ),
)


Run = tuple[dict[str, str], str]  # each transport case's outcome, and what the suite printed


async def run_setup(directory: Path, setup: Setup) -> Run:
    """The reference biller served as `setup` says, and the suite's transport cases against it."""
    ca = make_dev_ca()
    server, client = issue_server_cert(ca), issue_client_cert(ca, "conformance suite")
    tls = ClientTls(ca.cert_pem, certificate_chain=client.chain_pem, private_key=client.key_pem)
    report, output = directory / "report.json", io.StringIO()
    async with serving_biller(
        load_config(),
        listen="127.0.0.1:0",
        state_dir=directory / "state",
        clock=SteppableClock(),
        tls=(server.chain_pem, server.key_pem),
        tls_client_ca=ca.cert_pem if setup.mutual_tls else None,
        conformance_control=True,
        interval=timedelta(hours=1),
        shutdown_grace=0,
        connection_limits=setup.limits,
    ) as running:
        target = f"127.0.0.1:{running.port}"
        await run_suite(
            biller_suite.suite,
            lambda: biller_suite.connect(target, tls=tls, bounds=TOLD),
            RunOptions(target=target, json=report, only=TRANSPORT_CASES),
            Console(file=output, width=200),
        )
    cases = json.loads(report.read_text(encoding="utf-8"))["cases"]
    return {case["id"]: case["outcome"] for case in cases}, output.getvalue()


@pytest.fixture(scope="module")
def setup_runs(request: pytest.FixtureRequest) -> dict[str, Run | BaseException]:
    """The run of each setup selected in this session, all side by side in one loop before the first is judged.

    The cases mostly wait (for an idle timeout, a handshake deadline, a cap's refusal), each setup on a server
    and connections of its own: one after the other, the seven runs took 85 s of a CI run; side by side, about
    the longest one's time. Each test still judges its own run.
    """
    selected = {
        cast(Setup, item.callspec.params["setup"]).name
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.path == Path(__file__)
        and item.originalname == "test_transport_cases"
    }
    chosen = [setup for setup in SETUPS if setup.name in selected]

    async def side_by_side(root: Path) -> dict[str, Run | BaseException]:
        async def one(number: int, setup: Setup) -> Run:
            directory = root / str(number)
            directory.mkdir()
            return await run_setup(directory, setup)

        runs = await asyncio.gather(*(one(n, setup) for n, setup in enumerate(chosen)), return_exceptions=True)
        return {setup.name: run for setup, run in zip(chosen, runs, strict=True)}

    with scratch_directory("parley-transport-cases-") as root:
        return asyncio.run(side_by_side(root))


@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_transport_cases(setup_runs: dict[str, Run | BaseException], setup: Setup) -> None:
    run = setup_runs[setup.name]
    if isinstance(run, BaseException):
        raise run
    outcomes_seen, output = run
    assert outcomes_seen == setup.outcomes, output
