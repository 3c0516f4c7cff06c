"""Both parties negotiate with real keys through the sans-I/O stack, and the bundle verifies offline."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent.protocol.agreement import Bundle, verify_bundle
from agent.protocol.dsse import digest
from agent.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, make_key_set
from agent.protocol.messages import (
    CheckedEnvelope,
    check_envelope,
    new_header,
    new_message_id,
    open_envelope,
    seal,
)
from agent.protocol.moves import NEGOTIATION_TYPES, sign_move, thread_message
from agent.protocol.negotiation import Accept, Move, Negotiation, Offer, Open, Role, State
from parley.v1 import bill_pb2, envelope_pb2
from tests.fixtures import BILL, OPEN_TIME, terms_catalogue

HOUR = timedelta(hours=1)


def party(party_id: str) -> tuple[SigningKey, KeyChain]:
    key = SigningKey.generate()
    start = OPEN_TIME - timedelta(days=10)
    envelope = make_key_set(
        party_id=party_id,
        version=1,
        keys=[KeyEntry(key.public_key, start, start + timedelta(days=365))],
        signer=key,
        previous=None,
        create_time=start,
        expire_time=start + timedelta(days=365),
    )
    return key, KeyChain.verify([envelope], pin=digest(envelope))


def test_signed_negotiation_round_trip_and_offline_verification() -> None:
    (biller_key, biller), (consumer_key, consumer) = party("biller:test"), party("consumer:test")
    bill_message = bill_pb2.Bill(
        header=new_header(
            sender=biller.party_id,
            recipient=consumer.party_id,
            thread_id=new_message_id(),
            sequence=0,
            previous_digest=b"",
            now=OPEN_TIME - HOUR,
            lifetime=HOUR,
        )
    )
    bill_message.MergeFrom(BILL.to_proto())
    bill = seal(bill_message, biller_key)
    outside, inside = (next(t for t, ok in terms_catalogue() if ok is want) for want in (False, True))

    consumer_side = Negotiation(bill=BILL, bill_digest=digest(bill), role=Role.CONSUMER)
    biller_side = Negotiation(bill=BILL, bill_digest=digest(bill), role=Role.BILLER)
    sides = {
        Role.CONSUMER: (consumer_side, consumer_key, consumer, biller),
        Role.BILLER: (biller_side, biller_key, biller, consumer),
    }
    thread_id, thread = new_message_id(), []

    def move(role: Role, the_move: Move, minutes: int) -> envelope_pb2.Envelope:
        mine, key, me, peer = sides[role]
        theirs = sides[role.other][0]
        now = OPEN_TIME + timedelta(minutes=minutes)
        envelope, _ = sign_move(
            mine,
            the_move,
            key=key,
            sender=me.party_id,
            recipient=peer.party_id,
            thread_id=thread_id,
            now=now,
            lifetime=HOUR,
            bill_id=BILL.bill_id,
        )
        verified = open_envelope(envelope, NEGOTIATION_TYPES, sender_keys=me, recipient=peer.party_id, now=now)
        theirs.receive(thread_message(verified, role), now)
        thread.append(envelope)
        return envelope

    move(Role.CONSUMER, Open(outside, 3, OPEN_TIME + HOUR, digest(bill)), 0)
    with pytest.raises(LocalProtocolError) as refused:  # the core will not let the biller accept a stale digest
        sign_move(
            biller_side,
            Accept(b"\x00" * 32),
            key=biller_key,
            sender=biller.party_id,
            recipient=consumer.party_id,
            thread_id=thread_id,
            now=OPEN_TIME,
            lifetime=HOUR,
        )
    assert refused.value.reason is Reason.ACCEPT_DIGEST_MISMATCH
    counter = move(Role.BILLER, Offer(inside), 1)
    move(Role.CONSUMER, Accept(digest(counter)), 2)
    assert consumer_side.state is biller_side.state is State.AGREED

    agreement = verify_bundle(
        Bundle(
            key_sets={biller.party_id: biller.envelopes, consumer.party_id: consumer.envelopes},
            bill=bill,
            thread=thread,
        ),
        pins={biller.party_id: biller.fingerprint},
    )
    assert agreement.terms == inside
    assert agreement.offer.digest == digest(counter)
    assert agreement.accept.header.sender == consumer.party_id


def test_a_checked_envelope_is_made_only_by_the_check_and_opens_without_a_second_check() -> None:
    biller_key, biller = party("biller:test")
    bill_message = bill_pb2.Bill(
        header=new_header(
            sender=biller.party_id,
            recipient="consumer:test",
            thread_id=new_message_id(),
            sequence=0,
            previous_digest=b"",
            now=OPEN_TIME,
            lifetime=HOUR,
        )
    )
    bill_message.MergeFrom(BILL.to_proto())
    envelope = seal(bill_message, biller_key)

    checked = check_envelope(envelope, (bill_pb2.Bill,))
    assert checked.payload_class is bill_pb2.Bill
    assert checked.keyid == biller_key.keyid
    with pytest.raises(TypeError, match="check_envelope"):
        CheckedEnvelope(envelope, checked.signature, bill_pb2.Bill)
    with pytest.raises(RemoteProtocolError) as wrong_type:
        check_envelope(envelope, NEGOTIATION_TYPES)
    assert wrong_type.value.reason is Reason.WRONG_PAYLOAD_TYPE
    verified = open_envelope(checked, sender_keys=biller, recipient="consumer:test", now=OPEN_TIME)
    assert verified.message.bill_id == BILL.bill_id
    assert verified.digest == digest(envelope)
