"""The authorization matrix (PROTOCOL.md §6.4): consumer B can do nothing on consumer A's account.

A and B are each enrolled on their own account over a live gRPC biller. A has bills, an agreed thread
with a payment intent settled into a receipt, an open thread waiting for A's answer to the biller's
counter-offer, an erasure, and a fresh bill. Every row of the matrix is B trying to read, negotiate, pay,
watch or erase on A's account, and gets the specific reason §6.4 gives — ACCOUNT_ACCESS_DENIED when the
request names A's account (AUZ-1), NOT_FOUND when it names A's bill, thread, intent or agreement from B's
own account (AUZ-3), WRONG_SENDER when B signs in A's name (HDR-3) — while the store does not change.
B replaying A's captured envelopes gets A's original answer and no new effect, and cannot re-aim them.

tests/test_biller_grpc.py::test_bad_requests_are_refused_with_their_reason_and_change_nothing has a few
of these rows among other refusals; this is the complete matrix.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.transport.status import error_from_rpc
from parley.v1 import envelope_pb2, negotiation_pb2
from parley.v1.biller_service_pb2 import (
    CreatePaymentIntentRequest,
    EnrolRequest,
    GetBillRequest,
    GetReceiptRequest,
    GetThreadRequest,
    ListBillsRequest,
    NegotiateRequest,
    RequestErasureRequest,
    WatchEventsRequest,
)
from tests.fixtures import BILL, eur
from tests.helpers.db import dump
from tests.helpers.peer import Biller, Consumer, counter_terms, inside_options, outside_options, running_biller

A_ACCOUNT, B_ACCOUNT = "acct-1001", "acct-2002"
TWENTY = eur("20.00")


@dataclass
class World:
    """Everything on A's account that B goes after, and what A was answered."""

    biller: Biller
    alice: Consumer
    bob: Consumer
    agreed_thread: list[envelope_pb2.Envelope]  # [opening, counter, accept]: bill-a1, agreed
    open_thread: list[envelope_pb2.Envelope]  # [opening, counter]: bill-a2, A to answer the counter
    fresh_bill: envelope_pb2.Envelope  # bill-a3, no thread
    agreement: bytes  # the digest of A's Accept on bill-a1
    intent: envelope_pb2.Envelope  # A's payment intent pay-a1, settled
    erasure: envelope_pb2.Envelope  # A's erasure request
    enrolment: envelope_pb2.Envelope  # A's enrolment request
    answers: dict[str, bytes]  # A's original answers, serialized, by what was asked

    @property
    def impostor(self) -> Consumer:
        """B's key, signing with A's party id as sender."""
        impostor = copy.copy(self.bob)
        impostor.party_id = self.alice.party_id
        return impostor


async def build_world(biller: Biller) -> World:
    await biller.agent.create_account(A_ACCOUNT, "Alice")
    alice = Consumer("consumer:alice", biller.clock)
    code = await biller.agent.issue_enrolment_code(A_ACCOUNT)
    enrolment = alice.enrolment(A_ACCOUNT, code)
    enrolled = await biller.stub.Enrol(EnrolRequest(request=enrolment))
    bob = await biller.enrolled(B_ACCOUNT, "consumer:bob")
    await biller.bill(B_ACCOUNT, "bill-b1")

    agreed_bill = await biller.bill(A_ACCOUNT, "bill-a1")
    opening = alice.open(agreed_bill, outside_options())
    counter = (await biller.stub.Negotiate(NegotiateRequest(move=opening))).reply
    accept = alice.next([opening, counter], negotiation_pb2.Accept(offer_digest=digest(counter)))
    await biller.stub.Negotiate(NegotiateRequest(move=accept))
    agreed_thread = [opening, counter, accept]

    open_bill = await biller.bill(A_ACCOUNT, "bill-a2")
    open_opening = alice.open(open_bill, outside_options())
    open_counter = (await biller.stub.Negotiate(NegotiateRequest(move=open_opening))).reply
    fresh_bill = await biller.bill(A_ACCOUNT, "bill-a3")

    intent = alice.intent(A_ACCOUNT, "bill-a1", "pay-a1", TWENTY, agreement_digest=digest(accept))
    paid = await biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
    await biller.agent.record_settlement(A_ACCOUNT, "pay-a1", TWENTY, "RAIL-1")
    erasure = alice.erasure(A_ACCOUNT)
    erased = await biller.stub.RequestErasure(RequestErasureRequest(request=erasure))
    return World(
        biller=biller,
        alice=alice,
        bob=bob,
        agreed_thread=agreed_thread,
        open_thread=[open_opening, open_counter],
        fresh_bill=fresh_bill,
        agreement=digest(accept),
        intent=intent,
        erasure=erasure,
        enrolment=enrolment,
        answers={
            "enrol": enrolled.SerializeToString(),
            "intent": paid.SerializeToString(),
            "erasure": erased.SerializeToString(),
            "open-reply": counter.SerializeToString(),
        },
    )


