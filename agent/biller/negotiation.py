"""Negotiation (PROTOCOL.md §9): the consumer's moves fed to the sans-I/O core, the biller's answers signed.

The rules live in the core (`agent.protocol.negotiation`); this phase reads the thread's state (one replay
of the stored thread per request), hands the received move to the core, asks the core whether the offer
binds the biller (NEG-12) and otherwise the policy, signs the answer through the core and stores the step.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime

from agent.biller.bills import bill_facts
from agent.biller.party import BillerParty, stored_envelope
from agent.biller.plugins import OfferContext
from agent.biller.receive import Found, Inbound, idempotent_step, log_read
from agent.logs import log_step
from agent.lru import Lru
from agent.protocol.answers import AcceptOffer, Answer, CounterOffer
from agent.protocol.disclosures import check_disclosure
from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.limits import MAX_TEXT_CHARS, MAX_THREADS_PER_BILL
from agent.protocol.messages import Verified
from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload, sign_move, thread_message
from agent.protocol.negotiation import (
    Accept,
    Move,
    Negotiation,
    Offer,
    Open,
    PendingOffer,
    Reject,
    Role,
    State,
    ThreadMessage,
)
from agent.protocol.terms import BillFacts, Terms
from agent.stores.base import (
    AgreementFacts,
    BillRecord,
    BillStatus,
    MessageRecord,
    NegotiationStep,
    NewThread,
    PendingEvent,
    ThreadContext,
    ThreadOutcome,
    ThreadRecord,
)
from parley.v1 import biller_service_pb2, envelope_pb2, event_pb2, negotiation_pb2

logger = logging.getLogger("parley.biller")

_MOVE_CACHE_ENTRIES = 4_096  # thread messages parsed into the core's moves, by digest and role
_BILL_CACHE_ENTRIES = 1_024  # bills parsed into the core's facts, by digest


def _stored_payload(envelope: envelope_pb2.Envelope) -> NegotiationPayload:
    cls = next(c for c in NEGOTIATION_TYPES if c.DESCRIPTOR.full_name == envelope.payload_type)
    return cls.FromString(envelope.payload)


def _thread_outcome(state: State) -> ThreadOutcome:
    return ThreadOutcome(state.value) if state.terminal else ThreadOutcome.OPEN


def _move_of(answer: Answer, pending_digest: bytes) -> Move:
    if isinstance(answer, AcceptOffer):
        return Accept(pending_digest)
    if isinstance(answer, CounterOffer):
        return Offer(answer.terms)
    return Reject(answer.reason, answer.note)


def _already_late(move: Move, pending: Terms, now: datetime) -> date | None:
    """NEG-23: the first date before today (the UTC date of `now`, the signed create_time) in the terms a policy's
    counter-offer or Accept would sign, if any; an Accept NEG-12 obliges never comes here."""
    terms = move.terms if isinstance(move, Offer) else pending if isinstance(move, Accept) else None
    today = now.astimezone(UTC).date()
    return next((i.due_date for i in terms.schedule if i.due_date < today), None) if terms else None


class NegotiationPhase:
    """Negotiate and GetThread. `negotiation_type`, `thread_state` and `first_late_date` are the seams a test
    may override."""

    negotiation_type: type[Negotiation] = Negotiation

    def __init__(self, party: BillerParty) -> None:
        self.party = party
        # A stored message's move, by its digest (the digest fixes its bytes): a thread is replayed on every
        # move, and parsing its earlier messages again was most of that.
        self._moves: Lru[tuple[bytes, Role], ThreadMessage] = Lru(_MOVE_CACHE_ENTRIES)
        # A stored bill's facts, by its digest: parsed and validated once, not on every move of its threads.
        self._bills: Lru[bytes, BillFacts] = Lru(_BILL_CACHE_ENTRIES)

    # --- the thread's state ---

    def first_late_date(self, move: Move, pending: Terms, now: datetime) -> date | None:
        """NEG-23: the first date before today in what the policy's answer would sign (None: none is late)."""
        return _already_late(move, pending, now)

    def thread_state(
        self, thread: ThreadRecord | None, bill: BillRecord, *, hardship_disclosed: bool, received_minor: int = 0
    ) -> Negotiation:
        """The core's state of a thread: a new one, or the stored thread replayed (`Negotiation.replay`).

        Each stored message is judged at the time it was received, as it was then. A new thread's terms
        restate the outstanding balance (TRM-11, PAY-16: the amount due less `received_minor`, what was
        received for the bill so far); a stored thread's, the balance its opening restated when it was
        accepted — so a thread agreed before a payment still replays as it was agreed.
        """
        facts = self._bills.get(bill.digest)
        if facts is None:
            facts = bill_facts(bill)
            self._bills.put(bill.digest, facts)
        if thread is None:
            return self.negotiation_type(
                bill=facts.with_received(received_minor),
                bill_digest=bill.digest,
                role=Role.BILLER,
                limits=self.party.limits,
                hardship_disclosed=hardship_disclosed,
            )
        return self.negotiation_type.replay(
            bill=facts.with_received(self._received_at_opening(thread, facts)),
            bill_digest=bill.digest,
            role=Role.BILLER,
            messages=[(self._stored_move(record), record.received_at) for record in thread.messages],
            limits=self.party.limits,
            hardship_disclosed=thread.hardship_disclosed,
            recorded_expired=thread.outcome is ThreadOutcome.EXPIRED,
        )

    def current_state(self, thread: ThreadRecord, bill: BillRecord | None) -> Negotiation:
        """The thread's state now: replayed from its log, with the deadline applied (NEG-6)."""
        assert bill is not None, "threads reference existing bills"
        negotiation = self.thread_state(thread, bill, hardship_disclosed=thread.hardship_disclosed)
        negotiation.expire(self.party.clock.now())
        return negotiation

    def _received_at_opening(self, thread: ThreadRecord, facts: BillFacts) -> int:
        """What was received for the bill when the thread opened: the amount due less the principal its
        (accepted, so valid) opening restated; 0 if that is not a balance of this bill."""
        if not thread.messages:
            return 0
        opening = self._stored_move(thread.messages[0]).move
        if not isinstance(opening, Open):
            return 0
        return facts.restated_by(opening.terms.principal).received_minor

    def _stored_move(self, record: MessageRecord) -> ThreadMessage:
        """A stored (already verified) message as the core sees it."""
        sender = Role.BILLER if record.sender == self.party.party_id else Role.CONSUMER
        message = self._moves.get((record.digest, sender))
        if message is None:
            envelope = stored_envelope(record.envelope)
            verified = Verified(_stored_payload(envelope), envelope, record.digest, envelope.signatures[0].keyid)
            message = thread_message(verified, sender)
            self._moves.put((record.digest, sender), message)
        return message

    # --- the RPCs ---

    async def get_thread(self, envelope: envelope_pb2.Envelope) -> biller_service_pb2.GetThreadResponse:
        """NEG-22: every recorded message of a thread, sequence 0 first, with its current outcome."""
        party = self.party
        query = await party.receive.query(envelope, "GetThread")
        context = await party.store.thread_context(query.thread_id, "")
        thread = context.thread
        if thread is None or thread.account_id != query.account_id or thread.consumer_party_id != query.header.sender:
            # ENR-12: an earlier holder's thread (and the disclosure it committed to) is not shown
            raise RemoteProtocolError(Reason.NOT_FOUND, "no such thread on the account")
        negotiation = self.current_state(thread, context.bill)
        log_read("GetThread", query.account_id, thread=query.thread_id, outcome=negotiation.state.value)
        return biller_service_pb2.GetThreadResponse(
            messages=[stored_envelope(message.envelope) for message in thread.messages],
            outcome=negotiation.state.outcome,
        )

    async def negotiate(
        self, envelope: envelope_pb2.Envelope, disclosure: bytes = b""
    ) -> biller_service_pb2.NegotiateResponse:
        """One consumer move, answered in the same call with the biller's move if the thread is open (NEG-11)."""
        party = self.party
        inbound = await party.receive.receive(envelope, NEGOTIATION_TYPES)
        thread_id = inbound.header.thread_id
        context = await self._locate_thread(inbound)

        async def stored_answer(answer: bytes) -> biller_service_pb2.NegotiateResponse:
            """NEG-18: the stored reply (or error) to a retry, with the thread's current outcome."""
            response = biller_service_pb2.NegotiateResponse.FromString(answer)
            context = await party.store.thread_context(thread_id, "")
            if context.thread is not None:
                response.outcome = self.current_state(context.thread, context.bill).state.outcome
            return response

        return await idempotent_step(
            party, inbound, lambda: self._step(inbound, context, disclosure), stored_answer, found=Found(context.replay)
        )

    async def _step(
        self, inbound: Inbound[NegotiationPayload], context: ThreadContext, disclosure: bytes
    ) -> biller_service_pb2.NegotiateResponse:
        party = self.party
        thread, bill = context.thread, context.bill
        assert bill is not None, "located: the thread's bill, or the bill the opening names"
        thread_id = inbound.header.thread_id
        now = party.clock.now()
        message = thread_message(inbound.verified, Role.CONSUMER)
        self._moves.put((message.digest, Role.CONSUMER), message)  # replayed with the thread's next move
        payload = inbound.message
        committed = payload.disclosure_digest if isinstance(payload, negotiation_pb2.ThreadOpen) else b""
        disclosed = check_disclosure(committed, disclosure, message.create_time.date())
        hardship = disclosed is not None and disclosed.circumstances.hardship
        received = context.received_minor if thread is None else 0
        negotiation = self.thread_state(thread, bill, hardship_disclosed=hardship, received_minor=received)
        if thread is not None and thread.disclosure is not None:
            disclosed = negotiation_pb2.Disclosure.FromString(thread.disclosure)
        records = [self._message_record(inbound.verified, inbound.sender, now)]
        try:
            negotiation.receive(message, now)
        except RemoteProtocolError as error:
            await self.record_refusal(negotiation, thread, inbound, records[0], error=error, now=now)
            raise
        if isinstance(message.move, Open) and negotiation.expire(now):
            return await self._expired_opening(inbound, bill)
        new_thread = None
        if isinstance(message.move, Open):
            self._check_can_open(bill, context, now)
            new_thread = NewThread(
                consumer_party_id=inbound.sender,
                deadline=message.move.deadline,
                disclosure=disclosure if disclosed is not None else None,
                hardship_disclosed=negotiation.hardship_disclosed,
                max_open_threads=party.limits.max_open_threads_per_account,
            )
        reply = None
        if negotiation.state is State.BILLER_TO_MOVE:
            circumstances = disclosed.circumstances if disclosed is not None else None
            reply = self._answer(negotiation, bill, inbound.sender, thread_id, circumstances=circumstances, now=now)
            records.append(self._message_record(reply, party.party_id, now))

        response = biller_service_pb2.NegotiateResponse(
            reply=reply.envelope if reply is not None else None, outcome=negotiation.state.outcome
        )
        step = NegotiationStep(
            account_id=bill.account_id,
            bill_id=bill.bill_id,
            thread_id=thread_id,
            messages=tuple(records),
            outcome=_thread_outcome(negotiation.state),
            now=now,
            replay=party.replays.record(inbound, answer=response.SerializeToString()),
            new_thread=new_thread,
            agreement=self._agreement_facts(negotiation),
            events=self._agreement_events(negotiation, bill, inbound.sender, thread_id, now),
        )
        party.wakeups.notify(await party.store.record_negotiation_step(step))
        if new_thread is not None:
            party.metrics.negotiations_opened.inc()
        self._count_outcome(negotiation)
        log_step(
            logger,
            "negotiate",
            account=bill.account_id,
            bill=bill.bill_id,
            thread_id=thread_id,
            message_id=inbound.header.message_id,
            seq=inbound.header.sequence,
            move=type(message.move).__name__,
            reply=type(negotiation.history[-1].move).__name__ if reply is not None else None,
            outcome=negotiation.state.value,
        )
        return response

    async def _expired_opening(
        self, inbound: Inbound[NegotiationPayload], bill: BillRecord
    ) -> biller_service_pb2.NegotiateResponse:
        """NEG-11: an opening that arrives after its own deadline is answered EXPIRED, with no reply.

        No thread is kept (GetThread says NOT_FOUND, and the bill stays open to a fresh opening, NEG-3);
        only the answer is, so that a retry gets it again (HDR-12).
        """
        party = self.party
        response = biller_service_pb2.NegotiateResponse(outcome=negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED)
        await party.store.record_replay(party.replays.record(inbound, answer=response.SerializeToString()))
        log_step(
            logger,
            "negotiate-opening-expired",
            account=bill.account_id,
            bill=bill.bill_id,
            thread_id=inbound.header.thread_id,
            message_id=inbound.header.message_id,
        )
        return response

    async def _locate_thread(self, inbound: Inbound[NegotiationPayload]) -> ThreadContext:
        """AUZ-3: the move's thread (None for a new one) and its bill, on an account bound to the signer.

        The step's one store read: the thread, its bill and the bill's account (the thread's account),
        for an opening what it is judged against, and the message's replay cache entry.
        """
        party = self.party
        payload = inbound.message
        opened_bill_id = payload.bill_id if isinstance(payload, negotiation_pb2.ThreadOpen) else ""
        # The bill as presented to the signer (ENR-12): the digest its opening must name (NEG-2).
        context = await party.store.thread_context(
            inbound.header.thread_id, opened_bill_id, inbound.sender, replay_key=party.replays.key(inbound)
        )
        # AUZ-3, AUZ-5: a thread or bill of another account gets the very answer a missing one gets.
        new_thread = context.thread is None and isinstance(payload, negotiation_pb2.ThreadOpen)
        named = "bill" if new_thread else "thread"
        not_found = RemoteProtocolError(Reason.NOT_FOUND, f"no such {named} on the signer's accounts")
        if context.thread is None and not new_thread:
            raise not_found
        if context.bill is None:
            assert context.thread is None, "threads reference existing bills"
            raise not_found
        if context.account is None or context.account.consumer_party_id != inbound.sender:
            raise not_found
        if context.thread is not None and context.thread.consumer_party_id != inbound.sender:
            raise not_found  # ENR-12: an earlier holder's thread is not the new holder's
        return context

    async def record_refusal(
        self,
        negotiation: Negotiation,
        thread: ThreadRecord | None,
        inbound: Inbound[NegotiationPayload],
        record: MessageRecord,
        *,
        error: RemoteProtocolError,
        now: datetime,
    ) -> None:
        """§9.5: a violation is stored as evidence (with its error, for retries); a late move expires the thread.

        A move on a thread that already ended (THREAD_CLOSED) is refused and changes nothing, even when
        the thread ended in a protocol error: only the move that broke a rule is evidence.
        """
        party = self.party
        if thread is None:
            return
        if negotiation.state is State.PROTOCOL_ERROR and thread.outcome is ThreadOutcome.OPEN:
            log_step(
                logger,
                "negotiate-violation",
                logging.WARNING,
                account=thread.account_id,
                thread_id=record.thread_id,
                message_id=inbound.header.message_id,
                seq=record.sequence,
                reason=error.reason.name,
            )
            step = NegotiationStep(
                account_id=thread.account_id,
                bill_id=thread.bill_id,
                thread_id=thread.thread_id,
                messages=(record,),
                outcome=ThreadOutcome.PROTOCOL_ERROR,
                now=now,
                replay=party.replays.record(inbound, error=error),
            )
            await party.store.record_negotiation_step(step)
            self._count_outcome(negotiation)
        elif negotiation.state is State.EXPIRED:
            await party.store.mark_thread_expired(thread.thread_id)
            if thread.outcome is ThreadOutcome.OPEN:
                self._count_outcome(negotiation)
                log_step(logger, "negotiate-expired", account=thread.account_id, thread_id=thread.thread_id)

    def _check_can_open(self, bill: BillRecord, context: ThreadContext, now: datetime) -> None:
        """NEG-3, LIM-7 then LIM-16, after the opening passed the core's checks (re-checked when storing): the
        bills of the account's threads still open at `now` (deadline not passed), of those read with the step,
        and every thread the bill has had."""
        limits = self.party.limits
        open_bills = [bill_id for bill_id, deadline in context.open_threads if deadline >= now]
        if bill.status is not BillStatus.OPEN or bill.bill_id in open_bills:
            raise RemoteProtocolError(Reason.BILL_NOT_NEGOTIABLE, f"bill {bill.bill_id!r} is not open to negotiation")
        if len(open_bills) >= limits.max_open_threads_per_account:
            raise RemoteProtocolError(
                Reason.TOO_MANY_OPEN_THREADS, f"the account has {len(open_bills)} open threads already"
            )
        if context.threads_on_bill >= MAX_THREADS_PER_BILL:
            raise RemoteProtocolError(
                Reason.TOO_MANY_THREADS, f"bill {bill.bill_id!r} has had {MAX_THREADS_PER_BILL} threads (LIM-16)"
            )

    # --- our answer ---

    def _answer(
        self,
        negotiation: Negotiation,
        bill: BillRecord,
        consumer: str,
        thread_id: bytes,
        *,
        circumstances: negotiation_pb2.Circumstances | None,
        now: datetime,
    ) -> Verified[NegotiationPayload]:
        """The biller's signed move: Accept when the core says the offer binds us (NEG-12), else the policy's."""
        pending = negotiation.pending
        assert pending is not None, "the biller moves only when the consumer made an offer"
        if negotiation.offer_binds_biller:
            return self._sign_move(negotiation, Accept(pending.digest), consumer, thread_id, now)
        answer = "policy"
        try:
            move = self._policy_move(
                negotiation, bill, pending, circumstances=circumstances, thread_id=thread_id, now=now
            )
            answer = type(move).__name__
            return self._sign_move(negotiation, move, consumer, thread_id, now)
        except LocalProtocolError as refused:
            # The policy's answer broke a rule (NEG-16), or the policy could not even build it (terms past the
            # amount ceiling): either way a fault of ours, never the consumer's, whose offer was valid.
            log_step(
                logger,
                "policy-answer-refused",
                logging.WARNING,
                thread_id=thread_id,
                answer=answer,
                reason=refused.reason.name,
                instead="Reject",
            )
            fallback = Reject(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY)
            return self._sign_move(negotiation, fallback, consumer, thread_id, now)

    def _policy_move(
        self,
        negotiation: Negotiation,
        bill: BillRecord,
        pending: PendingOffer,
        *,
        circumstances: negotiation_pb2.Circumstances | None,
        thread_id: bytes,
        now: datetime,
    ) -> Move:
        """The policy's answer to the pending offer; a Reject instead of one dated before today (NEG-23)."""
        offers = [m.move.terms for m in negotiation.history[:-1] if isinstance(m.move, Open | Offer)]
        context = OfferContext(
            bill=negotiation.bill,
            account_id=bill.account_id,
            offer=pending.terms,
            round=negotiation.rounds,
            max_rounds=negotiation.max_rounds,
            previous_offers=tuple(offers),
            circumstances=circumstances,
            now=now,
        )
        move = _move_of(self.party.policy.decide(context), pending.digest)
        late = self.first_late_date(move, pending.terms, now)
        if late is None:
            return move
        log_step(  # a deal the household could not keep on the day it is made (NEG-23)
            logger,
            "policy-answer-late",
            logging.WARNING,
            thread_id=thread_id,
            answer=type(move).__name__,
            date=late.isoformat(),
            instead="Reject",
        )
        return Reject(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY, "no terms dated from today fit the policy")

    def _sign_move(
        self, negotiation: Negotiation, move: Move, consumer: str, thread_id: bytes, now: datetime
    ) -> Verified[NegotiationPayload]:
        """Sign our move through the core, which refuses one the rules would not allow (NEG-16)."""
        party = self.party
        if isinstance(move, Reject) and (
            move.reason not in negotiation_pb2.RejectReason.values()
            or move.reason == negotiation_pb2.REJECT_REASON_UNSPECIFIED
            or len(move.note) > MAX_TEXT_CHARS
        ):
            raise LocalProtocolError(Reason.MALFORMED_PAYLOAD, "a Reject needs a defined reason and a short note")
        envelope, message = sign_move(
            negotiation,
            move,
            key=party.key,
            sender=party.party_id,
            recipient=consumer,
            thread_id=thread_id,
            now=now,
            lifetime=party.message_lifetime,
        )
        self._moves.put((message.digest, Role.BILLER), message)  # replayed with the thread's next move
        return Verified(_stored_payload(envelope), envelope, message.digest, party.key.keyid)

    # --- what a step stores ---

    @staticmethod
    def _message_record(verified: Verified[NegotiationPayload], sender: str, now: datetime) -> MessageRecord:
        header = verified.header
        return MessageRecord(
            thread_id=header.thread_id,
            sequence=header.sequence,
            envelope=verified.envelope.SerializeToString(),
            digest=verified.digest,
            sender=sender,
            payload_type=verified.envelope.payload_type,
            message_id=header.message_id,
            received_at=now,
        )

    @staticmethod
    def _agreement_facts(negotiation: Negotiation) -> AgreementFacts | None:
        agreement, terms = negotiation.agreement, negotiation.agreed_terms
        if agreement is None or terms is None:
            return None
        offer, accept = agreement
        return AgreementFacts(offer.digest, accept.digest, terms.total.minor)

    def _agreement_events(
        self, negotiation: Negotiation, bill: BillRecord, consumer: str, thread_id: bytes, now: datetime
    ) -> tuple[PendingEvent, ...]:
        """EVT-2: ARRANGEMENT_ACTIVE when the thread ends AGREED."""
        agreement, terms = negotiation.agreement, negotiation.agreed_terms
        if agreement is None or terms is None:
            return ()
        count = len(terms.schedule)
        text = f"Arrangement agreed: {terms.total} in {count} payment{'s' if count > 1 else ''}"
        text += f", first on {terms.schedule[0].due_date.isoformat()}."
        event = self.party.events.pending_event(
            bill.account_id,
            event_pb2.EVENT_KIND_ARRANGEMENT_ACTIVE,
            now,
            party_id=consumer,  # the thread's party's log (ENR-12)
            bill_id=bill.bill_id,
            thread_id=thread_id,
            amount=terms.total,
            related_digest=agreement[1].digest,
            message=text,
        )
        return (event,)

    def _count_outcome(self, negotiation: Negotiation) -> None:
        """Metrics for a step that ended the thread: its outcome, and the agreement's kind."""
        if not negotiation.state.terminal:
            return
        metrics = self.party.metrics
        metrics.negotiations.labels(negotiation.state.value).inc()
        terms = negotiation.agreed_terms
        if terms is not None:
            metrics.agreements.labels(terms.kind.name.lower()).inc()


__all__ = ["NegotiationPhase"]
