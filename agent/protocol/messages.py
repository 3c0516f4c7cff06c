"""Signed payload types, headers, and the one path that opens a received envelope.

`open_envelope` applies PROTOCOL.md §3 and §5 in a fixed order, so a given bad
message always fails with the same reason: envelope form, payload type, key,
signature (nothing is parsed before it verifies, ENV-4), parse, unknown fields,
header, key validity, lifetime, and finally the validity window.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.unknown_fields import UnknownFieldSet

from agent.protocol.dsse import check_envelope_form, digest, sign_envelope, verify_signature
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.keys import SigningKey
from agent.protocol.limits import (
    DEFAULT_LIMITS,
    DIGEST_BYTES,
    MAX_PARTY_ID_CHARS,
    MESSAGE_ID_BYTES,
    PROTOCOL_VERSION,
    THREAD_ID_BYTES,
    Limits,
)
from parley.v1 import (
    account_pb2,
    bill_pb2,
    enrolment_pb2,
    envelope_pb2,
    event_pb2,
    header_pb2,
    keys_pb2,
    negotiation_pb2,
    payment_pb2,
)

if TYPE_CHECKING:
    from agent.protocol.keysets import KeyChain

M = TypeVar("M", bound=Message)

PAYLOAD_TYPES: Mapping[str, type[Message]] = MappingProxyType(
    {
        cls.DESCRIPTOR.full_name: cls
        for cls in (
            keys_pb2.KeySet,
            bill_pb2.Bill,
            negotiation_pb2.ThreadOpen,
            negotiation_pb2.Offer,
            negotiation_pb2.Accept,
            negotiation_pb2.Reject,
            negotiation_pb2.Withdraw,
            enrolment_pb2.EnrolmentRequest,
            enrolment_pb2.EnrolmentConfirmation,
            account_pb2.AccountQuery,
            account_pb2.ErasureRequest,
            account_pb2.ErasureConfirmation,
            payment_pb2.PaymentIntent,
            payment_pb2.PaymentInstructions,
            payment_pb2.Receipt,
            event_pb2.Event,
        )
    }
)


class _Signed(Protocol):
    """Every payload type carries its Header as field 1 (HDR-2)."""

    @property
    def header(self) -> header_pb2.Header: ...


def header_of(message: Message) -> header_pb2.Header:
    """The header of a signed payload."""
    return cast(_Signed, message).header


def to_timestamp(moment: datetime) -> Timestamp:
    """A protobuf Timestamp; ValueError for a naive datetime, whose instant is unknown."""
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


_NANOS_PER_MICROSECOND = 1000


def read_time(message: Message, field: str, reason: Reason) -> datetime:
    """The UTC time in `message.field`; RemoteProtocolError(reason) if unset, out of range or finer than 1 µs.

    HDR-16: every signed time is a whole number of microseconds, so that every comparison
    the spec makes (windows, lifetimes, deadlines) is exact at one precision everywhere.
    """
    if not message.HasField(field):
        raise RemoteProtocolError(reason, f"{field} is missing")
    timestamp = cast(Timestamp, getattr(message, field))
    if timestamp.nanos % _NANOS_PER_MICROSECOND:
        raise RemoteProtocolError(reason, f"{field} has nanos {timestamp.nanos}, not a whole number of microseconds")
    try:
        return timestamp.ToDatetime(tzinfo=UTC)
    except ValueError as error:
        raise RemoteProtocolError(reason, f"{field} is not a valid timestamp") from error


def new_message_id() -> bytes:
    """16 random bytes, unique per sender for ever (HDR-8)."""
    return secrets.token_bytes(MESSAGE_ID_BYTES)


def new_header(
    *,
    sender: str,
    recipient: str,
    thread_id: bytes,
    sequence: int,
    previous_digest: bytes,
    now: datetime,
    lifetime: timedelta,
    message_id: bytes | None = None,
) -> header_pb2.Header:
    """A header created at `now` and expiring `lifetime` later; a random message id unless given."""
    return header_pb2.Header(
        protocol_version=PROTOCOL_VERSION,
        message_id=new_message_id() if message_id is None else message_id,
        thread_id=thread_id,
        sequence=sequence,
        sender=sender,
        recipient=recipient,
        create_time=to_timestamp(now),
        expire_time=to_timestamp(now + lifetime),
        previous_digest=previous_digest,
    )


def encode_varint(value: int) -> bytes:
    """The protobuf base-128 varint of a non-negative integer: for crafting raw wire bytes (tests, fuzzing)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def seal(message: Message, key: SigningKey) -> envelope_pb2.Envelope:
    """Sign `message` in an envelope whose payloadType is its full protobuf name (ENV-5)."""
    return sign_envelope(key, message.DESCRIPTOR.full_name, message.SerializeToString(deterministic=True))


