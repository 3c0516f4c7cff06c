"""Errors on the wire: `ProtocolError` <-> `google.rpc.Status` with exactly one ErrorInfo (ERR-1..ERR-5).

A refused request ends with the gRPC code of its reason (the table in
`agent.protocol.errors`) and, in the `grpc-status-details-bin` trailer, a
`google.rpc.Status` whose one detail is an `ErrorInfo` with the reason's name,
domain "parley.v1" and metadata {"requirement": id}. Anything else that goes
wrong in a handler is INTERNAL / INTERNAL_ERROR with a generic message, the
exception being logged on the server only (ERR-2, ERR-3, ERR-5): never UNKNOWN.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agent.protocol.errors import ERROR_DOMAIN, ParleyError, ProtocolError, Reason, RemoteProtocolError

logger = logging.getLogger("parley.transport")

T = TypeVar("T")

Context = grpc.aio.ServicerContext[Any, Any]
INTERNAL_ERROR = ProtocolError(Reason.INTERNAL_ERROR, "the biller failed; retry with the same message")


def status_of(error: ProtocolError) -> status_pb2.Status:
    """The google.rpc.Status that carries `error` (ERR-1).

    metadata["requirement"] is the id in the reason's row of the §13 table, a function of the
    reason alone (ERR-1), not the id of the particular rule broken, which `detail` may name.
    """
    info = error_details_pb2.ErrorInfo(
        reason=error.reason.name, domain=ERROR_DOMAIN, metadata={"requirement": error.reason.requirement}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    code: grpc.StatusCode = grpc.StatusCode[error.reason.grpc_code]
    return status_pb2.Status(code=code.value[0], message=error.detail, details=[detail])


async def abort(context: Context, error: ProtocolError) -> NoReturn:
    """End the RPC with `error`'s code and Status."""
    status: grpc.Status = rpc_status.to_status(status_of(error))
    await context.abort_with_status(status)


async def answer(context: Context, call: Awaitable[T]) -> T:
    """Await a handler's work, turning every failure into a Parley error on the wire."""
    try:
        return await call
    except ProtocolError as error:
        await abort(context, error)
    except Exception:
        # ERR-3, ERR-5: the details stay in the server's log, never in the answer.
        logger.exception("internal error while handling a request")
        await abort(context, INTERNAL_ERROR)


class CallError(ParleyError):
    """A failed call to a peer (ERR-4: branch on `reason`, or on `code` if the reason is unknown).

    `wire_reason` is the ErrorInfo reason as received ("" without one). Two kinds:
    `RpcError`, the peer answered with a Parley error (a `RemoteProtocolError` too), and
    `TransportError`, gRPC failed before any Parley answer (UNAVAILABLE, DEADLINE_EXCEEDED,
    a TLS handshake...), where `reason` is INTERNAL_ERROR and `code` tells what happened.
    """

    def __init__(self, reason: Reason, detail: str, *, code: grpc.StatusCode, wire_reason: str) -> None:
        Exception.__init__(self, f"{reason.name}: {detail or reason.meaning}")
        self.reason = reason
        self.detail = detail or reason.meaning
        self.code = code
        self.wire_reason = wire_reason


class RpcError(CallError, RemoteProtocolError):
    """The peer refused the call with a Parley error (a reason this version may or may not know)."""


class TransportError(CallError):
    """The call failed in gRPC itself, with no Parley answer: the peer may never have seen it."""


def error_from_rpc(error: grpc.aio.AioRpcError) -> CallError:
    """The Parley error a failed call carries, read from its one ErrorInfo (domain "parley.v1")."""
    code = error.code()
    detail = error.details() or code.name
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:  # a Status that contradicts the call's own code or message
        status = None
    for any_detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if any_detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            reason = Reason.__members__.get(info.reason, Reason.INTERNAL_ERROR)
            return RpcError(reason, detail, code=code, wire_reason=info.reason)
    return TransportError(Reason.INTERNAL_ERROR, detail, code=code, wire_reason="")
