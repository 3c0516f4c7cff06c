"""The biller's gRPC server: a thin translation between BillerService RPCs and `BillerAgent`, plus the
standard services operators expect.

Each method takes the envelope(s) out of the request, awaits the agent and
returns its answer; `status.answer` turns every failure into a Parley error
(ERR-1). Start a server with `serve_biller` (or `start_biller_server`, which
returns just the grpc.aio server and its port):

    server = await serve_biller(agent, "0.0.0.0:7443", tls=(cert_pem, key_pem))
    ...
    await server.stop(grace=10)     # graceful: NOT_SERVING, no new calls, in-flight calls drained

Beside `parley.v1.BillerService` the server answers `grpc.health.v1.Health`
(the overall "" service and "parley.v1.BillerService": NOT_SERVING until
`set_serving`, which `serve_biller` calls at once unless `serving=False`, and
again from the start of a graceful stop) and server reflection
(`grpc.reflection.v1alpha`, for grpcurl, evans, Postman). Every call is counted
and timed into the agent's metrics (`agent.metrics`).

TRN-2: TLS on every listener. Plaintext (`insecure=True`) is accepted only on a
loopback address (127.0.0.0/8, ::1, localhost), for tests and demos.

TRN-10: connections are bounded (`ConnectionLimits`, gRPC core's own server
options): a total cap, idle connections closed, connections aged out, a
handshake deadline, keepalive pings policed, streams per connection capped; and
per peer address, at most `max_streams_per_peer` open WatchEvents streams (the
calls that hold a connection open for long). TRN-11: gRPC cannot cap
connections per address, so a `ConnectionWatcher` (agent/transport/connections.py)
closes an address's connections past `max_connections_per_address` (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from agent.biller import BillerAgent
from agent.listen import is_loopback
from agent.logs import log_step, request_ids
from agent.metrics import MetricsInterceptor
from agent.protocol.errors import ProtocolError, Reason, RemoteProtocolError
from agent.ratelimit import peer_address
from agent.transport.connections import ConnectionWatcher
from agent.transport.status import Context, abort, answer
from parley.v1 import biller_service_pb2 as pb
from parley.v1 import biller_service_pb2_grpc, envelope_pb2

logger = logging.getLogger("parley.transport")

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BillerService"].full_name  # "parley.v1.BillerService"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # "grpc.health.v1.Health"
OVERALL = ""  # the health service name that stands for the whole server
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds in-flight calls get to finish once a stop begins
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNSIGNED_RPCS = frozenset({"Hello", "GetKeySets"})  # limited per peer address only (LIM-8)


# The largest total cap a process may be given. gRPC core aborts the whole process at 2**31 - 1 (a failed check in
# connection_quota.cc, measured with grpcio 1.85), and no process holds a million sockets: a larger figure is a
# mistake, refused with a message rather than a crash.
MAX_CONNECTIONS_LIMIT = 1_000_000

# The longest duration a ConnectionLimits field passed to gRPC may hold. gRPC core takes each as a C int of
# milliseconds: from 2**31 ms (about 24.9 days) on, starting the server fails with "OverflowError: value too large to
# convert to int". Whole seconds, so that a message can state the bound plainly; no sensible timeout comes near it.
MAX_GRPC_DURATION = timedelta(seconds=(2**31 - 1) // 1000)
_GRPC_DURATIONS = ("idle_timeout", "max_age", "max_age_grace", "handshake_timeout", "min_ping_interval")


@dataclass(frozen=True)
class ConnectionLimits:
    """TRN-10: what one biller process gives connections, as gRPC server options (see `grpc_options`).

    The defaults suit a process under the common 1024 open-file limit: `max_connections` leaves room for
    the store, logs and metrics (docs/OPERATIONS.md, "File limits"). Idle connections — no call in flight,
    including those that never made one — are closed after `idle_timeout`, so a crowd of silent
    connections cannot hold every slot; a connection lives at most `max_age`, then gets `max_age_grace`
    to finish its calls (a WatchEvents stream ends by its query's expire_time anyway, EVT-10).
    `max_connections_per_address` (0: no cap) is enforced by the connection watcher every
    `connection_check_interval` (TRN-11).
    """

    max_connections: int = 800
    max_connections_per_address: int = 64
    connection_check_interval: timedelta = timedelta(milliseconds=500)
    max_streams_per_peer: int = 32
    max_streams_per_connection: int = 100
    idle_timeout: timedelta = timedelta(minutes=5)
    max_age: timedelta = timedelta(hours=1)
    max_age_grace: timedelta = timedelta(hours=25)
    handshake_timeout: timedelta = timedelta(seconds=10)
    min_ping_interval: timedelta = timedelta(minutes=1)

    def __post_init__(self) -> None:
        """ValueError for limits gRPC would crash on or misread, so that no caller gets that far: the serve
        options check the same bounds first, to name the flag, variable or key (reference_biller/settings.py)."""
        if not 1 <= self.max_connections <= MAX_CONNECTIONS_LIMIT:
            raise ValueError(
                f"max_connections must be from 1 to {MAX_CONNECTIONS_LIMIT:,}, not {self.max_connections:,}"
            )
        if not 0 <= self.max_connections_per_address <= MAX_CONNECTIONS_LIMIT:
            raise ValueError(
                f"max_connections_per_address must be from 0 (no cap) to {MAX_CONNECTIONS_LIMIT:,}, "
                f"not {self.max_connections_per_address:,}"
            )
        for name in _GRPC_DURATIONS:
            duration: timedelta = getattr(self, name)
            if not timedelta(0) < duration <= MAX_GRPC_DURATION:
                raise ValueError(
                    f"{name} must be above 0 and at most {MAX_GRPC_DURATION.total_seconds():,.0f} seconds "
                    f"(gRPC takes it as a C int of milliseconds), not {duration.total_seconds():,} seconds"
                )

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC core channel arguments (all present in grpcio 1.85) that enforce these limits."""

        def ms(duration: timedelta) -> int:
            return duration // timedelta(milliseconds=1)  # exact: no float rounding at the bound

        return [
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_connection_idle_ms", ms(self.idle_timeout)),
            ("grpc.max_connection_age_ms", ms(self.max_age)),
            ("grpc.max_connection_age_grace_ms", ms(self.max_age_grace)),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout)),
            # Keepalive enforcement: pings closer than this are strikes; two strikes close the connection.
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_ping_interval)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_permit_without_calls", 0),
        ]