def _unknown_field_paths(message: Message, prefix: str) -> Iterator[str]:
    unknown = UnknownFieldSet(message)
    for index in range(len(unknown)):
        yield f"{prefix}#{unknown[index].field_number}"
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        path = prefix + field.name
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    yield from _unknown_field_paths(item, f"{path}[{key!r}].")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from _unknown_field_paths(item, f"{path}[{index}].")
        else:
            yield from _unknown_field_paths(value, f"{path}.")


def find_unknown_fields(message: Message) -> list[str]:
    """ENV-7: paths of fields this version does not define, in `message` and every nested message.

    A path names the unknown field by number, e.g. "#99" or "terms.lines[0].#99".
    """
    return list(_unknown_field_paths(message, ""))


@dataclass(frozen=True)
class _StringFields:
    """Where a message type holds strings: its string fields and its message fields, each (name, repeated)."""

    strings: tuple[tuple[str, bool], ...]
    messages: tuple[tuple[str, bool], ...]


_STRING_FIELDS: dict[str, _StringFields] = {}  # by full type name: the schema's types, a fixed set


def _string_fields(descriptor: Descriptor) -> _StringFields:
    known = _STRING_FIELDS.get(descriptor.full_name)
    if known is None:
        fields = descriptor.fields
        known = _StringFields(
            tuple((f.name, f.is_repeated) for f in fields if f.type == FieldDescriptor.TYPE_STRING),
            tuple((f.name, f.is_repeated) for f in fields if f.message_type is not None),  # v1 defines no maps
        )
        _STRING_FIELDS[descriptor.full_name] = known
    return known


def _nul_string_paths(message: Message, prefix: str) -> Iterator[str]:
    # Each type's string and message fields are looked up once (descriptor walks cost ~50 µs a payload).
    fields = _string_fields(cast(Descriptor, message.DESCRIPTOR))
    for name, repeated in fields.strings:
        value = getattr(message, name)
        if repeated:
            yield from (f"{prefix}{name}[{index}]" for index, text in enumerate(value) if "\0" in text)
        elif "\0" in value:
            yield prefix + name
    for name, repeated in fields.messages:
        if repeated:
            for index, item in enumerate(getattr(message, name)):
                yield from _nul_string_paths(item, f"{prefix}{name}[{index}].")
        elif message.HasField(name):
            yield from _nul_string_paths(getattr(message, name), f"{prefix}{name}.")


def find_nul_strings(message: Message) -> list[str]:
    """ENV-15: paths of string fields holding U+0000, in `message` and every nested message."""
    return list(_nul_string_paths(message, ""))


