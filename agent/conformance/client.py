"""A Parley client for conformance suites that never raises for a refused call.

A `Connection` delivers what the suite's parties sign (`agent.conformance.peers`:
`SignedParty` and the envelope mutations) over gRPC and hands back either the
response or a `Refusal` — the gRPC code and every `ErrorInfo` found in the
status details:

    connection = Connection.open("127.0.0.1:7443", insecure=True)
    alice = SignedParty.create(biller_party_id, clock=lambda: now)
    answer = await connection.call("Enrol", EnrolRequest(request=alice.enrolment(account_id, code)))
    if isinstance(answer, Refusal):
        print(answer.code, answer.reason)

Nothing here trusts the target: answers are parsed but not verified (cases
verify what they need against the target's verified key set chain).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agent.protocol.errors import ERROR_DOMAIN
from agent.transport.client import ClientTls, open_channel
from parley.v1 import bill_pb2, biller_service_pb2, biller_service_pb2_grpc, envelope_pb2, terms_pb2
from parley.v1 import conformance_control_service_pb2 as cc
from parley.v1 import conformance_control_service_pb2_grpc as cc_grpc

# gRPC codes that mean the call never reached a Parley service (ERR-2): no ErrorInfo is expected with them.
LIBRARY_CODES = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
TRANSPORT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


# --- Talking to a target --------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInfoSeen:
    """One google.rpc.ErrorInfo found in a refusal's status details."""

    reason: str
    domain: str
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class Refusal:
    """A call that failed: its gRPC code and message, and what its `google.rpc.Status` carried.

    `status_readable` is False when the `grpc-status-details-bin` trailer is
    missing or contradicts the call; `infos` are all the ErrorInfo details (any
    domain); `other_details` counts the details of other types.
    """

    rpc: str
    code: grpc.StatusCode
    message: str
    status_readable: bool
    infos: tuple[ErrorInfoSeen, ...]
    other_details: int = 0

    @property
    def parley_infos(self) -> tuple[ErrorInfoSeen, ...]:
        return tuple(info for info in self.infos if info.domain == ERROR_DOMAIN)

    @property
    def reason(self) -> str | None:
        """The reason of the one ErrorInfo in domain "parley.v1", or None if there is not exactly one."""
        infos = self.parley_infos
        return infos[0].reason if len(infos) == 1 else None

    def describe(self) -> str:
        """E.g. "NOT_FOUND (NOT_FOUND)" or "UNAVAILABLE, no ErrorInfo in domain parley.v1"."""
        if self.reason is not None:
            text = f"{self.reason} ({self.code.name})"
        elif self.parley_infos:
            text = f"{self.code.name} with {len(self.parley_infos)} ErrorInfo in domain {ERROR_DOMAIN}"
        else:
            text = f"{self.code.name}, no ErrorInfo in domain {ERROR_DOMAIN}"
        return f"{text}: {self.message}" if self.message else text

    @property
    def unreachable(self) -> bool:
        """The target could not be reached (or did not answer in time)."""
        return self.code in TRANSPORT_CODES and not self.infos


def refusal_of(rpc: str, error: grpc.aio.AioRpcError) -> Refusal:
    """Everything a failed call carries."""
    code = error.code()
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
        readable = status is not None
    except ValueError:  # a Status contradicting the call's code or message
        status, readable = None, False
    infos: list[ErrorInfoSeen] = []
    others = 0
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):  # False for a detail of another type
            infos.append(ErrorInfoSeen(info.reason, info.domain, dict(info.metadata)))
        else:
            others += 1
    return Refusal(rpc, code, error.details() or "", readable, tuple(infos), others)


Answer = Any  # a response message, or a Refusal


