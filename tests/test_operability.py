"""Operability of the biller server over real gRPC on 127.0.0.1: health, reflection, graceful shutdown,
metrics, logs and tracing (docs/OPERATIONS.md)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import sqlite3
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from agent import tracing
from agent.biller import BillerAgent
from agent.clock import ManualClock
from agent.conformance.peers import PeerRail
from agent.consumer import (
    AcceptOffer,
    Circumstances,
    ConsumerAgent,
    Mandate,
    OpeningContext,
    PaymentOrder,
    ResponseContext,
)
from agent.logs import JsonFormatter
from agent.metrics import BillerMetrics, serve_metrics
from agent.protocol.dsse import digest
from agent.protocol.keys import SigningKey
from agent.protocol.terms import Terms
from agent.stores.base import ThreadOutcome
from agent.stores.biller_sqlite import SqliteBillerStore
from agent.stores.consumer_sqlite import SqliteConsumerStore
from agent.transport.server import BillerServer, serve_biller
from parley.v1 import biller_service_pb2_grpc, envelope_pb2, negotiation_pb2
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    EnrolRequest,
    GetBillRequest,
    HelloRequest,
    ListBillsRequest,
    NegotiateRequest,
    WatchEventsRequest,
    WatchEventsResponse,
)
from tests.fixtures import BILL, eur
from tests.helpers.peer import (
    BILLER_ID,
    START,
    Consumer,
    SamplePolicy,
    hardship_terms,
    inside_options,
    new_party,
)

ACCOUNT = "acct-1001"
BILLER_SERVICE = "parley.v1.BillerService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class SlowStore(SqliteBillerStore):
    """A store whose ListBills read takes `delay` seconds: a call still in flight when a stop begins."""

    delay = 0.0
    entered: asyncio.Event

    async def list_bills(self, account_id: str, party_id: str | None = None):  # type: ignore[no-untyped-def]
        self.entered.set()
        await asyncio.sleep(self.delay)
        return await super().list_bills(account_id, party_id)


@dataclass
class Served:
    agent: BillerAgent
    running: BillerServer
    stub: biller_service_pb2_grpc.BillerServiceAsyncStub
    health: Any  # grpc_health's stubs type no methods on HealthStub
    channel: grpc.aio.Channel
    store: SqliteBillerStore
    clock: ManualClock
    key: SigningKey
    target: str

    async def enrolled(self, party_id: str = "consumer:alice") -> Consumer:
        await self.agent.create_account(ACCOUNT, "Alice Example")
        consumer = Consumer(party_id, self.clock)
        code = await self.agent.issue_enrolment_code(ACCOUNT)
        await self.stub.Enrol(EnrolRequest(request=consumer.enrolment(ACCOUNT, code)))
        await self.agent.issue_bill(
            ACCOUNT, BILL.amount_due, BILL.due_date, BILL.description, issue_date=BILL.issue_date, bill_id=BILL.bill_id
        )
        return consumer

    async def bill_envelope(self) -> envelope_pb2.Envelope:
        record = await self.store.get_bill(BILL.bill_id)
        assert record is not None
        return envelope_pb2.Envelope.FromString(record.envelope)


@asynccontextmanager
async def served(
    tmp_path: Path, *, store_class: type[SqliteBillerStore] = SqliteBillerStore, serving: bool = True
) -> AsyncIterator[Served]:
    """A biller agent on a real SQLite file behind `serve_biller` on a free loopback port; always stopped."""
    clock = ManualClock(START)
    key, key_set = new_party(BILLER_ID, clock)
    store = await store_class.open(tmp_path / "biller.sqlite")
    agent = BillerAgent(
        party_id=BILLER_ID,
        signing_key=key,
        key_sets=[key_set],
        store=store,
        policy=SamplePolicy(),
        rail=PeerRail(),
        clock=clock,
        watch_poll_interval=timedelta(seconds=0.2),
    )
    try:
        running = await serve_biller(agent, "127.0.0.1:0", insecure=True, serving=serving)
        try:
            target = f"127.0.0.1:{running.port}"
            async with grpc.aio.insecure_channel(target) as channel:
                yield Served(
                    agent,
                    running,
                    biller_service_pb2_grpc.BillerServiceStub(channel),
                    health_pb2_grpc.HealthStub(channel),
                    channel,
                    store,
                    clock,
                    key,
                    target,
                )
        finally:
            await running.stop(grace=None)  # a no-op when the test stopped it already
    finally:
        await store.close()


async def status(served: Served, service: str) -> int:
    response = await served.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


# --- Health and reflection -------------------------------------------------------------------------------


def _reflect(target: str) -> tuple[list[str], str]:
    """What a reflection client (grpcurl, evans) sees: the services, and Negotiate's request type."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        negotiate = pool.FindServiceByName(BILLER_SERVICE).FindMethodByName("Negotiate")
        return services, negotiate.input_type.full_name