def _thread_id(thread: list[envelope_pb2.Envelope]) -> bytes:
    return negotiation_pb2.ThreadOpen.FromString(thread[0].payload).header.thread_id


async def _first(stream: object) -> object:
    async for response in stream:  # type: ignore[attr-defined]
        return response
    return None


async def _expired_intent(world: World) -> object:
    """A's captured intent sent once its expire_time plus the skew has passed."""
    world.biller.clock.advance(timedelta(hours=1) + world.biller.agent.limits.max_clock_skew + timedelta(seconds=1))
    return await world.biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=world.intent))


Attempt = Callable[[World], Awaitable[object]]

# (row id, what B tries, the reason it gets)
REFUSALS: list[tuple[str, Attempt, Reason]] = [
    # --- read ---
    (
        "ListBills on A's account",
        lambda w: w.biller.stub.ListBills(ListBillsRequest(query=w.bob.query(A_ACCOUNT))),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    (
        "ListBills on an account that does not exist (indistinguishable)",
        lambda w: w.biller.stub.ListBills(ListBillsRequest(query=w.bob.query("acct-9999"))),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    (
        "GetBill of A's bill on A's account",
        lambda w: w.biller.stub.GetBill(GetBillRequest(query=w.bob.query(A_ACCOUNT, bill_id="bill-a1"))),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    (
        "GetBill of A's bill through B's account",
        lambda w: w.biller.stub.GetBill(GetBillRequest(query=w.bob.query(B_ACCOUNT, bill_id="bill-a1"))),
        Reason.NOT_FOUND,
    ),
    (
        "GetThread of A's thread on A's account",
        lambda w: w.biller.stub.GetThread(
            GetThreadRequest(query=w.bob.query(A_ACCOUNT, thread_id=_thread_id(w.agreed_thread)))
        ),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    (
        "GetThread of A's thread through B's account",
        lambda w: w.biller.stub.GetThread(
            GetThreadRequest(query=w.bob.query(B_ACCOUNT, thread_id=_thread_id(w.agreed_thread)))
        ),
        Reason.NOT_FOUND,
    ),
    (
        "GetReceipt of A's intent on A's account",
        lambda w: w.biller.stub.GetReceipt(GetReceiptRequest(query=w.bob.query(A_ACCOUNT, intent_id="pay-a1"))),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    (
        "GetReceipt of A's intent through B's account",
        lambda w: w.biller.stub.GetReceipt(GetReceiptRequest(query=w.bob.query(B_ACCOUNT, intent_id="pay-a1"))),
        Reason.NOT_FOUND,
    ),
    # --- watch ---
    (
        "WatchEvents on A's account",
        lambda w: _first(w.biller.stub.WatchEvents(WatchEventsRequest(query=w.bob.query(A_ACCOUNT)))),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    # --- negotiate ---
    (
        "open a thread on A's bill",
        lambda w: w.biller.stub.Negotiate(NegotiateRequest(move=w.bob.open(w.fresh_bill, inside_options()))),
        Reason.NOT_FOUND,
    ),
    (
        "counter-offer on A's open thread",
        lambda w: w.biller.stub.Negotiate(
            NegotiateRequest(move=w.bob.next(w.open_thread, negotiation_pb2.Offer(terms=counter_terms())))
        ),
        Reason.NOT_FOUND,
    ),
    (
        "accept the biller's offer to A",
        lambda w: w.biller.stub.Negotiate(
            NegotiateRequest(
                move=w.bob.next(w.open_thread, negotiation_pb2.Accept(offer_digest=digest(w.open_thread[1])))
            )
        ),
        Reason.NOT_FOUND,
    ),
    (
        "withdraw A's open thread",
        lambda w: w.biller.stub.Negotiate(NegotiateRequest(move=w.bob.next(w.open_thread, negotiation_pb2.Withdraw()))),
        Reason.NOT_FOUND,
    ),
    # --- pay ---
    (
        "pay A's bill on A's account",
        lambda w: w.biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(intent=w.bob.intent(A_ACCOUNT, "bill-a3", "b-pay", BILL.amount_due))
        ),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    (
        "pay under A's agreement on A's account",
        lambda w: w.biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(
                intent=w.bob.intent(A_ACCOUNT, "bill-a1", "b-pay", TWENTY, agreement_digest=w.agreement)
            )
        ),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    (
        "reuse A's intent id with A's content (would get A's instructions)",
        lambda w: w.biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(
                intent=w.bob.intent(A_ACCOUNT, "bill-a1", "pay-a1", TWENTY, agreement_digest=w.agreement)
            )
        ),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    (
        "pay A's bill through B's account",
        lambda w: w.biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(intent=w.bob.intent(B_ACCOUNT, "bill-a3", "b-pay", BILL.amount_due))
        ),
        Reason.NOT_FOUND,
    ),
    (
        "pay B's bill under A's agreement",
        lambda w: w.biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(
                intent=w.bob.intent(B_ACCOUNT, "bill-b1", "b-pay", TWENTY, agreement_digest=w.agreement)
            )
        ),
        Reason.NOT_FOUND,
    ),
    # --- erase ---
    (
        "erase A's disclosures",
        lambda w: w.biller.stub.RequestErasure(RequestErasureRequest(request=w.bob.erasure(A_ACCOUNT))),
        Reason.ACCOUNT_ACCESS_DENIED,
    ),
    # --- B signing with its own key, naming A as sender (HDR-3) ---
    (
        "as A: ListBills",
        lambda w: w.biller.stub.ListBills(ListBillsRequest(query=w.impostor.query(A_ACCOUNT))),
        Reason.WRONG_SENDER,
    ),
    (
        "as A: WatchEvents",
        lambda w: _first(w.biller.stub.WatchEvents(WatchEventsRequest(query=w.impostor.query(A_ACCOUNT)))),
        Reason.WRONG_SENDER,
    ),
    (
        "as A: open a thread on A's bill",
        lambda w: w.biller.stub.Negotiate(NegotiateRequest(move=w.impostor.open(w.fresh_bill, inside_options()))),
        Reason.WRONG_SENDER,
    ),
    (
        "as A: accept the biller's offer to A",
        lambda w: w.biller.stub.Negotiate(
            NegotiateRequest(
                move=w.impostor.next(w.open_thread, negotiation_pb2.Accept(offer_digest=digest(w.open_thread[1])))
            )
        ),
        Reason.WRONG_SENDER,
    ),
    (
        "as A: pay under A's agreement",
        lambda w: w.biller.stub.CreatePaymentIntent(
            CreatePaymentIntentRequest(
                intent=w.impostor.intent(A_ACCOUNT, "bill-a1", "b-pay", TWENTY, agreement_digest=w.agreement)
            )
        ),
        Reason.WRONG_SENDER,
    ),
    (
        "as A: erase",
        lambda w: w.biller.stub.RequestErasure(RequestErasureRequest(request=w.impostor.erasure(A_ACCOUNT))),
        Reason.WRONG_SENDER,
    ),
    # --- B re-aiming A's captured envelopes ---
    (
        "A's intent with B's keyid put on it",
        lambda w: w.biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=_rekeyed(w.intent, w.bob))),
        Reason.BAD_SIGNATURE,
    ),
    (
        "A's erasure with its payload changed",
        lambda w: w.biller.stub.RequestErasure(RequestErasureRequest(request=_tampered(w.erasure))),
        Reason.BAD_SIGNATURE,
    ),
    (
        "A's captured intent, once expired",
        _expired_intent,
        Reason.MESSAGE_EXPIRED,
    ),
]


def _rekeyed(envelope: envelope_pb2.Envelope, other: Consumer) -> envelope_pb2.Envelope:
    copied = envelope_pb2.Envelope()
    copied.CopyFrom(envelope)
    copied.signatures[0].keyid = other.key.keyid
    return copied


def _tampered(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    copied = envelope_pb2.Envelope()
    copied.CopyFrom(envelope)
    copied.payload = copied.payload.replace(A_ACCOUNT.encode(), B_ACCOUNT.encode())
    assert copied.payload != envelope.payload
    return copied


def run(tmp_path: Path, scenario: Callable[[World], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_biller(tmp_path) as biller:
            await scenario(await build_world(biller))

    asyncio.run(main())


@pytest.mark.parametrize(("attempt", "expected"), [row[1:] for row in REFUSALS], ids=[row[0] for row in REFUSALS])
def test_b_is_refused_on_a_s_account_and_nothing_changes(tmp_path: Path, attempt: Attempt, expected: Reason) -> None:
    async def scenario(world: World) -> None:
        before = dump(world.biller.db_path)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await attempt(world)
        error = error_from_rpc(failure.value)
        assert error.reason is expected
        assert failure.value.code() is grpc.StatusCode[expected.grpc_code]
        # AUZ-5: the refusal tells B nothing of A beyond what B itself sent.
        for secret in ("Alice", world.agreement.hex(), _thread_id(world.open_thread).hex()):
            assert secret not in error.detail
        assert dump(world.biller.db_path) == before

    run(tmp_path, scenario)


# (row id, the RPC, A's captured request, which of A's answers B must get back, how to compare)
REPLAYS: list[tuple[str, Callable[[World], Awaitable[bytes]], str]] = [
    (
        "A's enrolment",
        lambda w: _bytes(w.biller.stub.Enrol(EnrolRequest(request=w.enrolment))),
        "enrol",
    ),
    (
        "A's payment intent",
        lambda w: _bytes(w.biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=w.intent))),
        "intent",
    ),
    (
        "A's erasure",
        lambda w: _bytes(w.biller.stub.RequestErasure(RequestErasureRequest(request=w.erasure))),
        "erasure",
    ),
    (
        "A's opening (the biller's reply is the stored one)",
        lambda w: _reply(w.biller.stub.Negotiate(NegotiateRequest(move=w.agreed_thread[0]))),
        "open-reply",
    ),
]


async def _bytes(call: Awaitable[object]) -> bytes:
    return (await call).SerializeToString()  # type: ignore[attr-defined, no-any-return]


async def _reply(call: Awaitable[object]) -> bytes:
    return (await call).reply.SerializeToString()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize(("replay", "answer"), [row[1:] for row in REPLAYS], ids=[row[0] for row in REPLAYS])
def test_b_replaying_a_s_envelopes_gets_a_s_answer_and_no_new_effect(
    tmp_path: Path, replay: Callable[[World], Awaitable[bytes]], answer: str
) -> None:
    async def scenario(world: World) -> None:
        before = dump(world.biller.db_path)
        assert await replay(world) == world.answers[answer]  # HDR-12: byte for byte, never re-signed
        assert dump(world.biller.db_path) == before

    run(tmp_path, scenario)


def test_a_still_has_everything_b_tried_to_take(tmp_path: Path) -> None:
    """The matrix's refusals are not just refusals of anyone: A, asking the same, is answered."""

    async def scenario(world: World) -> None:
        alice, stub = world.alice, world.biller.stub
        assert len((await stub.ListBills(ListBillsRequest(query=alice.query(A_ACCOUNT)))).bills) == 3
        await stub.GetBill(GetBillRequest(query=alice.query(A_ACCOUNT, bill_id="bill-a1")))
        thread = await stub.GetThread(
            GetThreadRequest(query=alice.query(A_ACCOUNT, thread_id=_thread_id(world.agreed_thread)))
        )
        assert list(thread.messages) == world.agreed_thread
        await stub.GetReceipt(GetReceiptRequest(query=alice.query(A_ACCOUNT, intent_id="pay-a1")))
        assert await _first(stub.WatchEvents(WatchEventsRequest(query=alice.query(A_ACCOUNT)))) is not None
        accept = alice.next(world.open_thread, negotiation_pb2.Accept(offer_digest=digest(world.open_thread[1])))
        agreed = await stub.Negotiate(NegotiateRequest(move=accept))
        assert agreed.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_AGREED
        await stub.Negotiate(NegotiateRequest(move=alice.open(world.fresh_bill, inside_options())))

    run(tmp_path, scenario)
