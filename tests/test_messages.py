"""Payload types, headers and the receive path `open_envelope` (PROTOCOL.md §3, §5)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from hypothesis import assume, given
from hypothesis import strategies as st

from agent.protocol.dsse import digest, sign_envelope
from agent.protocol.errors import ProtocolError, Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, make_key_set
from agent.protocol.limits import DEFAULT_LIMITS, Limits
from agent.protocol.messages import (
    PAYLOAD_TYPES,
    Verified,
    check_sequence,
    find_unknown_fields,
    new_header,
    new_message_id,
    open_envelope,
    read_time,
    seal,
)
from parley.v1 import envelope_pb2, header_pb2, negotiation_pb2, terms_pb2

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
SKEW = DEFAULT_LIMITS.max_clock_skew
CONSUMER, BILLER = "consumer.example", "biller.example"
OLD, KEY, STRANGER, BILLER_KEY = (SigningKey.from_seed(bytes([n]) * 32) for n in range(11, 15))
UNKNOWN_99 = b"\x98\x06\x01"  # field 99, varint 1
THREAD = bytes(range(16))
AnyMessage = TypeVar("AnyMessage", bound=Message)


def _consumer_keys() -> KeyChain:
    """Version 1 (T0 - 30 days): OLD, and KEY from T0 - 20 days. Version 2 (T0 - 10 days): KEY only,
    and OLD revoked from T0 - 15 days."""
    until = T0 + 365 * DAY
    v1 = make_key_set(
        party_id=CONSUMER,
        version=1,
        keys=[KeyEntry(OLD.public_key, T0 - 30 * DAY, until), KeyEntry(KEY.public_key, T0 - 20 * DAY, until)],
        signer=OLD,
        previous=None,
        create_time=T0 - 30 * DAY,
        expire_time=until,
    )
    chain = KeyChain.verify([v1])
    v2 = make_key_set(
        party_id=CONSUMER,
        version=2,
        keys=[KeyEntry(KEY.public_key, T0 - 20 * DAY, until)],
        signer=KEY,
        previous=chain.latest,
        create_time=T0 - 10 * DAY,
        expire_time=until,
        revocations={OLD.keyid: T0 - 15 * DAY},
    )
    return chain.extend(v2)


CONSUMER_KEYS = _consumer_keys()
BILLER_KEYS = KeyChain.verify(
    [
        make_key_set(
            party_id=BILLER,
            version=1,
            keys=[KeyEntry(BILLER_KEY.public_key, T0 - DAY, T0 + DAY)],
            signer=BILLER_KEY,
            previous=None,
            create_time=T0 - DAY,
            expire_time=T0 + DAY,
        )
    ]
)


def offer(created: datetime = T0, lifetime: timedelta = HOUR, **header_fields: object) -> negotiation_pb2.Offer:
    eur = terms_pb2.Money(currency_code="EUR", amount_minor=12_345)
    message = negotiation_pb2.Offer(
        header=new_header(
            sender=CONSUMER,
            recipient=BILLER,
            thread_id=THREAD,
            sequence=2,
            previous_digest=bytes(32),
            now=created,
            lifetime=lifetime,
        ),
        terms=terms_pb2.Terms(
            kind=terms_pb2.TERMS_KIND_INSTALMENT_PLAN,
            principal=eur,
            total=eur,
            lines=[terms_pb2.Line(kind=terms_pb2.LINE_KIND_FEE, description="fee", amount=eur)] * 2,
            schedule=[terms_pb2.Instalment(due_date="2026-04-01", amount=eur)],
        ),
    )
    header: Message = message.header
    for name, value in header_fields.items():
        if value is None:
            header.ClearField(name)
        else:
            setattr(header, name, value)
    return message


def with_unknown(message: AnyMessage) -> AnyMessage:
    """`message` carrying an extra field 99, as a newer or malicious sender would write it."""
    return type(message).FromString(message.SerializeToString() + UNKNOWN_99)


def open_offer(
    envelope: envelope_pb2.Envelope,
    expected: tuple[type[Message], ...] = (negotiation_pb2.Offer,),
    *,
    now: datetime | None = T0,
    limits: Limits = DEFAULT_LIMITS,
) -> Verified[Message]:
    return open_envelope(envelope, expected, sender_keys=CONSUMER_KEYS, recipient=BILLER, now=now, limits=limits)


def refusal(action: Callable[[], object]) -> Reason:
    with pytest.raises(RemoteProtocolError) as caught:
        action()
    return caught.value.reason


def test_payload_types_are_every_signed_message() -> None:
    assert len(PAYLOAD_TYPES) == 16
    for name, cls in PAYLOAD_TYPES.items():
        assert cls.DESCRIPTOR.full_name == name
        header = cls.DESCRIPTOR.fields_by_number[1]
        assert header.name == "header"
        assert header.message_type is header_pb2.Header.DESCRIPTOR


def test_new_header() -> None:
    header = new_header(
        sender=CONSUMER, recipient=BILLER, thread_id=THREAD, sequence=3, previous_digest=b"", now=T0, lifetime=HOUR
    )
    assert header.protocol_version == 1
    assert len(header.message_id) == 16
    assert header.create_time.ToDatetime(tzinfo=UTC) == T0
    assert header.expire_time.ToDatetime(tzinfo=UTC) == T0 + HOUR
    assert new_message_id() != new_message_id()
    with pytest.raises(ValueError, match="timezone-aware"):
        new_header(
            sender=CONSUMER,
            recipient=BILLER,
            thread_id=THREAD,
            sequence=0,
            previous_digest=b"",
            now=datetime(2026, 3, 1),
            lifetime=HOUR,
        )


def test_seal_and_open() -> None:
    message = offer()
    envelope = seal(message, KEY)
    assert envelope.payload_type == "parley.v1.Offer"
    assert envelope.payload == message.SerializeToString(deterministic=True)
    verified = open_offer(envelope)
    assert verified.message == message
    assert verified.header == message.header
    assert verified.envelope is envelope
    assert verified.digest == digest(envelope)
    assert verified.keyid == KEY.keyid


def test_an_old_message_by_a_rotated_out_key_still_opens_offline() -> None:
    assert open_offer(seal(offer(created=T0 - 20 * DAY), OLD), now=None).keyid == OLD.keyid


def _two_signatures() -> envelope_pb2.Envelope:
    envelope = seal(offer(), KEY)
    envelope.signatures.append(envelope.signatures[0])
    return envelope


def _tampered() -> envelope_pb2.Envelope:
    envelope = seal(offer(), KEY)
    envelope.payload += b"\x00"
    return envelope


def _nested_unknown(select: Callable[[negotiation_pb2.Offer], Message]) -> negotiation_pb2.Offer:
    message = offer()
    nested = select(message)
    nested.CopyFrom(with_unknown(nested))
    return message


def _out_of_range_create_time() -> negotiation_pb2.Offer:
    message = offer()
    message.header.create_time.seconds = 10**13
    return message


# Each case breaks one rule; they are listed in open_envelope's order of checks.
CASES: list[tuple[str, Callable[[], envelope_pb2.Envelope], dict[str, Any], Reason]] = [
    ("too large", lambda: seal(offer(), KEY), {"limits": Limits(max_envelope_bytes=100)}, Reason.ENVELOPE_TOO_LARGE),
    ("two signatures", _two_signatures, {}, Reason.MALFORMED_ENVELOPE),
    (
        "Offer where Accept expected",
        lambda: seal(offer(), KEY),
        {"expected": (negotiation_pb2.Accept,)},
        Reason.WRONG_PAYLOAD_TYPE,
    ),
    ("stranger's key", lambda: seal(offer(), STRANGER), {}, Reason.UNKNOWN_KEY),
    ("another party's key", lambda: seal(offer(), BILLER_KEY), {}, Reason.UNKNOWN_KEY),
    ("tampered payload", _tampered, {}, Reason.BAD_SIGNATURE),
    ("unparseable payload", lambda: sign_envelope(KEY, "parley.v1.Offer", b"\xff"), {}, Reason.MALFORMED_PAYLOAD),
    (
        "invalid UTF-8 string",
        lambda: sign_envelope(KEY, "parley.v1.Offer", b"\x12\x03\x32\x01\xff"),
        {},
        Reason.MALFORMED_PAYLOAD,
    ),
    ("unknown field", lambda: seal(with_unknown(offer()), KEY), {}, Reason.UNKNOWN_FIELD),
    ("unknown field in terms", lambda: seal(_nested_unknown(lambda m: m.terms), KEY), {}, Reason.UNKNOWN_FIELD),
    (
        "unknown field in a line",
        lambda: seal(_nested_unknown(lambda m: m.terms.lines[1]), KEY),
        {},
        Reason.UNKNOWN_FIELD,
    ),
    ("unknown field in header", lambda: seal(_nested_unknown(lambda m: m.header), KEY), {}, Reason.UNKNOWN_FIELD),
    ("no header", lambda: seal(negotiation_pb2.Offer(terms=offer().terms), KEY), {}, Reason.MALFORMED_HEADER),
    ("protocol version 2", lambda: seal(offer(protocol_version=2), KEY), {}, Reason.UNSUPPORTED_VERSION),
    ("protocol version 0", lambda: seal(offer(protocol_version=0), KEY), {}, Reason.UNSUPPORTED_VERSION),
    ("short message_id", lambda: seal(offer(message_id=bytes(15)), KEY), {}, Reason.MALFORMED_HEADER),
    ("long thread_id", lambda: seal(offer(thread_id=bytes(17)), KEY), {}, Reason.MALFORMED_HEADER),
    ("short previous_digest", lambda: seal(offer(previous_digest=bytes(31)), KEY), {}, Reason.MALFORMED_HEADER),
    ("no create_time", lambda: seal(offer(create_time=None), KEY), {}, Reason.MALFORMED_HEADER),
    ("no expire_time", lambda: seal(offer(expire_time=None), KEY), {}, Reason.MALFORMED_HEADER),
    ("create_time out of range", lambda: seal(_out_of_range_create_time(), KEY), {}, Reason.MALFORMED_HEADER),
    ("sender is not the signer", lambda: seal(offer(sender=BILLER), KEY), {}, Reason.WRONG_SENDER),
    ("recipient is someone else", lambda: seal(offer(recipient="x"), KEY), {}, Reason.WRONG_RECIPIENT),
    ("key not in the version in force", lambda: seal(offer(), OLD), {}, Reason.UNKNOWN_KEY),
    ("key not yet valid", lambda: seal(offer(created=T0 - 25 * DAY), KEY), {"now": None}, Reason.KEY_NOT_VALID),
    ("key revoked", lambda: seal(offer(created=T0 - 12 * DAY), OLD), {"now": None}, Reason.KEY_REVOKED),
    (
        "lifetime over the limit",
        lambda: seal(offer(lifetime=DAY + timedelta(seconds=1)), KEY),
        {},
        Reason.LIFETIME_TOO_LONG,
    ),
    ("zero lifetime", lambda: seal(offer(lifetime=timedelta(0)), KEY), {}, Reason.LIFETIME_TOO_LONG),
    ("negative lifetime", lambda: seal(offer(lifetime=-HOUR), KEY), {}, Reason.LIFETIME_TOO_LONG),
    (
        "created beyond the skew",
        lambda: seal(offer(created=T0 + SKEW + timedelta(seconds=1)), KEY),
        {},
        Reason.MESSAGE_NOT_YET_VALID,
    ),
    (
        "expired beyond the skew",
        lambda: seal(offer(created=T0 - HOUR - SKEW - timedelta(seconds=1)), KEY),
        {},
        Reason.MESSAGE_EXPIRED,
    ),
]


@pytest.mark.parametrize(("build", "options", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_refusal_is_reachable(
    build: Callable[[], envelope_pb2.Envelope], options: dict[str, Any], reason: Reason
) -> None:
    envelope = build()
    assert refusal(lambda: open_offer(envelope, **options)) is reason


def test_skew_boundaries_are_inclusive() -> None:
    open_offer(seal(offer(created=T0 + SKEW), KEY))
    open_offer(seal(offer(created=T0 - HOUR - SKEW), KEY))
    open_offer(seal(offer(lifetime=DAY), KEY))


def test_offline_verification_skips_only_the_window() -> None:
    stale = seal(offer(created=T0 - 2 * DAY), KEY)
    assert refusal(lambda: open_offer(stale)) is Reason.MESSAGE_EXPIRED
    assert open_offer(stale, now=None).envelope is stale
    future = seal(offer(created=T0 + 2 * DAY), KEY)
    assert refusal(lambda: open_offer(future)) is Reason.MESSAGE_NOT_YET_VALID
    assert open_offer(future, now=None).envelope is future
    too_long = seal(offer(created=T0 - 2 * DAY, lifetime=2 * DAY), KEY)
    assert refusal(lambda: open_offer(too_long, now=None)) is Reason.LIFETIME_TOO_LONG


def test_earlier_checks_win() -> None:
    tampered = _tampered()
    assert refusal(lambda: open_offer(tampered, (negotiation_pb2.Accept,))) is Reason.WRONG_PAYLOAD_TYPE
    stranger = seal(offer(), STRANGER)
    stranger.payload = b"\xff"
    assert refusal(lambda: open_offer(stranger)) is Reason.UNKNOWN_KEY
    # Nothing is parsed before the signature verifies (ENV-4).
    garbage = seal(offer(), KEY)
    garbage.payload = b"\xff"
    assert refusal(lambda: open_offer(garbage)) is Reason.BAD_SIGNATURE
    unknown_and_bad_header = seal(with_unknown(offer(message_id=b"")), KEY)
    assert refusal(lambda: open_offer(unknown_and_bad_header)) is Reason.UNKNOWN_FIELD
    wrong_sender_and_expired = seal(offer(sender=BILLER, created=T0 - 2 * DAY), KEY)
    assert refusal(lambda: open_offer(wrong_sender_and_expired)) is Reason.WRONG_SENDER


def test_an_offer_relabelled_as_accept_is_refused() -> None:
    relabelled = seal(offer(), KEY)
    relabelled.payload_type = "parley.v1.Accept"
    # The payloadType is signed (it is in the PAE), so the relabelling breaks the signature.
    assert refusal(lambda: open_offer(relabelled, (negotiation_pb2.Offer, negotiation_pb2.Accept))) is (
        Reason.BAD_SIGNATURE
    )
    assert refusal(lambda: open_offer(relabelled)) is Reason.WRONG_PAYLOAD_TYPE


def test_the_payload_type_selects_among_the_expected() -> None:
    verified = open_offer(seal(offer(), KEY), (negotiation_pb2.Accept, negotiation_pb2.Offer))
    assert isinstance(verified.message, negotiation_pb2.Offer)


SIGNED = seal(offer(), KEY)


@given(field=st.sampled_from(["payload", "payload_type", "keyid", "sig"]), bit=st.integers(min_value=0))
def test_any_flipped_bit_is_refused_by_the_first_check_it_breaks(field: str, bit: int) -> None:
    envelope = envelope_pb2.Envelope()
    envelope.CopyFrom(SIGNED)
    holder: Message = envelope.signatures[0] if field in ("keyid", "sig") else envelope
    value = getattr(holder, field)
    raw = value.encode() if isinstance(value, str) else value
    flipped = bytearray(raw)
    flipped[bit // 8 % len(raw)] ^= 1 << bit % 8
    if isinstance(value, str):
        try:
            setattr(holder, field, flipped.decode())
        except UnicodeDecodeError:
            assume(False)  # not a string an envelope can carry
    else:
        setattr(holder, field, bytes(flipped))
    expected = {
        "payload": Reason.BAD_SIGNATURE,
        "sig": Reason.BAD_SIGNATURE,
        "payload_type": Reason.WRONG_PAYLOAD_TYPE,
        "keyid": Reason.UNKNOWN_KEY
        if re.fullmatch("[0-9a-f]{32}", envelope.signatures[0].keyid)
        else Reason.MALFORMED_ENVELOPE,
    }[field]
    assert refusal(lambda: open_offer(envelope)) is expected


def test_find_unknown_fields_names_every_path() -> None:
    message = _nested_unknown(lambda m: m.terms.lines[1])
    message.header.CopyFrom(with_unknown(message.header))
    assert find_unknown_fields(with_unknown(message)) == ["#99", "header.#99", "terms.lines[1].#99"]
    assert find_unknown_fields(offer()) == []


def test_find_unknown_fields_recurses_into_map_values() -> None:
    document = struct_pb2.Struct()
    document.fields["a"].CopyFrom(with_unknown(struct_pb2.Value(number_value=1)))
    document.fields["b"].number_value = 2
    assert find_unknown_fields(document) == ["fields['a'].#99"]


def test_check_sequence() -> None:
    header = offer().header
    check_sequence(header, expected_sequence=2, expected_previous=bytes(32))
    with pytest.raises(RemoteProtocolError) as caught:
        check_sequence(header, expected_sequence=3, expected_previous=bytes(32))
    assert caught.value.reason is Reason.SEQUENCE_MISMATCH
    with pytest.raises(RemoteProtocolError) as caught:
        check_sequence(header, expected_sequence=2, expected_previous=b"\x01" * 32)
    assert caught.value.reason is Reason.PREVIOUS_DIGEST_MISMATCH


def test_a_live_message_from_a_frozen_chain_is_refused() -> None:
    """KEY-13: once the sender's newest key set version has expired, nothing it signs is accepted live."""
    key = SigningKey.from_seed(b"\x21" * 32)
    chain = KeyChain.verify(
        [
            make_key_set(
                party_id="biller:frozen.example",
                version=1,
                keys=[KeyEntry(key.public_key, T0 - DAY, T0 + 30 * DAY)],
                signer=key,
                previous=None,
                create_time=T0 - DAY,
                expire_time=T0 + DAY,
            )
        ]
    )
    at = T0 + 2 * DAY
    header = new_header(
        sender=chain.party_id, recipient=CONSUMER, thread_id=THREAD, sequence=0, previous_digest=b"", now=at,
        lifetime=HOUR,
    )  # fmt: skip
    envelope = seal(negotiation_pb2.Withdraw(header=header), key)
    with pytest.raises(RemoteProtocolError) as frozen:
        open_envelope(envelope, (negotiation_pb2.Withdraw,), sender_keys=chain, recipient=CONSUMER, now=at)
    assert frozen.value.reason is Reason.KEYSET_EXPIRED
    offline = open_envelope(envelope, (negotiation_pb2.Withdraw,), sender_keys=chain, recipient=CONSUMER, now=None)
    assert offline.header.sender == chain.party_id


