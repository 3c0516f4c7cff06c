"""Stateful property test of the negotiation core (PROTOCOL.md §9).

Hypothesis drives random legal and illegal move sequences against a
`Negotiation` observer and checks each answer against an independent model of
the rules: one mover at a time, nothing after an outcome, rounds and deadline
enforced, refused moves change nothing, and an agreement always pairs the last
offer with an acceptance by the other party.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import timedelta
from itertools import pairwise

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.negotiation import (
    Accept,
    Move,
    Negotiation,
    Offer,
    Open,
    Reject,
    Role,
    State,
    ThreadMessage,
    Withdraw,
)
from agent.protocol.terms import Money, Terms
from parley.v1 import negotiation_pb2
from tests.fixtures import BILL, BILL_DIGEST, OPEN_TIME, terms_catalogue

# Each catalogue entry: (terms, whether they are inside the bill's advertised options).
CATALOGUE = terms_catalogue()
terms_choice = st.sampled_from(CATALOGUE)
ONE_CENT = Money.of(1, "EUR")


def _digest(sequence: int, salt: int) -> bytes:
    return hashlib.sha256(f"{sequence}/{salt}".encode()).digest()


class NegotiationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.negotiation = Negotiation(bill=BILL, bill_digest=BILL_DIGEST)
        self.now = OPEN_TIME
        self.salt = 0
        # The model: what an independent reading of §9 says the thread is.
        self.outcome: State = State.IDLE
        self.offers: list[tuple[Role, bytes, bool]] = []  # (by, digest, inside options)
        self.max_rounds = 0
        self.deadline = OPEN_TIME

    def _message(
        self, sender: Role, move: Move, *, sequence: int | None = None, previous: bytes | None = None
    ) -> ThreadMessage:
        self.salt += 1
        seq = self.negotiation.next_sequence if sequence is None else sequence
        return ThreadMessage(
            sender=sender,
            move=move,
            sequence=seq,
            previous_digest=self.negotiation.last_digest if previous is None else previous,
            digest=_digest(seq, self.salt),
            create_time=self.now,
        )

    def _expect_refused(self, message: ThreadMessage, reason: Reason) -> None:
        before = (self.negotiation.state, list(self.negotiation.history), self.negotiation.rounds)
        with pytest.raises(RemoteProtocolError) as refused:
            self.negotiation.receive(message, self.now)
        assert refused.value.reason is reason
        after = (self.negotiation.state, list(self.negotiation.history), self.negotiation.rounds)
        if reason is not Reason.NEGOTIATION_DEADLINE_PASSED:
            assert after == before, "a refused move must change nothing"

    @initialize(
        offer=terms_choice,
        max_rounds=st.integers(min_value=1, max_value=6),
        minutes=st.integers(min_value=1, max_value=600),
    )
    def open_thread(self, offer: tuple[Terms, bool], max_rounds: int, minutes: int) -> None:
        terms, inside = offer
        deadline = OPEN_TIME + timedelta(minutes=minutes)
        message = self._message(Role.CONSUMER, Open(terms, max_rounds, deadline, BILL_DIGEST))
        assert self.negotiation.receive(message, self.now) is State.BILLER_TO_MOVE
        self.outcome, self.max_rounds, self.deadline = State.BILLER_TO_MOVE, max_rounds, deadline
        self.offers.append((Role.CONSUMER, message.digest, inside))

    @rule(seconds=st.integers(min_value=0, max_value=3 * 3600))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(
        sender=st.sampled_from(Role),
        kind=st.sampled_from(["offer", "accept", "accept-stale", "reject", "withdraw"]),
        offer=terms_choice,
    )
    def move(self, sender: Role, kind: str, offer: tuple[Terms, bool]) -> None:
        terms, inside = offer
        last_by, last_digest, last_inside = self.offers[-1]
        moves: dict[str, Move] = {
            "offer": Offer(terms),
            "accept": Accept(last_digest),
            "accept-stale": Accept(self.offers[0][1] if len(self.offers) > 1 else b"\x00" * 32),
            "reject": Reject(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY),
            "withdraw": Withdraw(),
        }
        message = self._message(sender, moves[kind])
        expected = self._model(sender, kind, last_by, last_inside)
        if expected in (Reason.THREAD_CLOSED, Reason.NEGOTIATION_DEADLINE_PASSED):
            self._expect_refused(message, expected)
            if expected is Reason.NEGOTIATION_DEADLINE_PASSED:
                self.outcome = State.EXPIRED
            return
        if isinstance(expected, Reason):
            with pytest.raises(RemoteProtocolError) as violation:
                self.negotiation.receive(message, self.now)
            assert violation.value.reason is expected
            self.outcome = State.PROTOCOL_ERROR
            assert self.negotiation.history[-1] is message, "the offending message is kept as evidence"
            return
        assert self.negotiation.receive(message, self.now) is expected
        self.outcome = expected
        if kind == "offer":
            self.offers.append((sender, message.digest, inside))

    def _model(self, sender: Role, kind: str, last_by: Role, last_inside: bool) -> State | Reason:
        if self.outcome not in (State.BILLER_TO_MOVE, State.CONSUMER_TO_MOVE):
            return Reason.THREAD_CLOSED
        if self.now > self.deadline:
            return Reason.NEGOTIATION_DEADLINE_PASSED
        turn = Role.BILLER if self.outcome is State.BILLER_TO_MOVE else Role.CONSUMER
        if sender is not turn:
            return Reason.OUT_OF_TURN
        if kind == "offer" and len(self.offers) >= self.max_rounds:
            return Reason.ROUND_LIMIT_EXCEEDED
        if kind == "accept-stale":
            return Reason.ACCEPT_DIGEST_MISMATCH
        if sender is Role.BILLER and last_by is Role.CONSUMER and last_inside and kind != "accept":
            return Reason.OPTIONS_NOT_HONOURED
        return {
            "offer": State.CONSUMER_TO_MOVE if sender is Role.BILLER else State.BILLER_TO_MOVE,
            "accept": State.AGREED,
            "reject": State.REJECTED,
            "withdraw": State.WITHDRAWN,
        }[kind]

    @rule(offset=st.sampled_from([-1, 1, 2]))
    def out_of_sequence(self, offset: int) -> None:
        if self.outcome.terminal:
            return
        seq = self.negotiation.next_sequence + offset
        turn = self.negotiation.state.mover
        assert turn is not None
        self._expect_refused(self._message(turn, Withdraw(), sequence=seq), Reason.SEQUENCE_MISMATCH)

    @precondition(lambda self: not self.outcome.terminal)
    @rule()
    def wrong_previous_digest(self) -> None:
        turn = self.negotiation.state.mover
        assert turn is not None
        message = self._message(turn, Withdraw(), previous=b"\x01" * 32)
        self._expect_refused(message, Reason.PREVIOUS_DIGEST_MISMATCH)

    @rule(sender=st.sampled_from(Role))
    def offer_with_broken_arithmetic(self, sender: Role) -> None:
        terms, _ = CATALOGUE[0]
        broken = replace(terms, schedule=(replace(terms.schedule[0], amount=terms.schedule[0].amount + ONE_CENT),))
        if self.outcome.terminal:
            expected = Reason.THREAD_CLOSED
        elif self.now > self.deadline:
            expected, self.outcome = Reason.NEGOTIATION_DEADLINE_PASSED, State.EXPIRED
        else:
            expected = Reason.SCHEDULE_SUM_MISMATCH
        self._expect_refused(self._message(sender, Offer(broken)), expected)

    @rule()
    def second_opening(self) -> None:
        terms, _ = CATALOGUE[0]
        message = self._message(Role.CONSUMER, Open(terms, 1, self.deadline, BILL_DIGEST))
        expected = Reason.THREAD_CLOSED if self.outcome.terminal else Reason.WRONG_PAYLOAD_TYPE
        self._expect_refused(message, expected)

    @invariant()
    def matches_model(self) -> None:
        assert self.negotiation.state is self.outcome

    @invariant()
    def one_mover_at_a_time(self) -> None:
        state = self.negotiation.state
        assert (state.mover is None) == state.terminal
        if not state.terminal:
            assert state.mover is Role.at(self.negotiation.next_sequence)

    @invariant()
    def thread_is_a_chain(self) -> None:
        history = self.negotiation.history
        assert [m.sequence for m in history] == list(range(len(history)))
        for before, after in pairwise(history):
            assert after.previous_digest == before.digest

    @invariant()
    def rounds_within_limit(self) -> None:
        assert self.negotiation.rounds <= max(self.max_rounds, 1)

    @invariant()
    def agreement_pairs_last_offer_with_acceptance(self) -> None:
        agreement = self.negotiation.agreement
        assert (agreement is not None) == (self.negotiation.state is State.AGREED)
        if agreement is not None:
            offer, accept = agreement
            assert isinstance(accept.move, Accept)
            assert accept.move.offer_digest == offer.digest == self.offers[-1][1]
            assert accept.sender is offer.sender.other
            assert accept.previous_digest == offer.digest


NegotiationMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
TestNegotiationMachine = NegotiationMachine.TestCase
