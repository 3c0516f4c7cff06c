"""Red team issue 13 item 7: another account's bill or thread and a missing one get the same answer (AUZ-3, AUZ-5)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc

from agent.protocol.dsse import digest
from parley.v1 import negotiation_pb2
from parley.v1.biller_service_pb2 import NegotiateRequest
from parley.v1.envelope_pb2 import Envelope
from tests.helpers.peer import LIFETIME, Biller, outside_options
from tests.test_biller_grpc import opened, run

ALICE_ACCOUNT, MALLORY_ACCOUNT = "acct-1001", "acct-2002"


async def refusal(biller: Biller, move: Envelope) -> tuple[grpc.StatusCode, str]:
    try:
        await biller.stub.Negotiate(NegotiateRequest(move=move))
    except grpc.aio.AioRpcError as failure:
        return failure.code(), failure.details() or ""
    raise AssertionError("the move was accepted")


def test_another_accounts_bill_or_thread_is_answered_as_a_missing_one(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ALICE_ACCOUNT, "consumer:alice")
        mallory = await biller.enrolled(MALLORY_ACCOUNT, "consumer:mallory")
        bill = await biller.bill(ALICE_ACCOUNT)
        deadline = biller.clock.now() + timedelta(days=1)

        def opening(bill_id: str) -> Envelope:
            return mallory.party.open(
                bill_id, digest(bill), outside_options(), max_rounds=4, deadline=deadline, header=LIFETIME
            )

        missing_bill = await refusal(biller, opening("BILL-X"))
        await biller.bill(ALICE_ACCOUNT, "BILL-X")
        alices_bill = await refusal(biller, opening("BILL-X"))  # the same id, now Alice's
        assert alices_bill == missing_bill

        thread = await opened(biller, alice, bill)
        accept = negotiation_pb2.Accept(offer_digest=digest(thread[1]))
        on_alices_thread = await refusal(biller, mallory.next(thread, accept))
        on_missing_thread = await refusal(biller, mallory.next(thread, accept, thread_id=b"\x01" * 16))
        assert on_alices_thread == on_missing_thread

    run(tmp_path, scenario)