DEFAULT_CONNECTION_LIMITS = ConnectionLimits()


class BillerServicer(biller_service_pb2_grpc.BillerServiceServicer):
    """BillerService backed by a `BillerAgent`; no protocol logic lives here.

    A refused request is counted (parley_verification_failures_total) and logged
    with its reason and, once its header verified, its thread and message ids.
    Each call is first admitted by the agent's rate limiter for its peer address
    (LIM-8): unsigned calls and refusals before the signer is established cost
    the peer a token, and a peer without tokens is refused before verification.
    `end_watches()` ends every open WatchEvents stream normally, so consumers
    resume from their cursor elsewhere or later (a graceful stop calls it).
    """

    def __init__(self, agent: BillerAgent, connection_limits: ConnectionLimits = DEFAULT_CONNECTION_LIMITS) -> None:
        self._agent = agent
        self._closing = asyncio.Event()
        self._max_streams_per_peer = connection_limits.max_streams_per_peer
        self._peer_streams: dict[str, int] = {}  # peer address -> open WatchEvents streams; no stream, no entry

    def end_watches(self) -> None:
        """End every open WatchEvents stream (and any opened from now on) with OK."""
        self._closing.set()

    async def _answer(self, context: Context, rpc: str, call: Awaitable[T], *, admit: bool = True) -> T:
        """`admit=False` for the later steps of a stream, which was admitted when it began."""
        peer = peer_address(context.peer()) if admit else None
        return await answer(context, self._observed(rpc, call, peer))

    async def _observed(self, rpc: str, call: Awaitable[T], peer: str | None) -> T:
        limiter, now = self._agent.rate_limiter, self._agent.clock.now()
        try:
            if peer is not None:
                try:
                    limiter.admit_peer(peer, now, unsigned=rpc in UNSIGNED_RPCS)
                except RemoteProtocolError:
                    if inspect.iscoroutine(call):
                        call.close()  # refused before it started: never run
                    raise
            return await call
        except RemoteProtocolError as error:
            if peer is not None:
                limiter.refused(peer, now)
            self._agent.metrics.verification_failures.labels(error.reason.name).inc()
            if error.reason is Reason.RATE_LIMITED:
                raise  # counted, not logged one by one: a flood of them must not flood the log
            thread_id, message_id = request_ids()
            log_step(
                logger,
                "refused",
                rpc=rpc,
                reason=error.reason.name,
                thread_id=thread_id,
                message_id=message_id,
                detail=error.detail,  # written for the peer, so free of codes, keys and disclosures (ERR-5)
            )
            raise

    async def Hello(self, request: pb.HelloRequest, context: Context) -> pb.HelloResponse:
        return await self._answer(context, "Hello", self._agent.hello(request))

    async def GetKeySets(self, request: pb.GetKeySetsRequest, context: Context) -> pb.GetKeySetsResponse:
        return await self._answer(context, "GetKeySets", self._agent.get_key_sets(request))

    async def PublishKeySet(self, request: pb.PublishKeySetRequest, context: Context) -> pb.PublishKeySetResponse:
        return await self._answer(context, "PublishKeySet", self._agent.publish_key_set(request.key_set))

    async def Enrol(self, request: pb.EnrolRequest, context: Context) -> pb.EnrolResponse:
        return await self._answer(context, "Enrol", self._agent.enrol(request.request))

    async def ListBills(self, request: pb.ListBillsRequest, context: Context) -> pb.ListBillsResponse:
        return await self._answer(context, "ListBills", self._agent.list_bills(request.query))

    async def GetBill(self, request: pb.GetBillRequest, context: Context) -> pb.GetBillResponse:
        return await self._answer(context, "GetBill", self._agent.get_bill(request.query))

    async def Negotiate(self, request: pb.NegotiateRequest, context: Context) -> pb.NegotiateResponse:
        return await self._answer(context, "Negotiate", self._agent.negotiate(request.move, request.disclosure))

    async def GetThread(self, request: pb.GetThreadRequest, context: Context) -> pb.GetThreadResponse:
        return await self._answer(context, "GetThread", self._agent.get_thread(request.query))

    async def CreatePaymentIntent(
        self, request: pb.CreatePaymentIntentRequest, context: Context
    ) -> pb.CreatePaymentIntentResponse:
        return await self._answer(context, "CreatePaymentIntent", self._agent.create_payment_intent(request.intent))

    async def GetReceipt(self, request: pb.GetReceiptRequest, context: Context) -> pb.GetReceiptResponse:
        return await self._answer(context, "GetReceipt", self._agent.get_receipt(request.query))

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        peer = peer_address(context.peer())
        open_streams = self._peer_streams.get(peer, 0)
        if open_streams >= self._max_streams_per_peer:
            # TRN-10: one address may not hold every stream; logged and counted like any refusal.
            refusal = RemoteProtocolError(
                Reason.TOO_MANY_STREAMS, f"at most {self._max_streams_per_peer} open event streams per address"
            )
            await self._answer(context, "WatchEvents", _raise(refusal))
        self._peer_streams[peer] = open_streams + 1
        try:
            async for response in self._watch(request, context):
                yield response
        finally:
            remaining = self._peer_streams.pop(peer, 1) - 1
            if remaining > 0:
                self._peer_streams[peer] = remaining

    async def _watch(self, request: pb.WatchEventsRequest, context: Context) -> AsyncIterator[pb.WatchEventsResponse]:
        events = await self._answer(context, "WatchEvents", self._agent.watch_events(request.query))
        iterator = aiter(events)
        closing = asyncio.ensure_future(self._closing.wait())
        step: asyncio.Future[envelope_pb2.Envelope] | None = None
        self._agent.metrics.event_watchers.inc()
        try:
            while True:
                step = asyncio.ensure_future(anext(iterator))
                await asyncio.wait((step, closing), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return  # the server is stopping: end the stream; the consumer resumes from its cursor (EVT-4)
                if isinstance(step.exception(), StopAsyncIteration):
                    return
                event = await self._answer(context, "WatchEvents", step, admit=False)
                yield pb.WatchEventsResponse(event=event)
        finally:
            self._agent.metrics.event_watchers.dec()
            closing.cancel()
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    async def RequestErasure(self, request: pb.RequestErasureRequest, context: Context) -> pb.RequestErasureResponse:
        return await self._answer(context, "RequestErasure", self._agent.request_erasure(request.request))


async def _raise(error: Exception) -> None:
    raise error


def add_biller_service(servicer: BillerServicer, server: grpc.aio.Server) -> None:
    """Register BillerService, each request parsed inside its handler (ERR-2).

    gRPC's own deserializer answers request bytes that do not parse with
    UNKNOWN and the parser's exception text; here they are refused with
    MALFORMED_ENVELOPE (ENV-1), since a request is only the framing of its
    envelope (§2.2), and the method is never called.
    """
    handlers: dict[str, grpc.RpcMethodHandler[bytes, Message]] = {}
    for method in pb.DESCRIPTOR.services_by_name["BillerService"].methods:
        request_type: type[Message] = getattr(pb, method.input_type.name)
        response_type: type[Message] = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _parsed_stream(request_type, behaviour), response_serializer=response_type.SerializeToString
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsed_unary(request_type, behaviour), response_serializer=response_type.SerializeToString
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


async def _parse_request(request_type: type[Message], data: bytes, context: Context) -> Message:
    try:
        return request_type.FromString(data)
    except DecodeError:
        await abort(context, ProtocolError(Reason.MALFORMED_ENVELOPE, f"the request is not a {request_type.__name__}"))


def _parsed_unary(
    request_type: type[Message], behaviour: Callable[[Message, Context], Awaitable[Message]]
) -> Callable[[bytes, Context], Awaitable[Message]]:
    async def handle(data: bytes, context: Context) -> Message:
        return await behaviour(await _parse_request(request_type, data, context), context)

    return handle


def _parsed_stream(
    request_type: type[Message], behaviour: Callable[[Message, Context], AsyncIterator[Message]]
) -> Callable[[bytes, Context], AsyncIterator[Message]]:
    async def handle(data: bytes, context: Context) -> AsyncIterator[Message]:
        async for response in behaviour(await _parse_request(request_type, data, context), context):
            yield response

    return handle


def _host_of(listen: str) -> str:
    host, _, _ = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]")


