"""Server CPU per unary call of a bare grpc.aio echo service (uvloop), without and with one server interceptor.

    python scripts/grpc_call_cost.py             # 3 alternating pairs, 6 s each
    python scripts/grpc_call_cost.py --pairs 5 --seconds 10

What it isolates: the cost gRPC's Python server pays per call before any protocol work (Parley's workers pay it
five times per negotiation, the bench's baseline once per call), and what a pass-through interceptor that caches
its wrapped handlers per method, as `agent.metrics.MetricsInterceptor` does, adds to it. One server process, one
client process with 8 concurrent calls on one channel, 400-byte payloads; the server's CPU (every thread) from
/proc/<pid>/stat. Compare the two figures of a pair, not runs on different days (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import time
from collections.abc import Awaitable, Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import grpc
import uvloop

METHOD = "/parley.measure.Echo/Echo"
CONCURRENCY = 8
PAYLOAD = b"x" * 400


class PassThrough(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once, as the metrics interceptor does, and times every call."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        self.seconds_in_calls = 0.0  # what a histogram would be given, summed

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        inner = handler.unary_unary

        async def observed(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            started = time.perf_counter()
            try:
                return await inner(request, context)  # type: ignore[no-any-return]
            finally:
                self.seconds_in_calls += time.perf_counter() - started

        wrapped: Any = grpc.unary_unary_rpc_method_handler(observed)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _serve(port: int, intercepted: bool, ready: Queue[int], stop: Event) -> None:
    uvloop.install()

    async def main() -> None:
        async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return request

        service, name = METHOD[1:].split("/")
        handler = grpc.method_handlers_generic_handler(service, {name: grpc.unary_unary_rpc_method_handler(echo)})
        server = grpc.aio.server(interceptors=(PassThrough(),) if intercepted else ())
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.put(os.getpid())
        await asyncio.to_thread(stop.wait)
        await server.stop(0)

    asyncio.run(main())


def _drive(port: int, seconds: float, calls: Queue[int]) -> None:
    uvloop.install()

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: Any = channel.unary_unary(METHOD)
            done, end = 0, time.monotonic() + seconds

            async def slot() -> None:
                nonlocal done
                while time.monotonic() < end:
                    await call(PAYLOAD)
                    done += 1

            await asyncio.gather(*(slot() for _ in range(CONCURRENCY)))
            calls.put(done)

    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat", encoding="ascii").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def measure(intercepted: bool, seconds: float) -> tuple[float, float]:
    """(calls per second, server CPU microseconds per call)."""
    context = multiprocessing.get_context("spawn")
    ready: Queue[int] = context.Queue()
    calls: Queue[int] = context.Queue()
    stop = context.Event()
    port = _free_port()
    server = context.Process(target=_serve, args=(port, intercepted, ready, stop))
    server.start()
    try:
        pid = ready.get(timeout=30)
        client = context.Process(target=_drive, args=(port, seconds, calls))
        before = _cpu_seconds(pid)
        client.start()
        done = calls.get(timeout=seconds + 30)
        after = _cpu_seconds(pid)
        client.join()
    finally:
        stop.set()
        server.join(timeout=10)
    return done / seconds, (after - before) / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs (default 3)")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of calls per run (default 6)")
    args = parser.parse_args()
    for _ in range(args.pairs):
        for intercepted in (False, True):
            rate, cpu = measure(intercepted, args.seconds)
            label = "with an interceptor" if intercepted else "bare"
            print(f"{label:20} {rate:7,.0f} calls/s  server {cpu:6.1f} µs per call", flush=True)


if __name__ == "__main__":
    main()
