"""Example tests of the negotiation core's rules and of the wire mapping (PROTOCOL.md §9)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.moves import move_of
from agent.protocol.negotiation import Accept, Negotiation, Offer, Open, Reject, Role, State, ThreadMessage, Withdraw
from parley.v1 import negotiation_pb2
from tests.fixtures import BILL, BILL_DIGEST, OPEN_TIME, terms_catalogue

INSIDE, OUTSIDE = (next(t for t, inside in terms_catalogue() if inside is want) for want in (True, False))
DEADLINE = OPEN_TIME + timedelta(hours=1)


def message(n: Negotiation, sender: Role, move: object, digest: bytes, **overrides: object) -> ThreadMessage:
    fields: dict[str, object] = {
        "sender": sender,
        "move": move,
        "sequence": n.next_sequence,
        "previous_digest": n.last_digest,
        "digest": digest,
        "create_time": OPEN_TIME,
    }
    fields.update(overrides)
    return ThreadMessage(**fields)  # type: ignore[arg-type]


def opened(role: Role | None = Role.BILLER, terms: object = OUTSIDE, max_rounds: int = 3) -> Negotiation:
    n = Negotiation(bill=BILL, bill_digest=BILL_DIGEST, role=role)
    opening = message(n, Role.CONSUMER, Open(terms, max_rounds, DEADLINE, BILL_DIGEST), b"o" * 32)  # type: ignore[arg-type]
    (n.send if role is Role.CONSUMER else n.receive)(opening, OPEN_TIME)
    return n


def test_biller_counter_then_consumer_accepts_gives_the_agreement() -> None:
    biller = opened()
    assert biller.send(message(biller, Role.BILLER, Offer(INSIDE), b"c" * 32), OPEN_TIME) is State.CONSUMER_TO_MOVE
    assert biller.receive(message(biller, Role.CONSUMER, Accept(b"c" * 32), b"a" * 32), OPEN_TIME) is State.AGREED
    assert biller.agreed_terms == INSIDE
    assert biller.agreement is not None
    assert [m.digest for m in biller.agreement] == [b"c" * 32, b"a" * 32]
    assert biller.state.outcome == negotiation_pb2.NEGOTIATION_OUTCOME_AGREED


def test_local_violations_raise_local_error_and_change_nothing() -> None:
    biller = opened(terms=INSIDE)
    before = (biller.state, list(biller.history))
    with pytest.raises(LocalProtocolError) as refused:
        biller.send(message(biller, Role.BILLER, Reject(negotiation_pb2.REJECT_REASON_OTHER), b"r" * 32), OPEN_TIME)
    assert refused.value.reason is Reason.OPTIONS_NOT_HONOURED
    assert (biller.state, biller.history) == before
    with pytest.raises(LocalProtocolError) as wrong_side:
        biller.send(message(biller, Role.CONSUMER, Withdraw(), b"w" * 32), OPEN_TIME)
    assert wrong_side.value.reason is Reason.WRONG_SENDER


def test_receiving_our_own_role_is_refused() -> None:
    consumer = opened(role=Role.CONSUMER)
    with pytest.raises(RemoteProtocolError) as refused:
        consumer.receive(message(consumer, Role.CONSUMER, Withdraw(), b"w" * 32), OPEN_TIME)
    assert refused.value.reason is Reason.WRONG_SENDER


@pytest.mark.parametrize(
    ("open_move", "sender", "reason"),
    [
        (Open(OUTSIDE, 0, DEADLINE, BILL_DIGEST), Role.CONSUMER, Reason.NEGOTIATION_LIMITS_INVALID),
        (Open(OUTSIDE, 11, DEADLINE, BILL_DIGEST), Role.CONSUMER, Reason.NEGOTIATION_LIMITS_INVALID),
        (Open(OUTSIDE, 3, OPEN_TIME, BILL_DIGEST), Role.CONSUMER, Reason.NEGOTIATION_LIMITS_INVALID),
        (
            Open(OUTSIDE, 3, OPEN_TIME + timedelta(days=7, seconds=1), BILL_DIGEST),
            Role.CONSUMER,
            Reason.NEGOTIATION_LIMITS_INVALID,
        ),
        (Open(OUTSIDE, 3, DEADLINE, b"\x00" * 32), Role.CONSUMER, Reason.BILL_DIGEST_MISMATCH),
        (Open(OUTSIDE, 3, DEADLINE, BILL_DIGEST), Role.BILLER, Reason.OUT_OF_TURN),
        (Offer(OUTSIDE), Role.CONSUMER, Reason.WRONG_PAYLOAD_TYPE),
    ],
)
def test_invalid_openings_create_no_thread(open_move: object, sender: Role, reason: Reason) -> None:
    n = Negotiation(bill=BILL, bill_digest=BILL_DIGEST)
    with pytest.raises(RemoteProtocolError) as refused:
        n.receive(message(n, sender, open_move, b"o" * 32), OPEN_TIME)
    assert refused.value.reason is reason
    assert n.state is State.IDLE
    assert n.history == []


def test_deadline_boundary_and_expiry_by_time_alone() -> None:
    n = opened(role=None)
    n.receive(message(n, Role.BILLER, Offer(OUTSIDE), b"c" * 32), DEADLINE)  # at the deadline: still in time
    assert not n.expire(DEADLINE)
    assert n.expire(DEADLINE + timedelta(microseconds=1))
    assert n.state is State.EXPIRED
    with pytest.raises(RemoteProtocolError) as closed:
        n.receive(message(n, Role.CONSUMER, Withdraw(), b"w" * 32), DEADLINE)
    assert closed.value.reason is Reason.THREAD_CLOSED


def test_violation_is_recorded_as_evidence() -> None:
    n = opened(role=Role.CONSUMER, max_rounds=1)
    offending = message(n, Role.BILLER, Offer(OUTSIDE), b"x" * 32)
    with pytest.raises(RemoteProtocolError) as violation:
        n.receive(offending, OPEN_TIME)
    assert violation.value.reason is Reason.ROUND_LIMIT_EXCEEDED
    assert n.state is State.PROTOCOL_ERROR
    assert n.history[-1] is offending
    assert n.violation is not None
    assert n.violation.reason is Reason.ROUND_LIMIT_EXCEEDED


def test_move_of_refuses_undefined_reject_reasons_and_missing_terms() -> None:
    with pytest.raises(RemoteProtocolError) as undefined:
        move_of(negotiation_pb2.Reject(reason=99))  # type: ignore[arg-type]
    assert undefined.value.reason is Reason.MALFORMED_PAYLOAD
    with pytest.raises(RemoteProtocolError) as no_terms:
        move_of(negotiation_pb2.Offer())
    assert no_terms.value.reason is Reason.INVALID_TERMS
    with pytest.raises(RemoteProtocolError) as long_note:
        move_of(negotiation_pb2.Withdraw(note="x" * 201))
    assert long_note.value.reason is Reason.MALFORMED_PAYLOAD
