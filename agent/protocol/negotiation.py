"""The sans-I/O negotiation core: alternating offers on one bill (PROTOCOL.md §9).

What belongs here, and only here: the states of a negotiation thread, whose
turn it is, the transition table, and every negotiation rule — round limit,
deadline, accept-names-the-last-offer, advertised options binding. No sockets,
no database, no clock reads: the caller passes `now` and already-verified
messages (signatures, headers and replay are checked in `messages.py` and by
the store). Both agents and the offline verifier drive the same `Negotiation`.

How a bad move is treated depends on what is wrong with it (NEG-15):

- it does not fit the thread (terminal thread, wrong sequence or previous
  digest, opening in the wrong place, invalid terms, invalid opening limits):
  refused, nothing changes — it may be a stale retry or a malformed message;
- it fits the thread but breaks a negotiation rule (out of turn, past the round
  limit, accepting something other than the last offer, not honouring the
  advertised options): the thread ends in PROTOCOL_ERROR, and the offending
  message is kept in the history as evidence;
- it arrives after the deadline: refused, and the thread ends EXPIRED.

Our own moves (`send`) are checked by the same rules but a violation raises
`LocalProtocolError` and changes nothing: we simply do not send it.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from agent.protocol.errors import LocalProtocolError, ProtocolError, Reason, RemoteProtocolError
from agent.protocol.limits import DEFAULT_LIMITS, Limits
from agent.protocol.terms import BillFacts, Terms, validate_against_bill, validate_terms, within_advertised_options
from parley.v1 import negotiation_pb2


class Role(enum.Enum):
    """The two parties. The consumer moves at even sequences, the biller at odd (NEG-7)."""

    CONSUMER = "consumer"
    BILLER = "biller"

    @property
    def other(self) -> Role:
        return Role.BILLER if self is Role.CONSUMER else Role.CONSUMER

    @staticmethod
    def at(sequence: int) -> Role:
        """Who moves at a given thread sequence."""
        return Role.CONSUMER if sequence % 2 == 0 else Role.BILLER


class State(enum.Enum):
    """A thread is IDLE until opened, then someone's turn, then one outcome (NEG-13)."""

    IDLE = "idle"
    BILLER_TO_MOVE = "biller_to_move"
    CONSUMER_TO_MOVE = "consumer_to_move"
    AGREED = "agreed"
    REJECTED = "rejected"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"
    PROTOCOL_ERROR = "protocol_error"

    @property
    def terminal(self) -> bool:
        return self not in (State.IDLE, State.BILLER_TO_MOVE, State.CONSUMER_TO_MOVE)

    @property
    def mover(self) -> Role | None:
        """Whose turn it is, or None once the thread has an outcome."""
        return _MOVER.get(self)

    @property
    def outcome(self) -> negotiation_pb2.NegotiationOutcome.ValueType:
        return _OUTCOME[self]


# --- Moves: what a message says, without its envelope ------------------------


@dataclass(frozen=True)
class Open:
    """The consumer's opening: fixes the rules of the thread and makes offer 1."""

    terms: Terms
    max_rounds: int
    deadline: datetime
    bill_digest: bytes
    disclosure_digest: bytes = b""


@dataclass(frozen=True)
class Offer:
    """A proposal of terms; a counter-offer is just another Offer."""

    terms: Terms


@dataclass(frozen=True)
class Accept:
    """Acceptance of the other party's last offer, named by its digest."""

    offer_digest: bytes


@dataclass(frozen=True)
class Reject:
    reason: negotiation_pb2.RejectReason.ValueType
    note: str = ""


@dataclass(frozen=True)
class Withdraw:
    note: str = ""


Move = Open | Offer | Accept | Reject | Withdraw


@dataclass(frozen=True)
class ThreadMessage:
    """One verified message of a thread: the move plus the envelope facts the rules need."""

    sender: Role
    move: Move
    sequence: int
    previous_digest: bytes
    digest: bytes
    create_time: datetime


# --- The transition table ----------------------------------------------------
# (state, move) -> next state. The mover is whoever's turn the state says it is;
# anything not listed is refused. A round is one offer; the opening's is round 1.

TRANSITIONS: dict[tuple[State, type[Move]], State] = {
    (State.IDLE, Open): State.BILLER_TO_MOVE,
    (State.BILLER_TO_MOVE, Offer): State.CONSUMER_TO_MOVE,
    (State.BILLER_TO_MOVE, Accept): State.AGREED,
    (State.BILLER_TO_MOVE, Reject): State.REJECTED,
    (State.BILLER_TO_MOVE, Withdraw): State.WITHDRAWN,
    (State.CONSUMER_TO_MOVE, Offer): State.BILLER_TO_MOVE,
    (State.CONSUMER_TO_MOVE, Accept): State.AGREED,
    (State.CONSUMER_TO_MOVE, Reject): State.REJECTED,
    (State.CONSUMER_TO_MOVE, Withdraw): State.WITHDRAWN,
}

_MOVER = {State.IDLE: Role.CONSUMER, State.BILLER_TO_MOVE: Role.BILLER, State.CONSUMER_TO_MOVE: Role.CONSUMER}

