"""Issue 13 leftover: renegotiating a broken plan restates the outstanding balance, not the whole amount due
(TRM-11, PAY-16). 60.00 of a 120.00 bill is received under a plan of 2 x 60.00; the plan breaks; the renegotiation
offer, a new opening, the biller's counter-offer and the new agreement all state 60.00."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from agent.protocol.dsse import digest
from agent.protocol.errors import Reason
from agent.protocol.terms import Money, Terms, TermsKind, build_terms, monthly_dates
from parley.v1 import event_pb2, negotiation_pb2, terms_pb2
from parley.v1.biller_service_pb2 import GetThreadRequest, NegotiateRequest
from tests.fixtures import BILL
from tests.helpers.peer import Biller
from tests.test_biller_grpc import reason, run
from tests.test_redteam_money_balance import ACCOUNT, eur, instruct
from tests.test_reference_biller_runtime import Harness, at, biller_bill_id, kinds
from tests.test_reference_biller_runtime import run as run_runtime

OPEN = negotiation_pb2.NEGOTIATION_OUTCOME_OPEN


def plan(amount: Money, count: int) -> terms_pb2.Terms:
    """`count` monthly instalments from 15 April: inside the fixture bill's options for 2 x 60.00 and 2 x 30.00."""
    return build_terms(TermsKind.INSTALMENT_PLAN, amount, monthly_dates(date(2026, 4, 15), count)).to_proto()


def test_a_renegotiation_restates_the_outstanding_balance(tmp_path: Path) -> None:
    async def scenario(biller: Biller) -> None:
        alice = await biller.enrolled(ACCOUNT, "consumer:alice")
        bill = await biller.bill(ACCOUNT)
        first_opening = alice.open(bill, plan(BILL.amount_due, 2))
        first = await biller.stub.Negotiate(NegotiateRequest(move=first_opening))
        assert first.reply.payload_type == "parley.v1.Accept"
        agreement = digest(first.reply)
        await instruct(biller, alice.intent(ACCOUNT, BILL.bill_id, "inst-1", eur("60.00"), agreement_digest=agreement))
        await biller.agent.record_settlement(ACCOUNT, "inst-1", eur("60.00"), "RAIL-1")

        offered = event_pb2.Event.FromString((await biller.agent.offer_renegotiation(BILL.bill_id)).payload)
        assert Money.from_proto(offered.amount) == eur("60.00")

        # The whole amount due again would charge the 60.00 received twice.
        whole = alice.open(bill, plan(BILL.amount_due, 2))
        assert await reason(biller.stub.Negotiate(NegotiateRequest(move=whole))) is Reason.PRINCIPAL_MISMATCH

        # An opening outside the options: the biller's counter-offer restates the outstanding balance.
        outside = build_terms(TermsKind.INSTALMENT_PLAN, eur("60.00"), monthly_dates(date(2026, 8, 15), 2))
        opening = alice.open(bill, outside.to_proto())
        countered = await biller.stub.Negotiate(NegotiateRequest(move=opening))
        assert countered.outcome == OPEN
        assert countered.reply.payload_type == "parley.v1.Offer"
        counter = negotiation_pb2.Offer.FromString(countered.reply.payload)
        assert Terms.from_proto(counter.terms).principal == eur("60.00")
        withdraw = alice.next([opening, countered.reply], negotiation_pb2.Withdraw())
        await biller.stub.Negotiate(NegotiateRequest(move=withdraw))

        # Inside the options and restating 60.00: agreed, and its instalments are what is paid.
        second = await biller.stub.Negotiate(NegotiateRequest(move=alice.open(bill, plan(eur("60.00"), 2))))
        assert second.reply.payload_type == "parley.v1.Accept"
        agreed = digest(second.reply)
        instalment = alice.intent(ACCOUNT, BILL.bill_id, "re-1", eur("30.00"), agreement_digest=agreed)
        assert Money.from_proto((await instruct(biller, instalment)).amount) == eur("30.00")

        # The first thread, agreed on 120.00 before anything was received, still reads back as it was.
        first_thread = negotiation_pb2.ThreadOpen.FromString(first_opening.payload).header.thread_id
        thread = await biller.stub.GetThread(GetThreadRequest(query=alice.query(ACCOUNT, thread_id=first_thread)))
        assert len(thread.messages) == 2

    run(tmp_path, scenario)


