"""The test peers every suite, test and tool shares: who plays the other side of a Parley conversation.

- `SignedParty`: a signed hostile consumer, able to sign anything — every
  header field, every key set field, the envelope itself (`flip_signature`,
  `swap_payload_type`, … reproduce the defects of the envelope test vectors,
  docs/VECTORS.md) — so a case can break exactly one rule at a time;
- `PeerIdentity`: a party's key and key set chain (a fresh one, or one that
  rotated and revoked a key), as plain bytes so it crosses process boundaries;
- `PeerPolicy` and `PeerRail`: a biller's policy and payment rail for tests;
- `HostileServicer`: the real `BillerAgent` behind a servicer that counts,
  fails, rewrites, scripts and observes calls;
- `free_port`, `serve_on_loopback`: a TCP port free on 127.0.0.1, a servicer served on one.

Why headers, key sets and derived ids are built here rather than with
`agent.protocol.messages.new_header` or `agent.protocol.keysets.make_key_set`:
the conformance suites judge implementations, this one included, and a judge
that shares the rule implementations of what it judges shares their bugs — a
wrong field written by `new_header` would be written by both sides, and every
check would pass. So everything the peers *send* is built from the spec
(PROTOCOL.md §3–§5) in this module; only the primitives the test vectors pin
independently (Ed25519 in `agent.protocol.keys`, DSSE PAE and digests in
`agent.protocol.dsse`) and the *reading* of what a target sent
(`KeyChain.verify`, `open_envelope`) come from the library. The tests that use
these peers thereby check the library against the same independent builder.

Nothing here is for production: the servicer forges on request.
"""

from __future__ import annotations

import hashlib
import inspect
import secrets
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from agent.biller import (
    AcceptOffer,
    BillContext,
    BillerAgent,
    CounterOffer,
    Decision,
    OfferContext,
    PaymentDetails,
    RejectOffer,
)
from agent.protocol.dsse import digest, pae, sign_envelope
from agent.protocol.errors import ProtocolError
from agent.protocol.keys import SigningKey, VerifyKey
from agent.protocol.keysets import KeyChain
from agent.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits
from agent.protocol.messages import PAYLOAD_TYPES, new_message_id
from agent.protocol.terms import AdvertisedOptions, Money, Terms, TermsKind
from agent.transport.server import BillerServicer
from agent.transport.status import Context, abort
from parley.v1 import (
    account_pb2,
    biller_service_pb2_grpc,
    enrolment_pb2,
    envelope_pb2,
    header_pb2,
    keys_pb2,
    negotiation_pb2,
    payment_pb2,
    terms_pb2,
)
from parley.v1 import biller_service_pb2 as pb

Clock = Callable[[], datetime]