class EventStream:
    """An open WatchEvents stream: read events one at a time, with a timeout."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def next(self, timeout: float) -> envelope_pb2.Envelope | Refusal | None:
        """The next event; None when the stream ended; a Refusal if it failed; TimeoutError if none came."""
        try:
            response = await asyncio.wait_for(self._call.read(), timeout)
        except grpc.aio.AioRpcError as error:
            return refusal_of("WatchEvents", error)
        if response is grpc.aio.EOF:
            return None
        event: envelope_pb2.Envelope = response.event
        return event

    def cancel(self) -> None:
        self._call.cancel()


class Connection:
    """One channel to a target: the BillerService and ConformanceControlService stubs, errors as values."""

    def __init__(self, channel: grpc.aio.Channel, *, call_timeout: float = 30.0) -> None:
        self.channel = channel
        self.biller = biller_service_pb2_grpc.BillerServiceStub(channel)
        self.control = cc_grpc.ConformanceControlServiceStub(channel)
        self.call_timeout = call_timeout
        self.refusals: list[Refusal] = []  # every refusal seen on this connection (ERR-1 checks them all)

    @classmethod
    def open(
        cls, target: str, *, tls: ClientTls | None = None, insecure: bool = False, call_timeout: float = 30.0
    ) -> Connection:
        """A connection to `target` (see agent.transport.client.open_channel for the TLS rules)."""
        return cls(open_channel(target, tls=tls, insecure=insecure), call_timeout=call_timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def call(self, rpc: str, request: Message) -> Answer:
        """A unary BillerService call by method name; the response, or a Refusal."""
        return await self._unary(rpc, getattr(self.biller, rpc), request)

    async def control_call(self, rpc: str, request: Message) -> Answer:
        """A unary ConformanceControlService call by method name; the response, or a Refusal."""
        return await self._unary(rpc, getattr(self.control, rpc), request)

    async def _unary(self, rpc: str, method: Any, request: Message) -> Answer:
        try:
            return await method(request, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as error:
            refusal = refusal_of(rpc, error)
            self.refusals.append(refusal)
            return refusal

    @asynccontextmanager
    async def watch(self, query: envelope_pb2.Envelope) -> AsyncIterator[EventStream]:
        """A WatchEvents stream for the block's duration (always cancelled at the end)."""
        call = self.biller.WatchEvents(biller_service_pb2.WatchEventsRequest(query=query))
        stream = _RecordingStream(call, self.refusals)
        try:
            yield stream
        finally:
            stream.cancel()

    # --- conformance control (§16) ---

    async def create_test_account(self, holder_name: str = "Conformance test") -> Answer:
        return await self.control_call("CreateTestAccount", cc.CreateTestAccountRequest(holder_name=holder_name))

    async def issue_test_bill(
        self, account_id: str, amount_due: terms_pb2.Money, due_date: str, options: bill_pb2.AdvertisedOptions | None
    ) -> Answer:
        request = cc.IssueTestBillRequest(account_id=account_id, amount_due=amount_due, due_date=due_date)
        if options is not None:
            request.options.CopyFrom(options)
        return await self.control_call("IssueTestBill", request)

    async def advance_clock(self, seconds: int) -> Answer:
        return await self.control_call("AdvanceClock", cc.AdvanceClockRequest(seconds=seconds))

    async def settle_payments(self) -> Answer:
        return await self.control_call("SettlePayments", cc.SettlePaymentsRequest())

    async def issue_test_enrolment_code(self, account_id: str) -> Answer:
        return await self.control_call(
            "IssueTestEnrolmentCode", cc.IssueTestEnrolmentCodeRequest(account_id=account_id)
        )


# An HTTP/2 client's opening (RFC 9113 §3.4): the preface, then an empty SETTINGS frame (length 0, type 4, no
# flags, stream 0); and the acknowledgement of the server's SETTINGS (flag ACK).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS_ACK = bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])
HTTP2_FRAME_HEADER_BYTES = 9
HTTP2_PING, HTTP2_GOAWAY = 6, 7  # frame types (RFC 9113, §6.7 and §6.8)
HTTP2_ENHANCE_YOUR_CALM = 0xB  # the GOAWAY error code of a peer that misbehaves, e.g. with too many pings


def http2_ping(opaque: int) -> bytes:
    """An HTTP/2 PING frame (no ACK flag) on the connection's stream 0, carrying `opaque` as its 8 bytes."""
    return bytes([0, 0, 8, HTTP2_PING, 0, 0, 0, 0, 0]) + opaque.to_bytes(8, "big")


