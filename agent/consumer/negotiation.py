"""Negotiation (PROTOCOL.md §9): a thread on a bill, driven through the sans-I/O core until it ends.

Our moves are checked by the core before they are signed (NEG-16), the biller's replies judged by the
same rules, and a rule the biller breaks ends the thread PROTOCOL_ERROR with the reply kept as evidence
(NEG-17). Each message we sign is stored before it is sent and resent byte for byte when the answer is
lost (NEG-18). A stored thread is rebuilt with the core's one replay (`Negotiation.replay`); the
thread's state changes only through the core's methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from agent.consumer.approvals import Approvals
from agent.consumer.bills import Bills
from agent.consumer.instalments import committed_instalments, negotiation_payload, owed_facts
from agent.consumer.mandate import Mandate
from agent.consumer.party import BillerSession, Party
from agent.consumer.plugins import (
    OpeningContext,
    ResponseContext,
    Strategy,
)
from agent.consumer.receive import Receiver, envelope_of
from agent.consumer.results import NegotiationResult, ReceivedBill
from agent.consumer.sessions import Sessions
from agent.logs import log_step
from agent.protocol import negotiation as core
from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.answers import AcceptOffer, CounterOffer, Escalate, RejectOffer
from agent.protocol.disclosures import check_disclosure
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, ProtocolError, Reason, RemoteProtocolError
from agent.protocol.limits import DISCLOSURE_SALT_BYTES, MAX_TEXT_CHARS, THREAD_ID_BYTES
from agent.protocol.messages import Verified
from agent.protocol.moves import sign_move, thread_message
from agent.protocol.terms import Terms
from agent.stores.base import ConsumerStore, ConsumerThreadRecord, MessageRecord, ThreadOutcome, ThreadUpdate
from agent.transport.client import is_transient
from agent.transport.status import CallError
from parley.v1 import envelope_pb2, negotiation_pb2

logger = logging.getLogger("parley.consumer")

DECLINED_NOTE = "The account holder declined these terms."
NO_ROUNDS_NOTE = "No offers are left in this thread."
_REJECT_REASONS = frozenset(negotiation_pb2.RejectReason.values()) - {negotiation_pb2.REJECT_REASON_UNSPECIFIED}
# The biller's refusals of our move after which reading the thread back may show it moved on (NEG-22).
_RESYNC_REASONS = (
    Reason.SEQUENCE_MISMATCH,
    Reason.PREVIOUS_DIGEST_MISMATCH,
    Reason.THREAD_CLOSED,
    Reason.MESSAGE_EXPIRED,
)


@dataclass
class _Run:
    """A thread being driven: the core's state plus what the agent needs beside it."""

    session: BillerSession
    bill: ReceivedBill
    thread_id: bytes
    negotiation: core.Negotiation
    envelopes: list[envelope_pb2.Envelope]
    my_last: Terms
    awaiting: bool
    disclosure: bytes | None
    violation: ProtocolError | None = None
    refusal: ProtocolError | CallError | None = None

    @property
    def deadline(self) -> datetime:
        assert self.negotiation.deadline is not None
        return self.negotiation.deadline


def _outcome(state: core.State) -> ThreadOutcome:
    return ThreadOutcome(state.value) if state.terminal else ThreadOutcome.OPEN


def stored_error(pair: tuple[str, str] | None) -> ProtocolError | None:
    """A violation or refusal as the store keeps it (reason name, detail), as an error again."""
    if pair is None:
        return None
    reason = Reason.__members__.get(pair[0], Reason.INTERNAL_ERROR)
    return RemoteProtocolError(reason, pair[1])


@dataclass(frozen=True)
class NegotiationSettings:
    """What our openings ask for (lowered to the biller's announced limits, LIM-10)."""

    max_rounds: int
    negotiation_time: timedelta


