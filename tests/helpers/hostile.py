"""A hostile or broken biller: the real servicer, with answers rewritten and calls failed on demand.

Tests of the consumer agent use it to play what the real biller never does —
answers lost on the way back, a phishing Hello, forged bills, instructions for
another amount, a receipt that does not match, an event stream with gaps — while
everything else is the real `BillerAgent` on a real SQLite file.

    async with running_biller(tmp_path, servicer=HostileServicer) as biller:
        hostile = hostile_of(biller)
        hostile.unavailable_after["Negotiate"] = 1      # the biller applies the move, the answer is lost
        hostile.rewrite["ListBills"] = add_forged_bill  # the answer is changed on its way
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from agent.biller import BillerAgent
from agent.protocol.keys import SigningKey
from agent.protocol.messages import PAYLOAD_TYPES, seal
from agent.transport.server import BillerServicer
from agent.transport.status import Context
from parley.v1 import biller_service_pb2 as pb
from parley.v1 import envelope_pb2
from tests.helpers.peer import Biller

T = TypeVar("T")
M = TypeVar("M", bound=Message)

Script = Callable[[pb.WatchEventsRequest], Awaitable[Sequence[envelope_pb2.Envelope]]]


class HostileServicer(BillerServicer):
    """BillerService over the real agent, with hooks.

    - `unavailable_before[method]`: fail that many next calls with UNAVAILABLE before the agent sees them;
    - `unavailable_after[method]`: let the agent answer, then fail that many calls with UNAVAILABLE
      (the request took effect, its answer is lost);
    - `rewrite[method]`: a function applied to the agent's answer before it is sent;
    - `streams`: scripted WatchEvents answers, one per stream (each ends the stream when done),
      after which streams are the real ones;
    - `calls`: how many times each method was called.
    """

    def __init__(self, agent: BillerAgent) -> None:
        super().__init__(agent)
        self.calls: Counter[str] = Counter()
        self.unavailable_before: Counter[str] = Counter()
        self.unavailable_after: Counter[str] = Counter()
        self.rewrite: dict[str, Callable[[Any], Any]] = {}
        self.streams: list[Script] = []

    async def _hooked(self, name: str, call: Callable[[], Awaitable[T]], context: Context) -> T:
        self.calls[name] += 1
        if self.unavailable_before[name] > 0:
            self.unavailable_before[name] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "simulated network failure")
        response = await call()
        if self.unavailable_after[name] > 0:
            self.unavailable_after[name] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "simulated lost answer")
        rewrite = self.rewrite.get(name)
        return rewrite(response) if rewrite is not None else response

    async def Hello(self, request: pb.HelloRequest, context: Context) -> pb.HelloResponse:
        call = super().Hello
        return await self._hooked("Hello", lambda: call(request, context), context)

    async def Enrol(self, request: pb.EnrolRequest, context: Context) -> pb.EnrolResponse:
        call = super().Enrol
        return await self._hooked("Enrol", lambda: call(request, context), context)

    async def ListBills(self, request: pb.ListBillsRequest, context: Context) -> pb.ListBillsResponse:
        call = super().ListBills
        return await self._hooked("ListBills", lambda: call(request, context), context)

    async def GetBill(self, request: pb.GetBillRequest, context: Context) -> pb.GetBillResponse:
        call = super().GetBill
        return await self._hooked("GetBill", lambda: call(request, context), context)

    async def Negotiate(self, request: pb.NegotiateRequest, context: Context) -> pb.NegotiateResponse:
        call = super().Negotiate
        return await self._hooked("Negotiate", lambda: call(request, context), context)

    async def GetThread(self, request: pb.GetThreadRequest, context: Context) -> pb.GetThreadResponse:
        call = super().GetThread
        return await self._hooked("GetThread", lambda: call(request, context), context)

    async def CreatePaymentIntent(
        self, request: pb.CreatePaymentIntentRequest, context: Context
    ) -> pb.CreatePaymentIntentResponse:
        call = super().CreatePaymentIntent
        return await self._hooked("CreatePaymentIntent", lambda: call(request, context), context)

    async def GetReceipt(self, request: pb.GetReceiptRequest, context: Context) -> pb.GetReceiptResponse:
        call = super().GetReceipt
        return await self._hooked("GetReceipt", lambda: call(request, context), context)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        self.calls["WatchEvents"] += 1
        if self.streams:
            script = self.streams.pop(0)
            for envelope in await script(request):
                yield pb.WatchEventsResponse(event=envelope)
            return
        async for response in super().WatchEvents(request, context):
            yield response


def hostile_of(biller: Biller) -> HostileServicer:
    """The hostile servicer a `running_biller(..., servicer=HostileServicer)` serves with."""
    assert isinstance(biller.servicer, HostileServicer)
    return biller.servicer


def resign(envelope: envelope_pb2.Envelope, key: SigningKey, change: Callable[[Any], None]) -> envelope_pb2.Envelope:
    """The envelope's payload, changed by `change` (given the parsed message), signed again with `key`."""
    message = PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload)
    change(message)
    return seal(message, key)
