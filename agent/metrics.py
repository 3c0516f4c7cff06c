"""Prometheus metrics of a biller: its gRPC calls and its protocol steps, on a registry of its own.

Every `BillerAgent` has a `BillerMetrics` (`agent.metrics`), whose metrics live
on a `CollectorRegistry` of their own — not prometheus_client's global one — so
several billers (or tests) in one process never collide. `serve_biller` adds
`MetricsInterceptor`, which counts and times every call by service, method and
status code; the agent counts negotiations, agreements, enrolments, payments and
refusals; `serve_metrics(registry, "127.0.0.1:9464")` serves the registry over
HTTP (`parley biller serve --metrics-listen`). docs/OPERATIONS.md lists the names.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from agent.listen import is_loopback, parse_listen

# Seconds: from a fast read to a slow store commit; streams (WatchEvents) land in +Inf.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BillerMetrics:
    """The biller's metrics, registered on `registry` (a new one of its own by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        rpc = ("grpc_service", "grpc_method", "grpc_code")
        on = self.registry
        self.rpcs = Counter(
            "parley_grpc_server_handled", "gRPC calls completed, by service, method and status code", rpc, registry=on
        )
        self.rpc_seconds = Histogram(
            "parley_grpc_server_handling_seconds",
            "Time from the start of a gRPC call to its status, by service, method and status code",
            rpc,
            buckets=LATENCY_BUCKETS,
            registry=on,
        )
        self.in_flight = Gauge("parley_grpc_server_in_flight", "gRPC calls being handled now", registry=on)
        self.negotiations_opened = Counter(
            "parley_negotiations_opened", "Negotiation threads opened by consumers", registry=on
        )
        self.negotiations = Counter(
            "parley_negotiations",
            "Negotiation threads ended, by outcome (agreed, rejected, withdrawn, expired, protocol_error)",
            ("outcome",),
            registry=on,
        )
        self.agreements = Counter(
            "parley_agreements",
            "Agreements reached, by terms kind (pay_in_full, deferral, instalment_plan, settlement)",
            ("kind",),
            registry=on,
        )
        self.enrolments = Counter("parley_enrolments", "Consumers enrolled on an account", registry=on)
        self.payment_intents = Counter(
            "parley_payment_intents", "Payment intents accepted (answered with new instructions)", registry=on
        )
        self.payments_settled = Counter(
            "parley_payments_settled", "Payments settled (a signed receipt issued)", registry=on
        )
        self.verification_failures = Counter(
            "parley_verification_failures",
            "Requests refused by the receive path or the protocol rules, by Parley reason (ErrorInfo.reason)",
            ("reason",),
            registry=on,
        )
        self.event_watchers = Gauge("parley_event_watchers", "WatchEvents streams open now", registry=on)
        self.connections_open = Gauge(
            "parley_connections_open",
            "Established connections this process holds on its gRPC listener, at the last check (TRN-10, TRN-11)",
            registry=on,
        )
        self.connection_caps_hit = Counter(
            "parley_connection_caps_hit",
            "Connection caps hit, by cap: per_address counts connections closed past the per-address cap "
            "(TRN-11); total counts the times the total cap was found reached (TRN-10)",
            ("cap",),
            registry=on,
        )

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (e.g. "parley_agreements_total", kind="deferral"); 0 if absent."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


# --- Calls: counted and timed by an interceptor ---------------------------------------------------------

Behaviour = Callable[..., Any]
Req = TypeVar("Req")
Res = TypeVar("Res")


