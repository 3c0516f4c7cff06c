"""A hostile-capable signed Parley client, for conformance suites.

Everything a conformance case sends goes through here: a `SignedParty` builds
and signs the messages a consumer agent sends — with control over every header
field, every key set field and the envelope itself, so a case can break exactly
one rule at a time — and a `Connection` delivers them over gRPC and hands back
either the response or a `Refusal` (the gRPC code and every `ErrorInfo` found
in the status details), never raising for a refused call.

    connection = Connection.open("127.0.0.1:7443", insecure=True)
    alice = SignedParty.create(biller_party_id, clock=lambda: now)
    answer = await connection.call("Enrol", EnrolRequest(request=alice.enrolment(account_id, code)))
    if isinstance(answer, Refusal):
        print(answer.code, answer.reason)

The envelope mutations (`flip_signature`, `swap_payload_type`, …) reproduce
the defects of the envelope test vectors (docs/VECTORS.md) on messages signed
by an enrolled party, so that a biller can be shown them over the wire.

Nothing here trusts the target: answers are parsed but not verified (cases
verify what they need against the target's verified key set chain).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agent.protocol.dsse import digest, pae, sign_envelope
from agent.protocol.errors import ERROR_DOMAIN
from agent.protocol.keys import SigningKey, VerifyKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import PROTOCOL_VERSION
from agent.protocol.messages import new_message_id
from agent.transport.client import ClientTls, open_channel
from parley.v1 import (
    account_pb2,
    bill_pb2,
    biller_service_pb2,
    biller_service_pb2_grpc,
    enrolment_pb2,
    envelope_pb2,
    header_pb2,
    keys_pb2,
    negotiation_pb2,
    payment_pb2,
    terms_pb2,
)
from parley.v1 import conformance_control_service_pb2 as cc
from parley.v1 import conformance_control_service_pb2_grpc as cc_grpc

Clock = Callable[[], datetime]

DEFAULT_LIFETIME = timedelta(minutes=10)  # HDR-14: the shortest lifetime that serves a request
KEY_VALIDITY = timedelta(days=399)  # under MAX_KEYSET_LIFETIME (400 days), so clocks may be advanced a lot
KEY_BACKDATE = timedelta(days=1)
_THREAD_ID_BYTES = 16
# gRPC codes that mean the call never reached a Parley service (ERR-2): no ErrorInfo is expected with them.
LIBRARY_CODES = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
TRANSPORT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


# --- Derived ids (PROTOCOL.md §5.2), computed here independently of the implementations under test ----


def keyset_chain_id(party_id: str) -> bytes:
    """The thread id of a party's key set chain."""
    return hashlib.sha256(b"parley/v1/keyset/" + party_id.encode()).digest()[:_THREAD_ID_BYTES]


def event_log_id(biller_party_id: str, account_id: str) -> bytes:
    """The thread id of an account's event log."""
    seed = b"parley/v1/events/" + biller_party_id.encode() + b"\x00" + account_id.encode()
    return hashlib.sha256(seed).digest()[:_THREAD_ID_BYTES]


def timestamp(moment: datetime) -> Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


# --- Building and signing ----------------------------------------------------------------------------


def build_header(
    *,
    sender: str,
    recipient: str,
    create_time: datetime,
    lifetime: timedelta = DEFAULT_LIFETIME,
    thread_id: bytes | None = None,
    sequence: int = 0,
    previous_digest: bytes = b"",
    message_id: bytes | None = None,
    protocol_version: int = PROTOCOL_VERSION,
    expire_time: datetime | None = None,
) -> header_pb2.Header:
    """A header with every field under the caller's control (random ids unless given)."""
    return header_pb2.Header(
        protocol_version=protocol_version,
        message_id=new_message_id() if message_id is None else message_id,
        thread_id=secrets.token_bytes(_THREAD_ID_BYTES) if thread_id is None else thread_id,
        sequence=sequence,
        sender=sender,
        recipient=recipient,
        create_time=timestamp(create_time),
        expire_time=timestamp(expire_time if expire_time is not None else create_time + lifetime),
        previous_digest=previous_digest,
    )