def test_a_renegotiated_plan_that_breaks_again_states_what_is_still_owed(tmp_path: Path) -> None:
    """The scheduler (reference biller, over gRPC): 2 x 60.00 agreed, 60.00 paid, broken; renegotiated for the
    60.00 outstanding as 2 x 30.00, the first 30.00 paid, broken again. ARRANGEMENT_BROKEN and
    RENEGOTIATION_OFFERED state the amount due less everything received (30.00), not the renegotiated
    principal less it (-30.00: the scheduler's pass failed and sent no event)."""

    def instalments(amount: Money, first: date, second: date) -> terms_pb2.Terms:
        """Two instalments inside the sample segment's options (every 14 days or more, the first by 30 April)."""
        return build_terms(TermsKind.INSTALMENT_PLAN, amount, [first, second]).to_proto()

    async def scenario(h: Harness) -> None:
        account_id, alice = await h.enrolled("consumer:alice")
        bill = await h.bill(account_id, alice)
        bill_id = biller_bill_id(bill)
        opening = alice.open(bill, instalments(eur("120.00"), date(2026, 4, 1), date(2026, 4, 15)))
        first = await h.stub.Negotiate(NegotiateRequest(move=opening))
        assert first.reply.payload_type == "parley.v1.Accept"
        paid = await h.pay_intent(
            account_id, alice, bill_id, "inst-1", eur("60.00"), agreement_digest=digest(first.reply)
        )
        h.rail.pay(paid.payment_reference, eur("60.00"), h.clock.now())
        await h.advance_to(at(date(2026, 3, 31)))  # settled: 60.00 received
        await h.advance_to(at(date(2026, 4, 19)))  # 15 April + 3 days of grace: the plan is broken
        events = await h.events(account_id, alice)
        assert kinds(events)[-2:] == ["ARRANGEMENT_BROKEN", "RENEGOTIATION_OFFERED"]
        assert [Money.from_proto(e.amount) for e in events[-2:]] == [eur("60.00"), eur("60.00")]

        # Renegotiated for the 60.00 outstanding, inside the options: agreed at once; its first 30.00 paid.
        opening = alice.open(bill, instalments(eur("60.00"), date(2026, 4, 25), date(2026, 5, 9)))
        second = await h.stub.Negotiate(NegotiateRequest(move=opening))
        assert second.reply.payload_type == "parley.v1.Accept"
        paid = await h.pay_intent(
            account_id, alice, bill_id, "re-1", eur("30.00"), agreement_digest=digest(second.reply)
        )
        h.rail.pay(paid.payment_reference, eur("30.00"), h.clock.now())
        await h.advance_to(at(date(2026, 4, 21)))  # settled: 90.00 received in all
        assert await h.running.biller.store.received_minor(bill_id) == 9000

        before = len(await h.events(account_id, alice))
        await h.advance_to(at(date(2026, 5, 13)))  # 9 May + 3 days of grace: broken again
        events = (await h.events(account_id, alice))[before:]
        assert kinds(events)[-3:] == ["INSTALMENT_MISSED", "ARRANGEMENT_BROKEN", "RENEGOTIATION_OFFERED"]
        missed, broken, offered = events[-3:]
        assert Money.from_proto(missed.amount) == eur("30.00")
        assert Money.from_proto(broken.amount) == Money.from_proto(offered.amount) == eur("30.00")
        assert "the remaining EUR 30.00 is now due" in broken.message
        thread_id = negotiation_pb2.ThreadOpen.FromString(opening.payload).header.thread_id
        assert broken.thread_id == offered.thread_id == thread_id

    run_runtime(tmp_path, scenario)