def parse_payload(cls: type[M], payload: bytes) -> M:
    """ENV-6, ENV-7, ENV-15: parse `payload` as `cls`, refusing any field `cls` does not define and any string
    holding U+0000."""
    try:
        message = cls.FromString(payload)
    except DecodeError as error:
        raise RemoteProtocolError(
            Reason.MALFORMED_PAYLOAD, f"payload does not parse as {cls.DESCRIPTOR.full_name}"
        ) from error
    # Unknown fields, at any depth, count in ByteSize until discarded: a C-speed test first, the walk that
    # names them only when there are some (a message with unknown fields is refused, so discarding is free).
    size = message.ByteSize()
    message.DiscardUnknownFields()
    if message.ByteSize() != size:
        unknown = find_unknown_fields(cls.FromString(payload))
        raise RemoteProtocolError(Reason.UNKNOWN_FIELD, f"unknown fields: {', '.join(unknown)}")
    # A string holding U+0000 is encoded with a zero byte: a payload without one (most) needs no walk.
    if b"\0" in payload and (nul := find_nul_strings(message)):
        raise RemoteProtocolError(Reason.MALFORMED_PAYLOAD, f"U+0000 in the string field {', '.join(nul)} (ENV-15)")
    return message


def _malformed_header(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.MALFORMED_HEADER, detail)


_PARTY_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_PARTY_ID_CHARS}}}")


def is_party_id(text: str) -> bool:
    """HDR-13: 1 to 128 characters of A-Z a-z 0-9 . _ : -, compared exactly."""
    return _PARTY_ID.fullmatch(text) is not None


def check_header_form(message: Message) -> tuple[datetime, datetime]:
    """HDR-1, HDR-2: the payload's header is present and well formed; returns (create_time, expire_time)."""
    if not message.HasField("header"):
        raise _malformed_header("header is missing")
    header = header_of(message)
    if header.protocol_version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            Reason.UNSUPPORTED_VERSION, f"protocol_version {header.protocol_version}, not {PROTOCOL_VERSION}"
        )
    if len(header.message_id) != MESSAGE_ID_BYTES:
        raise _malformed_header(f"message_id is {len(header.message_id)} bytes, not {MESSAGE_ID_BYTES}")
    if len(header.thread_id) != THREAD_ID_BYTES:
        raise _malformed_header(f"thread_id is {len(header.thread_id)} bytes, not {THREAD_ID_BYTES}")
    if len(header.previous_digest) not in (0, DIGEST_BYTES):
        raise _malformed_header(f"previous_digest is {len(header.previous_digest)} bytes, not 0 or {DIGEST_BYTES}")
    create_time = read_time(header, "create_time", Reason.MALFORMED_HEADER)
    expire_time = read_time(header, "expire_time", Reason.MALFORMED_HEADER)
    return create_time, expire_time


@dataclass(frozen=True)
class Verified(Generic[M]):
    """A received message that passed `open_envelope`, with the envelope it came in."""

    message: M
    envelope: envelope_pb2.Envelope
    digest: bytes
    keyid: str

    @property
    def header(self) -> header_pb2.Header:
        return header_of(self.message)


_CHECKED = object()  # only `check_envelope` holds this, so only it builds a CheckedEnvelope


@dataclass(frozen=True)
class CheckedEnvelope(Generic[M]):
    """A received envelope whose form (LIM-1, ENV-1, ENV-2) and payload type (ENV-5) passed, once.

    Built only by `check_envelope` (the constructor refuses anyone else), so a function that takes
    one knows both checks ran: `open_envelope` accepts it and does not repeat them.
    """

    envelope: envelope_pb2.Envelope
    signature: envelope_pb2.Signature
    payload_class: type[M]
    _made_by: object = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._made_by is not _CHECKED:
            raise TypeError("a CheckedEnvelope is made by check_envelope()")

    @property
    def keyid(self) -> str:
        return self.signature.keyid