_OUTCOME = {
    State.IDLE: negotiation_pb2.NEGOTIATION_OUTCOME_UNSPECIFIED,
    State.BILLER_TO_MOVE: negotiation_pb2.NEGOTIATION_OUTCOME_OPEN,
    State.CONSUMER_TO_MOVE: negotiation_pb2.NEGOTIATION_OUTCOME_OPEN,
    State.AGREED: negotiation_pb2.NEGOTIATION_OUTCOME_AGREED,
    State.REJECTED: negotiation_pb2.NEGOTIATION_OUTCOME_REJECTED,
    State.WITHDRAWN: negotiation_pb2.NEGOTIATION_OUTCOME_WITHDRAWN,
    State.EXPIRED: negotiation_pb2.NEGOTIATION_OUTCOME_EXPIRED,
    State.PROTOCOL_ERROR: negotiation_pb2.NEGOTIATION_OUTCOME_PROTOCOL_ERROR,
}


class _Refused(ProtocolError):
    """The move does not fit the thread: refuse it, change nothing."""


class _Violation(ProtocolError):
    """The move fits the thread but breaks a rule: the thread ends in PROTOCOL_ERROR."""


@dataclass(frozen=True)
class PendingOffer:
    """The offer on the table: who made it, in which message, with what terms."""

    by: Role
    digest: bytes
    terms: Terms


