"""The back-office API (reference_biller/backoffice.py) from a billing system's side.

The billing system is played by a client generated only from proto/parley/backoffice/v1 (the
`parley.backoffice.v1` stub), over a real socket on 127.0.0.1, beside a real biller serving a signed
test consumer. Errors are read from the google.rpc.Status trailer, as any language's client would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from agent.tools.certs import issue_client_cert, issue_server_cert, make_dev_ca
from parley.backoffice.v1 import backoffice_service_pb2 as bo
from parley.backoffice.v1 import backoffice_service_pb2_grpc as bo_grpc
from parley.v1 import biller_service_pb2, envelope_pb2, event_pb2
from parley.v1.biller_service_pb2 import CreatePaymentIntentRequest
from reference_biller.backoffice import ERROR_DOMAIN, read_token_file, serve_backoffice
from tests.fixtures import BILL
from tests.helpers.peer import Biller, Consumer, running_biller

TOKEN = "s3cret-token-for-the-billing-system-0123456789"
ACCOUNT = "acct-1001"


@dataclass
class BackOffice:
    biller: Biller
    stub: bo_grpc.BackOfficeServiceAsyncStub
    channel: grpc.aio.Channel
    target: str


@asynccontextmanager
async def back_office(tmp_path: Path, *, token: str = TOKEN) -> AsyncIterator[BackOffice]:
    token_file = tmp_path / "backoffice.token"
    token_file.write_text(token + "\n")
    async with running_biller(tmp_path) as biller:
        store = biller.agent._store
        server = await serve_backoffice(
            biller.agent,
            store,
            "127.0.0.1:0",
            token=read_token_file(token_file),
            insecure=True,
            watch_poll_interval=timedelta(seconds=0.05),
        )
        target = f"127.0.0.1:{server.port}"
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                yield BackOffice(biller, bo_grpc.BackOfficeServiceStub(channel), channel, target)
        finally:
            await server.stop(None)


def run(tmp_path: Path, scenario: Callable[[BackOffice], Awaitable[None]]) -> None:
    async def main() -> None:
        async with back_office(tmp_path) as office:
            await scenario(office)

    asyncio.run(main())


AUTH = (("authorization", f"Bearer {TOKEN}"),)


async def refusal(call: Awaitable[object]) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo reason, domain) of a refused call."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    assert status is not None, caught.value
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return caught.value.code(), info.reason, info.domain


async def next_event(call: grpc.aio.UnaryStreamCall[bo.WatchEventsRequest, bo.WatchEventsResponse]) -> bo.Event:
    response = await call.read()
    assert isinstance(response, bo.WatchEventsResponse), response
    return response.event


def eur(minor: int) -> bo.Money:
    return bo.Money(currency_code="EUR", amount_minor=minor)


def test_a_billing_system_creates_bills_and_settles_them_and_follows_the_events(tmp_path: Path) -> None:
    async def scenario(office: BackOffice) -> None:
        stub, biller = office.stub, office.biller
        created = await stub.CreateAccount(
            bo.CreateAccountRequest(request_id="r1", account_id=ACCOUNT, holder_name="A. Household"), metadata=AUTH
        )
        assert created.created
        assert not created.account.enrolled
        again = await stub.CreateAccount(
            bo.CreateAccountRequest(request_id="r1b", account_id=ACCOUNT, holder_name="A. Household"), metadata=AUTH
        )
        assert not again.created  # idempotent by the account id, across request ids
        code = await stub.IssueEnrolmentCode(
            bo.IssueEnrolmentCodeRequest(request_id="r2", account_id=ACCOUNT), metadata=AUTH
        )
        assert code.biller_fingerprint == biller.agent.key_chain.fingerprint.hex()
        same = await stub.IssueEnrolmentCode(
            bo.IssueEnrolmentCodeRequest(request_id="r2", account_id=ACCOUNT), metadata=AUTH
        )
        assert same.enrolment_code == code.enrolment_code  # a retry gets the first answer, not a second code
        first_letter = code
        code = await stub.IssueEnrolmentCode(
            bo.IssueEnrolmentCodeRequest(request_id="r2b", account_id=ACCOUNT), metadata=AUTH
        )
        assert code.enrolment_code != first_letter.enrolment_code
        mallory = Consumer("consumer:mallory", biller.clock)  # holds the superseded letter
        with pytest.raises(grpc.aio.AioRpcError) as superseded:
            await biller.stub.Enrol(
                biller_service_pb2.EnrolRequest(request=mallory.enrolment(ACCOUNT, first_letter.enrolment_code))
            )
        assert superseded.value.code() is not grpc.StatusCode.OK

        bill = bo.IssueBillRequest(
            request_id="r3",
            bill_id="INV-2026-0001",
            account_id=ACCOUNT,
            amount_due=eur(BILL.amount_due.minor),
            due_date=BILL.due_date.isoformat(),
            description="Water, March 2026",
        )
        assert await refusal(stub.IssueBill(bill, metadata=AUTH)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ACCOUNT_NOT_ENROLLED",
            ERROR_DOMAIN,
        )
        # The consumer enrols with the code the billing system printed.
        alice = Consumer("consumer:alice", biller.clock)
        await biller.stub.Enrol(biller_service_pb2.EnrolRequest(request=alice.enrolment(ACCOUNT, code.enrolment_code)))
        issued = await stub.IssueBill(bill, metadata=AUTH)
        assert issued.created
        assert len(issued.bill_digest) == 64
        retried = await stub.IssueBill(bo.IssueBillRequest(**{**_fields(bill), "request_id": "r3-new"}), metadata=AUTH)
        assert not retried.created
        assert retried.bill_digest == issued.bill_digest
        other = bo.IssueBillRequest(**{**_fields(bill), "request_id": "r4", "description": "Gas"})
        assert (await refusal(stub.IssueBill(other, metadata=AUTH)))[1] == "BILL_EXISTS"
        reused = bo.IssueBillRequest(**{**_fields(bill), "description": "Gas"})
        assert (await refusal(stub.IssueBill(reused, metadata=AUTH)))[1] == "REQUEST_ID_REUSED"
        bad_date = bo.IssueBillRequest(**{**_fields(bill), "request_id": "r5", "bill_id": "b2", "due_date": "31/03"})
        assert (await refusal(stub.IssueBill(bad_date, metadata=AUTH)))[:2] == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
        )

        early = {"request_id": "r6", "bill_id": "b3", "issue_date": "2026-04-01", "due_date": "2026-03-31"}
        due_before_issue = bo.IssueBillRequest(**{**_fields(bill), **early})
        assert await refusal(stub.IssueBill(due_before_issue, metadata=AUTH)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TERMS",
            "parley.v1",  # the protocol's own rule, with the protocol's reason (TRM-5)
        )
        ancient = bo.IssueBillRequest(
            **{**_fields(bill), "request_id": "r7", "bill_id": "b4", "issue_date": "0001-01-01"}
        )
        assert await refusal(stub.IssueBill(ancient, metadata=AUTH)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",  # the intake's rule: a new bill's issue date is within a year of today
            ERROR_DOMAIN,
        )

        # The consumer pays the bill in full; the billing system sees the payment awaited, then settles it.
        await biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(intent=alice.intent(ACCOUNT, "INV-2026-0001", "pay-1", BILL.amount_due))
        )
        [awaited] = (await stub.ListAwaitedPayments(bo.ListAwaitedPaymentsRequest(), metadata=AUTH)).payments
        assert awaited.intent.intent_id == "pay-1"
        assert awaited.amount == eur(BILL.amount_due.minor)
        short = bo.RecordSettlementRequest(
            request_id="s0", payment_reference=awaited.payment_reference, amount=eur(100), rail_reference="BANK-1"
        )
        assert (await refusal(stub.RecordSettlement(short, metadata=AUTH)))[1] == "SETTLEMENT_REFUSED"
        settle = bo.RecordSettlementRequest(
            request_id="s1",
            payment_reference=awaited.payment_reference.lower(),
            amount=awaited.amount,
            rail_reference="BANK-1",
        )
        settled = await stub.RecordSettlement(settle, metadata=AUTH)
        assert settled.intent.intent_id == "pay-1"
        assert settled.receipt
        by_intent = bo.RecordSettlementRequest(
            request_id="s2", intent=awaited.intent, amount=awaited.amount, rail_reference="BANK-1"
        )
        assert (await stub.RecordSettlement(by_intent, metadata=AUTH)).receipt == settled.receipt  # same receipt
        assert not (await stub.ListAwaitedPayments(bo.ListAwaitedPaymentsRequest(), metadata=AUTH)).payments

        # The event stream from the start, then resumed from a cursor: nothing missed, nothing twice.
        watch = stub.WatchEvents(
            bo.WatchEventsRequest(cursors=[bo.EventCursor(account_id=ACCOUNT, next_sequence=0)]), metadata=AUTH
        )
        first = [await next_event(watch) for _ in range(2)]
        watch.cancel()
        assert [e.kind for e in first] == [bo.EVENT_KIND_BILL_ISSUED, bo.EVENT_KIND_PAYMENT_RECEIVED]
        assert [e.sequence for e in first] == [0, 1]
        assert first[0].bill_id == "INV-2026-0001"
        assert first[1].amount == eur(BILL.amount_due.minor)
        resumed = stub.WatchEvents(
            bo.WatchEventsRequest(cursors=[bo.EventCursor(account_id=ACCOUNT, next_sequence=2)]), metadata=AUTH
        )
        await biller.agent.emit_event(ACCOUNT, event_pb2.EVENT_KIND_REMINDER, reminder_level=1, message="hi")
        live = await asyncio.wait_for(next_event(resumed), 5)
        resumed.cancel()
        assert (live.sequence, live.kind, live.reminder_level) == (2, bo.EVENT_KIND_REMINDER, 1)
        beyond = stub.WatchEvents(
            bo.WatchEventsRequest(cursors=[bo.EventCursor(account_id=ACCOUNT, next_sequence=9)]), metadata=AUTH
        )
        assert (await refusal(next_event(beyond)))[:2] == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_OUT_OF_RANGE")

        arrangements = await stub.ListArrangements(
            bo.ListArrangementsRequest(account_id=ACCOUNT, include_inactive=True), metadata=AUTH
        )
        assert list(arrangements.arrangements) == []  # paid in full, no negotiation
        missing = bo.ListArrangementsRequest(account_id="nobody")
        assert (await refusal(stub.ListArrangements(missing, metadata=AUTH)))[1] == "ACCOUNT_NOT_FOUND"

    run(tmp_path, scenario)


def _fields(message: bo.IssueBillRequest) -> dict[str, Any]:
    return {field.name: value for field, value in message.ListFields()}


def test_every_call_needs_the_token_but_health_does_not(tmp_path: Path) -> None:
    async def scenario(office: BackOffice) -> None:
        request = bo.ListAwaitedPaymentsRequest()
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            assert await refusal(office.stub.ListAwaitedPayments(request, metadata=metadata)) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "UNAUTHENTICATED",
                ERROR_DOMAIN,
            )
        health: Any = health_pb2_grpc.HealthStub(office.channel)  # grpc_health's stubs type no methods
        for service in ("", "parley.backoffice.v1.BackOfficeService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect: Any = reflection_pb2_grpc.ServerReflectionStub(office.channel)  # type: ignore[arg-type] # aio works too
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in reflect.ServerReflectionInfo(iter([listing])):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async for answer_ in reflect.ServerReflectionInfo(iter([listing]), metadata=AUTH):
            names = {service.name for service in answer_.list_services_response.service}
            assert "parley.backoffice.v1.BackOfficeService" in names
            break

    run(tmp_path, scenario)


def test_the_back_office_is_never_open_and_plaintext_only_on_loopback(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_biller(tmp_path) as biller:
            store = biller.agent._store
            with pytest.raises(ValueError, match="never open"):
                await serve_backoffice(biller.agent, store, "127.0.0.1:0", insecure=True)
            with pytest.raises(ValueError, match="loopback"):
                await serve_backoffice(biller.agent, store, "0.0.0.0:0", token=TOKEN.encode(), insecure=True)

    asyncio.run(scenario())
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="shorter"):
        read_token_file(short)


def test_the_event_kinds_mirror_the_protocol() -> None:
    mirrored: dict[str, int] = dict(bo.EventKind.items())
    assert mirrored == dict(event_pb2.EventKind.items())


def test_mutual_tls_alone_authenticates_a_billing_system(tmp_path: Path) -> None:
    """With a client CA and no token, the certificate is the credential: no certificate, no connection."""
    ca = make_dev_ca()
    server_cert = issue_server_cert(ca)
    client_cert = issue_client_cert(ca, "billing-system")

    async def scenario() -> None:
        async with running_biller(tmp_path) as biller:
            server = await serve_backoffice(
                biller.agent,
                biller.agent._store,
                "127.0.0.1:0",
                tls=(server_cert.chain_pem, server_cert.key_pem),
                tls_client_ca=ca.cert_pem,
            )
            target = f"127.0.0.1:{server.port}"
            request = bo.CreateAccountRequest(request_id="m1", account_id="acct-tls", holder_name="T. Example")
            try:
                with_certificate = grpc.ssl_channel_credentials(ca.cert_pem, client_cert.key_pem, client_cert.cert_pem)
                async with grpc.aio.secure_channel(target, with_certificate) as channel:
                    answer = await bo_grpc.BackOfficeServiceStub(channel).CreateAccount(request, timeout=10)
                    assert answer.created
                async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca.cert_pem)) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await bo_grpc.BackOfficeServiceStub(channel).CreateAccount(request, timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
            finally:
                await server.stop(None)

    asyncio.run(scenario())


def test_a_watcher_follows_every_holders_log_across_a_re_binding_and_resumes_each(tmp_path: Path) -> None:
    """ENR-12: a log per (account, holder), each from 0. A watcher sees the new holder's log start live; resumed
    after the switch with a position per log, it gets bob's events from 1 and the payment_received appended to
    alice's log later (her payment, settled after the switch), each exactly once."""

    async def scenario(office: BackOffice) -> None:
        stub, biller = office.stub, office.biller
        await stub.CreateAccount(
            bo.CreateAccountRequest(request_id="a", account_id=ACCOUNT, holder_name="A. Household"), metadata=AUTH
        )

        async def bind(party_id: str, request_id: str) -> Consumer:
            code = await stub.IssueEnrolmentCode(
                bo.IssueEnrolmentCodeRequest(request_id=request_id, account_id=ACCOUNT), metadata=AUTH
            )
            consumer = Consumer(party_id, biller.clock)
            enrolment = consumer.enrolment(ACCOUNT, code.enrolment_code)
            await biller.stub.Enrol(biller_service_pb2.EnrolRequest(request=enrolment))
            return consumer

        alice = await bind("consumer:alice", "code-1")
        bill = bo.IssueBillRequest(
            request_id="bill",
            bill_id="INV-1",
            account_id=ACCOUNT,
            amount_due=eur(BILL.amount_due.minor),
            due_date=BILL.due_date.isoformat(),
            description="Water",
        )
        await stub.IssueBill(bill, metadata=AUTH)  # alice's 0
        await biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(intent=alice.intent(ACCOUNT, "INV-1", "pay-1", BILL.amount_due))
        )
        await biller.agent.emit_event(ACCOUNT, event_pb2.EVENT_KIND_REMINDER, reminder_level=1)  # alice's 1

        def seen(event: bo.Event) -> tuple[str, int, int]:
            signed = envelope_pb2.Envelope.FromString(event.signed_event)
            assert event_pb2.Event.FromString(signed.payload).header.recipient == event.holder  # its signed log
            assert event.account_id == ACCOUNT
            return event.holder, event.sequence, event.kind

        alice_id, bob_id = "consumer:alice", "consumer:bob"
        watch = stub.WatchEvents(bo.WatchEventsRequest(cursors=[bo.EventCursor(account_id=ACCOUNT)]), metadata=AUTH)
        assert [seen(await next_event(watch)) for _ in range(2)] == [
            (alice_id, 0, bo.EVENT_KIND_BILL_ISSUED),
            (alice_id, 1, bo.EVENT_KIND_REMINDER),
        ]
        await bind(bob_id, "code-2")  # bob's 0: the unpaid bill presented to him
        assert seen(await asyncio.wait_for(next_event(watch), 5)) == (bob_id, 0, bo.EVENT_KIND_BILL_ISSUED)
        watch.cancel()  # positions kept: alice's log at 2, bob's at 1

        await biller.agent.emit_event(ACCOUNT, event_pb2.EVENT_KIND_REMINDER, reminder_level=2)  # bob's 1
        settle = bo.RecordSettlementRequest(
            request_id="s",
            intent=bo.IntentKey(account_id=ACCOUNT, intent_id="pay-1"),
            amount=eur(BILL.amount_due.minor),
            rail_reference="BANK-1",
        )
        await stub.RecordSettlement(settle, metadata=AUTH)  # alice's 2: her payment, thanked in her log

        cursors = [
            bo.EventCursor(account_id=ACCOUNT, holder=alice_id, next_sequence=2),
            bo.EventCursor(account_id=ACCOUNT, holder=bob_id, next_sequence=1),
        ]
        resumed = stub.WatchEvents(bo.WatchEventsRequest(cursors=cursors), metadata=AUTH)
        caught_up = [seen(await asyncio.wait_for(next_event(resumed), 5)) for _ in range(2)]
        assert sorted(caught_up) == [
            (alice_id, 2, bo.EVENT_KIND_PAYMENT_RECEIVED),
            (bob_id, 1, bo.EVENT_KIND_REMINDER),
        ]
        await biller.agent.emit_event(ACCOUNT, event_pb2.EVENT_KIND_REMINDER, reminder_level=3)  # bob's 2
        # The next event is the live one: nothing was sent twice meanwhile.
        assert seen(await asyncio.wait_for(next_event(resumed), 5)) == (bob_id, 2, bo.EVENT_KIND_REMINDER)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(next_event(resumed), 0.3)
        resumed.cancel()

        # A cursor without a holder (as written before holders were named) on an account with several logs:
        # which log it meant is unknown, so each is streamed from its beginning rather than one skipped.
        legacy = stub.WatchEvents(
            bo.WatchEventsRequest(cursors=[bo.EventCursor(account_id=ACCOUNT, next_sequence=2)]), metadata=AUTH
        )
        everything = sorted([seen(await asyncio.wait_for(next_event(legacy), 5))[:2] for _ in range(6)])
        legacy.cancel()
        assert everything == [(alice_id, 0), (alice_id, 1), (alice_id, 2), (bob_id, 0), (bob_id, 1), (bob_id, 2)]

        beyond = bo.WatchEventsRequest(cursors=[bo.EventCursor(account_id=ACCOUNT, holder=alice_id, next_sequence=4)])
        out_of_range = await refusal(next_event(stub.WatchEvents(beyond, metadata=AUTH)))
        assert out_of_range[:2] == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_OUT_OF_RANGE")
        for wrong in (
            [*cursors, bo.EventCursor(account_id=ACCOUNT)],  # with and without a holder
            [*cursors, cursors[0]],  # one log twice
        ):
            call = stub.WatchEvents(bo.WatchEventsRequest(cursors=wrong), metadata=AUTH)
            assert (await refusal(next_event(call)))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")

    run(tmp_path, scenario)