class Negotiator:
    """The negotiation phase: `negotiate` a bill, read a thread's result, export its bundle."""

    def __init__(
        self,
        party: Party,
        store: ConsumerStore,
        receiver: Receiver,
        sessions: Sessions,
        bills: Bills,
        *,
        strategy: Strategy,
        mandate: Mandate,
        approvals: Approvals,
        settings: NegotiationSettings,
    ) -> None:
        self._party = party
        self._store = store
        self._receiver = receiver
        self._sessions = sessions
        self._bills = bills
        self._strategy = strategy
        self._mandate = mandate
        self._approvals = approvals
        self._settings = settings

    async def negotiate(self, biller: str, bill_id: str) -> NegotiationResult:
        """See `ConsumerAgent.negotiate` (called under the bill's lock)."""
        session = await self._sessions.get(biller)
        await self._sessions.require(session, "negotiation")
        bill = await self._bills.get(session, bill_id)
        run = await self._resume(session, bill)
        if run is None:
            run = await self._start(session, bill)
            if run is None:
                return NegotiationResult(biller, bill.account_id, bill_id, None, None)
        return await self._drive(run)

    async def result(self, thread_id: bytes) -> NegotiationResult:
        record = await self._store.get_thread(thread_id)
        if record is None:
            raise LookupError(f"no thread {thread_id.hex()}")
        return await self._result_of(record)

    async def export_bundle(self, thread_id: bytes) -> Bundle:
        """See `ConsumerAgent.export_bundle`."""
        record = await self._store.get_thread(thread_id)
        if record is None:
            raise LookupError(f"no thread {thread_id.hex()}")
        if record.outcome is not ThreadOutcome.AGREED:
            raise ValueError(f"thread {thread_id.hex()} is {record.outcome.value}, not agreed")
        bill = await self._store.get_bill(record.biller_party_id, record.bill_id)
        assert bill is not None, "a thread's bill is stored before the thread"
        biller_chain = [envelope_of(data) for data in await self._store.link_key_sets(record.biller_party_id)]
        return Bundle(
            key_sets={
                record.biller_party_id: biller_chain,
                self._party.party_id: list(self._party.key_chain.envelopes),
            },
            bill=envelope_of(bill.envelope),
            thread=[envelope_of(message.envelope) for message in record.messages],
        )

    # --- Opening and resuming ---

    async def _start(self, session: BillerSession, bill: ReceivedBill) -> _Run | None:
        """Open a thread: the strategy's opening, approved if outside the mandate, stored, then sent.

        The thread restates the bill's outstanding balance (TRM-11, PAY-16), as our own record of what we
        paid of the bill computes it (`owed_facts`): the strategy, the mandate and the core judge our terms
        and the biller's against it, so after a half-paid plan broke nothing already paid is offered again."""
        party = self._party
        facts = await owed_facts(self._store, bill)
        bill = dataclasses.replace(bill, facts=facts)
        committed = await committed_instalments(self._store, excluding=[(session.biller, facts.bill_id)])
        context = OpeningContext(facts, party.now().date(), session.biller, bill.account_id, committed)
        terms, circumstances = self._strategy.opening(context)
        violations = self._mandate.violations(terms, facts)
        if circumstances is not None and not self._mandate.allow_disclosure:
            violations.append("it discloses your circumstances to the biller")
        if violations:
            request = self._approvals.request("open", bill, terms, violations, circumstances=circumstances)
            if not await self._approvals.ask(request):
                log_step(logger, "opening-declined", biller=session.biller, bill=facts.bill_id)
                return None
        disclosure = b""
        if circumstances is not None:
            disclosure = negotiation_pb2.Disclosure(
                salt=secrets.token_bytes(DISCLOSURE_SALT_BYTES), circumstances=circumstances.to_proto()
            ).SerializeToString(deterministic=True)
            try:  # the receiver's rules (PRV-3, PRV-9), applied to ours before anything is signed or stored
                check_disclosure(hashlib.sha256(disclosure).digest(), disclosure, party.now().date())
            except RemoteProtocolError as error:
                raise LocalProtocolError(error.reason, f"the strategy's disclosure: {error.detail}") from error
        negotiation = core.Negotiation(
            bill=facts,
            bill_digest=bill.digest,
            role=core.Role.CONSUMER,
            limits=session.limits,
            hardship_disclosed=circumstances is not None and circumstances.hardship,
        )
        now = party.now()
        thread_id = secrets.token_bytes(THREAD_ID_BYTES)
        opening = core.Open(
            terms,
            min(self._settings.max_rounds, session.limits.max_rounds),
            now + min(self._settings.negotiation_time, session.limits.max_negotiation_time),
            bill.digest,
            hashlib.sha256(disclosure).digest() if disclosure else b"",  # PRV-2: exactly the bytes sent
        )
        envelope, message = sign_move(
            negotiation,
            opening,
            key=party.key,
            sender=party.party_id,
            recipient=session.biller,
            thread_id=thread_id,
            now=now,
            lifetime=party.lifetime,
            bill_id=facts.bill_id,
        )
        await self._store.create_thread(
            ConsumerThreadRecord(
                thread_id=thread_id,
                biller_party_id=session.biller,
                account_id=bill.account_id,
                bill_id=facts.bill_id,
                outcome=ThreadOutcome.OPEN,
                deadline=opening.deadline,
                opened_at=now,
                hardship_disclosed=negotiation.hardship_disclosed,
                awaiting_answer=True,
                disclosure=disclosure or None,
                violation=None,
                refusal=None,
                messages=(self._message_record(envelope, message.digest, party.party_id, now),),
            )
        )
        log_step(logger, "thread-opened", biller=session.biller, bill=facts.bill_id, thread_id=thread_id)
        return _Run(session, bill, thread_id, negotiation, [envelope], terms, True, disclosure or None)

    async def _resume(self, session: BillerSession, bill: ReceivedBill) -> _Run | None:
        """The thread on the bill that can go on — open, or ended by our move that the biller has not
        acknowledged yet — rebuilt from the store (None if there is none)."""
        for record in reversed(await self._store.threads(session.biller, bill.facts.bill_id)):
            # An opening the biller refused leaves a thread without messages.
            if record.messages and (record.outcome is ThreadOutcome.OPEN or record.awaiting_answer):
                return self._rebuild(session, bill, record)
        return None

    def _rebuild(self, session: BillerSession, bill: ReceivedBill, record: ConsumerThreadRecord) -> _Run:
        """The stored thread (already verified) through the core's one replay, each message at its own time,
        against the balance its opening restated (TRM-11), whatever was paid since."""
        envelopes: list[envelope_pb2.Envelope] = []
        messages: list[tuple[core.ThreadMessage, datetime]] = []
        my_last: Terms | None = None
        for stored in record.messages:
            envelope = envelope_of(stored.envelope)
            payload = negotiation_payload(envelope)
            verified = Verified(payload, envelope, stored.digest, envelope.signatures[0].keyid)
            ours = stored.sender == self._party.party_id
            messages.append(
                (thread_message(verified, core.Role.CONSUMER if ours else core.Role.BILLER), stored.received_at)
            )
            if ours and isinstance(payload, negotiation_pb2.ThreadOpen | negotiation_pb2.Offer):
                my_last = Terms.from_proto(payload.terms)
            envelopes.append(envelope)
        assert my_last is not None, "a stored thread starts with our opening"
        opening = negotiation_payload(envelopes[0])
        assert isinstance(opening, negotiation_pb2.ThreadOpen), "a stored thread starts with our opening"
        bill = dataclasses.replace(bill, facts=bill.facts.restated_by(Terms.from_proto(opening.terms).principal))
        negotiation = core.Negotiation.replay(
            bill=bill.facts,
            bill_digest=bill.digest,
            role=core.Role.CONSUMER,
            messages=messages,
            limits=session.limits,
            hardship_disclosed=record.hardship_disclosed,
            recorded_expired=record.outcome is ThreadOutcome.EXPIRED,
        )
        return _Run(
            session,
            bill,
            record.thread_id,
            negotiation,
            envelopes,
            my_last,
            record.awaiting_answer,
            record.disclosure,
            violation=stored_error(record.violation),
            refusal=stored_error(record.refusal),
        )

    # --- Driving the thread ---

    async def _drive(self, run: _Run) -> NegotiationResult:
        """Move the thread on until it ends or the biller refuses our move."""
        run.refusal = None
        while True:
            if run.awaiting:
                await self._exchange(run)
                if run.refusal is not None:
                    break
                continue
            state = run.negotiation.state
            if state.terminal:
                break
            if state is core.State.BILLER_TO_MOVE:
                # Our move is answered but no reply came with the answer: read the thread (NEG-22).
                if not await self._resync(run):
                    error = RemoteProtocolError(Reason.INTERNAL_ERROR, "the biller applied our move but did not reply")
                    await self._refuse(run, error, drop=False)
                    break
                continue
            if await self._expire(run):
                continue
            move = await self._decide(run)
            if move is None:
                await self._expire(run, force=True)
                continue
            await self._send(run, move)
        record = await self._store.get_thread(run.thread_id)
        assert record is not None
        return await self._result_of(record, refusal=run.refusal)

    async def _decide(self, run: _Run) -> core.Move | None:
        """Our next move: the strategy's answer, checked against the mandate (None: no time left to move)."""
        negotiation = run.negotiation
        pending = negotiation.pending
        assert pending is not None
        assert pending.by is core.Role.BILLER
        facts, biller = run.bill.facts, run.session.biller
        committed = await committed_instalments(self._store, excluding=[(biller, facts.bill_id)])
        rounds_left = negotiation.max_rounds - negotiation.rounds
        context = ResponseContext(
            facts,
            pending.terms,
            run.my_last,
            rounds_left,
            self._party.now().date(),
            biller,
            run.bill.account_id,
            committed,
        )
        answer = self._strategy.respond(context)
        if isinstance(answer, AcceptOffer | Escalate):
            violations = self._mandate.violations(pending.terms, facts)
            accept = core.Accept(pending.digest)
            if violations or isinstance(answer, Escalate):
                reason = answer.reason if isinstance(answer, Escalate) else ""
                return await self._if_approved(
                    accept, run, "accept", pending.terms, violations, reason=reason, in_reply_to=pending.digest
                )
            return accept
        if isinstance(answer, CounterOffer):
            if rounds_left <= 0:
                log_step(logger, "counter-without-rounds", logging.WARNING, thread_id=run.thread_id, move="Withdraw")
                return core.Withdraw(NO_ROUNDS_NOTE)
            violations = self._mandate.violations(answer.terms, facts)
            offer = core.Offer(answer.terms)
            if violations:
                return await self._if_approved(
                    offer, run, "counter", answer.terms, violations, in_reply_to=pending.digest
                )
            return offer
        if isinstance(answer, RejectOffer):
            why = answer.reason if answer.reason in _REJECT_REASONS else negotiation_pb2.REJECT_REASON_OTHER
            return core.Reject(why, answer.note[:MAX_TEXT_CHARS])
        return core.Withdraw(answer.note[:MAX_TEXT_CHARS])

    async def _if_approved(
        self,
        move: core.Move,
        run: _Run,
        action: Literal["counter", "accept"],
        terms: Terms,
        violations: Sequence[str],
        *,
        reason: str = "",
        in_reply_to: bytes | None = None,
    ) -> core.Move | None:
        """The move once the user approved it (NEG-20); a Withdraw when they declined; None when no
        answer came while the thread could still move."""
        request = self._approvals.request(
            action,
            run.bill,
            terms,
            violations,
            reason=reason,
            thread_id=run.thread_id,
            deadline=run.deadline,
            in_reply_to=in_reply_to,
        )
        approved = await self._approvals.ask(request)
        if approved is None:
            return None
        return move if approved else core.Withdraw(DECLINED_NOTE)

    async def _send(self, run: _Run, move: core.Move) -> None:
        """Sign our move (the core refuses one the rules do not allow, NEG-16), store it, mark it unanswered."""
        now = self._party.now()
        if now > run.deadline - self._party.limits.max_clock_skew:  # NEG-21: too late to move safely
            await self._expire(run, force=True)
            return
        try:
            envelope, message = self._sign(run, move, now)
        except LocalProtocolError as error:
            if isinstance(move, core.Withdraw):
                raise
            log_step(
                logger,
                "move-not-allowed",
                logging.WARNING,
                thread_id=run.thread_id,
                move=type(move).__name__,
                reason=error.reason.name,
                instead="Withdraw",
            )
            envelope, message = self._sign(run, core.Withdraw(""), now)
        record = self._message_record(envelope, message.digest, self._party.party_id, now)
        await self._store.update_thread(
            ThreadUpdate(run.thread_id, (record,), _outcome(run.negotiation.state), awaiting_answer=True)
        )
        run.envelopes.append(envelope)
        run.awaiting = True
        if isinstance(message.move, core.Offer):
            run.my_last = message.move.terms

    def _sign(self, run: _Run, move: core.Move, now: datetime) -> tuple[envelope_pb2.Envelope, core.ThreadMessage]:
        party = self._party
        return sign_move(
            run.negotiation,
            move,
            key=party.key,
            sender=party.party_id,
            recipient=run.session.biller,
            thread_id=run.thread_id,
            now=now,
            lifetime=party.lifetime,
        )

    async def _exchange(self, run: _Run) -> None:
        """Send our last message (again, byte for byte, NEG-18) and take the biller's answer."""
        opening = len(run.envelopes) == 1
        disclosure = run.disclosure if opening and run.disclosure is not None else b""
        try:
            response = await run.session.client.negotiate(run.envelopes[-1], disclosure)
        except CallError as error:
            await self._refused(run, error)
            return
        clear = run.disclosure is not None
        run.disclosure = None  # the opening is answered: the disclosure is needed no more (PRV-7)
        if response.HasField("reply"):
            await self._take_reply(run, response.reply, stored=False, clear_disclosure=clear)
            return
        state = run.negotiation.state
        if state is core.State.BILLER_TO_MOVE and response.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED:
            await self._expire(run, force=True)  # NEG-11: the deadline came before the biller could reply
            return
        # Our move is applied; when it called for a reply that did not come, `_drive` reads the thread.
        await self._store.update_thread(
            ThreadUpdate(run.thread_id, (), _outcome(state), awaiting_answer=False, clear_disclosure=clear)
        )
        run.awaiting = False

    async def _refused(self, run: _Run, error: CallError) -> None:
        """The biller's error for our last message (§13, ERR-6)."""
        if error.reason is Reason.NEGOTIATION_DEADLINE_PASSED:
            await self._expire(run, force=True)
            return
        if is_transient(error) or error.reason in _RESYNC_REASONS:
            if await self._resync(run):
                return
            if is_transient(error):
                raise error  # stored as unanswered: the next negotiate() sends it again
        await self._refuse(run, error)

    async def _refuse(self, run: _Run, error: ProtocolError | CallError, *, drop: bool = True) -> None:
        """The thread cannot go on now; report why. With `drop`, the biller refused our last message
        (NEG-15: it changed nothing there), so it leaves our copy too and the thread stands where the
        biller has it: the next `negotiate` asks the strategy again."""
        log_step(
            logger,
            "thread-stopped",
            logging.WARNING,
            thread_id=run.thread_id,
            reason=error.reason.name,
            detail=error.detail,
        )
        await self._store.update_thread(
            ThreadUpdate(
                run.thread_id,
                (),
                ThreadOutcome.OPEN if drop else _outcome(run.negotiation.state),
                awaiting_answer=False,
                refusal=(error.reason.name, error.detail),
                clear_disclosure=True,
                drop_from=len(run.envelopes) - 1 if drop else None,
            )
        )
        record = await self._store.get_thread(run.thread_id)
        assert record is not None
        if drop and record.messages:
            rebuilt = self._rebuild(run.session, run.bill, record)
            run.negotiation, run.envelopes, run.my_last = rebuilt.negotiation, rebuilt.envelopes, rebuilt.my_last
        run.awaiting = False
        run.disclosure = None
        run.refusal = error

    async def _take_reply(
        self, run: _Run, envelope: envelope_pb2.Envelope, *, stored: bool, clear_disclosure: bool = False
    ) -> None:
        """Verify the biller's move and put it through the core (NEG-15); a violation is kept as evidence."""
        verified = await self._receiver.open_reply(run.session, envelope, run.thread_id, stored=stored)
        message = thread_message(verified, core.Role.BILLER)
        now = self._party.now()
        record = self._message_record(envelope, verified.digest, run.session.biller, now)
        negotiation = run.negotiation
        try:
            negotiation.receive(message, now)
        except RemoteProtocolError as error:
            if negotiation.state is core.State.PROTOCOL_ERROR:  # NEG-17
                log_step(
                    logger,
                    "biller-broke-rule",
                    logging.WARNING,
                    thread_id=run.thread_id,
                    reason=error.reason.name,
                    detail=error.detail,
                    evidence="kept",
                )
                await self._store.update_thread(
                    ThreadUpdate(
                        run.thread_id,
                        (record,),
                        ThreadOutcome.PROTOCOL_ERROR,
                        awaiting_answer=False,
                        violation=(error.reason.name, error.detail),
                        clear_disclosure=True,
                    )
                )
                run.envelopes.append(envelope)
                run.awaiting = False
                run.violation = error
                return
            if negotiation.state is core.State.EXPIRED:
                await self._expire(run, force=True)
                return
            raise
        await self._store.update_thread(
            ThreadUpdate(
                run.thread_id,
                (record,),
                _outcome(negotiation.state),
                awaiting_answer=False,
                clear_disclosure=clear_disclosure or negotiation.state.terminal,
            )
        )
        run.envelopes.append(envelope)
        run.awaiting = False

    async def _resync(self, run: _Run) -> bool:
        """NEG-22: read the thread back and take what the biller recorded beyond our copy; True if it moved on."""
        session = run.session
        query = self._party.query(session.biller, run.bill.account_id, thread_id=run.thread_id)
        try:
            response = await session.client.get_thread(query)
        except CallError as error:
            log_step(logger, "get-thread-failed", thread_id=run.thread_id, reason=error.reason.name)
            return False
        theirs, ours = list(response.messages), run.envelopes
        for position, (their, our) in enumerate(zip(theirs, ours, strict=False)):
            if digest(their) != digest(our):
                raise RemoteProtocolError(
                    Reason.PREVIOUS_DIGEST_MISMATCH, f"the biller's copy of the thread differs at sequence {position}"
                )
        if len(theirs) < len(ours):  # the biller never applied our last message
            if response.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED:
                await self._expire(run, force=True)
                return True
            return False
        clear = run.disclosure is not None
        run.disclosure = None
        if len(theirs) > len(ours):
            await self._take_reply(run, theirs[len(ours)], stored=True, clear_disclosure=clear)
            return True
        if response.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED and not run.negotiation.state.terminal:
            await self._expire(run, force=True)
            return True
        await self._store.update_thread(
            ThreadUpdate(
                run.thread_id, (), _outcome(run.negotiation.state), awaiting_answer=False, clear_disclosure=clear
            )
        )
        progressed = run.awaiting
        run.awaiting = False
        return progressed

    async def _expire(self, run: _Run, *, force: bool = False) -> bool:
        """NEG-6: the thread is EXPIRED once its deadline has passed (or, forced, when it cannot move in time)."""
        negotiation = run.negotiation
        if negotiation.state.terminal:
            return False
        if not negotiation.expire(self._party.now()):
            if not force:
                return False
            negotiation.close_as_expired()
        await self._store.update_thread(
            ThreadUpdate(run.thread_id, (), ThreadOutcome.EXPIRED, awaiting_answer=False, clear_disclosure=True)
        )
        run.awaiting = False
        run.disclosure = None
        return True

    async def _result_of(
        self, record: ConsumerThreadRecord, refusal: ProtocolError | CallError | None = None
    ) -> NegotiationResult:
        bundle = agreement = None
        if record.outcome is ThreadOutcome.AGREED:
            bundle = await self.export_bundle(record.thread_id)
            link = await self._store.get_link(record.biller_party_id)
            assert link is not None
            # The agreement as anyone would verify it offline, with both identities pinned (BND-8).
            pins = {record.biller_party_id: link.fingerprint, self._party.party_id: self._party.key_chain.fingerprint}
            agreement = verify_bundle(bundle, pins=pins)
        return NegotiationResult(
            biller_party_id=record.biller_party_id,
            account_id=record.account_id,
            bill_id=record.bill_id,
            thread_id=record.thread_id,
            outcome=record.outcome,
            messages=tuple(envelope_of(message.envelope) for message in record.messages),
            agreement=agreement,
            violation=stored_error(record.violation),
            refusal=refusal if refusal is not None else stored_error(record.refusal),
            _bundle=bundle,
        )

    @staticmethod
    def _message_record(
        envelope: envelope_pb2.Envelope, message_digest: bytes, sender: str, now: datetime
    ) -> MessageRecord:
        header = negotiation_payload(envelope).header
        return MessageRecord(
            thread_id=header.thread_id,
            sequence=header.sequence,
            envelope=envelope.SerializeToString(),
            digest=message_digest,
            sender=sender,
            payload_type=envelope.payload_type,
            message_id=header.message_id,
            received_at=now,
        )


__all__ = ["DECLINED_NOTE", "NO_ROUNDS_NOTE", "NegotiationSettings", "Negotiator", "stored_error"]