DEFAULT_LIFETIME = timedelta(minutes=10)  # HDR-14: the shortest lifetime that serves a request
KEY_VALIDITY = timedelta(days=399)  # under MAX_KEYSET_LIFETIME (400 days), so clocks may be advanced a lot
KEY_BACKDATE = timedelta(days=1)
_THREAD_ID_BYTES = 16


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (nothing holds it: a server started later may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


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


def disclosure_bytes(*, hardship: bool = True, next_pay_date: date | None = None) -> bytes:
    """A well-formed serialized Disclosure (PRV-2)."""
    circumstances = negotiation_pb2.Circumstances(
        purpose=negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP,
        hardship=hardship,
        next_pay_date="" if next_pay_date is None else next_pay_date.isoformat(),
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


# --- Re-signing what another party signed -----------------------------------------------------------


def resign(envelope: envelope_pb2.Envelope, key: SigningKey, *, keyid: str | None = None) -> envelope_pb2.Envelope:
    """The same payload, signed by `key` instead — under `keyid` when given (a forgery under someone's keyid)."""
    signature = envelope_pb2.Signature(
        keyid=key.keyid if keyid is None else keyid, sig=key.sign(pae(envelope.payload_type, envelope.payload))
    )
    return envelope_pb2.Envelope(payload=envelope.payload, payload_type=envelope.payload_type, signatures=[signature])


def reseal(envelope: envelope_pb2.Envelope, key: SigningKey, change: Callable[[Any], None]) -> envelope_pb2.Envelope:
    """The envelope's payload, changed by `change` (given the parsed message), signed again with `key`."""
    message = PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload)
    change(message)
    return seal_message(key, message, envelope.payload_type)


# --- A party's identity ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerIdentity:
    """A party's signing key and verified key set chain, kept as bytes (so it pickles into worker processes).

    `retired_seed` is, after a rotation, a key of version 1 that version 2 dropped
    and revoked — a key an attacker may still hold.
    """

    seed: bytes
    key_sets: tuple[bytes, ...]
    retired_seed: bytes | None = None

    @classmethod
    def create(
        cls, party_id: str, now: datetime, *, backdate: timedelta = KEY_BACKDATE, validity: timedelta = KEY_VALIDITY
    ) -> PeerIdentity:
        """A fresh identity: key set version 1, created `backdate` before `now`, listing one key."""
        key = SigningKey.generate()
        start = now - backdate
        version_1 = build_key_set(
            party_id=party_id,
            version=1,
            keys=[KeySpec(key.public_key, start, start + validity)],
            signer=key,
            create_time=start,
            expire_time=start + validity,
            previous=None,
        )
        return cls(key.seed, (version_1.SerializeToString(),))

    @classmethod
    def rotated(cls, party_id: str, now: datetime, *, validity: timedelta = KEY_VALIDITY) -> PeerIdentity:
        """An identity that rotated: version 1 lists keys K1 and K2 (two days ago); version 2 (an hour ago),
        signed by K2, lists K2 only and revokes K1. K2 signs; K1 is `retired`.

        Under version 2 a message signed by K1 now is refused (UNKNOWN_KEY: K1 is in no version in force),
        while a receiver rolled back to version 1 would take it.
        """
        old, current = SigningKey.generate(), SigningKey.generate()
        start, rotation = now - timedelta(days=2), now - timedelta(hours=1)
        version_1 = build_key_set(
            party_id=party_id,
            version=1,
            keys=[
                KeySpec(old.public_key, start, start + validity),
                KeySpec(current.public_key, start, start + validity),
            ],
            signer=current,
            create_time=start,
            expire_time=start + validity,
            previous=None,
        )
        version_2 = build_key_set(
            party_id=party_id,
            version=2,
            keys=[KeySpec(current.public_key, start, start + validity)],
            signer=current,
            create_time=rotation,
            expire_time=rotation + validity,
            previous=version_1,
            revocations={old.keyid: rotation},
        )
        return cls(current.seed, (version_1.SerializeToString(), version_2.SerializeToString()), old.seed)

    @property
    def key(self) -> SigningKey:
        return SigningKey.from_seed(self.seed)

    @property
    def retired(self) -> SigningKey | None:
        return None if self.retired_seed is None else SigningKey.from_seed(self.retired_seed)

    @property
    def envelopes(self) -> list[envelope_pb2.Envelope]:
        return [envelope_pb2.Envelope.FromString(data) for data in self.key_sets]

    @property
    def key_set(self) -> envelope_pb2.Envelope:
        """Version 1, which enrolment carries."""
        return envelope_pb2.Envelope.FromString(self.key_sets[0])

    @property
    def chain(self) -> KeyChain:
        return KeyChain.verify(self.envelopes)

    @property
    def fingerprint(self) -> bytes:
        return self.chain.fingerprint

    @property
    def older(self) -> tuple[envelope_pb2.Envelope, ...]:
        """The versions before the newest, which a rollback serves again."""
        return tuple(self.envelopes[:-1])


# --- A biller's policy and payment rail -------------------------------------------------------------


CounterRule = Callable[[OfferContext], Terms]


class PeerPolicy:
    """A biller policy for tests: advertises `options` on every bill and answers offers outside them.

    An offer of a kind in `refuse` is rejected (OUT_OF_POLICY); an offer equal to
    `counter(context)` is accepted; any other is countered with it — or, with
    `counter_once`, rejected once the counter has been made or no round is left.
    With `keep_contexts`, `contexts` keeps every context the policy was asked about.
    """

    def __init__(
        self,
        options: AdvertisedOptions,
        counter: CounterRule,
        *,
        refuse: frozenset[TermsKind] = frozenset(),
        counter_once: bool = False,
        keep_contexts: bool = False,
    ) -> None:
        self.options = options
        self.counter = counter
        self.refuse = refuse
        self.counter_once = counter_once
        self.keep_contexts = keep_contexts  # off for long runs (bench, chaos, fuzz): the list would only grow
        self.contexts: list[OfferContext] = []

    def advertise(self, context: BillContext) -> AdvertisedOptions:
        return self.options

    def decide(self, context: OfferContext) -> Decision:
        if self.keep_contexts:
            self.contexts.append(context)
        if context.offer.kind in self.refuse:
            return RejectOffer(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY, f"no {context.offer.kind.name.lower()}")
        counter = self.counter(context)
        if context.offer == counter:
            return AcceptOffer()
        if self.counter_once and (context.round >= context.max_rounds or counter in context.previous_offers):
            return RejectOffer(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY)
        return CounterOffer(counter)


@dataclass(frozen=True)
class PeerRail:
    """A simulated payment rail: instructions with a reference unique to the account and intent."""

    payee_name: str = "Energy Example Ltd"
    reference_prefix: str = "PRL"
    method: str = "simulated"
    account: str = "SIM-0001"

    def instructions(self, account_id: str, intent_id: str, amount: Money) -> PaymentDetails:
        return PaymentDetails(
            self.method, self.payee_name, self.account, f"{self.reference_prefix}-{account_id}-{intent_id}"
        )


# --- A hostile servicer ---------------------------------------------------------------------------------


Rewrite = Callable[[Any, Any], Any]
"""`rewrite[rpc](request, answer)`: the answer to send instead (or an awaitable of it)."""

Script = Callable[[pb.WatchEventsRequest], Awaitable[Sequence[envelope_pb2.Envelope]]]
"""A scripted WatchEvents stream: the events to send for the request, then the stream ends."""


class CallObserver(Protocol):
    """Who watches every call a `HostileServicer` serves (e.g. a scripted biller recording what a client did)."""

    async def received(self, rpc: str, request: Any) -> None:
        """Before the agent sees the call."""

    async def answered(self, rpc: str, request: Any, answer: Any) -> None:
        """The agent's own answer, before any rewrite."""

    async def sending(self, rpc: str, request: Any, answer: Any) -> Any:
        """The answer about to be sent (rewritten, if so scripted): returns what to send instead."""

    def streamed(self, request: pb.WatchEventsRequest, response: pb.WatchEventsResponse) -> list[Any]:
        """An event the agent streams: the responses to send for it (none, it, forged, several copies…)."""


_UNARY = (
    "Hello",
    "GetKeySets",
    "PublishKeySet",
    "Enrol",
    "ListBills",
    "GetBill",
    "Negotiate",
    "GetThread",
    "CreatePaymentIntent",
    "GetReceipt",
    "RequestErasure",
)


class HostileServicer(BillerServicer):
    """BillerService over the real agent, with hooks (the one hostile or broken biller of suites and tests).

    - `calls[rpc]`: how many times each method was called;
    - `unavailable_before[rpc]`: fail that many next calls with UNAVAILABLE before the agent sees them;
    - `unavailable_after[rpc]`: let the agent answer, then fail that many calls with UNAVAILABLE
      (the request took effect, its answer is lost);
    - `refuse_before[rpc]`: refuse the next calls with these errors, one each, before the agent sees them
      (nothing took effect: a refusal as the spec's table of reasons has it, §13);
    - `rewrite[rpc]`: given (request, answer), the answer to send instead (may be async);
    - `streams`: scripted WatchEvents answers, one per stream (each ends the stream when done),
      after which streams are the real ones;
    - `observer`: sees every call, the agent's answer, and every streamed event (`CallObserver`).
    """

    def __init__(self, agent: BillerAgent, observer: CallObserver | None = None) -> None:
        super().__init__(agent)
        self.observer = observer
        self.calls: Counter[str] = Counter()
        self.unavailable_before: Counter[str] = Counter()
        self.unavailable_after: Counter[str] = Counter()
        self.refuse_before: dict[str, list[ProtocolError]] = {}
        self.rewrite: dict[str, Rewrite] = {}
        self.streams: list[Script] = []

    async def _hooked(self, rpc: str, request: Any, context: Context) -> Any:
        self.calls[rpc] += 1
        if self.observer is not None:
            await self.observer.received(rpc, request)
        if self.unavailable_before[rpc] > 0:
            self.unavailable_before[rpc] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "simulated network failure")
        refusals = self.refuse_before.get(rpc)
        if refusals:
            await abort(context, refusals.pop(0))
        answer = await getattr(super(), rpc)(request, context)  # a refusal aborts the call here
        if self.unavailable_after[rpc] > 0:
            self.unavailable_after[rpc] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "simulated lost answer")
        if self.observer is not None:
            await self.observer.answered(rpc, request, answer)
        rewrite = self.rewrite.get(rpc)
        if rewrite is not None:
            answer = rewrite(request, answer)
            if inspect.isawaitable(answer):
                answer = await answer
        if self.observer is not None:
            answer = await self.observer.sending(rpc, request, answer)
        return answer

    async def Hello(self, request: pb.HelloRequest, context: Context) -> pb.HelloResponse:
        answer: pb.HelloResponse = await self._hooked("Hello", request, context)
        return answer

    async def GetKeySets(self, request: pb.GetKeySetsRequest, context: Context) -> pb.GetKeySetsResponse:
        answer: pb.GetKeySetsResponse = await self._hooked("GetKeySets", request, context)
        return answer

    async def PublishKeySet(self, request: pb.PublishKeySetRequest, context: Context) -> pb.PublishKeySetResponse:
        answer: pb.PublishKeySetResponse = await self._hooked("PublishKeySet", request, context)
        return answer

    async def Enrol(self, request: pb.EnrolRequest, context: Context) -> pb.EnrolResponse:
        answer: pb.EnrolResponse = await self._hooked("Enrol", request, context)
        return answer

    async def ListBills(self, request: pb.ListBillsRequest, context: Context) -> pb.ListBillsResponse:
        answer: pb.ListBillsResponse = await self._hooked("ListBills", request, context)
        return answer

    async def GetBill(self, request: pb.GetBillRequest, context: Context) -> pb.GetBillResponse:
        answer: pb.GetBillResponse = await self._hooked("GetBill", request, context)
        return answer

    async def Negotiate(self, request: pb.NegotiateRequest, context: Context) -> pb.NegotiateResponse:
        answer: pb.NegotiateResponse = await self._hooked("Negotiate", request, context)
        return answer

    async def GetThread(self, request: pb.GetThreadRequest, context: Context) -> pb.GetThreadResponse:
        answer: pb.GetThreadResponse = await self._hooked("GetThread", request, context)
        return answer

    async def CreatePaymentIntent(
        self, request: pb.CreatePaymentIntentRequest, context: Context
    ) -> pb.CreatePaymentIntentResponse:
        answer: pb.CreatePaymentIntentResponse = await self._hooked("CreatePaymentIntent", request, context)
        return answer

    async def GetReceipt(self, request: pb.GetReceiptRequest, context: Context) -> pb.GetReceiptResponse:
        answer: pb.GetReceiptResponse = await self._hooked("GetReceipt", request, context)
        return answer

    async def RequestErasure(self, request: pb.RequestErasureRequest, context: Context) -> pb.RequestErasureResponse:
        answer: pb.RequestErasureResponse = await self._hooked("RequestErasure", request, context)
        return answer

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        self.calls["WatchEvents"] += 1
        if self.observer is not None:
            await self.observer.received("WatchEvents", request)
        if self.streams:
            script = self.streams.pop(0)
            for envelope in await script(request):
                yield pb.WatchEventsResponse(event=envelope)
            return
        async for response in super().WatchEvents(request, context):
            if self.observer is None:
                yield response
                continue
            for sent in self.observer.streamed(request, response):
                yield sent