def seal_bytes(key: SigningKey, payload_type: str, payload: bytes) -> envelope_pb2.Envelope:
    """Sign raw payload bytes as they are, whatever they contain (unknown fields, truncations…)."""
    return sign_envelope(key, payload_type, payload)


def seal_message(key: SigningKey, message: Message, payload_type: str | None = None) -> envelope_pb2.Envelope:
    """Sign `message` (deterministically serialized) under its own payload type unless another is given."""
    return sign_envelope(
        key, payload_type or message.DESCRIPTOR.full_name, message.SerializeToString(deterministic=True)
    )


@dataclass(frozen=True)
class KeySpec:
    """A key listed in a key set version, with its validity window."""

    key: VerifyKey
    not_before: datetime
    not_after: datetime


def build_key_set(
    *,
    party_id: str,
    version: int,
    keys: Sequence[KeySpec],
    signer: SigningKey,
    create_time: datetime,
    expire_time: datetime,
    previous: envelope_pb2.Envelope | None,
    revocations: Mapping[str, datetime] | None = None,
    header: Mapping[str, Any] | None = None,
) -> envelope_pb2.Envelope:
    """A signed KeySet version, valid or not: nothing here checks the result (the target must).

    `previous` gives the previous_digest (empty for version 1); `header` overrides header fields.
    """
    fields: dict[str, Any] = {
        "sender": party_id,
        "recipient": "",
        "create_time": create_time,
        "expire_time": expire_time,
        "thread_id": keyset_chain_id(party_id),
        "sequence": version - 1,
        "previous_digest": b"" if previous is None else digest(previous),
    }
    fields.update(header or {})
    keyset = keys_pb2.KeySet(
        header=build_header(**fields),
        party_id=party_id,
        version=version,
        keys=[
            keys_pb2.PublicKey(
                keyid=spec.key.keyid,
                public_key=spec.key.raw,
                not_before=timestamp(spec.not_before),
                not_after=timestamp(spec.not_after),
            )
            for spec in keys
        ],
        revocations=[
            keys_pb2.Revocation(keyid=keyid, revoke_time=timestamp(at), reason="conformance test")
            for keyid, at in (revocations or {}).items()
        ],
    )
    return seal_message(signer, keyset)