class IdleConnection:
    """A connection to the target that completes the TLS and HTTP/2 handshakes, then never makes a call (TRN-10,
    TRN-11): what a crowd of silent clients holds. `closed` is set once the target closes it; `goaway_code` is the
    error code of the GOAWAY frame the target sent, if it sent one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, received: bytes = b"") -> None:
        self._writer = writer
        self._pending = bytearray(received)  # bytes of frames not yet complete, from the target
        self.closed = asyncio.Event()
        self.opened_at = time.monotonic()  # once the handshakes are done
        self.closed_at: float | None = None  # when the target closed it
        self.goaway_code: int | None = None
        self._watch = asyncio.ensure_future(self._until_closed(reader))

    @property
    def lived(self) -> float | None:
        """Seconds from the end of the handshakes until the target closed it; None while open."""
        return None if self.closed_at is None else self.closed_at - self.opened_at

    @classmethod
    async def open(
        cls, target: str, tls: ClientTls | None, timeout: float, *, source: str | None = None
    ) -> IdleConnection:
        """Connect (from the local address `source`, if given), send the preface and SETTINGS, read the target's
        SETTINGS and acknowledge them."""
        host, port = _host_port(target)
        context = None if tls is None else _ssl_context(tls)
        server_name = None if tls is None else tls.server_name or host
        local_addr = None if source is None else (source, 0)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=server_name, local_addr=local_addr),
            timeout,
        )
        writer.write(HTTP2_PREFACE)
        await writer.drain()
        first = await asyncio.wait_for(reader.read(65536), timeout)  # the target's SETTINGS
        if not first:
            writer.transport.abort()
            raise ConnectionError("the target closed the connection during the HTTP/2 handshake")
        writer.write(HTTP2_SETTINGS_ACK)
        await writer.drain()
        return cls(reader, writer, first)

    @classmethod
    async def open_silent(cls, target: str, timeout: float) -> IdleConnection:
        """Connect over TCP and send nothing at all: neither a TLS ClientHello nor the HTTP/2 preface (TRN-10's
        handshake deadline is what must close it)."""
        host, port = _host_port(target)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        """Write raw bytes (HTTP/2 frames) on the connection; a connection the target closed takes them silently."""
        if not self.closed.is_set():
            self._writer.write(data)
            with contextlib.suppress(OSError, ssl.SSLError):
                await self._writer.drain()

    async def _until_closed(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(65536):  # frames until a GOAWAY, then the end of the stream
                self._pending.extend(data)
                self._read_frames()
        self._read_frames()
        self.closed_at = time.monotonic()
        self.closed.set()

    def _read_frames(self) -> None:
        """Consume the complete frames received so far, noting a GOAWAY's error code."""
        while len(self._pending) >= HTTP2_FRAME_HEADER_BYTES:
            length = int.from_bytes(self._pending[:3], "big")
            end = HTTP2_FRAME_HEADER_BYTES + length
            if len(self._pending) < end:
                return
            if self._pending[3] == HTTP2_GOAWAY and length >= 8:  # last stream id (4 bytes), error code (4 bytes)
                error_code = self._pending[HTTP2_FRAME_HEADER_BYTES + 4 : HTTP2_FRAME_HEADER_BYTES + 8]
                self.goaway_code = int.from_bytes(error_code, "big")
            del self._pending[:end]

    async def close(self) -> None:
        """Drop the connection at once (no TLS close_notify to wait for: the target may never answer one)."""
        self._writer.transport.abort()
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _ssl_context(tls: ClientTls) -> ssl.SSLContext:
    """A client TLS context offering HTTP/2 as gRPC does, with `tls`'s trust anchors and client certificate."""
    context = ssl.create_default_context(
        cadata=None if tls.root_certificates is None else tls.root_certificates.decode("ascii")
    )
    context.set_alpn_protocols(["h2"])
    if tls.certificate_chain is not None and tls.private_key is not None:
        with tempfile.TemporaryDirectory() as directory:  # ssl loads a certificate only from files
            chain, key = Path(directory, "chain.pem"), Path(directory, "key.pem")
            chain.write_bytes(tls.certificate_chain)
            key.touch(0o600)
            key.write_bytes(tls.private_key)
            context.load_cert_chain(chain, key)
    return context


class _RecordingStream(EventStream):
    def __init__(self, call: Any, refusals: list[Refusal]) -> None:
        super().__init__(call)
        self._refusals = refusals

    async def next(self, timeout: float) -> envelope_pb2.Envelope | Refusal | None:
        answer = await super().next(timeout)
        if isinstance(answer, Refusal):
            self._refusals.append(answer)
        return answer


__all__ = [
    "LIBRARY_CODES",
    "Connection",
    "ErrorInfoSeen",
    "EventStream",
    "IdleConnection",
    "Refusal",
    "refusal_of",
]
