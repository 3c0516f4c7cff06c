"""Red team issue 13 items 4 and 5: agreed dates are enforced at payment (PAY-15), only the outstanding
balance can be paid and is what a renegotiation restates (PAY-16), one intent per bill is in flight at a
time (PAY-14), and no receipt ever says less is owed than really is."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.biller import payments
from agent.protocol import terms
from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.protocol.terms import Money
from agent.stores.base import BillStatus
from parley.v1 import event_pb2, payment_pb2
from parley.v1.biller_service_pb2 import CreatePaymentIntentRequest, NegotiateRequest
from parley.v1.envelope_pb2 import Envelope
from tests.fixtures import BILL
from tests.helpers.peer import Biller, Consumer, inside_options
from tests.test_biller_grpc import reason, run

ACCOUNT = "acct-1001"


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


async def instruct(biller: Biller, intent: Envelope) -> payment_pb2.PaymentInstructions:
    answer = await biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intent))
    return payment_pb2.PaymentInstructions.FromString(answer.instructions.payload)


async def agreed_plan(biller: Biller) -> tuple[Consumer, bytes]:
    """Alice agrees 3 x EUR 40.00 on 15 April, May and June (inside the options: accepted at once)."""
    alice = await biller.enrolled(ACCOUNT, "consumer:alice")
    bill = await biller.bill(ACCOUNT)
    answer = await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, inside_options())))
    assert answer.reply.payload_type == "parley.v1.Accept"
    return alice, digest(answer.reply)


def remaining(receipt: Envelope) -> Money:
    return Money.from_proto(payment_pb2.Receipt.FromString(receipt.payload).remaining_balance)


def test_after_a_broken_plan_only_the_outstanding_balance_is_owed_restated_and_payable(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice, agreement = await agreed_plan(biller)
        await instruct(biller, alice.intent(ACCOUNT, BILL.bill_id, "inst-1", eur("40.00"), agreement_digest=agreement))
        first = await biller.agent.record_settlement(ACCOUNT, "inst-1", eur("40.00"), "RAIL-1")
        assert remaining(first) == eur("80.00")

        # The plan breaks: the renegotiation offer states what is really owed.
        offered = event_pb2.Event.FromString((await biller.agent.offer_renegotiation(BILL.bill_id)).payload)
        assert Money.from_proto(offered.amount) == eur("80.00")
        # The broken agreement no longer sets payments; the whole amount due is not owed any more.
        late_instalment = alice.intent(
            ACCOUNT, BILL.bill_id, "inst-2", eur("40.00"), agreement_digest=agreement, instalment_index=1
        )
        assert await reason(instruct(biller, late_instalment)) is Reason.PAYMENT_AMOUNT_MISMATCH
        whole = alice.intent(ACCOUNT, BILL.bill_id, "all", eur("120.00"))
        assert await reason(instruct(biller, whole)) is Reason.PAYMENT_AMOUNT_MISMATCH
        rest = await instruct(biller, alice.intent(ACCOUNT, BILL.bill_id, "rest", eur("80.00")))
        assert Money.from_proto(rest.amount) == eur("80.00")
        last = await biller.agent.record_settlement(ACCOUNT, "rest", eur("80.00"), "RAIL-2")
        assert remaining(last) == eur("0.00")
        assert await biller.agent.party.store.received_minor(BILL.bill_id) == BILL.amount_due.minor
        stored = await biller.agent.party.store.get_bill(BILL.bill_id)
        assert stored is not None
        assert stored.status is BillStatus.PAID

    run(tmp_path, scenario)


def test_a_second_intent_for_a_bill_is_refused_while_the_first_is_in_flight(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        await biller.bill(ACCOUNT)
        await instruct(biller, alice.intent(ACCOUNT, BILL.bill_id, "pay-a", BILL.amount_due))
        second = alice.intent(ACCOUNT, BILL.bill_id, "pay-b", BILL.amount_due)
        assert await reason(instruct(biller, second)) is Reason.PAYMENT_IN_PROGRESS
        receipt = await biller.agent.record_settlement(ACCOUNT, "pay-a", BILL.amount_due, "RAIL-A")
        assert remaining(receipt) == eur("0.00")
        # Paid: nothing more can be instructed for it.
        third = alice.intent(ACCOUNT, BILL.bill_id, "pay-c", BILL.amount_due)
        assert await reason(instruct(biller, third)) is Reason.PAYMENT_AMOUNT_MISMATCH

    run(tmp_path, scenario)


def test_an_agreed_instalment_is_instructed_only_until_its_date_and_grace(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice, agreement = await agreed_plan(biller)
        # Instalment 1 is due 15 April; with 3 days of grace it can be instructed until the end of 18 April.
        biller.clock.set(datetime(2026, 4, 18, 23, 0, tzinfo=UTC))
        on_time = await instruct(
            biller, alice.intent(ACCOUNT, BILL.bill_id, "inst-1", eur("40.00"), agreement_digest=agreement)
        )
        assert on_time.pay_by_time.ToDatetime(tzinfo=UTC) == datetime(2026, 4, 19, tzinfo=UTC)
        biller.clock.set(datetime(2026, 5, 19, 0, 0, tzinfo=UTC))  # instalment 2 (15 May) is past its grace
        late = alice.intent(
            ACCOUNT, BILL.bill_id, "inst-2", eur("40.00"), agreement_digest=agreement, instalment_index=1
        )
        assert await reason(instruct(biller, late)) is Reason.PAYMENT_AMOUNT_MISMATCH

    run(tmp_path, scenario)


def test_a_settlement_that_would_receive_more_than_is_owed_gets_no_receipt(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        await instruct(biller, alice.intent(ACCOUNT, BILL.bill_id, "whole", BILL.amount_due))  # in flight...
        answer = await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, inside_options())))
        agreement = digest(answer.reply)  # ...while a plan is agreed and its first instalment paid
        await instruct(biller, alice.intent(ACCOUNT, BILL.bill_id, "inst-1", eur("40.00"), agreement_digest=agreement))
        assert remaining(await biller.agent.record_settlement(ACCOUNT, "inst-1", eur("40.00"), "RAIL-1")) == eur(
            "80.00"
        )
        with pytest.raises(ValueError, match="more than is owed"):
            await biller.agent.record_settlement(ACCOUNT, "whole", BILL.amount_due, "RAIL-2")
        assert await biller.agent.party.store.received_minor(BILL.bill_id) == eur("40.00").minor

    run(tmp_path, scenario)


def test_the_biller_owes_what_the_one_outstanding_balance_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PAY-16, one implementation of each rule: what an intent without agreement must carry is computed by
    `agent.protocol.terms.outstanding_balance` (the consumer's too), not by arithmetic of the biller's own."""
    asked: list[tuple[Money, list[Money]]] = []

    def spy(amount_due: Money, received: Iterable[Money]) -> Money:
        received = list(received)
        asked.append((amount_due, received))
        return terms.outstanding_balance(amount_due, received)

    monkeypatch.setattr(payments, "outstanding_balance", spy)

    async def scenario(biller: Biller) -> None:
        alice, agreement = await agreed_plan(biller)
        await instruct(biller, alice.intent(ACCOUNT, BILL.bill_id, "inst-1", eur("40.00"), agreement_digest=agreement))
        await biller.agent.record_settlement(ACCOUNT, "inst-1", eur("40.00"), "RAIL-1")
        await biller.agent.offer_renegotiation(BILL.bill_id)
        asked.clear()
        rest = await instruct(biller, alice.intent(ACCOUNT, BILL.bill_id, "rest", eur("80.00")))
        assert Money.from_proto(rest.amount) == eur("80.00")
        assert asked == [(eur("120.00"), [eur("40.00")])]

    run(tmp_path, scenario)
