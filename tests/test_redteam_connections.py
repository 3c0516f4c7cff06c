"""Issue 13, item 6: idle connections are reaped, connections and streams per address are bounded (TRN-10).

Loopback only, and bounded: 200 raw TCP connections that complete the HTTP/2 preface and SETTINGS exchange,
then stay silent, as the red team's 1,000 did."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from agent.protocol.errors import Reason
from agent.transport.server import ConnectionLimits, serve_biller
from agent.transport.status import error_from_rpc
from parley.v1 import biller_service_pb2_grpc, event_pb2
from parley.v1.biller_service_pb2 import HelloRequest, WatchEventsRequest
from tests.helpers.peer import Biller, running_biller

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
