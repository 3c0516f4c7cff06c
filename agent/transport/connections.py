"""TRN-11: at most `max_per_address` connections per peer address on the biller's gRPC listener.

gRPC offers no per-address connection cap (grpcio's server options bound the
total only: `grpc.max_allowed_incoming_connections`), and an interceptor sees
calls, never the silent connections that are the problem. So `ConnectionWatcher`
looks at the connections themselves: every `interval` it lists the established
TCP connections whose local port is the listener's (Linux: /proc/net/tcp and
tcp6) and which this process holds (their socket inode is one of /proc/self/fd),
groups them by the peer's IP address, keeps each address's oldest
`max_per_address` and shuts down the rest (`shutdown(SHUT_RDWR)` on a duplicate of
gRPC's descriptor: gRPC sees the connection end and releases it; the client sees
it closed). What it bounds: established connections per address held by this
process for longer than one check interval (0.5 s by default). A burst within an
interval is bounded by the total cap, and connections still in the kernel's
accept queue are not yet the process's. Each address over its cap is logged
once per check (`connection cap hit cap=per_address peer=… open=… closed=…`)
and each connection closed counted in
`parley_connection_caps_hit_total{cap="per_address"}`; the total cap found
reached is logged and counted (`cap="total"`) once each time it is reached;
`parley_connections_open` is the count at the last check, summed over the process's listeners (each
watcher adds the change it saw, so two listeners never overwrite each other's figure).

Elsewhere than Linux the watcher logs once that it cannot enforce the cap and
does nothing: put the cap in front of the process there (docs/OPERATIONS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.logs import log_step
from agent.metrics import BillerMetrics

logger = logging.getLogger("parley.transport")

PROC = Path("/proc")
ESTABLISHED = "01"  # the state column of /proc/net/tcp


@dataclass(frozen=True)
class Connection:
    """One established connection to the listener: its socket inode and the peer's IP address."""

    inode: int
    peer: str


def _ipv4(hex_address: str) -> str:
    return str(ipaddress.IPv4Address(bytes.fromhex(hex_address)[::-1]))


def _ipv6(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    address = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return str(address.ipv4_mapped or address)


def parse_proc_net_tcp(text: str, port: int, ipv6: bool) -> list[Connection]:
    """The established connections whose local port is `port`, from /proc/net/tcp (or tcp6) text."""
    decode = _ipv6 if ipv6 else _ipv4
    connections = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != ESTABLISHED:
            continue
        _, _, local_port = fields[1].partition(":")
        if int(local_port, 16) != port:
            continue
        remote, _, _ = fields[2].partition(":")
        connections.append(Connection(int(fields[9]), decode(remote)))
    return connections


def own_sockets(proc: Path = PROC) -> dict[int, int]:
    """Socket inode -> a descriptor of this process that holds it."""
    sockets: dict[int, int] = {}
    directory = proc / "self" / "fd"
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):  # closed since listed
            target = os.readlink(directory / name)
            if target.startswith("socket:["):
                sockets[int(target[8:-1])] = int(name)
    return sockets


def supported(proc: Path = PROC) -> bool:
    return (proc / "self" / "fd").is_dir() and (proc / "net" / "tcp").is_file()


def listener_connections(port: int, proc: Path = PROC) -> tuple[list[Connection], dict[int, int]]:
    """This process's established connections to `port`, and its socket descriptors by inode."""
    held = own_sockets(proc)
    connections: list[Connection] = []
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        path = proc / "net" / name
        with contextlib.suppress(FileNotFoundError):
            connections += parse_proc_net_tcp(path.read_text(), port, ipv6)
    return [c for c in connections if c.inode in held], held


def shut_down(inode: int, descriptor: int) -> bool:
    """End the connection behind `descriptor`, if it still is socket `inode`; gRPC keeps and closes its own
    descriptor. The duplicate makes the check and the shutdown about the same socket, never a reused number."""
    try:
        duplicate = os.dup(descriptor)
    except OSError:
        return False
    with socket.socket(fileno=duplicate) as connection:  # closes the duplicate only
        if os.fstat(duplicate).st_ino != inode:
            return False
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
    return True


class ConnectionWatcher:
    """Enforces TRN-11 on one listener port of this process (see the module docstring); `start`, then `stop`."""

    def __init__(
        self, port: int, metrics: BillerMetrics, *, max_per_address: int, max_total: int, interval: float
    ) -> None:
        self._port = port
        self._metrics = metrics
        self._max_per_address = max_per_address
        self._max_total = max_total
        self._interval = interval
        self._order: dict[int, int] = {}  # inode -> when first seen (a counter): the oldest are kept
        self._seen = 0
        self._total_reached = False
        self._open = 0  # this listener's share of the parley_connections_open gauge
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._max_per_address <= 0:
            return
        if not supported():
            log_step(
                logger, "connection cap unavailable", logging.WARNING, cap="per_address", reason="no /proc (not Linux)"
            )
            return
        self._task = asyncio.create_task(self._run(), name="parley-connection-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._count_open(0)

    async def _run(self) -> None:
        while True:
            try:
                self.check(*await asyncio.to_thread(listener_connections, self._port))
            except OSError as error:  # /proc unreadable now: try again next time
                logger.debug("connection check failed: %s", error)
            await asyncio.sleep(self._interval)

    def _count_open(self, open_now: int) -> None:
        self._metrics.connections_open.inc(open_now - self._open)
        self._open = open_now

    def check(self, connections: Iterable[Connection], descriptors: dict[int, int]) -> None:
        """One round: close what is past each address's cap, update the gauge, note the total cap."""
        by_peer: dict[str, list[Connection]] = {}
        order: dict[int, int] = {}
        for connection in sorted(connections, key=lambda c: (self._order.get(c.inode, sys.maxsize), c.inode)):
            if connection.inode not in self._order:
                self._seen += 1
            order[connection.inode] = self._order.get(connection.inode, self._seen)
            by_peer.setdefault(connection.peer, []).append(connection)
        self._order = order
        open_now = len(order)
        for peer, held in by_peer.items():
            excess = held[self._max_per_address :]
            if not excess:
                continue
            closed = sum(shut_down(c.inode, descriptors[c.inode]) for c in excess if c.inode in descriptors)
            open_now -= closed
            for connection in excess:
                self._order.pop(connection.inode, None)
            self._metrics.connection_caps_hit.labels("per_address").inc(closed)
            log_step(
                logger,
                "connection cap hit",
                logging.WARNING,
                cap="per_address",
                peer=peer,
                open=len(held),
                closed=closed,
                limit=self._max_per_address,
            )
        self._count_open(open_now)
        reached = open_now >= self._max_total
        if reached and not self._total_reached:
            self._metrics.connection_caps_hit.labels("total").inc()
            log_step(logger, "connection cap hit", logging.WARNING, cap="total", open=open_now, limit=self._max_total)
        self._total_reached = reached