@dataclass
class Negotiation:
    """One negotiation thread as seen by `role` (or by an observer, for offline replay)."""

    bill: BillFacts
    bill_digest: bytes
    role: Role | None = None
    limits: Limits = DEFAULT_LIMITS
    hardship_disclosed: bool = False
    state: State = State.IDLE
    history: list[ThreadMessage] = field(default_factory=list)
    rounds: int = 0
    max_rounds: int = 0
    deadline: datetime | None = None
    pending: PendingOffer | None = None
    violation: ProtocolError | None = None
    _within_options: tuple[tuple[bytes, bool], bool] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def next_sequence(self) -> int:
        return len(self.history)

    @property
    def last_digest(self) -> bytes:
        return self.history[-1].digest if self.history else b""

    @property
    def agreement(self) -> tuple[ThreadMessage, ThreadMessage] | None:
        """The accepted offer's message and the acceptance, once AGREED."""
        if self.state is not State.AGREED:
            return None
        accept = self.history[-1]
        assert isinstance(accept.move, Accept)
        offer = next(m for m in self.history if m.digest == accept.move.offer_digest)
        return offer, accept

    @property
    def agreed_terms(self) -> Terms | None:
        agreement = self.agreement
        if agreement is None:
            return None
        move = agreement[0].move
        assert isinstance(move, Open | Offer)
        return move.terms

    def expire(self, now: datetime) -> bool:
        """Let time pass: an open thread whose deadline has gone becomes EXPIRED (NEG-6)."""
        if not self.state.terminal and self.deadline is not None and now > self.deadline:
            self.state = State.EXPIRED
            return True
        return False

    def close_as_expired(self) -> bool:
        """The store recorded this thread as EXPIRED (a move past the deadline was refused, NEG-15 5b):
        end it the same way here. False if it had already ended otherwise."""
        if self.state.terminal:
            return False
        self.state = State.EXPIRED
        return True

    @classmethod
    def replay(
        cls,
        *,
        bill: BillFacts,
        bill_digest: bytes,
        role: Role,
        messages: Iterable[tuple[ThreadMessage, datetime]],
        limits: Limits = DEFAULT_LIMITS,
        hardship_disclosed: bool = False,
        recorded_expired: bool = False,
    ) -> Negotiation:
        """The one replay of a stored thread: every message, already verified, judged as it was when received.

        Our own messages are sent, the peer's received; a stored violation ends the thread there
        (PROTOCOL_ERROR), as it did when the message arrived; `recorded_expired` (the store says the thread
        EXPIRED) closes it as EXPIRED, which no message shows. Both agents rebuild their state this
        way; an offline verifier uses `receive` with an observer instead (`agent.protocol.agreement`).
        """
        negotiation = cls(
            bill=bill, bill_digest=bill_digest, role=role, limits=limits, hardship_disclosed=hardship_disclosed
        )
        for message, received_at in messages:
            if message.sender is role:
                negotiation.send(message, received_at)
            else:
                with contextlib.suppress(RemoteProtocolError):  # the violation's evidence: the thread ends here
                    negotiation.receive(message, received_at)
        if recorded_expired:  # a move past the deadline expired it (NEG-15 5b): closed for good (NEG-14)
            negotiation.close_as_expired()
        return negotiation

    def send(self, message: ThreadMessage, now: datetime) -> State:
        """Check and record one of our own moves; a violation changes nothing."""
        if self.role is None or message.sender is not self.role:
            raise LocalProtocolError(Reason.WRONG_SENDER, "send() is for the negotiation's own role")
        try:
            self._check(message, now)
        except ProtocolError as error:
            raise LocalProtocolError(error.reason, error.detail) from error
        return self._advance(message)

    def receive(self, message: ThreadMessage, now: datetime) -> State:
        """Check and record the peer's move (or any move, for an observer)."""
        if self.role is not None and message.sender is self.role:
            raise RemoteProtocolError(Reason.WRONG_SENDER, "a received move must come from the other party")
        try:
            self._check(message, now)
        except _Violation as error:
            self.history.append(message)
            self.state = State.PROTOCOL_ERROR
            self.violation = error
            raise RemoteProtocolError(error.reason, error.detail) from error
        except ProtocolError as error:
            raise RemoteProtocolError(error.reason, error.detail) from error
        return self._advance(message)

    # --- the rules, in the order the spec gives them (NEG-15) ---

    def _check(self, message: ThreadMessage, now: datetime) -> None:
        move = message.move
        if self.state.terminal:
            raise _Refused(Reason.THREAD_CLOSED, f"thread already ended {self.state.value}")
        if message.sequence != self.next_sequence:
            raise _Refused(Reason.SEQUENCE_MISMATCH, f"expected sequence {self.next_sequence}, got {message.sequence}")
        if message.previous_digest != self.last_digest:
            raise _Refused(Reason.PREVIOUS_DIGEST_MISMATCH, "previous_digest is not the thread's last message")
        if (self.state is State.IDLE) != isinstance(move, Open):
            raise _Refused(Reason.WRONG_PAYLOAD_TYPE, "a thread starts with exactly one ThreadOpen, at sequence 0")
        if isinstance(move, Open):
            self._check_opening(message.sender, move, message.create_time)
        elif self.expire(now):
            raise _Refused(Reason.NEGOTIATION_DEADLINE_PASSED, f"the deadline {self.deadline} has passed")
        if isinstance(move, Open | Offer):
            self._check_terms(move.terms)
        if message.sender is not self.state.mover:
            raise _Violation(Reason.OUT_OF_TURN, f"it is the {self.state.mover}'s turn")
        if isinstance(move, Offer) and self.rounds >= self.max_rounds:
            raise _Violation(Reason.ROUND_LIMIT_EXCEEDED, f"the thread allows {self.max_rounds} offers")
        if isinstance(move, Accept) and (self.pending is None or move.offer_digest != self.pending.digest):
            raise _Violation(Reason.ACCEPT_DIGEST_MISMATCH, "accept must name the other party's last offer")
        if message.sender is Role.BILLER and not isinstance(move, Accept) and self._pending_within_options():
            raise _Violation(Reason.OPTIONS_NOT_HONOURED, "an offer inside the advertised options must be accepted")

    def _check_opening(self, sender: Role, opening: Open, create_time: datetime) -> None:
        if sender is not Role.CONSUMER:
            raise _Refused(Reason.OUT_OF_TURN, "only the consumer opens a thread")
        if opening.bill_digest != self.bill_digest:
            raise _Refused(Reason.BILL_DIGEST_MISMATCH, "the opening names another version of the bill")
        if not 1 <= opening.max_rounds <= self.limits.max_rounds:
            raise _Refused(Reason.NEGOTIATION_LIMITS_INVALID, f"max_rounds must be 1..{self.limits.max_rounds}")
        # A difference, not create_time + limit: offline (a bundle), create_time is whatever the sender's own key
        # set allowed, up to the year 9999, where the sum overflows.
        if not timedelta(0) < opening.deadline - create_time <= self.limits.max_negotiation_time:
            raise _Refused(
                Reason.NEGOTIATION_LIMITS_INVALID,
                f"deadline must be after the opening and within {self.limits.max_negotiation_time}",
            )

    def _check_terms(self, terms: Terms) -> None:
        try:
            validate_terms(terms, self.limits)
            validate_against_bill(terms, self.bill)
        except LocalProtocolError as error:
            raise _Refused(error.reason, error.detail) from error

    @property
    def offer_binds_biller(self) -> bool:
        """NEG-12: the consumer's offer on the table is inside the advertised options, so the biller
        must accept it (the one place the rule is decided; the biller agent asks here)."""
        return self._pending_within_options()

    def _pending_within_options(self) -> bool:
        pending = self.pending
        if pending is None or pending.by is not Role.CONSUMER:
            return False
        # Asked twice per biller move (offer_binds_biller, then the check of the move itself): judged once per
        # offer. Its terms passed validate_terms and validate_against_bill (this bill, these limits) when it
        # was received (_check_terms), so only the options are left to judge (within_options, step 1 holds).
        key = (pending.digest, self.hardship_disclosed)
        if self._within_options is None or self._within_options[0] != key:
            inside = within_advertised_options(pending.terms, self.bill, hardship_disclosed=self.hardship_disclosed)
            self._within_options = (key, inside)
        return self._within_options[1]

    def _advance(self, message: ThreadMessage) -> State:
        move = message.move
        self.state = TRANSITIONS[(self.state, type(move))]
        self.history.append(message)
        if isinstance(move, Open):
            self.max_rounds, self.deadline = move.max_rounds, move.deadline
        if isinstance(move, Open | Offer):
            self.rounds += 1
            self.pending = PendingOffer(message.sender, message.digest, move.terms)
        return self.state
