"""Issue 13, item 6: idle connections are reaped, connections and streams per address are bounded (TRN-10).

Loopback only, and bounded: 200 raw TCP connections that complete the HTTP/2 preface and SETTINGS exchange,
then stay silent, as the red team's 1,000 did."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.cli import main as parley_main
from agent.metrics import BillerMetrics
from agent.protocol.errors import Reason
from agent.transport.connections import Connection, ConnectionWatcher
from agent.transport.server import MAX_GRPC_DURATION, ConnectionLimits, serve_biller
from agent.transport.status import error_from_rpc
from parley.v1 import biller_service_pb2_grpc, event_pb2
from parley.v1.biller_service_pb2 import HelloRequest, WatchEventsRequest
from reference_biller.config import SAMPLE, ConfigError, ServerSettings, load_config
from reference_biller.settings import SettingsError, resolve_serve
from tests.helpers.peer import Biller, running_biller
from tests.helpers.process import serving_process

IDLE_CONNECTIONS = 200
# The client preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SETTINGS_ACK = bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])
SHORT_IDLE = ConnectionLimits(idle_timeout=timedelta(seconds=1), max_streams_per_peer=2)


@contextmanager
def idle_http2_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that speak HTTP/2 far enough to be established, then say nothing."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        for connection in sockets:
            connection.sendall(PREFACE)
        for connection in sockets:
            connection.settimeout(5)
            connection.recv(65536)  # the server's SETTINGS
            connection.sendall(SETTINGS_ACK)
            connection.setblocking(False)
        yield sockets
    finally:
        for connection in sockets:
            connection.close()


def closed_by_server(connection: socket.socket) -> bool:
    try:
        while data := connection.recv(65536):  # a GOAWAY, then the end of the stream
            del data
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.slow
def test_idle_connections_are_reaped_and_a_new_client_is_served(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        running = await serve_biller(biller.agent, "127.0.0.1:0", insecure=True, connection_limits=SHORT_IDLE)
        try:
            with idle_http2_connections(running.port, IDLE_CONNECTIONS) as sockets:
                started = time.monotonic()
                while not all(closed_by_server(s) for s in sockets):
                    assert time.monotonic() - started < 5, "idle connections still open well after the timeout"
                    await asyncio.sleep(0.2)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                hello = await stub.Hello(HelloRequest(protocol_versions=[1]), timeout=5)
                assert hello.protocol_version == 1
        finally:
            await running.stop(None)

    asyncio.run(_with_biller(tmp_path, scenario))


def test_open_streams_per_peer_address_are_bounded(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        running = await serve_biller(biller.agent, "127.0.0.1:0", insecure=True, connection_limits=SHORT_IDLE)
        alice = await biller.enrolled("acct-1", "consumer:alice")
        bob = await biller.enrolled("acct-2", "consumer:bob")
        carol = await biller.enrolled("acct-3", "consumer:carol")
        await biller.agent.emit_event("acct-1", event_pb2.EVENT_KIND_REMINDER, bill_id="b", reminder_level=1)
        await biller.agent.emit_event("acct-2", event_pb2.EVENT_KIND_REMINDER, bill_id="b", reminder_level=1)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                calls = [
                    stub.WatchEvents(WatchEventsRequest(query=consumer.query(account)))
                    for consumer, account in ((alice, "acct-1"), (bob, "acct-2"))
                ]
                for call in calls:
                    await call.read()  # open, and streaming
                third = stub.WatchEvents(WatchEventsRequest(query=carol.query("acct-3")))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await third.read()
                assert error_from_rpc(refused.value).reason is Reason.TOO_MANY_STREAMS
                failures = biller.agent.metrics.sample("parley_verification_failures_total", reason="TOO_MANY_STREAMS")
                assert failures == 1
                for call in calls:
                    call.cancel()
        finally:
            await running.stop(None)

    asyncio.run(_with_biller(tmp_path, scenario))


async def _with_biller(tmp_path: Path, scenario: object) -> None:
    async with running_biller(tmp_path) as biller:
        await scenario(biller)  # type: ignore[operator]


PER_ADDRESS = ConnectionLimits(max_connections_per_address=8, connection_check_interval=timedelta(milliseconds=100))


def test_connections_per_address_are_capped_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TRN-11: 12 silent connections from 127.0.0.1 against a cap of 8: four closed by the server, eight kept;
    the cap is logged and counted; once they go, a client from the same address is served."""

    async def scenario(biller: Biller) -> None:
        running = await serve_biller(biller.agent, "127.0.0.1:0", insecure=True, connection_limits=PER_ADDRESS)
        metrics = biller.agent.metrics
        try:
            with idle_http2_connections(running.port, 12) as sockets:
                started = time.monotonic()
                while metrics.sample("parley_connection_caps_hit_total", cap="per_address") < 4:
                    assert time.monotonic() - started < 5, "no connection past the per-address cap was closed"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)  # a few more checks: nothing else is closed
                closed = [s for s in sockets if closed_by_server(s)]
                assert len(closed) == 4
                assert metrics.sample("parley_connection_caps_hit_total", cap="per_address") == 4
                assert metrics.sample("parley_connections_open") == 8
            started = time.monotonic()
            while metrics.sample("parley_connections_open") > 0:
                assert time.monotonic() - started < 5
                await asyncio.sleep(0.1)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                hello = await stub.Hello(HelloRequest(protocol_versions=[1]), timeout=5)
                assert hello.protocol_version == 1
        finally:
            await running.stop(None)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connection cap hit")]
        assert lines
        assert all("cap=per_address" in line and "peer=127.0.0.1" in line for line in lines)

    caplog.set_level("INFO", logger="parley.transport")
    asyncio.run(_with_biller(tmp_path, scenario))