async def serve_on_loopback(servicer: BillerServicer, limits: Limits = DEFAULT_LIMITS) -> tuple[grpc.aio.Server, int]:
    """Serve any BillerServicer (e.g. a `HostileServicer`) in plaintext on a free 127.0.0.1 port; (server, port)."""
    server = grpc.aio.server(options=(("grpc.max_receive_message_length", limits.grpc_max_receive_bytes),))
    biller_service_pb2_grpc.add_BillerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


__all__ = [
    "DEFAULT_LIFETIME",
    "KEY_VALIDITY",
    "UNKNOWN_FIELD",
    "CallObserver",
    "HostileServicer",
    "KeySpec",
    "PeerIdentity",
    "PeerPolicy",
    "PeerRail",
    "Rewrite",
    "Script",
    "SignedParty",
    "build_header",
    "build_key_set",
    "disclosure_bytes",
    "duplicate_signature",
    "event_log_id",
    "flip_payload",
    "flip_signature",
    "free_port",
    "keyset_chain_id",
    "reseal",
    "resign",
    "seal_bytes",
    "seal_message",
    "serve_on_loopback",
    "sign_payload_not_pae",
    "sign_wrong_pae_length",
    "strip_signatures",
    "swap_payload_type",
    "timestamp",
    "truncated",
    "with_unknown_field",
]