def _split(method: str) -> tuple[str, str]:
    """ "/parley.v1.BillerService/Hello" -> ("parley.v1.BillerService", "Hello")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode.OK.name if error is None else grpc.StatusCode.UNKNOWN.name


@dataclass
class _Observed:
    metrics: BillerMetrics
    service: str
    method: str
    # The labelled children by status code: looking a child up by its labels takes a lock on every call.
    _children: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def start(self) -> float:
        self.metrics.in_flight.inc()
        return time.perf_counter()

    def end(self, started: float, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> None:
        self.metrics.in_flight.dec()
        code = _code(context, error)
        children = self._children.get(code)
        if children is None:
            labels = (self.service, self.method, code)
            children = self._children[code] = (
                self.metrics.rpcs.labels(*labels),
                self.metrics.rpc_seconds.labels(*labels),
            )
        calls, seconds = children
        calls.inc()
        seconds.observe(time.perf_counter() - started)

    def unary(self, behaviour: Behaviour) -> Behaviour:
        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started, error = self.start(), None
            try:
                return await behaviour(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self.end(started, context, error)

        return observed

    def stream(self, behaviour: Behaviour) -> Behaviour:
        if not inspect.isasyncgenfunction(behaviour):  # a handler that writes with context.write()
            return self.unary(behaviour)

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started, error = self.start(), None
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                self.end(started, context, error)

        return observed


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call the server handles into `metrics` (parley_grpc_server_*)."""

    def __init__(self, metrics: BillerMetrics) -> None:
        self._metrics = metrics
        # method -> (the handler gRPC gave, its observed wrapper): built once per method, not once per call.
        self._observed: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Res] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Res] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # UNIMPLEMENTED: answered by gRPC itself
            return handler
        method = handler_call_details.method
        known = self._observed.get(method)
        if known is not None and known[0] is handler:  # an inner interceptor may hand out a new one per call
            return known[1]
        wrapped = self._wrap(handler, _Observed(self._metrics, *_split(method)))
        self._observed[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler[Req, Res], observed: _Observed) -> grpc.RpcMethodHandler[Req, Res]:
        decode, encode = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(observed.unary(handler.unary_unary), decode, encode)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(observed.stream(handler.unary_stream), decode, encode)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(observed.unary(handler.stream_unary), decode, encode)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(observed.stream(handler.stream_stream), decode, encode)
        return handler


# --- The HTTP endpoint ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsTls:
    """TLS for a /metrics endpoint off loopback: the server's certificate and key files, and the CA whose
    client certificates may scrape (mutual TLS is the authentication: TRN-2 asks every listener that
    leaves the machine for both)."""

    certfile: str
    keyfile: str
    client_cafile: str


class MetricsEndpoint:
    """A running /metrics HTTP endpoint (a daemon thread); `close()` stops it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, tls: MetricsTls | None = None) -> None:
        if tls is None:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        else:
            self._server, self._thread = start_http_server(
                port,
                addr=host,
                registry=registry,
                certfile=tls.certfile,
                keyfile=tls.keyfile,
                client_cafile=tls.client_cafile,
                client_auth_required=True,
            )
        self.host = host
        self.port: int = self._server.server_port
        self.scheme = "http" if tls is None else "https"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/metrics"

    async def close(self) -> None:
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        self._thread.join(timeout=5)


async def serve_metrics(registry: CollectorRegistry, listen: str, *, tls: MetricsTls | None = None) -> MetricsEndpoint:
    """Serve `registry` as Prometheus text on http(s)://listen/metrics (port 0 picks a free port).

    Plaintext only on a loopback address (TRN-2, as for the gRPC listener): metrics name accounts'
    activity and the biller's load, so off the machine they need `tls` with client certificates.
    ValueError otherwise, naming what to do.
    """
    host, port = parse_listen(listen)
    if tls is None and not is_loopback(host):
        raise ValueError(
            f"metrics on {listen} would be plaintext and open to anyone who can reach {host}: "
            "listen on 127.0.0.1 (scrape through a tunnel or proxy), or configure TLS with client certificates"
        )
    return await asyncio.to_thread(MetricsEndpoint, registry, host, port, tls)


__all__ = [
    "LATENCY_BUCKETS",
    "BillerMetrics",
    "MetricsEndpoint",
    "MetricsInterceptor",
    "MetricsTls",
    "serve_metrics",
]