@dataclass
class SignedParty:
    """A consumer party the suite plays: keys, key set chain, and signed requests to one biller.

    `clock` gives the time messages are created at (the suite keeps it on the
    target's clock). Header fields of every builder can be overridden through
    `header=`, e.g. `party.query(account, header={"sequence": 3})`; `key=` signs
    with another key (rotated, revoked, stranger...).
    """

    party_id: str
    biller: str
    clock: Clock
    key: SigningKey
    key_sets: list[envelope_pb2.Envelope] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        biller: str,
        *,
        clock: Clock,
        party_id: str | None = None,
        extra_keys: Sequence[SigningKey] = (),
        key_set_lifetime: timedelta = KEY_VALIDITY,
        key_set_created: datetime | None = None,
    ) -> SignedParty:
        """A fresh party with a random id and key, and its self-signed key set version 1."""
        key = SigningKey.generate()
        party = cls(party_id or f"consumer:cf-{secrets.token_hex(8)}", biller, clock, key)
        start = key_set_created if key_set_created is not None else clock() - KEY_BACKDATE
        specs = [party.key_spec(k, start) for k in (key, *extra_keys)]
        party.key_sets.append(
            build_key_set(
                party_id=party.party_id,
                version=1,
                keys=specs,
                signer=key,
                create_time=start,
                expire_time=start + key_set_lifetime,
                previous=None,
            )
        )
        return party

    @staticmethod
    def key_spec(key: SigningKey, start: datetime, validity: timedelta = KEY_VALIDITY) -> KeySpec:
        return KeySpec(key.public_key, start, start + validity)

    @property
    def chain(self) -> KeyChain:
        """The party's own chain, verified (to check how the target echoes its messages)."""
        return KeyChain.verify(self.key_sets)

    @property
    def key_set(self) -> envelope_pb2.Envelope:
        """Version 1, which enrolment carries."""
        return self.key_sets[0]

    def next_key_set(
        self,
        keys: Sequence[KeySpec],
        *,
        signer: SigningKey | None = None,
        version: int | None = None,
        create_time: datetime | None = None,
        lifetime: timedelta = KEY_VALIDITY,
        revocations: Mapping[str, datetime] | None = None,
        previous: envelope_pb2.Envelope | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> envelope_pb2.Envelope:
        """A next key set version (not adopted: call `adopt` once the target accepted it)."""
        latest = previous if previous is not None else self.key_sets[-1]
        created = create_time if create_time is not None else self.clock() - timedelta(seconds=1)
        return build_key_set(
            party_id=self.party_id,
            version=len(self.key_sets) + 1 if version is None else version,
            keys=keys,
            signer=signer or self.key,
            create_time=created,
            expire_time=created + lifetime,
            previous=latest,
            revocations=revocations,
            header=header,
        )

    def adopt(self, key_set: envelope_pb2.Envelope, key: SigningKey | None = None) -> None:
        """Append a published version to the chain, and sign from now on with `key` if given."""
        self.key_sets.append(key_set)
        if key is not None:
            self.key = key

    # --- headers and signatures ---

    def header(self, **fields: Any) -> header_pb2.Header:
        """A header from this party to the biller, created now; any field overridable."""
        values: dict[str, Any] = {"sender": self.party_id, "recipient": self.biller, "create_time": self.clock()}
        values.update(fields)
        return build_header(**values)

    def sign(self, message: Message, *, key: SigningKey | None = None) -> envelope_pb2.Envelope:
        return seal_message(key or self.key, message)

    def sign_bytes(self, payload_type: str, payload: bytes, *, key: SigningKey | None = None) -> envelope_pb2.Envelope:
        """Sign payload bytes as they are (unknown fields, truncations…) with the party's key."""
        return seal_bytes(key or self.key, payload_type, payload)

    # --- the consumer's requests ---

    def enrolment(
        self,
        account_id: str,
        code: str,
        *,
        key_set: envelope_pb2.Envelope | None = None,
        key: SigningKey | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> envelope_pb2.Envelope:
        request = enrolment_pb2.EnrolmentRequest(
            header=self.header(**(header or {})),
            account_id=account_id,
            code=code,
            consumer_key_set=key_set if key_set is not None else self.key_set,
        )
        return self.sign(request, key=key)

    def query(
        self, account_id: str, *, key: SigningKey | None = None, header: Mapping[str, Any] | None = None, **fields: Any
    ) -> envelope_pb2.Envelope:
        """A signed AccountQuery (bill_id, thread_id, intent_id, start_sequence as keyword arguments)."""
        query = account_pb2.AccountQuery(header=self.header(**(header or {})), account_id=account_id, **fields)
        return self.sign(query, key=key)

    def intent(
        self,
        account_id: str,
        bill_id: str,
        intent_id: str,
        amount: terms_pb2.Money,
        *,
        agreement_digest: bytes = b"",
        instalment_index: int = 0,
        key: SigningKey | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> envelope_pb2.Envelope:
        intent = payment_pb2.PaymentIntent(
            header=self.header(**(header or {})),
            intent_id=intent_id,
            account_id=account_id,
            bill_id=bill_id,
            agreement_digest=agreement_digest,
            instalment_index=instalment_index,
            amount=amount,
        )
        return self.sign(intent, key=key)

    def erasure(self, account_id: str, *, header: Mapping[str, Any] | None = None) -> envelope_pb2.Envelope:
        return self.sign(account_pb2.ErasureRequest(header=self.header(**(header or {})), account_id=account_id))

    def open(
        self,
        bill_id: str,
        bill_digest: bytes,
        terms: terms_pb2.Terms | None,
        *,
        max_rounds: int = 4,
        deadline: datetime | None = None,
        no_deadline: bool = False,
        disclosure_digest: bytes = b"",
        header: Mapping[str, Any] | None = None,
    ) -> envelope_pb2.Envelope:
        """A ThreadOpen (sequence 0 of a fresh thread unless `header` says otherwise)."""
        head = self.header(**(header or {}))
        created = head.create_time.ToDatetime(tzinfo=UTC)
        opening = negotiation_pb2.ThreadOpen(
            header=head,
            bill_id=bill_id,
            bill_digest=bill_digest,
            max_rounds=max_rounds,
            deadline=None if no_deadline else timestamp(deadline or created + timedelta(days=2)),
            terms=terms,
            disclosure_digest=disclosure_digest,
        )
        return self.sign(opening)

    def move(
        self, thread: Sequence[envelope_pb2.Envelope], message: Message, *, header: Mapping[str, Any] | None = None
    ) -> envelope_pb2.Envelope:
        """`message` (Offer, Accept, Reject, Withdraw…) signed as the next message of `thread`."""
        first = negotiation_pb2.ThreadOpen.FromString(thread[0].payload)
        fields: dict[str, Any] = {
            "thread_id": first.header.thread_id,
            "sequence": len(thread),
            "previous_digest": digest(thread[-1]),
        }
        fields.update(header or {})
        message.header.CopyFrom(self.header(**fields))  # type: ignore[attr-defined]
        return self.sign(message)


def disclosure_bytes(*, hardship: bool = True) -> bytes:
    """A well-formed serialized Disclosure (PRV-2)."""
    circumstances = negotiation_pb2.Circumstances(
        purpose=negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=hardship
    )
    return negotiation_pb2.Disclosure(salt=secrets.token_bytes(16), circumstances=circumstances).SerializeToString()


# --- Envelope mutations: the defects of the envelope test vectors, on any envelope -----------------


def _copy(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    copied = envelope_pb2.Envelope()
    copied.CopyFrom(envelope)
    return copied


def flip_signature(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """Vector `bad-signature`: one bit of the signature flipped."""
    changed = _copy(envelope)
    sig = changed.signatures[0].sig
    changed.signatures[0].sig = bytes([sig[0] ^ 1]) + sig[1:]
    return changed


def flip_payload(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """Vector `tampered-payload`: one bit of the payload's last byte flipped after signing."""
    changed = _copy(envelope)
    changed.payload = envelope.payload[:-1] + bytes([envelope.payload[-1] ^ 1])
    return changed


def sign_payload_not_pae(envelope: envelope_pb2.Envelope, key: SigningKey) -> envelope_pb2.Envelope:
    """Vector `signed-payload-not-pae`: the signature covers the raw payload instead of the PAE."""
    changed = envelope_pb2.Envelope(payload=envelope.payload, payload_type=envelope.payload_type)
    changed.signatures.add(keyid=key.keyid, sig=key.sign(envelope.payload))
    return changed


def sign_wrong_pae_length(envelope: envelope_pb2.Envelope, key: SigningKey) -> envelope_pb2.Envelope:
    """Vector `pae-wrong-length`: the signed PAE states the payload length off by one."""
    length = len(envelope.payload)
    wrong = pae(envelope.payload_type, envelope.payload).replace(f" {length} ".encode(), f" {length + 1} ".encode(), 1)
    changed = envelope_pb2.Envelope(payload=envelope.payload, payload_type=envelope.payload_type)
    changed.signatures.add(keyid=key.keyid, sig=key.sign(wrong))
    return changed


def swap_payload_type(envelope: envelope_pb2.Envelope, payload_type: str) -> envelope_pb2.Envelope:
    """Vector `payload-type-swapped`: the payloadType changed after signing."""
    changed = _copy(envelope)
    changed.payload_type = payload_type
    return changed


def duplicate_signature(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """Vector `two-signatures`: the one signature, twice."""
    changed = _copy(envelope)
    changed.signatures.add().CopyFrom(envelope.signatures[0])
    return changed


def strip_signatures(envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """Vector `no-signature`."""
    return envelope_pb2.Envelope(payload=envelope.payload, payload_type=envelope.payload_type)


UNKNOWN_FIELD = b"\xf8\x06\x01"  # field 111, varint 1: defined by no Parley message (vector `unknown-field`)


def with_unknown_field(envelope: envelope_pb2.Envelope, key: SigningKey) -> envelope_pb2.Envelope:
    """Vector `unknown-field`: an undefined field appended to the payload, then signed."""
    return seal_bytes(key, envelope.payload_type, envelope.payload + UNKNOWN_FIELD)


def truncated(envelope: envelope_pb2.Envelope, key: SigningKey, cut: int = 3) -> envelope_pb2.Envelope:
    """Vector `truncated-payload`: the payload cut short, then signed, so it no longer parses."""
    return seal_bytes(key, envelope.payload_type, envelope.payload[:-cut])


# --- Talking to a target --------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInfoSeen:
    """One google.rpc.ErrorInfo found in a refusal's status details."""

    reason: str
    domain: str
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class Refusal:
    """A call that failed: its gRPC code and message, and what its `google.rpc.Status` carried.

    `status_readable` is False when the `grpc-status-details-bin` trailer is
    missing or contradicts the call; `infos` are all the ErrorInfo details (any
    domain); `other_details` counts the details of other types.
    """

    rpc: str
    code: grpc.StatusCode
    message: str
    status_readable: bool
    infos: tuple[ErrorInfoSeen, ...]
    other_details: int = 0

    @property
    def parley_infos(self) -> tuple[ErrorInfoSeen, ...]:
        return tuple(info for info in self.infos if info.domain == ERROR_DOMAIN)

    @property
    def reason(self) -> str | None:
        """The reason of the one ErrorInfo in domain "parley.v1", or None if there is not exactly one."""
        infos = self.parley_infos
        return infos[0].reason if len(infos) == 1 else None

    def describe(self) -> str:
        """E.g. "NOT_FOUND (NOT_FOUND)" or "UNAVAILABLE, no ErrorInfo in domain parley.v1"."""
        if self.reason is not None:
            text = f"{self.reason} ({self.code.name})"
        elif self.parley_infos:
            text = f"{self.code.name} with {len(self.parley_infos)} ErrorInfo in domain {ERROR_DOMAIN}"
        else:
            text = f"{self.code.name}, no ErrorInfo in domain {ERROR_DOMAIN}"
        return f"{text}: {self.message}" if self.message else text

    @property
    def unreachable(self) -> bool:
        """The target could not be reached (or did not answer in time)."""
        return self.code in TRANSPORT_CODES and not self.infos


def refusal_of(rpc: str, error: grpc.aio.AioRpcError) -> Refusal:
    """Everything a failed call carries."""
    code = error.code()
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
        readable = status is not None
    except ValueError:  # a Status contradicting the call's code or message
        status, readable = None, False
    infos: list[ErrorInfoSeen] = []
    others = 0
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):  # False for a detail of another type
            infos.append(ErrorInfoSeen(info.reason, info.domain, dict(info.metadata)))
        else:
            others += 1
    return Refusal(rpc, code, error.details() or "", readable, tuple(infos), others)


Answer = Any  # a response message, or a Refusal


class EventStream:
    """An open WatchEvents stream: read events one at a time, with a timeout."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def next(self, timeout: float) -> envelope_pb2.Envelope | Refusal | None:
        """The next event; None when the stream ended; a Refusal if it failed; TimeoutError if none came."""
        try:
            response = await asyncio.wait_for(self._call.read(), timeout)
        except grpc.aio.AioRpcError as error:
            return refusal_of("WatchEvents", error)
        if response is grpc.aio.EOF:
            return None
        event: envelope_pb2.Envelope = response.event
        return event

    def cancel(self) -> None:
        self._call.cancel()


class Connection:
    """One channel to a target: the BillerService and ConformanceControlService stubs, errors as values."""

    def __init__(self, channel: grpc.aio.Channel, *, call_timeout: float = 30.0) -> None:
        self.channel = channel
        self.biller = biller_service_pb2_grpc.BillerServiceStub(channel)
        self.control = cc_grpc.ConformanceControlServiceStub(channel)
        self.call_timeout = call_timeout
        self.refusals: list[Refusal] = []  # every refusal seen on this connection (ERR-1 checks them all)

    @classmethod
    def open(
        cls, target: str, *, tls: ClientTls | None = None, insecure: bool = False, call_timeout: float = 30.0
    ) -> Connection:
        """A connection to `target` (see agent.transport.client.open_channel for the TLS rules)."""
        return cls(open_channel(target, tls=tls, insecure=insecure), call_timeout=call_timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def call(self, rpc: str, request: Message) -> Answer:
        """A unary BillerService call by method name; the response, or a Refusal."""
        return await self._unary(rpc, getattr(self.biller, rpc), request)

    async def control_call(self, rpc: str, request: Message) -> Answer:
        """A unary ConformanceControlService call by method name; the response, or a Refusal."""
        return await self._unary(rpc, getattr(self.control, rpc), request)

    async def _unary(self, rpc: str, method: Any, request: Message) -> Answer:
        try:
            return await method(request, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as error:
            refusal = refusal_of(rpc, error)
            self.refusals.append(refusal)
            return refusal

    @asynccontextmanager
    async def watch(self, query: envelope_pb2.Envelope) -> AsyncIterator[EventStream]:
        """A WatchEvents stream for the block's duration (always cancelled at the end)."""
        call = self.biller.WatchEvents(biller_service_pb2.WatchEventsRequest(query=query))
        stream = _RecordingStream(call, self.refusals)
        try:
            yield stream
        finally:
            stream.cancel()

    # --- conformance control (§16) ---

    async def create_test_account(self, holder_name: str = "Conformance test") -> Answer:
        return await self.control_call("CreateTestAccount", cc.CreateTestAccountRequest(holder_name=holder_name))

    async def issue_test_bill(
        self, account_id: str, amount_due: terms_pb2.Money, due_date: str, options: bill_pb2.AdvertisedOptions | None
    ) -> Answer:
        request = cc.IssueTestBillRequest(account_id=account_id, amount_due=amount_due, due_date=due_date)
        if options is not None:
            request.options.CopyFrom(options)
        return await self.control_call("IssueTestBill", request)

    async def advance_clock(self, seconds: int) -> Answer:
        return await self.control_call("AdvanceClock", cc.AdvanceClockRequest(seconds=seconds))

    async def settle_payments(self) -> Answer:
        return await self.control_call("SettlePayments", cc.SettlePaymentsRequest())


class _RecordingStream(EventStream):
    def __init__(self, call: Any, refusals: list[Refusal]) -> None:
        super().__init__(call)
        self._refusals = refusals

    async def next(self, timeout: float) -> envelope_pb2.Envelope | Refusal | None:
        answer = await super().next(timeout)
        if isinstance(answer, Refusal):
            self._refusals.append(answer)
        return answer


__all__ = [
    "DEFAULT_LIFETIME",
    "LIBRARY_CODES",
    "UNKNOWN_FIELD",
    "Connection",
    "ErrorInfoSeen",
    "EventStream",
    "KeySpec",
    "Refusal",
    "SignedParty",
    "build_header",
    "build_key_set",
    "disclosure_bytes",
    "duplicate_signature",
    "event_log_id",
    "flip_payload",
    "flip_signature",
    "keyset_chain_id",
    "refusal_of",
    "seal_bytes",
    "seal_message",
    "sign_payload_not_pae",
    "sign_wrong_pae_length",
    "strip_signatures",
    "swap_payload_type",
    "timestamp",
    "truncated",
    "with_unknown_field",
]