# --- `parley biller serve --max-connections-per-address` (flag > PARLEY_* > [server] > 64) ------------------


def test_two_listeners_add_up_in_the_open_connections_gauge() -> None:
    """Each watcher adds the change it saw: a second listener of the process (the tests' harness serves the same
    agent twice) must not overwrite the first's figure — it did, and the gauge read 0 with 8 connections open."""
    metrics = BillerMetrics()
    first, second = (
        ConnectionWatcher(port, metrics, max_per_address=8, max_total=100, interval=1.0) for port in (1, 2)
    )
    first.check([Connection(inode, "192.0.2.1") for inode in range(8)], {})
    second.check([], {})
    assert metrics.sample("parley_connections_open") == 8
    second.check([Connection(100, "192.0.2.2")], {})
    first.check([Connection(inode, "192.0.2.1") for inode in range(5)], {})
    assert metrics.sample("parley_connections_open") == 6
    asyncio.run(first.stop())
    assert metrics.sample("parley_connections_open") == 1


@pytest.mark.parametrize(
    ("name", "flag", "env", "default"),
    [
        ("max_connections", "--max-connections", "PARLEY_MAX_CONNECTIONS", 800),
        ("max_connections_per_address", "--max-connections-per-address", "PARLEY_MAX_CONNECTIONS_PER_ADDRESS", 64),
    ],
)
def test_the_connection_caps_are_serve_options(name: str, flag: str, env: str, default: int) -> None:
    """TRN-10's total cap and TRN-11's per-address cap, so that a conformance run can reach them with a few
    connections."""
    assert getattr(resolve_serve({}, ServerSettings(listen="127.0.0.1:0"), {}), name) == default
    from_file: dict[str, Any] = {name: 16}
    file = dataclasses.replace(ServerSettings(listen="127.0.0.1:0"), **from_file)
    assert getattr(resolve_serve({}, file, {}), name) == 16
    assert getattr(resolve_serve({}, file, {env: "24"}), name) == 24
    chosen = resolve_serve({name: "32"}, file, {env: "24"})
    assert (getattr(chosen, name), chosen.sources[name]) == (32, flag)
    for bad in ("0", "-3", "many", "2.5"):
        with pytest.raises(SettingsError, match=f"{flag}: expected a whole number"):
            resolve_serve({name: bad}, file, {})


