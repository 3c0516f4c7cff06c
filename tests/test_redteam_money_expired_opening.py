"""Red team issue 13 item 12: an opening whose deadline has already passed ends EXPIRED (NEG-11), not THREAD_CLOSED."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from agent.protocol.errors import Reason
from parley.v1 import negotiation_pb2
from parley.v1.biller_service_pb2 import GetThreadRequest, NegotiateRequest
from tests.helpers.peer import Biller, outside_options
from tests.test_biller_grpc import reason, run

ACCOUNT = "acct-1001"


def test_an_opening_past_its_deadline_is_answered_expired_and_leaves_no_thread(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        opening = alice.open(bill, outside_options(), deadline=timedelta(seconds=1))
        biller.clock.advance(timedelta(seconds=2))  # the opening arrives after its own deadline
        response = await biller.stub.Negotiate(NegotiateRequest(move=opening))
        assert response.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED
        assert not response.HasField("reply")
        # A retry gets the same answer (HDR-12), and no thread was recorded (NEG-11: GetThread says NOT_FOUND).
        again = await biller.stub.Negotiate(NegotiateRequest(move=opening))
        assert again.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED
        thread_id = negotiation_pb2.ThreadOpen.FromString(opening.payload).header.thread_id
        query = alice.query(ACCOUNT, thread_id=thread_id)
        assert await reason(biller.stub.GetThread(GetThreadRequest(query=query))) is Reason.NOT_FOUND
        # The bill is still open to negotiation (NEG-3): a fresh opening is answered.
        fresh = alice.open(bill, outside_options())
        answered = await biller.stub.Negotiate(NegotiateRequest(move=fresh))
        assert answered.HasField("reply")

    run(tmp_path, scenario)
