"""The consumer agent end to end: real gRPC on 127.0.0.1 against the real BillerAgent, real SQLite files.

Where the real biller never misbehaves, a `HostileServicer` wraps it: answers
lost on the way back, a phishing endpoint, forged bills, instructions for
another amount, a receipt that does not match, an event stream with gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.conformance.peers import HostileServicer, reseal
from agent.consumer import (
    AcceptOffer,
    AccountEvent,
    ApprovalRequest,
    Circumstances,
    ConsumerAgent,
    ConsumerAnswer,
    CounterOffer,
    Escalate,
    EventLogForked,
    EventLogFull,
    Mandate,
    OpeningContext,
    Payment,
    PaymentDispute,
    PaymentInDoubt,
    PaymentNotSent,
    PaymentOrder,
    PaymentRefused,
    PaymentSender,
    RejectOffer,
    ResponseContext,
    Withdraw,
)
from agent.consumer.events import MAX_STORED_EVENTS
from agent.consumer.locks import KeyedLocks
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, ParleyError, ProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyEntry, make_key_set
from agent.protocol.messages import seal, to_timestamp
from agent.protocol.negotiation import Role
from agent.protocol.terms import Terms, TermsKind, build_terms, monthly_dates
from agent.stores.base import (
    BillerLinkRecord,
    EventCursor,
    IntentRecord,
    IntentState,
    LinkedAccountRecord,
    ReceiptRecord,
    ReceivedEventRecord,
    StoreConflict,
    ThreadOutcome,
)
from agent.stores.consumer_sqlite import MIGRATIONS as CONSUMER_MIGRATIONS
from agent.stores.consumer_sqlite import SqliteConsumerStore
from agent.stores.sqlite_base import ts
from agent.tools.certs import issue_client_cert, issue_server_cert, make_dev_ca
from agent.transport.client import ClientTls, RetryPolicy, open_channel
from agent.transport.server import serve_biller, start_biller_server
from agent.transport.status import CallError
from parley.v1 import bill_pb2, envelope_pb2, event_pb2, negotiation_pb2, payment_pb2
from parley.v1 import biller_service_pb2 as pb
from tests.fixtures import BILL, DUE, eur
from tests.helpers.db import dump
from tests.helpers.hostile import hostile_of
from tests.helpers.peer import (
    BILLER_ID,
    START,
    Biller,
    counter_terms,
    inside_options,
    new_party,
    outside_options,
    running_biller,
)
from tests.helpers.tls import self_signed

ACCOUNT = "acct-1001"
PARTY = "consumer:alice"
FAST = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.05, call_timeout=5)
WIDE = Mandate(max_fee=eur("10.00"), max_instalments=12, max_total_over_bill=eur("10.00"))
NARROW = Mandate(max_fee=eur("10.00"), max_instalments=3, max_total_over_bill=eur("10.00"))
COUNTER = Terms.from_proto(counter_terms())  # 6 x EUR 20.00: the sample policy's counter-offer
INSIDE = Terms.from_proto(inside_options())  # 3 x EUR 40.00: accepted at once (NEG-12)
OUTSIDE = Terms.from_proto(outside_options())  # 8 x EUR 15.00: countered


# --- The consumer's side of a test ---------------------------------------------------------------


class ScriptedStrategy:
    """Opens with given terms; answers with a script (an answer, or a function of the context)."""

    def __init__(
        self,
        opening: Terms = OUTSIDE,
        answers: list[ConsumerAnswer | Callable[[Terms], ConsumerAnswer]] | None = None,
        circumstances: Circumstances | None = None,
    ) -> None:
        self._opening = opening
        self._answers = list(answers or [])
        self._circumstances = circumstances
        self.contexts: list[OpeningContext] = []
        self.offers: list[Terms] = []

    def opening(self, context: OpeningContext) -> tuple[Terms, Circumstances | None]:
        self.contexts.append(context)
        return self._opening, self._circumstances

    def respond(self, context: ResponseContext) -> ConsumerAnswer:
        self.offers.append(context.their_offer)
        answer = self._answers.pop(0)
        return answer(context.their_offer) if callable(answer) else answer


class Bank:
    """A PaymentSender that records every order it is given."""

    def __init__(self) -> None:
        self.orders: list[PaymentOrder] = []

    async def send(self, order: PaymentOrder) -> str:
        self.orders.append(order)
        return f"bank-{len(self.orders)}"


class Household:
    """The consumer's identity and files, kept across agent restarts."""

    def __init__(self, biller: Biller, tmp_path: Path) -> None:
        self.biller = biller
        self.key, self.key_set = new_party(PARTY, biller.clock)
        self.db_path = tmp_path / "consumer.sqlite"

    @asynccontextmanager
    async def agent(
        self,
        strategy: ScriptedStrategy | None = None,
        *,
        mandate: Mandate = WIDE,
        approve: Callable[[ApprovalRequest], Awaitable[bool]] | None = None,
        bank: PaymentSender | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
        max_stored_events: int = MAX_STORED_EVENTS,
    ) -> AsyncIterator[ConsumerAgent]:
        store = await SqliteConsumerStore.open(self.db_path)
        agent = ConsumerAgent(
            party_id=PARTY,
            signing_key=self.key,
            key_sets=[self.key_set],
            store=store,
            strategy=strategy or ScriptedStrategy(),
            mandate=mandate,
            approve=approve,
            payment_sender=bank,
            clock=self.biller.clock,
            retry=FAST,
            client_certificate=client_certificate,
            max_stored_events=max_stored_events,
        )
        try:
            yield agent
        finally:
            await agent.close()
            await store.close()

    @asynccontextmanager
    async def agent_with_its_bill(self, *, bank: PaymentSender | None = None) -> AsyncIterator[ConsumerAgent]:
        """An agent enrolled on a fresh account, its bill issued and listed: ready to pay or negotiate."""
        async with self.agent(bank=bank) as agent:
            await enrol(self.biller, agent)
            await agent.bills(BILLER_ID)
            yield agent


async def enrol(biller: Biller, agent: ConsumerAgent) -> None:
    """A fresh account enrolled through the agent, with the fixture bill issued on it."""
    await biller.agent.create_account(ACCOUNT, "Alice Example")
    code = await biller.agent.issue_enrolment_code(ACCOUNT)
    await agent.enrol(
        biller.target,
        biller_party_id=BILLER_ID,
        fingerprint=biller.chain.fingerprint,
        account_id=ACCOUNT,
        code=code,
        insecure=True,
    )
    await biller.bill(ACCOUNT)


def run(tmp_path: Path, scenario: Callable[[Biller, Household], Awaitable[None]], *, hostile: bool = False) -> None:
    async def main() -> None:
        options: dict[str, Any] = {"servicer": HostileServicer} if hostile else {}
        async with running_biller(tmp_path, **options) as biller:
            await scenario(biller, Household(biller, tmp_path))

    asyncio.run(main())


async def biller_outcome(biller: Biller, thread_id: bytes | None) -> str:
    assert thread_id is not None
    thread = await biller.agent._store.get_thread(thread_id)
    assert thread is not None
    return thread.outcome.value


# --- Enrolment and bills ---------------------------------------------------------------------------