def test_a_total_cap_gRPC_would_abort_on_is_refused_with_a_message() -> None:
    """gRPC core aborts the whole process when told 2**31 - 1 connections (a failed check, not an exception)."""
    file = ServerSettings(listen="127.0.0.1:0", max_connections=2**31 - 1)
    with pytest.raises(
        SettingsError, match=r"server.max_connections: expected a whole number of connections from 1 to 1,000,000"
    ):
        resolve_serve({}, file, {})
    with pytest.raises(
        SettingsError, match=r"PARLEY_MAX_CONNECTIONS: expected a whole number of connections from 1 to 1,000,000"
    ):
        resolve_serve({}, ServerSettings(listen="127.0.0.1:0"), {"PARLEY_MAX_CONNECTIONS": "2147483647"})
    assert resolve_serve({"max_connections": "1000000"}, file, {}).max_connections == 1_000_000
    with pytest.raises(ValueError, match="max_connections must be from 1 to 1,000,000, not 2,147,483,647"):
        ConnectionLimits(max_connections=2**31 - 1)
    with pytest.raises(ValueError, match=r"max_connections_per_address must be from 0 \(no cap\) to 1,000,000"):
        ConnectionLimits(max_connections_per_address=2**31 - 1)


@pytest.mark.parametrize(
    ("name", "flag", "env", "file_field", "default"),
    [
        ("idle_timeout", "--idle-timeout", "PARLEY_IDLE_TIMEOUT", "idle_timeout_seconds", 300.0),
        ("handshake_timeout", "--handshake-timeout", "PARLEY_HANDSHAKE_TIMEOUT", "handshake_timeout_seconds", 10.0),
    ],
)
def test_the_connection_timeouts_are_serve_options(
    name: str, flag: str, env: str, file_field: str, default: float
) -> None:
    """TRN-10's idle timeout and handshake deadline, so that a conformance run can check them without waiting."""
    assert getattr(resolve_serve({}, ServerSettings(listen="127.0.0.1:0"), {}), name) == default
    from_file: dict[str, Any] = {file_field: 60.0}
    file = dataclasses.replace(ServerSettings(listen="127.0.0.1:0"), **from_file)
    assert getattr(resolve_serve({}, file, {}), name) == 60.0
    assert getattr(resolve_serve({}, file, {env: "30"}), name) == 30.0
    chosen = resolve_serve({name: "2.5"}, file, {env: "30"})
    assert (getattr(chosen, name), chosen.sources[name]) == (2.5, flag)
    for bad in ("0", "-3", "soon"):
        with pytest.raises(SettingsError, match=f"{flag}: expected a number of seconds"):
            resolve_serve({name: bad}, file, {})


@pytest.mark.parametrize(
    ("name", "flag", "env"),
    [
        ("idle_timeout", "--idle-timeout", "PARLEY_IDLE_TIMEOUT"),
        ("handshake_timeout", "--handshake-timeout", "PARLEY_HANDSHAKE_TIMEOUT"),
    ],
)
def test_a_connection_timeout_gRPC_cannot_take_is_refused_with_a_message(name: str, flag: str, env: str) -> None:
    """gRPC takes each timeout as a C int of milliseconds: from 2147484 s on, `serve` crashed as it started
    ("OverflowError: value too large to convert to int"). The bound lives with ConnectionLimits
    (MAX_GRPC_DURATION); the serve options check the same one, naming where the value came from."""
    file = ServerSettings(listen="127.0.0.1:0")
    bound = "expected a number of seconds above 0 and at most 2,147,483 (gRPC takes it as a C int of milliseconds)"
    for bad in ("2147484", "1e300", "inf", "nan"):
        with pytest.raises(SettingsError, match=re.escape(f"{flag}: {bound}, got {bad!r}")):
            resolve_serve({name: bad}, file, {})
        with pytest.raises(SettingsError, match=re.escape(f"{env}: {bound}, got {bad!r}")):
            resolve_serve({}, file, {env: bad})
    largest = resolve_serve({name: "2147483"}, file, {})
    assert getattr(largest, name) == MAX_GRPC_DURATION.total_seconds() == 2_147_483
    longest: dict[str, Any] = {name: MAX_GRPC_DURATION}
    options = dict(ConnectionLimits(**longest).grpc_options())
    assert max(options.values()) == 2_147_483_000 < 2**31  # what gRPC is told fits its C int
    past: dict[str, Any] = {name: MAX_GRPC_DURATION + timedelta(milliseconds=1)}
    with pytest.raises(ValueError, match=f"{name} must be above 0 and at most 2,147,483 seconds"):
        ConnectionLimits(**past)
    zero: dict[str, Any] = {name: timedelta(0)}
    with pytest.raises(ValueError, match=f"{name} must be above 0"):
        ConnectionLimits(**zero)


