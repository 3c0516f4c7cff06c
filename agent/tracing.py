"""OpenTelemetry tracing of the biller's gRPC server, with the optional `otel` extra.

    pip install "parley[otel]"          # opentelemetry-instrumentation-grpc
    parley biller serve --otel ...      # one span per call, through OpenTelemetry's global tracer provider

Spans go wherever the process's OpenTelemetry SDK sends them (configure one, e.g.
by running under `opentelemetry-instrument` with `OTEL_*` variables); without an
SDK the API's tracer is a no-op. Without the extra, `server_interceptors()`
raises `TracingUnavailable` with a message that says what to install.
"""

from __future__ import annotations

import importlib
from typing import Any

import grpc

OTEL_MODULE = "opentelemetry.instrumentation.grpc"
INSTALL_HINT = 'install the otel extra: pip install "parley[otel]" (opentelemetry-instrumentation-grpc)'


class TracingUnavailable(RuntimeError):
    """OpenTelemetry tracing was asked for, but its instrumentation package is not installed."""


def available() -> bool:
    """Whether the `otel` extra is installed."""
    try:
        importlib.import_module(OTEL_MODULE)
    except ImportError:
        return False
    return True


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The OpenTelemetry interceptor for a grpc.aio server; TracingUnavailable without the extra."""
    try:
        instrumentation: Any = importlib.import_module(OTEL_MODULE)
    except ImportError as error:
        raise TracingUnavailable(f"OpenTelemetry tracing is not available: {INSTALL_HINT}") from error
    interceptor: grpc.aio.ServerInterceptor = instrumentation.aio_server_interceptor()
    return [interceptor]


__all__ = ["INSTALL_HINT", "TracingUnavailable", "available", "server_interceptors"]