def test_health_is_not_serving_until_ready_and_reflection_lists_the_services(tmp_path: Path) -> None:
    async def main() -> None:
        async with served(tmp_path, serving=False) as biller:
            assert await status(biller, "") == NOT_SERVING  # starting
            assert await status(biller, BILLER_SERVICE) == NOT_SERVING
            await biller.running.set_serving()
            assert await status(biller, "") == SERVING
            assert await status(biller, BILLER_SERVICE) == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await status(biller, "no.such.Service")
            assert unknown.value.code() is grpc.StatusCode.NOT_FOUND

            services, request_type = await asyncio.to_thread(_reflect, biller.target)
            assert {BILLER_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
                services
            )
            assert request_type == "parley.v1.NegotiateRequest"

    asyncio.run(main())


# --- Graceful shutdown -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stop_reports_not_serving_refuses_new_calls_and_drains_the_call_in_flight(tmp_path: Path) -> None:
    async def main() -> None:
        # Another process's connection keeps the WAL file alive: only a checkpoint on close empties it.
        reader = sqlite3.connect(tmp_path / "biller.sqlite")
        async with served(tmp_path, store_class=SlowStore) as biller:
            reader.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            store = biller.store
            assert isinstance(store, SlowStore)
            consumer = await biller.enrolled()
            watch = biller.health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            events = biller.stub.WatchEvents(WatchEventsRequest(query=consumer.query(ACCOUNT)))
            first = await events.read()
            assert isinstance(first, WatchEventsResponse)
            assert first.event.payload_type == "parley.v1.Event"

            store.delay, store.entered = 1.0, asyncio.Event()
            in_flight = asyncio.ensure_future(biller.stub.ListBills(ListBillsRequest(query=consumer.query(ACCOUNT))))
            await asyncio.wait_for(store.entered.wait(), 5)
            began = time.monotonic()
            stopping = asyncio.ensure_future(biller.running.stop(grace=5))

            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
            # The event stream ends at once (OK), so the consumer resumes from its cursor elsewhere or later.
            assert await asyncio.wait_for(events.read(), 2) is grpc.aio.EOF
            assert await events.code() is grpc.StatusCode.OK
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # no new calls once the stop began
                await biller.stub.Hello(HelloRequest(protocol_versions=[1]), timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

            answer = await in_flight  # finished within the grace period
            assert len(answer.bills) == 1
            await stopping
            assert 0.5 <= time.monotonic() - began < 4.0  # waited for the call, not for the whole grace
            assert biller.agent.metrics.sample("parley_event_watchers") == 0

        try:  # the store closed cleanly: the WAL was folded into the database and truncated
            assert (tmp_path / "biller.sqlite-wal").stat().st_size == 0
            assert reader.execute("SELECT COUNT(*) FROM bills").fetchone() == (1,)
        finally:
            reader.close()

    asyncio.run(main())


# --- Metrics ---------------------------------------------------------------------------------------------


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_calls_and_protocol_steps_and_are_scraped_over_http(tmp_path: Path) -> None:
    async def main() -> None:
        async with served(tmp_path) as biller:
            endpoint = await serve_metrics(biller.agent.metrics.registry, "127.0.0.1:0")
            try:
                consumer = await biller.enrolled()
                await biller.stub.Hello(HelloRequest(protocol_versions=[1]))
                bill = await biller.bill_envelope()
                opened = await biller.stub.Negotiate(NegotiateRequest(move=consumer.open(bill, inside_options())))
                assert opened.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_AGREED
                forty = eur("40.00")  # the first of 3 instalments, under the agreement the biller's Accept sealed
                intent = consumer.intent(
                    ACCOUNT, BILL.bill_id, "intent-1", forty, agreement_digest=digest(opened.reply), instalment_index=0
                )
                await biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
                await biller.agent.record_settlement(ACCOUNT, "intent-1", forty, "rail-1")
                with pytest.raises(grpc.aio.AioRpcError):
                    await biller.stub.GetBill(GetBillRequest(query=consumer.query(ACCOUNT, bill_id="no-such-bill")))
                events = biller.stub.WatchEvents(WatchEventsRequest(query=consumer.query(ACCOUNT)))
                await events.read()
                watching = await asyncio.to_thread(_scrape, endpoint.url)
                events.cancel()
                # The server notices the cancelled stream asynchronously, the agent's watcher gauge first and
                # the interceptor's in-flight gauge after it: wait (bounded) for both to drop.
                settled = (("parley_event_watchers", ()), ("parley_grpc_server_in_flight", ()))
                for _ in range(100):
                    samples = await asyncio.to_thread(_scrape, endpoint.url)
                    if all(samples.get(gauge, 0.0) == 0 for gauge in settled):
                        break
                    await asyncio.sleep(0.05)
            finally:
                await endpoint.close()

        def value(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        def rpc(method: str, code: str = "OK") -> dict[str, str]:
            return {"grpc_service": BILLER_SERVICE, "grpc_method": method, "grpc_code": code}

        assert value("parley_grpc_server_handled_total", **rpc("Hello")) == 1
        assert value("parley_grpc_server_handled_total", **rpc("Enrol")) == 1
        assert value("parley_grpc_server_handled_total", **rpc("Negotiate")) == 1
        assert value("parley_grpc_server_handled_total", **rpc("GetBill", "NOT_FOUND")) == 1
        assert value("parley_grpc_server_handling_seconds_count", **rpc("Negotiate")) == 1
        assert value("parley_grpc_server_handling_seconds_bucket", **rpc("Hello"), le="+Inf") == 1
        assert value("parley_negotiations_opened_total") == 1
        assert value("parley_negotiations_total", outcome="agreed") == 1
        assert value("parley_agreements_total", kind="instalment_plan") == 1
        assert value("parley_enrolments_total") == 1
        assert value("parley_payment_intents_total") == 1
        assert value("parley_payments_settled_total") == 1
        assert value("parley_verification_failures_total", reason="NOT_FOUND") == 1
        assert watching[("parley_event_watchers", ())] == 1
        assert value("parley_event_watchers") == 0
        assert value("parley_grpc_server_in_flight") == 0

    asyncio.run(main())


def test_each_agent_has_its_own_registry() -> None:
    first, second = BillerMetrics(), BillerMetrics()  # the same names twice in one process: no collision
    first.enrolments.inc()
    assert (first.sample("parley_enrolments_total"), second.sample("parley_enrolments_total")) == (1, 0)


# --- Logs ------------------------------------------------------------------------------------------------

NOTE = "Lost my job at the bakery in March; partner in hospital"


class HardshipStrategy:
    """Opens under the hardship programme, disclosing its circumstances; accepts any counter."""

    def opening(self, context: OpeningContext) -> tuple[Terms, Circumstances | None]:
        circumstances = Circumstances(negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=True, note=NOTE)
        return Terms.from_proto(hardship_terms()), circumstances

    def respond(self, context: ResponseContext) -> AcceptOffer:
        return AcceptOffer()


class Bank:
    async def send(self, order: PaymentOrder) -> str:
        return "bank-transfer-1"


def _renderings(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        base64.b64encode(secret).decode().rstrip("="),
    ]


def test_logs_carry_steps_with_ids_but_never_keys_codes_or_circumstances(tmp_path: Path) -> None:
    text, lines = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(lines)]
    handlers[0].setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    handlers[1].setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    secrets_: list[str] = []

    async def main() -> None:
        async with served(tmp_path) as biller:
            await biller.agent.create_account(ACCOUNT, "Alice Example")
            code = await biller.agent.issue_enrolment_code(ACCOUNT)
            consumer_key, consumer_keys = new_party("consumer:alice", biller.clock)
            store = await SqliteConsumerStore.open(tmp_path / "consumer.sqlite")
            consumer = ConsumerAgent(
                party_id="consumer:alice",
                signing_key=consumer_key,
                key_sets=[consumer_keys],
                store=store,
                strategy=HardshipStrategy(),
                mandate=Mandate(eur("10.00"), 12, eur("10.00"), allow_disclosure=True),
                payment_sender=Bank(),
                clock=biller.clock,
            )
            try:
                await consumer.enrol(
                    biller.target,
                    biller_party_id=BILLER_ID,
                    fingerprint=biller.agent.key_chain.fingerprint,
                    account_id=ACCOUNT,
                    code=code,
                    insecure=True,
                )
                await biller.agent.issue_bill(
                    ACCOUNT, BILL.amount_due, BILL.due_date, BILL.description, bill_id=BILL.bill_id
                )
                await consumer.bills(BILLER_ID)
                result = await consumer.negotiate(BILLER_ID, BILL.bill_id)
                assert result.outcome is ThreadOutcome.AGREED
                await consumer.pay(BILLER_ID, BILL.bill_id)
            finally:
                await consumer.close()
                await store.close()
            for key in (biller.key, consumer_key):
                secrets_.extend(_renderings(key.seed))
                secrets_.extend(_renderings(key.public_key.raw))
            secrets_.extend([code, code.replace("-", ""), code.lower(), NOTE, "bakery", "hospital", "Alice Example"])

    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        asyncio.run(main())
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(level)

    captured = text.getvalue() + lines.getvalue()
    assert len(captured) > 1000, "the run logged its steps"
    leaked = [secret for secret in secrets_ if secret in captured]
    assert not leaked, f"the logs carry secrets: {leaked}"

    steps = [json.loads(line) for line in lines.getvalue().splitlines()]
    by_step = {entry.get("step"): entry for entry in steps if entry["logger"] == "parley.biller"}
    for step in ("enrolled", "negotiate", "payment-intent", "read"):
        assert len(by_step[step]["thread_id"]) == 32, step  # 16-byte ids, hex
        assert len(by_step[step]["message_id"]) == 32, step
    assert by_step["negotiate"]["outcome"] == "agreed"


# --- Tracing ---------------------------------------------------------------------------------------------


def test_tracing_without_the_otel_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, tracing.OTEL_MODULE, None)  # as if the extra were not installed
    assert not tracing.available()
    with pytest.raises(tracing.TracingUnavailable, match=r"parley\[otel\]"):
        tracing.server_interceptors()


def test_tracing_with_the_otel_extra_serves_through_its_interceptor(tmp_path: Path) -> None:
    pytest.importorskip(tracing.OTEL_MODULE)

    async def main() -> None:
        clock = ManualClock(START)
        key, key_set = new_party(BILLER_ID, clock)
        store = await SqliteBillerStore.open(tmp_path / "biller.sqlite")
        agent = BillerAgent(
            party_id=BILLER_ID,
            signing_key=key,
            key_sets=[key_set],
            store=store,
            policy=SamplePolicy(),
            rail=PeerRail(),
            clock=clock,
        )
        running = await serve_biller(agent, "127.0.0.1:0", insecure=True, interceptors=tracing.server_interceptors())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                hello = await biller_service_pb2_grpc.BillerServiceStub(channel).Hello(
                    HelloRequest(protocol_versions=[1])
                )
                assert hello.biller_party_id == BILLER_ID
        finally:
            await running.stop(grace=None)
            await store.close()

    asyncio.run(main())
