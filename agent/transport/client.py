"""The consumer's gRPC client: channels, the BillerService calls, errors and retries.

`BillerClient` is a thin, typed wrapper over the generated stub; it knows
nothing of signatures or state (that is `agent.consumer`). What it adds:

- **Channels** (TRN-3): TLS by default, verified against the given trust
  anchors (or gRPC's default roots); plaintext only when asked for explicitly
  (`insecure=True`) and only to a loopback address.
- **Errors** (ERR-4): every failed call raises `CallError`, a
  `RemoteProtocolError` carrying the reason read from the call's one
  `ErrorInfo`, or INTERNAL_ERROR with the gRPC code for failures without one.
- **Deadlines and retries** (TRN-6, TRN-7, ERR-6): every unary call has a
  deadline; a call that fails transiently (UNAVAILABLE, DEADLINE_EXCEEDED,
  INTERNAL, RATE_LIMITED) is sent again with the very same request bytes,
  with exponential backoff, a bounded number of times. Retrying the same
  envelope is always safe: the biller answers a retry with its stored answer
  (HDR-12, NEG-18, PAY-2).

    client = BillerClient.connect("billing.energy.example:7443", tls=ClientTls(root_certificates=ca_pem))
    hello = await client.hello()
    ...
    await client.close()
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from agent.listen import is_loopback
from agent.protocol.errors import Reason
from agent.protocol.limits import SUPPORTED_VERSIONS
from agent.transport.status import CallError, error_from_rpc
from agent.version import software_name
from parley.v1 import biller_service_pb2 as pb
from parley.v1 import biller_service_pb2_grpc, envelope_pb2

logger = logging.getLogger("parley.client")

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

CLIENT_NAME = software_name("consumer")
# TRN-8: list answers carry many envelopes; accept well over the 4 MiB the spec asks for.
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
_TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL})
_JITTER_STEPS = 1000


@dataclass(frozen=True)
class RetryPolicy:
    """How a unary call is retried: `attempts` tries in all, backoff doubling from `initial_backoff`.

    `call_timeout` is the gRPC deadline of each attempt, in seconds (TRN-7).
    """

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    call_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a call needs at least one attempt")
        if not 0 <= self.initial_backoff <= self.max_backoff or self.multiplier < 1 or self.call_timeout <= 0:
            raise ValueError("backoff must satisfy 0 <= initial <= max, multiplier >= 1, and call_timeout > 0")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 for the first): capped exponential, half jitter."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        return ceiling * (0.5 + secrets.randbelow(_JITTER_STEPS) / (2 * _JITTER_STEPS))


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class ClientTls:
    """TLS settings for a biller channel (TRN-3).

    `root_certificates` are the PEM trust anchors that verify the biller's
    certificate chain (None: gRPC's default roots); `server_name` overrides the
    name checked against the certificate (for a target given as an address).
    `certificate_chain` and `private_key` (PEM, both or neither) are the client
    certificate a mutual-TLS biller asks for (TRN-9).
    """

    root_certificates: bytes | None = None
    server_name: str | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)  # never printed

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate chain and its private key go together")


def target_host(target: str) -> str:
    """The host of a gRPC target such as "host:port", "[::1]:port" or "dns:///host:port"."""
    address = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit():
        host = address
    return host.removeprefix("[").removesuffix("]")


def open_channel(
    target: str, *, tls: ClientTls | None = None, insecure: bool = False, max_receive_bytes: int = MAX_RECEIVE_BYTES
) -> grpc.aio.Channel:
    """A channel to a biller: TLS, or plaintext with `insecure=True` to a loopback address only (TRN-3).

    ValueError for plaintext to any other address, and for both `tls` and `insecure`.
    """
    if tls is not None and insecure:
        raise ValueError("choose either tls or insecure, not both")
    options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_receive_bytes)]
    if insecure:
        host = target_host(target)
        if not is_loopback(host):
            raise ValueError(f"plaintext is allowed only to a loopback address (TRN-3), not {host!r}")
        return grpc.aio.insecure_channel(target, options=options)
    settings = tls or ClientTls()
    if settings.server_name is not None:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.root_certificates,
        private_key=settings.private_key,
        certificate_chain=settings.certificate_chain,
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


def is_transient(error: CallError) -> bool:
    """ERR-6: whether resending the same request later may succeed (transport failures, INTERNAL, RATE_LIMITED)."""
    return error.code in _TRANSIENT_CODES or error.reason is Reason.RATE_LIMITED


class BillerClient:
    """The BillerService calls of one biller endpoint; errors raise `CallError`."""

    def __init__(self, channel: grpc.aio.Channel, *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self._channel = channel
        self._stub = biller_service_pb2_grpc.BillerServiceStub(channel)
        self.retry = retry

    @classmethod
    def connect(
        cls, target: str, *, tls: ClientTls | None = None, insecure: bool = False, retry: RetryPolicy = DEFAULT_RETRY
    ) -> BillerClient:
        """A client on a new channel to `target` (see `open_channel`)."""
        return cls(open_channel(target, tls=tls, insecure=insecure), retry=retry)

    async def close(self) -> None:
        """Close the channel; calls and streams still running on it are cancelled."""
        await self._channel.close()

    # --- the calls (each one signed envelope in, the biller's answer out) ---

    async def hello(self) -> pb.HelloResponse:
        request = pb.HelloRequest(protocol_versions=SUPPORTED_VERSIONS, client_name=CLIENT_NAME)
        return await self._unary(self._stub.Hello, request)

    async def get_key_sets(self, party_id: str = "", after_version: int = 0) -> pb.GetKeySetsResponse:
        return await self._unary(
            self._stub.GetKeySets, pb.GetKeySetsRequest(party_id=party_id, after_version=after_version)
        )

    async def publish_key_set(self, key_set: envelope_pb2.Envelope) -> pb.PublishKeySetResponse:
        return await self._unary(self._stub.PublishKeySet, pb.PublishKeySetRequest(key_set=key_set))

    async def enrol(self, request: envelope_pb2.Envelope) -> pb.EnrolResponse:
        return await self._unary(self._stub.Enrol, pb.EnrolRequest(request=request))

    async def list_bills(self, query: envelope_pb2.Envelope) -> pb.ListBillsResponse:
        return await self._unary(self._stub.ListBills, pb.ListBillsRequest(query=query))

    async def get_bill(self, query: envelope_pb2.Envelope) -> pb.GetBillResponse:
        return await self._unary(self._stub.GetBill, pb.GetBillRequest(query=query))

    async def negotiate(self, move: envelope_pb2.Envelope, disclosure: bytes = b"") -> pb.NegotiateResponse:
        return await self._unary(self._stub.Negotiate, pb.NegotiateRequest(move=move, disclosure=disclosure))

    async def get_thread(self, query: envelope_pb2.Envelope) -> pb.GetThreadResponse:
        return await self._unary(self._stub.GetThread, pb.GetThreadRequest(query=query))

    async def create_payment_intent(self, intent: envelope_pb2.Envelope) -> pb.CreatePaymentIntentResponse:
        return await self._unary(self._stub.CreatePaymentIntent, pb.CreatePaymentIntentRequest(intent=intent))

    async def get_receipt(self, query: envelope_pb2.Envelope) -> pb.GetReceiptResponse:
        return await self._unary(self._stub.GetReceipt, pb.GetReceiptRequest(query=query))

    async def request_erasure(self, request: envelope_pb2.Envelope) -> pb.RequestErasureResponse:
        return await self._unary(self._stub.RequestErasure, pb.RequestErasureRequest(request=request))

    async def watch_events(self, query: envelope_pb2.Envelope) -> AsyncGenerator[envelope_pb2.Envelope, None]:
        """The event stream of one signed query, without retries (the caller resumes from its cursor, EVT-5).

        Failures raise `CallError`; the stream is cancelled when the iterator is closed.
        """
        call = self._stub.WatchEvents(pb.WatchEventsRequest(query=query))
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as failure:
            raise error_from_rpc(failure) from failure
        finally:
            call.cancel()

    async def _unary(self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        """One call with a deadline, resent unchanged after transient failures (TRN-6)."""
        policy = self.retry
        for attempt in range(policy.attempts):
            try:
                return await method(request, timeout=policy.call_timeout)
            except grpc.aio.AioRpcError as failure:
                error = error_from_rpc(failure)
                if attempt + 1 == policy.attempts or not is_transient(error):
                    raise error from failure
                delay = policy.delay(attempt)
                logger.info("call failed with %s (%s); retry in %.2fs", error.code.name, error.wire_reason, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


__all__ = [
    "CLIENT_NAME",
    "DEFAULT_RETRY",
    "BillerClient",
    "ClientTls",
    "RetryPolicy",
    "is_transient",
    "open_channel",
    "target_host",
]