def test_serve_starts_with_the_longest_timeouts_and_refuses_one_past_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bound is what gRPC takes: at it the server starts (gRPC is told 2,147,483,000 ms); one second past it
    is one line and exit 2, with nothing created."""
    state = tmp_path / "state"
    arguments = ["biller", "serve", "--insecure", "--listen", "127.0.0.1:0", "--state-dir", str(state)]
    assert parley_main([*arguments, "--idle-timeout", "2147484"]) == 2
    shown = capsys.readouterr().out.strip()
    assert "--idle-timeout: expected a number of seconds above 0 and at most 2,147,483" in shown
    assert len(shown.splitlines()) == 1
    assert not state.exists()

    async def scenario(biller: Biller) -> None:
        longest = ConnectionLimits(idle_timeout=MAX_GRPC_DURATION, handshake_timeout=MAX_GRPC_DURATION)
        running = await serve_biller(biller.agent, "127.0.0.1:0", insecure=True, connection_limits=longest)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = biller_service_pb2_grpc.BillerServiceStub(channel)
                hello = await stub.Hello(HelloRequest(protocol_versions=[1]), timeout=5)
                assert hello.protocol_version == 1
        finally:
            await running.stop(None)

    asyncio.run(_with_biller(tmp_path, scenario))


def test_a_bad_per_address_cap_in_the_config_names_its_key(tmp_path: Path) -> None:
    config = tmp_path / "biller.toml"
    config.write_text(
        SAMPLE.read_text().replace("\n[payments]", "\n[server]\nmax_connections_per_address = 0\n\n[payments]", 1)
    )
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert "server.max_connections_per_address: expected a whole number of connections from 1 to 1,000,000" in str(
        refused.value
    )
    assert str(refused.value).endswith("got 0")


def test_serve_refuses_a_bad_per_address_cap_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    arguments = ["biller", "serve", "--insecure", "--listen", "127.0.0.1:0", "--state-dir", str(state)]
    assert parley_main([*arguments, "--max-connections-per-address", "none"]) == 2
    shown = capsys.readouterr().out.strip()
    assert "--max-connections-per-address: expected a whole number of connections from 1 to 1,000,000" in shown
    assert shown.endswith("got 'none'")
    assert len(shown.splitlines()) == 1
    assert not state.exists()


@pytest.mark.slow
def test_serve_enforces_the_per_address_cap_it_is_given(tmp_path: Path) -> None:
    arguments = ["--insecure", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")]
    with serving_process([*arguments, "--max-connections-per-address", "2"], log=tmp_path / "serve.log") as (
        process,
        banner,
    ):
        port = int(banner["listening"].split()[0].rpartition(":")[2])
        with idle_http2_connections(port, 4) as sockets:
            started = time.monotonic()
            while sum(closed_by_server(s) for s in sockets) < 2:
                assert time.monotonic() - started < 10, "the serve process kept connections past its cap"
                time.sleep(0.2)
            time.sleep(1.5)  # more checks: the two oldest stay
            assert sum(closed_by_server(s) for s in sockets) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert "connection cap hit cap=per_address peer=127.0.0.1" in (tmp_path / "serve.log").read_text()