@dataclass
class BillerServer:
    """A running biller server: the grpc.aio server, its port, its health service and its servicer."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    servicer: BillerServicer
    agent: BillerAgent
    watcher: ConnectionWatcher | None = None

    async def set_serving(self, serving: bool = True) -> None:
        """Report SERVING (or NOT_SERVING) for "" and parley.v1.BillerService; ignored once stopping."""
        status = SERVING if serving else NOT_SERVING
        for service in (OVERALL, SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace: float | None = DEFAULT_SHUTDOWN_GRACE) -> None:
        """Graceful stop: NOT_SERVING, event streams ended, no new calls, in-flight calls given `grace` seconds.

        Calls still running after `grace` are cancelled (None: at once). The
        agent's store stays open: close it after this returns.
        """
        in_flight = int(self.agent.metrics.sample("parley_grpc_server_in_flight"))
        log_step(logger, "stopping", grace_seconds=grace, in_flight=in_flight)
        await self.health.enter_graceful_shutdown()
        self.servicer.end_watches()
        if self.watcher is not None:
            await self.watcher.stop()
        await self.server.stop(grace)
        log_step(logger, "stopped", party=self.agent.party_id)


async def serve_biller(
    agent: BillerAgent,
    listen: str,
    *,
    tls: tuple[bytes, bytes] | None = None,
    tls_client_ca: bytes | None = None,
    insecure: bool = False,
    reuse_port: bool = False,
    services: Sequence[Callable[[grpc.aio.Server], None]] = (),
    service_names: Sequence[str] = (),
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    serving: bool = True,
    connection_limits: ConnectionLimits = DEFAULT_CONNECTION_LIMITS,
) -> BillerServer:
    """Serve `agent` on `listen` ("host:port"; port 0 picks a free port), with health and reflection.

    `tls` is (certificate chain PEM, private key PEM). Plaintext needs `insecure=True`
    and a loopback host; anything else without TLS is refused with ValueError
    (TRN-2). With `tls_client_ca` (PEM trust anchors) the server is mutual TLS
    (TRN-9): a client must present a certificate chaining to one of them, or the
    handshake fails before any call. `reuse_port` lets several processes (one
    per core) share the port.
    The receive limit is one envelope plus framing (TRN-8). `services` register
    further servicers before the server starts (the conformance control service,
    §16), and `service_names` are their full names, for reflection.
    `interceptors` run inside the metrics interceptor (e.g. tracing's). Health
    says NOT_SERVING until the server listens, then SERVING — or, with
    `serving=False`, until the caller's `set_serving()` (say, once its start-up
    work is done). `connection_limits` bound connections and streams (TRN-10).
    """
    if (tls is None) == (not insecure):
        if tls is not None:
            raise ValueError("choose either tls or insecure, not both")
        raise ValueError("TLS is required (TRN-2): pass tls=(cert_pem, key_pem), or insecure=True on loopback")
    if tls_client_ca is not None and tls is None:
        raise ValueError("mutual TLS (a client CA) needs TLS: pass tls=(cert_pem, key_pem) too")
    host = _host_of(listen)
    if insecure and not is_loopback(host):
        raise ValueError(f"plaintext is allowed only on a loopback address (TRN-2), not {host!r}")
    options: Sequence[tuple[str, int]] = (
        ("grpc.max_receive_message_length", agent.limits.grpc_max_receive_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
        *connection_limits.grpc_options(),
    )
    server = grpc.aio.server(options=options, interceptors=(MetricsInterceptor(agent.metrics), *interceptors))
    servicer = BillerServicer(agent, connection_limits)
    add_biller_service(servicer, server)
    health = health_aio.HealthServicer()
    for service in (OVERALL, SERVICE_NAME):
        await health.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for add_service in services:
        add_service(server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME, *service_names), server
    )
    if tls is not None:
        certificate_chain, private_key = tls
        credentials = grpc.ssl_server_credentials(
            [(private_key, certificate_chain)],
            root_certificates=tls_client_ca,
            require_client_auth=tls_client_ca is not None,
        )
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    watcher = ConnectionWatcher(
        port,
        agent.metrics,
        max_per_address=connection_limits.max_connections_per_address,
        max_total=connection_limits.max_connections,
        interval=connection_limits.connection_check_interval.total_seconds(),
    )
    watcher.start()
    running = BillerServer(server, port, health, servicer, agent, watcher)
    if serving:
        await running.set_serving()
    logger.info("biller %s serving on %s port %d (%s)", agent.party_id, host, port, _transport_name(tls, tls_client_ca))
    return running


def _transport_name(tls: tuple[bytes, bytes] | None, client_ca: bytes | None) -> str:
    if tls is None:
        return "plaintext, loopback"
    return "TLS" if client_ca is None else "mutual TLS"


async def start_biller_server(
    agent: BillerAgent,
    listen: str,
    *,
    tls: tuple[bytes, bytes] | None = None,
    insecure: bool = False,
    reuse_port: bool = False,
    services: Sequence[Callable[[grpc.aio.Server], None]] = (),
) -> tuple[grpc.aio.Server, int]:
    """`serve_biller` for callers that need only (server, port); stop it with `await server.stop(grace)`.

    See `serve_biller` for the arguments. The agent's store is the caller's to close.
    """
    running = await serve_biller(agent, listen, tls=tls, insecure=insecure, reuse_port=reuse_port, services=services)
    return running.server, running.port


def freeze_startup_heap() -> None:
    """Exempt what start-up allocated (modules, descriptors, configuration) from the cyclic garbage collector.

    Each full collection otherwise walks all of those long-lived objects again: a 15-30 ms pause in which
    the process answers nothing (docs/PERFORMANCE.md). Call it once in a serving process, when it is ready.
    """
    gc.collect()
    gc.freeze()


def install_uvloop() -> bool:
    """Use uvloop for the asyncio event loop when it is installed (the `uvloop` extra); returns whether it is."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