def test_enrol_pins_the_biller_and_bills_are_verified_and_kept_across_restarts(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent() as agent:
            await enrol(biller, agent)
            (link,) = await agent.links()
            assert (link.biller_party_id, link.fingerprint, link.accounts) == (
                BILLER_ID,
                biller.chain.fingerprint,
                (ACCOUNT,),
            )
            (bill,) = await agent.bills(BILLER_ID)
            assert bill.facts == BILL
            assert bill.digest == digest(await biller.bill_envelope(BILL.bill_id))
        async with household.agent() as agent:  # restarted: the link and the bill come back from the store
            (link,) = await agent.links()
            assert link.target == biller.target
            (bill,) = await agent.bills(BILLER_ID)
            assert bill.facts.bill_id == BILL.bill_id

    run(tmp_path, scenario)


def test_enrolment_with_a_wrong_pin_is_refused_and_stores_nothing(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        await biller.agent.create_account(ACCOUNT, "Alice Example")
        code = await biller.agent.issue_enrolment_code(ACCOUNT)
        wrong_pin = hashlib.sha256(b"a phishing biller's key set").digest()
        async with household.agent() as agent:

            async def enrol_with(pin: bytes, code: str) -> None:
                await agent.enrol(
                    biller.target,
                    biller_party_id=BILLER_ID,
                    fingerprint=pin,
                    account_id=ACCOUNT,
                    code=code,
                    insecure=True,
                )

            # The endpoint's Hello names another identity: refused before the code is sent (VER-4).
            with pytest.raises(RemoteProtocolError) as failure:
                await enrol_with(wrong_pin, code)
            assert failure.value.reason is Reason.PIN_MISMATCH
            assert hostile.calls["Enrol"] == 0
            # A phishing endpoint echoing the pin in Hello: its chain is checked against the pin (ENR-10).
            hostile.rewrite["Hello"] = lambda _request, hello: pb.HelloResponse(
                protocol_version=1, biller_party_id=BILLER_ID, identity_fingerprint=wrong_pin, features=hello.features
            )
            with pytest.raises(RemoteProtocolError) as failure:
                await enrol_with(wrong_pin, code)
            assert failure.value.reason is Reason.PIN_MISMATCH
            assert hostile.calls["Enrol"] == 1
            assert await agent.links() == []
            stored = dump(household.db_path)
            assert not stored["links"]
            assert not stored["link_key_sets"]
            assert not stored["accounts"]
            # With the right pin (and a new code: the phishing answer spent the first one), it enrols.
            del hostile.rewrite["Hello"]
            await enrol_with(biller.chain.fingerprint, await biller.agent.issue_enrolment_code(ACCOUNT))
            assert [link.accounts for link in await agent.links()] == [(ACCOUNT,)]

    run(tmp_path, scenario, hostile=True)


def test_forged_and_tampered_bills_are_never_returned_nor_paid(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        bank = Bank()
        async with household.agent(bank=bank) as agent:
            await enrol(biller, agent)
            genuine = await biller.bill_envelope(BILL.bill_id)

            def rename(bill_id: str) -> Callable[[Any], None]:
                def change(bill: Any) -> None:
                    bill.bill_id = bill_id

                return change

            phishing = reseal(genuine, SigningKey.generate(), rename("bill-phish"))  # another key: UNKNOWN_KEY
            tampered = envelope_pb2.Envelope()
            tampered.CopyFrom(genuine)
            body = bill_pb2.Bill.FromString(genuine.payload)
            body.bill_id, body.description = "bill-tampered", "Pay to IBAN XX00 0000"
            tampered.payload = body.SerializeToString()  # the biller's signature no longer covers it

            def to_someone_else(bill: Any) -> None:
                bill.bill_id = "bill-elsewhere"
                bill.header.recipient = "consumer:bob"

            misaddressed = reseal(genuine, biller.key, to_someone_else)
            hostile.rewrite["ListBills"] = lambda _request, answer: pb.ListBillsResponse(
                bills=[*answer.bills, phishing, tampered, misaddressed]
            )
            bills = await agent.bills(BILLER_ID)
            assert [bill.facts.bill_id for bill in bills] == [BILL.bill_id]
            assert [bill.facts.bill_id for bill in await agent.bills(BILLER_ID)] == [BILL.bill_id]
            assert len(dump(household.db_path)["bills"]) == 1
            for bill_id in ("bill-phish", "bill-tampered", "bill-elsewhere"):
                with pytest.raises(LookupError):
                    await agent.pay(BILLER_ID, bill_id)
            assert bank.orders == []

    run(tmp_path, scenario, hostile=True)


def test_the_biller_s_messages_are_judged_with_the_limits_its_hello_announced(tmp_path: Path) -> None:
    """LIM-13: a biller announcing a 30-minute message lifetime (below the default 24 hours) while it signs
    its bills for an hour: the consumer judges them with what was announced, and refuses them."""

    def announcing(lifetime_seconds: int) -> Callable[[Any, pb.HelloResponse], pb.HelloResponse]:
        def rewrite(_request: Any, answer: pb.HelloResponse) -> pb.HelloResponse:
            lowered = pb.HelloResponse()
            lowered.CopyFrom(answer)
            lowered.limits.max_message_lifetime_seconds = lifetime_seconds
            return lowered

        return rewrite

    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        bank = Bank()
        async with household.agent(bank=bank) as agent:
            await enrol(biller, agent)  # an honest Hello: the defaults
        hostile.rewrite["Hello"] = announcing(30 * 60)
        async with household.agent(bank=bank) as agent:  # a new connection, a new Hello
            assert await agent.bills(BILLER_ID) == []  # each bill lives an hour: LIFETIME_TOO_LONG
            with pytest.raises(LookupError):
                await agent.pay(BILLER_ID, BILL.bill_id)
        hostile.rewrite["Hello"] = announcing(60 * 60)
        async with household.agent(bank=bank) as agent:
            assert [bill.facts.bill_id for bill in await agent.bills(BILLER_ID)] == [BILL.bill_id]
        assert bank.orders == []

    run(tmp_path, scenario, hostile=True)


def test_a_rotated_biller_key_is_learnt_from_get_key_sets(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent_with_its_bill() as agent:
            # The biller rotates: version 2 lists a new key, signed by the old one (KEY-9, KEY-17).
            new_key = SigningKey.generate()
            since = biller.clock.advance(timedelta(hours=1))  # the first bill stays under version 1 (KEY-14)
            version_2 = make_key_set(
                party_id=BILLER_ID,
                version=2,
                keys=[KeyEntry(new_key.public_key, since, since + timedelta(days=300))],
                signer=biller.key,
                previous=biller.chain.latest,
                create_time=since,
                expire_time=since + timedelta(days=300),
            )
            biller.agent.key_chain = biller.chain.extend(version_2)
            biller.agent._key = new_key
            await biller.bill(ACCOUNT, "bill-2026-04")  # signed with the new key: UNKNOWN_KEY, then a refresh
            assert [bill.facts.bill_id for bill in await agent.bills(BILLER_ID)] == [BILL.bill_id, "bill-2026-04"]
        async with household.agent() as agent:  # the extended chain is stored and verifies on restart
            assert len(await agent.bills(BILLER_ID)) == 2
            assert len(dump(household.db_path)["link_key_sets"]) == 2

    run(tmp_path, scenario)


# --- Negotiation -------------------------------------------------------------------------------------------


def test_agreed_after_a_counter_with_a_lost_answer_then_instalments_paid(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        strategy = ScriptedStrategy(OUTSIDE, [AcceptOffer()])
        bank = Bank()
        async with household.agent(strategy, bank=bank) as agent:
            await enrol(biller, agent)
            hostile.unavailable_after["Negotiate"] = 1  # the opening is applied, its answer lost: sent again
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.AGREED
            assert hostile.calls["Negotiate"] == 3
            assert strategy.offers == [COUNTER]
            agreement = result.agreement
            assert agreement is not None
            assert agreement.terms == COUNTER
            assert agreement.offered_by is Role.BILLER
            # The bundle verifies offline, with both identities pinned, after a JSON round trip.
            bundle = Bundle.from_json(result.bundle().to_json())
            pins = {BILLER_ID: biller.chain.fingerprint, PARTY: digest(household.key_set)}
            assert verify_bundle(bundle, pins=pins).accept.digest == agreement.accept.digest
            assert await biller_outcome(biller, result.thread_id) == "agreed"
            (arrangement,) = await biller.agent.arrangements(ACCOUNT)
            assert arrangement.agreement_digest == agreement.accept.digest
            # Our record of the thread: every signed message, as sent and received.
            assert [m.payload_type for m in result.messages] == [
                "parley.v1.ThreadOpen",
                "parley.v1.Offer",
                "parley.v1.Accept",
            ]
            # Instalments are paid one by one under the agreement (PAY-3).
            first = await agent.pay(BILLER_ID, BILL.bill_id)
            second = await agent.pay(BILLER_ID, BILL.bill_id)
            assert (first.instalment_index, second.instalment_index) == (0, 1)
            assert first.agreement_digest == agreement.accept.digest
            assert [order.amount for order in bank.orders] == [eur("20.00"), eur("20.00")]
            assert bank.orders[0].payment_reference != bank.orders[1].payment_reference
            # Committed payments reach the strategy's context.
            assert [instalment.amount for instalment in await agent.committed()] == [eur("20.00")] * 4

    run(tmp_path, scenario, hostile=True)


def test_agreed_at_once_inside_the_options(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        strategy = ScriptedStrategy(INSIDE)
        async with household.agent(strategy) as agent:
            await enrol(biller, agent)
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.AGREED
            assert result.agreement is not None
            assert result.agreement.offered_by is Role.CONSUMER
            assert result.agreement.terms == INSIDE
            assert strategy.offers == []
            assert (await agent.negotiation(result.thread_id or b"")).outcome is ThreadOutcome.AGREED
            # The bill is now under the arrangement: a new opening is refused, and nothing of it kept (NEG-3).
            again = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert (again.outcome, again.messages) == (ThreadOutcome.OPEN, ())
            assert again.refusal is not None
            assert again.refusal.reason is Reason.BILL_NOT_NEGOTIABLE

    run(tmp_path, scenario)


def test_after_the_biller_breaks_a_plan_its_outstanding_balance_is_paid_not_its_instalment(tmp_path: Path) -> None:
    """PAY-16 (issue 13): once the plan is broken, the next `pay` pays the bill's outstanding balance (no
    agreement), which the real biller instructs; the broken plan's instalment is never asked for."""

    async def scenario(biller: Biller, household: Household) -> None:
        bank = Bank()
        async with household.agent(ScriptedStrategy(INSIDE), bank=bank) as agent:
            await enrol(biller, agent)
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.AGREED
            assert result.thread_id is not None
            first = await agent.pay(BILLER_ID, BILL.bill_id)
            assert (first.instalment_index, first.amount) == (0, eur("40.00"))
            await biller.agent.record_settlement(ACCOUNT, first.intent_id, eur("40.00"), "RAIL-1")
            # The second instalment is missed: the biller ends the plan and offers to negotiate again (EVT-7).
            await biller.agent.emit_event(
                ACCOUNT,
                event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN,
                bill_id=BILL.bill_id,
                thread_id=result.thread_id,
                amount=eur("80.00"),
            )
            await biller.agent.offer_renegotiation(BILL.bill_id)
            async with contextlib.aclosing(agent.watch(BILLER_ID)) as events:
                while (await asyncio.wait_for(anext(events), 5)).kind != event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED:
                    pass
            # The ended plan commits nothing any more (its instalments are not paid): the strategy is not told
            # they are still owed (PAY-16).
            assert await agent.committed() == ()
            assert (await agent.owed(BILLER_ID, BILL.bill_id)).outstanding == eur("80.00")
            with pytest.raises(ValueError, match="PAY-16"):
                await agent.pay(BILLER_ID, BILL.bill_id, instalment_index=1)
            rest = await agent.pay(BILLER_ID, BILL.bill_id)
            assert (rest.agreement_digest, rest.instalment_index, rest.amount) == (b"", 0, eur("80.00"))
            assert [order.amount for order in bank.orders] == [eur("40.00"), eur("80.00")]
            assert (await agent.pay(BILLER_ID, BILL.bill_id)).intent_id == rest.intent_id  # never paid twice
            assert len(bank.orders) == 2
            receipt = await biller.agent.record_settlement(ACCOUNT, rest.intent_id, eur("80.00"), "RAIL-2")
            remaining = payment_pb2.Receipt.FromString(receipt.payload).remaining_balance
            assert remaining.amount_minor == 0

    run(tmp_path, scenario)


def test_a_renegotiated_bill_commits_only_its_new_arrangement(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        strategy = ScriptedStrategy(INSIDE)
        async with household.agent(strategy) as agent:
            await enrol(biller, agent)
            first = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert first.outcome is ThreadOutcome.AGREED
            assert [i.amount for i in await agent.committed()] == [eur("40.00")] * 3
            # The arrangement is broken and renegotiation offered (EVT-7): the bill is negotiable again.
            await biller.agent.offer_renegotiation(BILL.bill_id)
            two = build_terms(TermsKind.INSTALMENT_PLAN, BILL.amount_due, monthly_dates(date(2026, 4, 20), 2))
            strategy._opening = two
            second = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert second.outcome is ThreadOutcome.AGREED
            # The new arrangement replaces the old one: deciding it, the strategy was not told the old
            # instalments were still owed, and from now on only the new ones are committed.
            assert strategy.contexts[-1].committed == ()
            assert [i.amount for i in await agent.committed()] == [eur("60.00")] * 2
            assert await agent.committed(excluding=[(BILLER_ID, BILL.bill_id)]) == ()

    run(tmp_path, scenario)


def test_a_counter_inside_the_options_is_accepted_and_a_lost_reply_is_read_back(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        five = build_terms(TermsKind.INSTALMENT_PLAN, BILL.amount_due, monthly_dates(date(2026, 4, 15), 5))
        strategy = ScriptedStrategy(OUTSIDE, [CounterOffer(five)])
        async with household.agent(strategy) as agent:
            await enrol(biller, agent)
            # Every answer to the opening is lost, retries included: the agent reads the thread back (NEG-22).
            hostile.unavailable_after["Negotiate"] = FAST.attempts
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert hostile.calls["GetThread"] == 1
            assert result.outcome is ThreadOutcome.AGREED
            assert result.agreement is not None
            assert result.agreement.terms == five
            assert result.agreement.offer.header.sequence == 2  # our counter, accepted at once (NEG-12)
            assert strategy.offers == [COUNTER]

    run(tmp_path, scenario, hostile=True)


def test_an_acceptance_that_did_not_reach_the_biller_is_delivered_after_a_restart(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)

        def accept_into_an_outage(offer: Terms) -> ConsumerAnswer:
            hostile.unavailable_before["Negotiate"] = FAST.attempts
            return AcceptOffer()

        bank = Bank()
        async with household.agent(ScriptedStrategy(OUTSIDE, [accept_into_an_outage]), bank=bank) as agent:
            await enrol(biller, agent)
            with pytest.raises(CallError):
                await agent.negotiate(BILLER_ID, BILL.bill_id)
            with pytest.raises(ValueError, match="not reached the biller"):
                await agent.pay(BILLER_ID, BILL.bill_id)  # not under an agreement the biller does not know
            assert bank.orders == []
        async with household.agent(ScriptedStrategy(), bank=bank) as agent:  # restarted: no strategy call needed
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.AGREED
            assert await biller_outcome(biller, result.thread_id) == "agreed"
            assert (await agent.pay(BILLER_ID, BILL.bill_id)).amount == eur("20.00")

    run(tmp_path, scenario, hostile=True)


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (RejectOffer(negotiation_pb2.REJECT_REASON_UNAFFORDABLE, "too dear for us"), ThreadOutcome.REJECTED),
        (Withdraw("not now"), ThreadOutcome.WITHDRAWN),
    ],
)
def test_the_strategy_rejects_or_withdraws(tmp_path: Path, answer: ConsumerAnswer, outcome: ThreadOutcome) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent(ScriptedStrategy(OUTSIDE, [answer])) as agent:
            await enrol(biller, agent)
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is outcome
            assert result.agreement is None
            assert await biller_outcome(biller, result.thread_id) == outcome.value
            with pytest.raises(ValueError, match="agreed"):
                result.bundle()

    run(tmp_path, scenario)


def test_an_offer_outside_the_mandate_waits_for_the_users_approval(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent(ScriptedStrategy(OUTSIDE, [AcceptOffer()]), mandate=NARROW) as agent:
            await enrol(biller, agent)
            # The opening (8 instalments) is itself outside the mandate: approved first.
            negotiation = asyncio.create_task(agent.negotiate(BILLER_ID, BILL.bill_id))
            actions = []
            while not negotiation.done():
                for request in agent.approvals.pending():
                    actions.append((request.action, request.violations))
                    agent.approvals.answer(request.request_id, approved=True)
                await asyncio.sleep(0.01)
            result = await negotiation
            assert result.outcome is ThreadOutcome.AGREED
            assert [action for action, _ in actions] == ["open", "accept"]
            assert "6 instalments exceed your limit of 3" in actions[1][1][0]

    run(tmp_path, scenario)


def test_a_denied_escalation_withdraws(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        asked: list[ApprovalRequest] = []

        async def deny(request: ApprovalRequest) -> bool:
            asked.append(request)
            return False

        strategy = ScriptedStrategy(OUTSIDE, [Escalate("a plan of 6 is more than I planned for")])
        async with household.agent(strategy, approve=deny) as agent:
            await enrol(biller, agent)
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.WITHDRAWN
            (request,) = asked
            assert (request.action, request.violations, request.terms) == ("accept", (), COUNTER)
            assert request.reason == "a plan of 6 is more than I planned for"
            assert await biller_outcome(biller, result.thread_id) == "withdrawn"

    run(tmp_path, scenario)


def test_a_thread_expires_while_the_strategy_thinks(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        def too_late(offer: Terms) -> ConsumerAnswer:
            biller.clock.advance(timedelta(days=3))
            return AcceptOffer()

        async with household.agent(ScriptedStrategy(OUTSIDE, [too_late])) as agent:
            await enrol(biller, agent)
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.EXPIRED
            assert result.agreement is None
            assert len(result.messages) == 2  # nothing was sent after the deadline
            assert await biller.agent._store.open_thread_bills(ACCOUNT, biller.clock.now()) == []

    run(tmp_path, scenario)


def test_a_biller_that_does_not_honour_its_options_is_a_protocol_error_with_evidence(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)

        def counter_instead(_request: pb.NegotiateRequest, answer: pb.NegotiateResponse) -> pb.NegotiateResponse:
            accept = negotiation_pb2.Accept.FromString(answer.reply.payload)
            offer = negotiation_pb2.Offer(header=accept.header, terms=counter_terms())  # same position, signed
            return pb.NegotiateResponse(reply=seal(offer, biller.key), outcome=negotiation_pb2.NEGOTIATION_OUTCOME_OPEN)

        hostile.rewrite["Negotiate"] = counter_instead
        strategy = ScriptedStrategy(INSIDE)
        async with household.agent(strategy) as agent:
            await enrol(biller, agent)
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.PROTOCOL_ERROR
            assert result.violation is not None
            assert result.violation.reason is Reason.OPTIONS_NOT_HONOURED
            assert result.agreement is None
            assert strategy.offers == []
            evidence = result.messages[-1]  # the biller's signed counter, kept (NEG-17)
            assert evidence.payload_type == "parley.v1.Offer"
            assert evidence.signatures[0].keyid == biller.key.keyid
            stored = await agent.negotiation(result.thread_id or b"")
            assert stored.violation is not None
            assert stored.violation.reason is Reason.OPTIONS_NOT_HONOURED
            # A new call does not resume a thread that ended.
            assert (await agent.negotiate(BILLER_ID, BILL.bill_id)).thread_id != result.thread_id

    run(tmp_path, scenario, hostile=True)


def test_an_interrupted_opening_is_sent_again_with_its_disclosure_after_a_restart(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        circumstances = Circumstances(negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=True)
        mandate = dataclasses.replace(WIDE, allow_disclosure=True)
        async with household.agent(ScriptedStrategy(INSIDE, circumstances=circumstances), mandate=mandate) as agent:
            await enrol(biller, agent)
            hostile.unavailable_before["Negotiate"] = FAST.attempts  # the biller is unreachable throughout
            with pytest.raises(CallError):
                await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert dump(household.db_path)["threads"][0][9] is not None  # kept until the opening is answered
        async with household.agent(ScriptedStrategy(OUTSIDE), mandate=mandate) as agent:  # restarted
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.AGREED
            assert result.agreement is not None
            assert result.agreement.terms == INSIDE  # the stored opening, not a new one
            assert len(dump(household.db_path)["threads"]) == 1
            assert dump(household.db_path)["threads"][0][9] is None
            assert biller.policy.contexts == []  # inside the options: accepted without asking the policy

    run(tmp_path, scenario, hostile=True)


def test_a_disclosure_is_committed_to_and_not_kept(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        circumstances = Circumstances(
            negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=True, note="job lost"
        )
        strategy = ScriptedStrategy(OUTSIDE, [AcceptOffer()], circumstances=circumstances)
        mandate = Mandate(eur("10.00"), 12, eur("10.00"), allow_disclosure=True)
        async with household.agent(strategy, mandate=mandate) as agent:
            await enrol(biller, agent)
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.outcome is ThreadOutcome.AGREED
            (context,) = biller.policy.contexts
            assert context.circumstances is not None
            assert context.circumstances.note == "job lost"
            assert dump(household.db_path)["threads"][0][9] is None  # the disclosure column, erased

    run(tmp_path, scenario)


def test_a_strategy_disclosing_a_pay_day_years_away_is_stopped_before_anything_is_signed(tmp_path: Path) -> None:
    """PRV-9, on our side: the receiver's rules are applied to our own disclosure before the opening is signed,
    stored or sent, so the strategy's mistake is ours to report, not a MALFORMED_PAYLOAD from the biller."""

    async def scenario(biller: Biller, household: Household) -> None:
        far = biller.clock.now().date() + timedelta(days=400)
        circumstances = Circumstances(negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_ARRANGEMENT, next_pay_date=far)
        mandate = dataclasses.replace(WIDE, allow_disclosure=True)
        async with household.agent(ScriptedStrategy(OUTSIDE, circumstances=circumstances), mandate=mandate) as agent:
            await enrol(biller, agent)
            with pytest.raises(LocalProtocolError, match="PRV-9"):
                await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert dump(household.db_path)["threads"] == []
            assert biller.policy.contexts == []

    run(tmp_path, scenario)


# --- Payments ------------------------------------------------------------------------------------------------


def test_a_bill_is_paid_once_whatever_the_retries_and_restarts(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        bank = Bank()
        async with household.agent_with_its_bill(bank=bank) as agent:
            hostile.unavailable_after["CreatePaymentIntent"] = 1  # applied, answer lost: the same intent again
            payment = await agent.pay(BILLER_ID, BILL.bill_id)
            assert payment.state is IntentState.PAID
            assert payment.amount == BILL.amount_due
            assert hostile.calls["CreatePaymentIntent"] == 2
            (order,) = bank.orders
            assert (order.amount, order.intent_id, payment.proof) == (BILL.amount_due, payment.intent_id, "bank-1")
            again = await agent.pay(BILLER_ID, BILL.bill_id)
            assert (again.intent_id, again.state, len(bank.orders)) == (payment.intent_id, IntentState.PAID, 1)
            assert await agent.receipt(BILLER_ID, payment.intent_id) is None  # not settled yet (PAY-5)
        later = Bank()
        async with household.agent(bank=later) as agent:  # restarted on the same store
            assert (await agent.pay(BILLER_ID, BILL.bill_id)).intent_id == payment.intent_id
            assert later.orders == []
            assert len(dump(biller.db_path)["payment_intents"]) == 1
            await biller.agent.record_settlement(ACCOUNT, payment.intent_id, order.amount, "rail-0001")
            receipt = await agent.receipt(BILLER_ID, payment.intent_id)
            assert receipt is not None
            assert (receipt.amount_received, receipt.remaining_balance, receipt.disputed) == (
                BILL.amount_due,
                eur("0.00"),
                False,
            )
            assert await agent.receipt(BILLER_ID, payment.intent_id) == receipt  # kept

    run(tmp_path, scenario, hostile=True)


def test_an_intent_stored_before_a_failed_send_is_the_one_sent_again(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        bank = Bank()
        async with household.agent_with_its_bill(bank=bank) as agent:
            hostile.unavailable_before["CreatePaymentIntent"] = FAST.attempts  # every retry fails
            with pytest.raises(CallError):
                await agent.pay(BILLER_ID, BILL.bill_id)
            (pending,) = await agent.payments(BILLER_ID)
            assert pending.state is IntentState.CREATED
            assert bank.orders == []
            payment = await agent.pay(BILLER_ID, BILL.bill_id)
            assert payment.intent_id == pending.intent_id
            assert len(bank.orders) == 1
            assert len(dump(biller.db_path)["payment_intents"]) == 1

    run(tmp_path, scenario, hostile=True)


class IntentsSent:
    """A `CallObserver` keeping the bytes of every payment intent the biller receives."""

    def __init__(self) -> None:
        self.intents: list[bytes] = []

    async def received(self, rpc: str, request: Any) -> None:
        if rpc == "CreatePaymentIntent":
            self.intents.append(request.intent.SerializeToString())

    async def answered(self, rpc: str, request: Any, answer: Any) -> None:
        return None

    async def sending(self, rpc: str, request: Any, answer: Any) -> Any:
        return answer

    def streamed(self, request: pb.WatchEventsRequest, response: pb.WatchEventsResponse) -> list[Any]:
        return [response]


def test_an_intent_refused_invalid_argument_is_signed_afresh_not_resent(tmp_path: Path) -> None:
    """ERR-6: after INVALID_ARGUMENT the same bytes are never sent again; the next attempt is a fresh signature
    of the same intent (PAY-2), which the biller instructs."""

    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        bank = Bank()
        async with household.agent_with_its_bill(bank=bank) as agent:
            sent = IntentsSent()
            hostile.observer = sent
            hostile.refuse_before["CreatePaymentIntent"] = [ProtocolError(Reason.MALFORMED_PAYLOAD, "refused")]
            with pytest.raises(CallError) as refused:
                await agent.pay(BILLER_ID, BILL.bill_id)
            assert refused.value.reason is Reason.MALFORMED_PAYLOAD
            (pending,) = await agent.payments(BILLER_ID)
            payment = await agent.pay(BILLER_ID, BILL.bill_id)
            assert (payment.intent_id, payment.state, len(bank.orders)) == (pending.intent_id, IntentState.PAID, 1)
            assert len(sent.intents) == 2
            assert sent.intents[0] != sent.intents[1]  # signed afresh, never the refused bytes again

    run(tmp_path, scenario, hostile=True)


def instructions_for_one_cent_more(
    biller: Biller,
) -> Callable[[pb.CreatePaymentIntentRequest, pb.CreatePaymentIntentResponse], pb.CreatePaymentIntentResponse]:
    """A hostile biller's rewrite: its instructions, signed by it, for one cent more than the intent (PAY-8)."""

    def more(
        _request: pb.CreatePaymentIntentRequest, answer: pb.CreatePaymentIntentResponse
    ) -> pb.CreatePaymentIntentResponse:
        def raise_amount(instructions: Any) -> None:
            instructions.amount.amount_minor += 1

        return pb.CreatePaymentIntentResponse(instructions=reseal(answer.instructions, biller.key, raise_amount))

    return more


def test_instructions_for_another_amount_are_never_paid(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)

        hostile.rewrite["CreatePaymentIntent"] = instructions_for_one_cent_more(biller)
        bank = Bank()
        async with household.agent_with_its_bill(bank=bank) as agent:
            for _ in range(2):
                with pytest.raises(PaymentRefused) as refused:
                    await agent.pay(BILLER_ID, BILL.bill_id)
                assert refused.value.reason is Reason.PAYMENT_AMOUNT_MISMATCH
            assert bank.orders == []
            (payment,) = await agent.payments(BILLER_ID)
            assert (payment.state, payment.order) == (IntentState.REFUSED, None)
            assert hostile.calls["CreatePaymentIntent"] == 1  # the refusal is kept, not asked again

    run(tmp_path, scenario, hostile=True)


def test_refused_instructions_set_aside_by_the_household_give_way_to_a_new_intent(tmp_path: Path) -> None:
    """A refusal holds its payment until the household says otherwise: `set_aside_refused` keeps the refused
    intent (evidence) and the next `pay` starts a new one, refused PAYMENT_IN_PROGRESS while the refused
    instructions are payable on the biller's side (PAY-14), then instructed and paid once."""

    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)

        hostile.rewrite["CreatePaymentIntent"] = instructions_for_one_cent_more(biller)
        bank = Bank()
        async with household.agent_with_its_bill(bank=bank) as agent:
            with pytest.raises(PaymentRefused):
                await agent.pay(BILLER_ID, BILL.bill_id)
            (refused,) = await agent.payments(BILLER_ID)
            assert (refused.state, refused.holds_payment) == (IntentState.REFUSED, True)
            with pytest.raises(LookupError):
                await agent.set_aside_refused(BILLER_ID, "pi-unknown")
            set_aside = await agent.set_aside_refused(BILLER_ID, refused.intent_id)
            assert (set_aside.state, set_aside.holds_payment, set_aside.order) == (IntentState.REFUSED, False, None)

            del hostile.rewrite["CreatePaymentIntent"]  # the biller fixed its fault
            with pytest.raises(CallError) as waiting:
                await agent.pay(BILLER_ID, BILL.bill_id)
            assert waiting.value.reason is Reason.PAYMENT_IN_PROGRESS
            # Without agreement the instructions were payable until the end of the due date (PAY-3).
            biller.clock.advance(datetime.combine(DUE, time(), UTC) + timedelta(days=1) - biller.clock.now())
            payment = await agent.pay(BILLER_ID, BILL.bill_id)
            assert payment.intent_id != refused.intent_id
            assert (payment.state, len(bank.orders), bank.orders[0].amount) == (IntentState.PAID, 1, eur("120.00"))
            states = [(p.intent_id, p.state, p.holds_payment) for p in await agent.payments(BILLER_ID)]
            assert states == [
                (refused.intent_id, IntentState.REFUSED, False),
                (payment.intent_id, IntentState.PAID, True),
            ]
            with pytest.raises(ValueError, match="only refused"):
                await agent.set_aside_refused(BILLER_ID, payment.intent_id)

    run(tmp_path, scenario, hostile=True)


def test_a_receipt_for_another_amount_is_a_dispute(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)

        def less(_request: pb.GetReceiptRequest, answer: pb.GetReceiptResponse) -> pb.GetReceiptResponse:
            def lower(receipt: Any) -> None:
                receipt.amount_received.amount_minor -= 100

            return pb.GetReceiptResponse(receipt=reseal(answer.receipt, biller.key, lower))

        hostile.rewrite["GetReceipt"] = less
        async with household.agent_with_its_bill(bank=Bank()) as agent:
            payment = await agent.pay(BILLER_ID, BILL.bill_id)
            await biller.agent.record_settlement(ACCOUNT, payment.intent_id, payment.amount, "rail-0001")
            for _ in range(2):
                with pytest.raises(PaymentDispute) as dispute:
                    await agent.receipt(BILLER_ID, payment.intent_id)
                assert dispute.value.receipt.amount_received == eur("119.00")
            assert hostile.calls["GetReceipt"] == 1

    run(tmp_path, scenario, hostile=True)


# --- Instructions that lapse unpaid (PAY-17) -------------------------------------------------------------------


class DownBank:
    """A bank that cannot be reached: it certainly pays nothing (`PaymentNotSent`), so the intent stays instructed."""

    def __init__(self) -> None:
        self.asked = 0

    async def send(self, order: PaymentOrder) -> str:
        self.asked += 1
        raise PaymentNotSent("the bank cannot be reached")


class CrashingBank:
    """A bank whose answer never comes: the intent was handed over, and is in doubt (PAY-7)."""

    async def send(self, order: PaymentOrder) -> str:
        raise ConnectionResetError("the bank hung up mid-order")


def past_pay_by(biller: Biller, payment: Payment) -> None:
    """Move the shared clock a second past the payment's instructions' pay_by_time."""
    assert payment.order is not None
    biller.clock.advance(payment.order.pay_by_time - biller.clock.now() + timedelta(seconds=1))


def test_instructions_that_lapsed_unpaid_give_way_to_a_new_intent_paid_in_the_same_call(tmp_path: Path) -> None:
    """PAY-17: the bank was down until after the instructions' pay_by_time. The next `pay` lapses them (kept,
    never paid), starts a new intent for the same payment, which the biller instructs (PAY-14), and pays it."""

    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent_with_its_bill(bank=DownBank()) as agent:
            with pytest.raises(PaymentNotSent):
                await agent.pay(BILLER_ID, BILL.bill_id)
            (instructed,) = await agent.payments(BILLER_ID)
            assert instructed.state is IntentState.INSTRUCTED
            past_pay_by(biller, instructed)
        bank = Bank()
        async with household.agent(bank=bank) as agent:  # a later run, the bank back
            payment = await agent.pay(BILLER_ID, BILL.bill_id)
            assert payment.intent_id != instructed.intent_id
            assert (payment.state, payment.amount, payment.proof) == (IntentState.PAID, BILL.amount_due, "bank-1")
            (order,) = bank.orders
            assert instructed.order is not None
            assert (order.intent_id, order.amount) == (payment.intent_id, BILL.amount_due)
            assert order.payment_reference != instructed.order.payment_reference  # the new instructions only
            lapsed, paid = await agent.payments(BILLER_ID)
            assert (lapsed.intent_id, lapsed.state, lapsed.order) == (instructed.intent_id, IntentState.LAPSED, None)
            assert paid == payment
            assert (await agent.pay(BILLER_ID, BILL.bill_id)).intent_id == payment.intent_id  # never paid twice
            assert len(bank.orders) == 1
            with pytest.raises(ValueError, match="no instructions it was paid under"):
                await agent.receipt(BILLER_ID, lapsed.intent_id)
            assert len(dump(biller.db_path)["payment_intents"]) == 2

    run(tmp_path, scenario)


def test_instructions_that_arrive_past_their_pay_by_lapse_and_the_payment_gets_a_new_intent(tmp_path: Path) -> None:
    """PAY-17 for instructions taken late: every answer to the intent was lost (the biller instructed it), and the
    household's next run comes after their pay_by_time. The retry is answered with the stored instructions, already
    past their time: never paid (PAY-8), they lapse, and the payment is made under a new intent in the same call.
    (Refused instead, they held the payment for good: every later `pay` met the same refused intent.)"""

    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)
        async with household.agent_with_its_bill(bank=Bank()) as agent:
            hostile.unavailable_after["CreatePaymentIntent"] = FAST.attempts  # applied each time, answers lost
            with pytest.raises(CallError):
                await agent.pay(BILLER_ID, BILL.bill_id)
            (created,) = await agent.payments(BILLER_ID)
            assert created.state is IntentState.CREATED
        stored = await biller.agent._store.get_payment_intent(ACCOUNT, created.intent_id)
        assert stored is not None
        assert stored.pay_by is not None
        biller.clock.advance(stored.pay_by - biller.clock.now() + timedelta(seconds=1))
        bank = Bank()
        async with household.agent(bank=bank) as agent:  # the next run, after the instructions' time
            payment = await agent.pay(BILLER_ID, BILL.bill_id)
            assert payment.intent_id != created.intent_id
            assert (payment.state, payment.amount) == (IntentState.PAID, BILL.amount_due)
            (order,) = bank.orders
            assert order.intent_id == payment.intent_id
            assert order.payment_reference != stored.payment_reference  # never under the lapsed instructions
            lapsed, paid = await agent.payments(BILLER_ID)
            assert (lapsed.intent_id, lapsed.state, paid) == (created.intent_id, IntentState.LAPSED, payment)

    run(tmp_path, scenario, hostile=True)


def test_an_intent_handed_to_the_bank_never_lapses(tmp_path: Path) -> None:
    """PAY-7 over PAY-17: once handed to the bank the payment is in doubt, whatever the time; it is neither lapsed
    nor followed by a new intent, which could pay the bill twice."""

    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent_with_its_bill(bank=CrashingBank()) as agent:
            with pytest.raises(PaymentInDoubt, match=r"the bank's sender failed: ConnectionResetError") as crashed:
                await agent.pay(BILLER_ID, BILL.bill_id)
            assert isinstance(crashed.value.__cause__, ConnectionResetError)
            (sending,) = await agent.payments(BILLER_ID)
            assert sending.state is IntentState.SENDING
            past_pay_by(biller, sending)
        bank = Bank()
        async with household.agent(bank=bank) as agent:
            with pytest.raises(PaymentInDoubt):
                await agent.pay(BILLER_ID, BILL.bill_id)
            assert [p.state for p in await agent.payments(BILLER_ID)] == [IntentState.SENDING]
            assert bank.orders == []
            assert len(dump(biller.db_path)["payment_intents"]) == 1

    run(tmp_path, scenario)


def test_an_outstanding_balance_whose_instructions_lapsed_is_paid_under_a_new_intent(tmp_path: Path) -> None:
    """PAY-16 with PAY-17: the outstanding balance's intent is continued, never paid twice — but once its
    instructions lapsed unpaid it fixes nothing any more: a new intent carries the outstanding balance as the
    consumer's own record computes it, and is paid."""

    async def scenario(biller: Biller, household: Household) -> None:
        down = DownBank()
        async with household.agent(ScriptedStrategy(INSIDE), bank=Bank()) as agent:
            await enrol(biller, agent)
            result = await agent.negotiate(BILLER_ID, BILL.bill_id)
            assert result.thread_id is not None
            first = await agent.pay(BILLER_ID, BILL.bill_id)
            await biller.agent.record_settlement(ACCOUNT, first.intent_id, eur("40.00"), "RAIL-1")
            await biller.agent.emit_event(
                ACCOUNT,
                event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN,
                bill_id=BILL.bill_id,
                thread_id=result.thread_id,
                amount=eur("80.00"),
            )
            await biller.agent.offer_renegotiation(BILL.bill_id)  # the bill is open again, for its balance
            async with contextlib.aclosing(agent.watch(BILLER_ID)) as events:
                while (await asyncio.wait_for(anext(events), 5)).kind != event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED:
                    pass
        async with household.agent(ScriptedStrategy(INSIDE), bank=down) as agent:
            with pytest.raises(PaymentNotSent):
                await agent.pay(BILLER_ID, BILL.bill_id)
            *_, balance = await agent.payments(BILLER_ID)
            assert (balance.agreement_digest, balance.amount, balance.state) == (
                b"",
                eur("80.00"),
                IntentState.INSTRUCTED,
            )
            past_pay_by(biller, balance)
        bank = Bank()
        async with household.agent(ScriptedStrategy(INSIDE), bank=bank) as agent:
            rest = await agent.pay(BILLER_ID, BILL.bill_id)
            assert rest.intent_id != balance.intent_id
            assert (rest.agreement_digest, rest.amount, rest.state) == (b"", eur("80.00"), IntentState.PAID)
            assert [(order.intent_id, order.amount) for order in bank.orders] == [(rest.intent_id, eur("80.00"))]
            states = {p.intent_id: p.state for p in await agent.payments(BILLER_ID)}
            lapsed, paid = IntentState.LAPSED, IntentState.PAID
            assert states == {first.intent_id: paid, balance.intent_id: lapsed, rest.intent_id: paid}
            assert (await agent.pay(BILLER_ID, BILL.bill_id)).intent_id == rest.intent_id  # continued, not paid twice
            assert len(bank.orders) == 1
            assert down.asked == 1

    run(tmp_path, scenario)


def test_the_consumer_store_lapses_only_instructed_intents_past_their_time_and_never_sends_them(
    tmp_path: Path,
) -> None:
    """`lapse_intent` is the one way to LAPSED: only an INSTRUCTED intent, only once its pay_by_time has passed;
    a lapsed intent is never handed to the bank, and the payment may then have one new live intent (no more)."""
    now = START
    pay_by = now + timedelta(hours=1)
    instructions = envelope_pb2.Envelope(
        payload=payment_pb2.PaymentInstructions(pay_by_time=to_timestamp(pay_by)).SerializeToString()
    ).SerializeToString()

    async def main() -> None:
        store = await SqliteConsumerStore.open(tmp_path / "consumer.sqlite")
        try:
            await enrol_directly(store, now)
            intent = IntentRecord(
                BILLER_ID, "pi-1", ACCOUNT, "bill-1", b"", 0, 12000, "EUR", b"t" * 16, IntentState.CREATED, now, (b"m",)
            )
            await store.create_intent(intent)
            later = pay_by + timedelta(seconds=1)
            assert not await store.lapse_intent(BILLER_ID, "pi-1", later)  # CREATED: no instructions to lapse
            await store.record_instructions(BILLER_ID, "pi-1", instructions, None)
            assert not await store.lapse_intent(BILLER_ID, "pi-1", pay_by)  # not past its time yet
            assert await asyncio.gather(*(store.lapse_intent(BILLER_ID, "pi-1", later) for _ in range(3))) == [
                True,
                False,
                False,
            ]
            lapsed = await store.get_intent(BILLER_ID, "pi-1")
            assert lapsed is not None
            assert (lapsed.state, lapsed.instructions, lapsed.messages) == (IntentState.LAPSED, instructions, (b"m",))
            assert not await store.begin_sending(BILLER_ID, "pi-1", later)  # never handed to the bank
            assert await store.find_intent(BILLER_ID, "bill-1", b"", 0) is None  # no live intent for the payment
            assert (await store.create_intent(dataclasses.replace(intent, intent_id="pi-2"))).intent_id == "pi-2"
            twin = dataclasses.replace(intent, intent_id="pi-3")  # one live intent per payment still
            assert (await store.create_intent(twin)).intent_id == "pi-2"
            await store.record_instructions(BILLER_ID, "pi-2", instructions, None)
            assert await store.begin_sending(BILLER_ID, "pi-2", later)
            assert not await store.lapse_intent(BILLER_ID, "pi-2", later)  # SENDING: in doubt, never lapsed
            assert [i.intent_id for i in await store.intents(BILLER_ID)] == ["pi-1", "pi-2"]
        finally:
            await store.close()

    asyncio.run(main())


async def enrol_directly(store: SqliteConsumerStore, now: datetime) -> None:
    """Store an enrolment with BILLER_ID for ACCOUNT, as `enrol` would, without a biller (store-level tests)."""
    link = BillerLinkRecord(BILLER_ID, "127.0.0.1:1", b"p" * 32, True, None, None, now)
    await store.save_enrolment(link, [b"v1"], LinkedAccountRecord(BILLER_ID, ACCOUNT, now, b"r", b"c"))


def test_a_store_at_schema_2_is_migrated_to_lapsed_intents_keeping_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 3 rebuilds `intents` (a partial unique index over live intents instead of the table's UNIQUE):
    every intent, message and receipt a store at schema 2 had is kept, and a lapsed intent's payment can then
    have a new one."""
    path = tmp_path / "consumer.sqlite"
    now = START
    intent = IntentRecord(
        BILLER_ID, "pi-1", ACCOUNT, "bill-1", b"", 0, 12000, "EUR", b"t" * 16, IntentState.CREATED, now, (b"m0",)
    )
    receipt = ReceiptRecord(BILLER_ID, "pi-1", b"receipt", b"d" * 32, 12000, None, now)

    async def at_schema_2() -> None:
        store = await SqliteConsumerStore.open(path)
        try:
            await enrol_directly(store, now)
        finally:
            await store.close()
        # The intents as that version wrote them (today's code reads and writes a later schema).
        with sqlite3.connect(path) as db:
            for intent_id, index, state, instructions, proof in (
                ("pi-1", 0, "paid", b"instructions", "bank-1"),
                ("pi-2", 1, "created", None, ""),
            ):
                db.execute(
                    "INSERT INTO intents VALUES (?, ?, ?, 'bill-1', x'', ?, 12000, 'EUR', ?, ?, ?, ?, ?, ?, NULL, '')",
                    (BILLER_ID, intent_id, ACCOUNT, index, b"t" * 16, state, ts(now), ts(now), instructions, proof),
                )
                db.execute("INSERT INTO intent_messages VALUES (?, ?, 0, ?)", (BILLER_ID, intent_id, b"m0"))
            db.execute("INSERT INTO intent_messages VALUES (?, 'pi-1', 1, ?)", (BILLER_ID, b"m1"))
            db.execute(
                "INSERT INTO receipts VALUES (?, 'pi-1', ?, ?, 12000, NULL, ?)",
                (BILLER_ID, receipt.envelope, receipt.digest, ts(now)),
            )

    monkeypatch.setattr(SqliteConsumerStore, "MIGRATIONS", CONSUMER_MIGRATIONS[:2])
    asyncio.run(at_schema_2())
    before = dump(path)
    assert before["schema_version"] == [(1,), (2,)]
    monkeypatch.undo()

    async def migrated() -> None:
        store = await SqliteConsumerStore.open(path)
        try:
            paid = await store.get_intent(BILLER_ID, "pi-1")
            assert paid is not None
            assert (paid.state, paid.messages, paid.instructions, paid.payment_proof) == (
                IntentState.PAID,
                (b"m0", b"m1"),
                b"instructions",
                "bank-1",
            )
            assert await store.get_receipt(BILLER_ID, "pi-1") == receipt
            assert [i.intent_id for i in await store.intents()] == ["pi-1", "pi-2"]
            assert (await store.create_intent(dataclasses.replace(intent, intent_id="pi-3"))).intent_id == "pi-1"
        finally:
            await store.close()

    asyncio.run(migrated())
    after = dump(path)
    assert after["schema_version"] == [(1,), (2,), (3,), (4,)]
    for table in ("intent_messages", "receipts", "links", "accounts"):
        assert after[table] == before[table], table
    assert [row[:-1] for row in after["intents"]] == before["intents"]  # migration 4 adds set_aside_at, unset
    assert {row[-1] for row in after["intents"]} == {None}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        db.execute("UPDATE intents SET state = 'lapsed' WHERE intent_id = 'pi-2'")  # the new CHECK takes it
        db.execute(
            "INSERT INTO intents SELECT biller_party_id, 'pi-4', account_id, bill_id, agreement_digest,"
            " instalment_index, amount_minor, currency, thread_id, 'created', created_at, updated_at, NULL, '', NULL,"
            " '', NULL FROM intents"
            " WHERE intent_id = 'pi-2'"
        )  # a second intent for a payment whose first lapsed: allowed now
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # but one live intent per payment
            db.execute("UPDATE intents SET state = 'created' WHERE intent_id = 'pi-2'")


def test_a_store_at_schema_3_is_migrated_so_that_refused_instructions_can_be_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 4 adds `set_aside_at` and narrows the live-intent index: a refused intent stored at schema 3 is
    kept as it was, and once set aside its payment may have a new intent (one live intent per payment still)."""
    path = tmp_path / "consumer.sqlite"
    now = START
    refused = IntentRecord(
        BILLER_ID, "pi-1", ACCOUNT, "bill-1", b"", 0, 12000, "EUR", b"t" * 16, IntentState.CREATED, now, (b"m0",)
    )

    async def at_schema_3() -> None:
        store = await SqliteConsumerStore.open(path)
        try:
            await enrol_directly(store, now)
        finally:
            await store.close()
        with sqlite3.connect(path) as db:  # as that version wrote it
            db.execute(
                "INSERT INTO intents VALUES (?, 'pi-1', ?, 'bill-1', x'', 0, 12000, 'EUR', ?, 'refused', ?, ?, ?, '',"
                " 'PAYMENT_AMOUNT_MISMATCH', 'EUR 120.01')",
                (BILLER_ID, ACCOUNT, b"t" * 16, ts(now), ts(now), b"forged"),
            )
            db.execute("INSERT INTO intent_messages VALUES (?, 'pi-1', 0, ?)", (BILLER_ID, b"m0"))

    monkeypatch.setattr(SqliteConsumerStore, "MIGRATIONS", CONSUMER_MIGRATIONS[:3])
    asyncio.run(at_schema_3())
    before = dump(path)
    monkeypatch.undo()

    async def migrated() -> None:
        store = await SqliteConsumerStore.open(path)
        try:
            kept = await store.get_intent(BILLER_ID, "pi-1")
            assert kept is not None
            assert (kept.state, kept.instructions, kept.refusal, kept.set_aside_at, kept.holds_payment) == (
                IntentState.REFUSED,
                b"forged",
                ("PAYMENT_AMOUNT_MISMATCH", "EUR 120.01"),
                None,
                True,
            )
            fresh = dataclasses.replace(refused, intent_id="pi-2")
            assert (await store.create_intent(fresh)).intent_id == "pi-1"  # the refusal holds the payment
            with pytest.raises(LookupError):
                await store.set_aside_intent(BILLER_ID, "pi-9", now)
            later = now + timedelta(minutes=1)
            set_aside = await store.set_aside_intent(BILLER_ID, "pi-1", later)
            assert (set_aside.state, set_aside.set_aside_at, set_aside.holds_payment) == (
                IntentState.REFUSED,
                later,
                False,
            )
            assert await store.set_aside_intent(BILLER_ID, "pi-1", later + timedelta(minutes=1)) == set_aside
            assert await store.find_intent(BILLER_ID, "bill-1", b"", 0) is None
            assert (await store.create_intent(fresh)).intent_id == "pi-2"  # the payment's new intent
            assert (await store.create_intent(dataclasses.replace(refused, intent_id="pi-3"))).intent_id == "pi-2"
            with pytest.raises(ValueError, match="only refused"):
                await store.set_aside_intent(BILLER_ID, "pi-2", later)
        finally:
            await store.close()

    asyncio.run(migrated())
    after = dump(path)
    assert after["schema_version"] == [(1,), (2,), (3,), (4,)]
    assert after["intent_messages"][: len(before["intent_messages"])] == before["intent_messages"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # one live intent per payment
            db.execute("UPDATE intents SET set_aside_at = NULL WHERE intent_id = 'pi-1'")


# --- Events ----------------------------------------------------------------------------------------------------


async def take(events: AsyncGenerator[AccountEvent, None], count: int) -> list[int]:
    return [(await asyncio.wait_for(anext(events), 5)).sequence for _ in range(count)]


async def remind(biller: Biller, times: int) -> None:
    for level in range(1, times + 1):
        await biller.agent.emit_event(
            ACCOUNT,
            event_pb2.EVENT_KIND_REMINDER,
            bill_id=BILL.bill_id,
            amount=BILL.amount_due,
            reminder_level=min(level, 3),
        )


def test_watch_resumes_from_its_cursor_without_loss_or_duplicates(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent() as agent:
            await enrol(biller, agent)  # event 0: BILL_ISSUED
            await remind(biller, 2)  # events 1, 2
            async with contextlib.aclosing(agent.watch(BILLER_ID)) as events:
                assert await take(events, 3) == [0, 1, 2]
                await remind(biller, 1)  # live: event 3
                assert await take(events, 1) == [3]
            await remind(biller, 2)  # while nobody watches: events 4, 5
            async with contextlib.aclosing(agent.watch(BILLER_ID)) as events:
                assert await take(events, 2) == [4, 5]
        await remind(biller, 1)  # event 6, after a restart
        async with household.agent() as agent, contextlib.aclosing(agent.watch(BILLER_ID)) as events:
            assert await take(events, 1) == [6]
            stored = await agent.stored_events(BILLER_ID)
            assert [event.sequence for event in stored] == list(range(7))
            assert stored[0].kind == event_pb2.EVENT_KIND_BILL_ISSUED
            assert stored[0].related_digest == digest(await biller.bill_envelope(BILL.bill_id))

    run(tmp_path, scenario)


def test_watch_stores_at_most_its_bound_of_events_then_ends_with_a_clear_error(tmp_path: Path) -> None:
    """A biller cannot grow our store without bound: past `max_stored_events` the watch ends, nothing stored."""

    async def scenario(biller: Biller, household: Household) -> None:
        async with household.agent(max_stored_events=3) as agent:
            await enrol(biller, agent)  # event 0: BILL_ISSUED
            await remind(biller, 3)  # events 1, 2, 3
            async with contextlib.aclosing(agent.watch(BILLER_ID)) as events:
                assert await take(events, 3) == [0, 1, 2]
                with pytest.raises(EventLogFull, match="reached 3 events"):
                    await anext(events)
            assert [event.sequence for event in await agent.stored_events(BILLER_ID)] == [0, 1, 2]

    run(tmp_path, scenario)


def test_watch_drops_duplicates_and_reconnects_on_gaps_and_forgeries(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        hostile = hostile_of(biller)

        async def log() -> list[envelope_pb2.Envelope]:
            records = await biller.agent._store.events(ACCOUNT, 0, 100)
            return [envelope_pb2.Envelope.FromString(record.envelope) for record in records]

        def script(*envelopes: envelope_pb2.Envelope) -> Callable[[Any], Awaitable[list[envelope_pb2.Envelope]]]:
            async def send(request: pb.WatchEventsRequest) -> list[envelope_pb2.Envelope]:
                return list(envelopes)

            return send

        async with household.agent() as agent:
            await enrol(biller, agent)
            await remind(biller, 2)
            events = await log()
            hostile.streams = [script(events[0], events[0], events[1], events[1], events[2])]
            async with contextlib.aclosing(agent.watch(BILLER_ID)) as watch:
                assert await take(watch, 3) == [0, 1, 2]
                assert hostile.calls["WatchEvents"] == 1  # duplicates dropped, the stream kept
                await remind(biller, 2)
                events = await log()
                forged = reseal(events[3], SigningKey.generate(), lambda event: None)
                hostile.streams = [script(events[4]), script(forged)]  # a gap, then a forgery
                assert await take(watch, 2) == [3, 4]
                assert hostile.calls["WatchEvents"] == 4  # the scripted end, the gap, the forgery: reconnected
            assert [event.sequence for event in await agent.stored_events(BILLER_ID)] == [0, 1, 2, 3, 4]
            assert [event.digest for event in await agent.stored_events(BILLER_ID)] == [digest(e) for e in events]

    run(tmp_path, scenario, hostile=True)


# --- Transport ---------------------------------------------------------------------------------------------


def test_enrol_and_read_bills_over_tls_and_no_plaintext_off_loopback(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        certificate, key = self_signed()
        server, port = await start_biller_server(biller.agent, "127.0.0.1:0", tls=(certificate, key))
        try:
            tls = ClientTls(root_certificates=certificate)
            async with household.agent() as agent:
                await biller.agent.create_account(ACCOUNT, "Alice Example")
                code = await biller.agent.issue_enrolment_code(ACCOUNT)
                link = await agent.enrol(
                    f"127.0.0.1:{port}",
                    biller_party_id=BILLER_ID,
                    fingerprint=biller.chain.fingerprint,
                    account_id=ACCOUNT,
                    code=code,
                    tls=tls,
                )
                assert (link.insecure, link.tls) == (False, tls)
                await biller.bill(ACCOUNT)
            async with household.agent() as agent:  # the TLS settings come back from the store
                assert [bill.facts.bill_id for bill in await agent.bills(BILLER_ID)] == [BILL.bill_id]
        finally:
            await server.stop(None)
        with pytest.raises(ValueError, match="loopback"):
            open_channel("billing.energy.example:7443", insecure=True)

    run(tmp_path, scenario)


def test_a_client_certificate_reaches_a_mutual_tls_biller_on_every_channel_and_is_never_stored(tmp_path: Path) -> None:
    async def scenario(biller: Biller, household: Household) -> None:
        ca = make_dev_ca()
        server_certificate = issue_server_cert(ca)
        app = issue_client_cert(ca, "household app")
        certificate = (app.chain_pem, app.key_pem)
        running = await serve_biller(
            biller.agent,
            "127.0.0.1:0",
            tls=(server_certificate.chain_pem, server_certificate.key_pem),
            tls_client_ca=ca.cert_pem,
        )
        try:
            target, tls = f"127.0.0.1:{running.port}", ClientTls(root_certificates=ca.cert_pem)
            await biller.agent.create_account(ACCOUNT, "Alice Example")
            code = await biller.agent.issue_enrolment_code(ACCOUNT)
            material = {"biller_party_id": BILLER_ID, "fingerprint": biller.chain.fingerprint, "account_id": ACCOUNT}
            async with household.agent() as agent:  # no client certificate: refused in the handshake
                with pytest.raises(CallError) as refused:
                    await agent.enrol(target, code=code, tls=tls, **material)  # type: ignore[arg-type]
                assert refused.value.code is grpc.StatusCode.UNAVAILABLE
            async with household.agent(client_certificate=certificate) as agent:  # the same code: nothing was spent
                await agent.enrol(target, code=code, tls=tls, **material)  # type: ignore[arg-type]
                await biller.bill(ACCOUNT)
            async with household.agent(client_certificate=certificate) as agent:  # a new channel from the stored link
                assert [bill.facts.bill_id for bill in await agent.bills(BILLER_ID)] == [BILL.bill_id]
            async with household.agent() as agent:
                with pytest.raises(CallError) as refused:
                    await agent.bills(BILLER_ID)
                assert refused.value.code is grpc.StatusCode.UNAVAILABLE
            stored = b"".join(path.read_bytes() for path in household.db_path.parent.glob("consumer.sqlite*"))
            assert app.key_pem not in stored
            assert b"PRIVATE KEY" not in stored
        finally:
            await running.stop(None)

    run(tmp_path, scenario)


# --- The store's own guarantees --------------------------------------------------------------------------


def test_the_consumer_store_settles_races_in_the_database(tmp_path: Path) -> None:
    """What the agent relies on when two processes share the file: one intent per payment, one hand-over
    to the bank, events stored once and in order, a pin never silently replaced."""
    now = START

    async def main() -> None:
        store = await SqliteConsumerStore.open(tmp_path / "consumer.sqlite")
        try:
            link = BillerLinkRecord(BILLER_ID, "127.0.0.1:1", b"p" * 32, True, None, None, now)
            account = LinkedAccountRecord(BILLER_ID, ACCOUNT, now, b"request", b"confirmation")
            await store.save_enrolment(link, [b"v1"], account)
            await store.save_enrolment(dataclasses.replace(link, target="127.0.0.1:2"), [b"v1", b"v2"], account)
            moved = await store.get_link(BILLER_ID)
            assert moved is not None
            assert moved.target == "127.0.0.1:2"
            assert await store.link_key_sets(BILLER_ID) == [b"v1", b"v2"]
            with pytest.raises(ValueError, match="pinned"):
                await store.save_enrolment(dataclasses.replace(link, fingerprint=b"q" * 32), [b"v1"], account)
            with pytest.raises(StoreConflict) as conflict:
                await store.append_link_key_sets(BILLER_ID, 2, [b"v2 again"])
            assert conflict.value.reason is Reason.KEYSET_ROLLBACK

            intent = IntentRecord(
                BILLER_ID, "pi-1", ACCOUNT, "bill-1", b"", 0, 12000, "EUR", b"t" * 16, IntentState.CREATED, now, (b"m",)
            )
            assert (await store.create_intent(intent)).intent_id == "pi-1"
            twin = dataclasses.replace(intent, intent_id="pi-2")  # the same payment from another process
            assert (await store.create_intent(twin)).intent_id == "pi-1"
            await store.record_instructions(BILLER_ID, "pi-1", b"instructions", None)
            kept = await store.record_instructions(BILLER_ID, "pi-1", b"other instructions", None)
            assert (kept.state, kept.instructions) == (IntentState.INSTRUCTED, b"instructions")
            assert await asyncio.gather(*(store.begin_sending(BILLER_ID, "pi-1", now) for _ in range(5))) == [
                True,
                False,
                False,
                False,
                False,
            ]
            paid = await store.finish_sending(BILLER_ID, "pi-1", paid=True, proof="bank-1", now=now)
            assert (paid.state, paid.payment_proof) == (IntentState.PAID, "bank-1")
            with pytest.raises(LookupError):
                await store.finish_sending(BILLER_ID, "pi-1", paid=True, proof="bank-2", now=now)

            def event(sequence: int, content: bytes) -> ReceivedEventRecord:
                return ReceivedEventRecord(BILLER_ID, ACCOUNT, sequence, content, digest_of(content), 1, now)

            await store.append_event(event(0, b"e0"), previous_digest=b"")
            for sequence, previous, reason in (
                (0, b"", Reason.SEQUENCE_MISMATCH),  # a duplicate
                (2, digest_of(b"e0"), Reason.SEQUENCE_MISMATCH),  # a gap
                (1, digest_of(b"forged"), Reason.PREVIOUS_DIGEST_MISMATCH),  # a broken chain
            ):
                with pytest.raises(StoreConflict) as conflict:
                    await store.append_event(event(sequence, b"e%d" % sequence), previous_digest=previous)
                assert conflict.value.reason is reason
            await store.append_event(event(1, b"e1"), previous_digest=digest_of(b"e0"))
            assert await store.event_cursor(BILLER_ID, ACCOUNT) == EventCursor(2, digest_of(b"e1"))
        finally:
            await store.close()

    asyncio.run(main())


def digest_of(content: bytes) -> bytes:
    return hashlib.sha256(content).digest()


def test_per_bill_locks_serialize_and_are_dropped_when_released() -> None:
    """The agent's locks are bounded by the work in flight: none is kept once its last holder leaves."""
    locks = KeyedLocks()
    order: list[str] = []

    async def hold(name: str, key: tuple[str, ...]) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    async def scenario() -> None:
        await asyncio.gather(hold("a", ("pay", "b1")), hold("b", ("pay", "b1")), hold("c", ("pay", "b2")))
        assert len(locks) == 0

    asyncio.run(scenario())
    assert order.index("a-") < order.index("b+")  # one holder per key at a time
    assert order.index("c+") < order.index("a-")  # other keys do not wait


def test_every_consumer_error_has_the_one_root() -> None:
    for error in (PaymentNotSent, PaymentInDoubt, PaymentDispute, PaymentRefused, EventLogForked):
        assert issubclass(error, ParleyError)
    assert issubclass(PaymentRefused, RemoteProtocolError)
    assert issubclass(EventLogForked, RemoteProtocolError)
