"""The biller's gRPC service: a thin translation between BillerService RPCs and `BillerAgent`.

Each method takes the envelope(s) out of the request, awaits the agent and
returns its answer; `status.answer` turns every failure into a Parley error
(ERR-1). Start a server with `start_biller_server`:

    server, port = await start_biller_server(agent, "0.0.0.0:7443", tls=(cert_pem, key_pem))
    ...
    await server.stop(grace=5)

TRN-2: TLS on every listener. Plaintext (`insecure=True`) is accepted only on a
loopback address (127.0.0.0/8, ::1, localhost), for tests and demos.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from agent.biller import BillerAgent
from agent.transport.status import Context, answer
from parley.v1 import biller_service_pb2 as pb
from parley.v1 import biller_service_pb2_grpc

logger = logging.getLogger("parley.transport")


class BillerServicer(biller_service_pb2_grpc.BillerServiceServicer):
    """BillerService backed by a `BillerAgent`; no protocol logic lives here."""

    def __init__(self, agent: BillerAgent) -> None:
        self._agent = agent

    async def Hello(self, request: pb.HelloRequest, context: Context) -> pb.HelloResponse:
        return await answer(context, self._agent.hello(request))

    async def GetKeySets(self, request: pb.GetKeySetsRequest, context: Context) -> pb.GetKeySetsResponse:
        return await answer(context, self._agent.get_key_sets(request))

    async def PublishKeySet(self, request: pb.PublishKeySetRequest, context: Context) -> pb.PublishKeySetResponse:
        return await answer(context, self._agent.publish_key_set(request.key_set))

    async def Enrol(self, request: pb.EnrolRequest, context: Context) -> pb.EnrolResponse:
        return await answer(context, self._agent.enrol(request.request))

    async def ListBills(self, request: pb.ListBillsRequest, context: Context) -> pb.ListBillsResponse:
        return await answer(context, self._agent.list_bills(request.query))

    async def GetBill(self, request: pb.GetBillRequest, context: Context) -> pb.GetBillResponse:
        return await answer(context, self._agent.get_bill(request.query))

    async def Negotiate(self, request: pb.NegotiateRequest, context: Context) -> pb.NegotiateResponse:
        return await answer(context, self._agent.negotiate(request.move, request.disclosure))

    async def GetThread(self, request: pb.GetThreadRequest, context: Context) -> pb.GetThreadResponse:
        return await answer(context, self._agent.get_thread(request.query))

    async def CreatePaymentIntent(
        self, request: pb.CreatePaymentIntentRequest, context: Context
    ) -> pb.CreatePaymentIntentResponse:
        return await answer(context, self._agent.create_payment_intent(request.intent))

    async def GetReceipt(self, request: pb.GetReceiptRequest, context: Context) -> pb.GetReceiptResponse:
        return await answer(context, self._agent.get_receipt(request.query))

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        events = await answer(context, self._agent.watch_events(request.query))
        iterator = aiter(events)
        while True:
            try:
                event = await answer(context, anext(iterator))
            except StopAsyncIteration:
                return
            yield pb.WatchEventsResponse(event=event)

    async def RequestErasure(self, request: pb.RequestErasureRequest, context: Context) -> pb.RequestErasureResponse:
        return await answer(context, self._agent.request_erasure(request.request))


def is_loopback(host: str) -> bool:
    """Whether a listen host is a loopback address (TRN-2)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(listen: str) -> str:
    host, _, _ = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]")


async def start_biller_server(
    agent: BillerAgent,
    listen: str,
    *,
    tls: tuple[bytes, bytes] | None = None,
    insecure: bool = False,
    reuse_port: bool = False,
    services: Sequence[Callable[[grpc.aio.Server], None]] = (),
) -> tuple[grpc.aio.Server, int]:
    """Serve `agent` on `listen` ("host:port"; port 0 picks a free port) and return (server, port).

    `tls` is (certificate chain PEM, private key PEM). Plaintext needs `insecure=True`
    and a loopback host; anything else without TLS is refused with ValueError
    (TRN-2). `reuse_port` lets several processes (one per core) share the port.
    The receive limit is one envelope plus framing (TRN-8). `services` register
    further servicers before the server starts (the conformance control service,
    §16). Stop the server with `await server.stop(grace)`; the agent's store is
    the caller's to close.
    """
    if (tls is None) == (not insecure):
        if tls is not None:
            raise ValueError("choose either tls or insecure, not both")
        raise ValueError("TLS is required (TRN-2): pass tls=(cert_pem, key_pem), or insecure=True on loopback")
    host = _host_of(listen)
    if insecure and not is_loopback(host):
        raise ValueError(f"plaintext is allowed only on a loopback address (TRN-2), not {host!r}")
    options: Sequence[tuple[str, int]] = (
        ("grpc.max_receive_message_length", agent.limits.grpc_max_receive_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
    )
    server = grpc.aio.server(options=options)
    biller_service_pb2_grpc.add_BillerServiceServicer_to_server(BillerServicer(agent), server)
    for add_service in services:
        add_service(server)
    if tls is not None:
        certificate_chain, private_key = tls
        credentials = grpc.ssl_server_credentials([(private_key, certificate_chain)])
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    logger.info(
        "biller %s serving on %s port %d (%s)", agent.party_id, host, port, "TLS" if tls else "plaintext, loopback"
    )
    return server, port


def install_uvloop() -> bool:
    """Use uvloop for the asyncio event loop when it is installed (the `uvloop` extra); returns whether it is."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
