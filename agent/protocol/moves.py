"""Translation between negotiation payloads (parley.v1) and the core's moves.

The negotiation core reasons about small frozen dataclasses; the wire carries
protobuf messages in envelopes. This module is the only bridge between the two,
in both directions, so the core never sees protobuf and the agents never build
negotiation payloads by hand.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.limits import MAX_TEXT_CHARS
from agent.protocol.messages import Verified, new_header, read_time, seal, to_timestamp
from agent.protocol.negotiation import Accept, Move, Negotiation, Offer, Open, Reject, Role, ThreadMessage, Withdraw
from agent.protocol.terms import Terms
from parley.v1 import envelope_pb2, header_pb2
from parley.v1 import negotiation_pb2 as pb

NegotiationPayload = pb.ThreadOpen | pb.Offer | pb.Accept | pb.Reject | pb.Withdraw
NEGOTIATION_TYPES: tuple[type[NegotiationPayload], ...] = (pb.ThreadOpen, pb.Offer, pb.Accept, pb.Reject, pb.Withdraw)


def _terms(payload: pb.ThreadOpen | pb.Offer) -> Terms:
    if not payload.HasField("terms"):
        raise RemoteProtocolError(Reason.INVALID_TERMS, "the offer carries no terms")
    try:
        return Terms.from_proto(payload.terms)
    except LocalProtocolError as error:
        raise error.as_remote() from error


def _note(note: str) -> str:
    if len(note) > MAX_TEXT_CHARS:
        raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, f"note is longer than {MAX_TEXT_CHARS} characters")
    return note


def move_of(payload: NegotiationPayload) -> Move:
    """The core move a verified negotiation payload expresses."""
    if isinstance(payload, pb.ThreadOpen):
        deadline = read_time(payload, "deadline", Reason.NEGOTIATION_LIMITS_INVALID)
        return Open(_terms(payload), payload.max_rounds, deadline, payload.bill_digest, payload.disclosure_digest)
    if isinstance(payload, pb.Offer):
        return Offer(_terms(payload))
    if isinstance(payload, pb.Accept):
        return Accept(payload.offer_digest)
    if isinstance(payload, pb.Reject):
        # Unknown enum numbers parse as plain integers, so ENV-7 cannot catch them here.
        if payload.reason not in pb.RejectReason.values() or payload.reason == pb.REJECT_REASON_UNSPECIFIED:
            raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, f"reject reason {payload.reason} is not defined")
        return Reject(payload.reason, _note(payload.note))
    return Withdraw(_note(payload.note))


def thread_message(verified: Verified[NegotiationPayload], sender: Role) -> ThreadMessage:
    """A verified envelope as the core sees it; `sender` is the role of the party whose keys verified it."""
    header = verified.header
    return ThreadMessage(
        sender=sender,
        move=move_of(verified.message),
        sequence=header.sequence,
        previous_digest=header.previous_digest,
        digest=verified.digest,
        create_time=read_time(header, "create_time", Reason.MALFORMED_HEADER),
    )


def payload_of(move: Move, header: header_pb2.Header, *, bill_id: str = "") -> NegotiationPayload:
    """The payload that carries `move` under `header` (bill_id is needed for an opening only)."""
    if isinstance(move, Open):
        return pb.ThreadOpen(
            header=header,
            bill_id=bill_id,
            bill_digest=move.bill_digest,
            max_rounds=move.max_rounds,
            deadline=to_timestamp(move.deadline),
            terms=move.terms.to_proto(),
            disclosure_digest=move.disclosure_digest,
        )
    if isinstance(move, Offer):
        return pb.Offer(header=header, terms=move.terms.to_proto())
    if isinstance(move, Accept):
        return pb.Accept(header=header, offer_digest=move.offer_digest)
    if isinstance(move, Reject):
        return pb.Reject(header=header, reason=move.reason, note=move.note)
    return pb.Withdraw(header=header, note=move.note)


def sign_move(
    negotiation: Negotiation,
    move: Move,
    *,
    key: SigningKey,
    sender: str,
    recipient: str,
    thread_id: bytes,
    now: datetime,
    lifetime: timedelta,
    bill_id: str = "",
) -> tuple[envelope_pb2.Envelope, ThreadMessage]:
    """Sign our next move in `negotiation`'s thread and record it there (LocalProtocolError if not allowed).

    The header follows the thread (next sequence, last digest); the core checks the move
    before it is recorded, so an envelope is only returned for a move the rules allow.
    """
    assert negotiation.role is not None, "an observer does not move"
    header = new_header(
        sender=sender,
        recipient=recipient,
        thread_id=thread_id,
        sequence=negotiation.next_sequence,
        previous_digest=negotiation.last_digest,
        now=now,
        lifetime=lifetime,
    )
    envelope = seal(payload_of(move, header, bill_id=bill_id), key)
    message = ThreadMessage(negotiation.role, move, header.sequence, header.previous_digest, digest(envelope), now)
    negotiation.send(message, now)
    return envelope, message
