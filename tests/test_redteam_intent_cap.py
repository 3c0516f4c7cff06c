"""PAY-14's bound on the payment intents of one bill (MAX_PAYMENT_INTENTS_PER_BILL, agent/protocol/limits.py):
past it a new intent is TOO_MANY_PAYMENT_INTENTS and changes nothing, while a retry of a stored intent is still
answered as before. The bound is lowered to 3 here so that three instalments in flight reach it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.protocol.limits import MAX_PAYMENT_INTENTS_PER_BILL
from agent.stores import biller_sql
from parley.v1.biller_service_pb2 import CreatePaymentIntentRequest, NegotiateRequest
from tests.fixtures import BILL
from tests.helpers.peer import Biller, inside_options
from tests.test_biller_grpc import refused, run
from tests.test_redteam_money_balance import ACCOUNT, eur

CAP = 3


def test_a_bill_takes_at_most_its_cap_of_payment_intents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_PAYMENT_INTENTS_PER_BILL == 100  # the real bound; lowered below
    monkeypatch.setattr(biller_sql, "MAX_PAYMENT_INTENTS_PER_BILL", CAP)

    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        accepted = await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, inside_options())))
        agreement = digest(accepted.reply)
        intents = [
            alice.intent(ACCOUNT, BILL.bill_id, f"i-{n}", eur("40.00"), agreement_digest=agreement, instalment_index=n)
            for n in range(CAP)
        ]
        answers = [await biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=i)) for i in intents]

        extra = alice.intent(ACCOUNT, BILL.bill_id, "one-more", eur("40.00"), agreement_digest=agreement)
        error = await refused(biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=extra)))
        assert error.reason is Reason.TOO_MANY_PAYMENT_INTENTS
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await biller.agent.party.store.get_payment_intent(ACCOUNT, "one-more") is None

        again = await biller.stub.CreatePaymentIntent(CreatePaymentIntentRequest(intent=intents[0]))
        assert again == answers[0]  # a retry of a stored intent: the same answer (PAY-2), not refused
        failures = biller.agent.metrics.sample("parley_verification_failures_total", reason="TOO_MANY_PAYMENT_INTENTS")
        assert failures == 1

    run(tmp_path, scenario)