@pytest.mark.parametrize("party_id", ["", "biller energy", "biller/energy", "é", "x" * 129])
def test_key_sets_refuse_malformed_party_ids(party_id: str) -> None:
    """HDR-13: party ids are 1..128 characters of [A-Za-z0-9._:-]."""
    key = SigningKey.from_seed(b"\x22" * 32)
    with pytest.raises(ProtocolError) as refused:
        make_key_set(
            party_id=party_id, version=1, keys=[KeyEntry(key.public_key, T0, T0 + DAY)], signer=key, previous=None,
            create_time=T0, expire_time=T0 + DAY,
        )  # fmt: skip
    assert refused.value.reason is Reason.KEYSET_INVALID


# --- Revision 1.1: whole microseconds (HDR-16) and the protobuf parsing rules (ENV-14) -------------


@pytest.mark.parametrize(
    ("nanos", "reason"), [(1_000, None), (1, Reason.MALFORMED_HEADER), (999, Reason.MALFORMED_HEADER)]
)
def test_header_times_are_whole_microseconds(nanos: int, reason: Reason | None) -> None:
    for field in ("create_time", "expire_time"):
        message = offer()
        getattr(message.header, field).nanos = nanos
        envelope = seal(message, KEY)
        if reason is None:
            open_offer(envelope)
        else:
            assert refusal(partial(open_offer, envelope)) is reason