def check_envelope(
    envelope: envelope_pb2.Envelope, expected: tuple[type[M], ...], limits: Limits = DEFAULT_LIMITS
) -> CheckedEnvelope[M]:
    """Steps 1-2 of the receive path (§3.8): the envelope's form, then its payload type among `expected`."""
    signature = check_envelope_form(envelope, limits)
    cls = next((c for c in expected if c.DESCRIPTOR.full_name == envelope.payload_type), None)
    if cls is None:
        names = ", ".join(c.DESCRIPTOR.full_name for c in expected)
        raise RemoteProtocolError(
            Reason.WRONG_PAYLOAD_TYPE, f"payloadType {envelope.payload_type!r} is not one of: {names}"
        )
    return CheckedEnvelope(envelope, signature, cls, _CHECKED)


def open_envelope(
    envelope: envelope_pb2.Envelope | CheckedEnvelope[M],
    expected: tuple[type[M], ...] = (),
    *,
    sender_keys: KeyChain,
    recipient: str,
    now: datetime | None,
    limits: Limits = DEFAULT_LIMITS,
) -> Verified[M]:
    """Verify and parse a received envelope: the one receive path (§3, §5).

    `envelope` is either already checked (`check_envelope`, then `expected` is not needed) or raw,
    checked here against `expected`, the payload types the call or thread position accepts.
    `now=None` verifies offline (bundles): the checks against the reception
    time (HDR-5 window) are skipped, everything else applies. Key sets are not
    opened here: they verify as a chain (`KeyChain`).
    """
    checked = envelope if isinstance(envelope, CheckedEnvelope) else check_envelope(envelope, expected, limits)
    envelope, signature, cls = checked.envelope, checked.signature, checked.payload_class
    # KEY-6: the keyid only selects among the expected sender's own keys.
    candidates = sender_keys.candidate_keys(signature.keyid)
    if not candidates:
        raise RemoteProtocolError(
            Reason.UNKNOWN_KEY, f"keyid {signature.keyid} is not in {sender_keys.party_id}'s key set"
        )
    verify_signature(envelope, *candidates)  # ENV-4: before anything is parsed
    message = parse_payload(cls, envelope.payload)

    create_time, expire_time = check_header_form(message)
    header = header_of(message)
    if header.sender != sender_keys.party_id:
        raise RemoteProtocolError(
            Reason.WRONG_SENDER, f"sender {header.sender!r} did not sign; {sender_keys.party_id!r} did"
        )
    if header.recipient != recipient:
        raise RemoteProtocolError(Reason.WRONG_RECIPIENT, f"recipient {header.recipient!r} is not {recipient!r}")
    sender_keys.check_key_at(signature.keyid, create_time)
    if now is not None:
        sender_keys.check_fresh(now)  # KEY-13: a frozen (expired) chain speaks for no one live

    lifetime = expire_time - create_time
    if not timedelta(0) < lifetime <= limits.max_message_lifetime:
        raise RemoteProtocolError(
            Reason.LIFETIME_TOO_LONG, f"lifetime {lifetime} is not within (0, {limits.max_message_lifetime}]"
        )
    # HDR-5. Skew is added to `now`, never to received times, which may be
    # near the ends of the datetime range.
    if now is not None:
        if create_time > now + limits.max_clock_skew:
            raise RemoteProtocolError(Reason.MESSAGE_NOT_YET_VALID, f"created {create_time}, now {now}")
        if expire_time < now - limits.max_clock_skew:
            raise RemoteProtocolError(Reason.MESSAGE_EXPIRED, f"expired {expire_time}, now {now}")
    return Verified(message=message, envelope=envelope, digest=digest(envelope), keyid=signature.keyid)


def check_sequence(header: header_pb2.Header, *, expected_sequence: int, expected_previous: bytes) -> None:
    """HDR-6, HDR-7: the message is the next one in its thread and chains to the last one."""
    if header.sequence != expected_sequence:
        raise RemoteProtocolError(Reason.SEQUENCE_MISMATCH, f"sequence {header.sequence}, expected {expected_sequence}")
    if header.previous_digest != expected_previous:
        raise RemoteProtocolError(
            Reason.PREVIOUS_DIGEST_MISMATCH, "previous_digest is not the digest of the thread's last message"
        )