def test_read_time_refuses_sub_microsecond_times_with_the_callers_reason() -> None:
    message = offer()
    message.header.create_time.nanos = 1
    with pytest.raises(RemoteProtocolError) as caught:
        read_time(message.header, "create_time", Reason.NEGOTIATION_LIMITS_INVALID)
    assert caught.value.reason is Reason.NEGOTIATION_LIMITS_INVALID


def _reopened(payload: bytes) -> Verified[Message]:
    return open_offer(sign_envelope(KEY, "parley.v1.Offer", payload))


def test_parsing_follows_the_protobuf_rules() -> None:
    payload = seal(offer(), KEY).payload
    other = header_pb2.Header(recipient="someone.else").SerializeToString()
    header_again = b"\x0a" + bytes([len(other)]) + other
    # A longer-than-minimal varint means its value; a repeated singular field takes the last value.
    assert _reopened(payload + b"\x0a\x03\x20\x82\x00").header.sequence == 2
    assert _reopened(header_again + payload).header.recipient == BILLER
    assert refusal(lambda: _reopened(payload + header_again)) is Reason.WRONG_RECIPIENT
    # Invalid UTF-8 and an unclosed group do not parse; a closed group is an unknown field.
    assert refusal(lambda: _reopened(payload + b"\x0a\x04\x2a\x02\xc3\x28")) is Reason.MALFORMED_PAYLOAD
    assert refusal(lambda: _reopened(payload + b"\x9b\x06\x08\x01")) is Reason.MALFORMED_PAYLOAD
    assert refusal(lambda: _reopened(payload + b"\x9b\x06\x08\x01\x9c\x06")) is Reason.UNKNOWN_FIELD
    assert refusal(lambda: _reopened(payload + b"\x13\x14")) is Reason.UNKNOWN_FIELD
