"""Generate Parley's test vectors into agent/data/vectors.json, deterministically.

    python scripts/gen_vectors.py          # regenerate
    python scripts/gen_vectors.py --check  # exit 1 if the committed file is stale

Keys come from fixed seeds, ids from counters and times are fixed, and Ed25519
signatures are deterministic, so every run writes the same bytes. Invalid cases
are made from valid messages by tampering, re-signing where the point is that
the signature is fine but something else is wrong. Each case records the
verdict and reason the spec requires; tests/test_vectors.py checks that this
library agrees, and other implementations can do the same (docs/VECTORS.md).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from agent.protocol.agreement import Bundle
from agent.protocol.dsse import digest, envelope_to_json, pae, sign_envelope
from agent.protocol.events import events_thread_id
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KeyChain, KeyEntry, make_key_set
from agent.protocol.limits import DEFAULT_LIMITS
from agent.protocol.messages import PAYLOAD_TYPES, new_header, seal
from agent.protocol.moves import payload_of
from agent.protocol.negotiation import Accept, Move, Offer, Open, Reject, Withdraw
from agent.protocol.terms import (
    CURRENCY_TABLE_EDITION,
    AdvertisedOptions,
    BillFacts,
    DeferralOption,
    EarlyPaymentDiscount,
    InstalmentOption,
    Line,
    LineKind,
    Money,
    TermsKind,
    build_terms,
    currency_minor_units,
    monthly_dates,
)
from agent.vectors import SCHEMA
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

OUT = Path(__file__).resolve().parent.parent / "agent" / "data" / "vectors.json"
BILLER, CONSUMER = "biller:energy.example", "consumer:alice"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
YEAR = timedelta(days=365)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def seeded_key(name: str) -> SigningKey:
    return SigningKey.from_seed(hashlib.sha256(f"parley-vectors/key/{name}".encode()).digest())


KEYS = {
    name: seeded_key(name)
    for name in ("biller-1", "biller-2", "consumer-1", "consumer-2", "stranger", "consumer-bob")  # bob: issue 14
}
_ids = itertools.count(1)


def next_id() -> bytes:
    return hashlib.sha256(f"parley-vectors/id/{next(_ids)}".encode()).digest()[:16]


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


def entry(name: str, not_before: datetime = T0, not_after: datetime = T0 + YEAR) -> KeyEntry:
    return KeyEntry(KEYS[name].public_key, not_before, not_after)


# --- Key set chains -------------------------------------------------------------------------
BILLER_V1 = make_key_set(
    party_id=BILLER,
    version=1,
    keys=[entry("biller-1")],
    signer=KEYS["biller-1"],
    previous=None,
    create_time=T0,
    expire_time=T0 + YEAR,
    message_id=next_id(),
)
ROTATION = datetime(2026, 3, 20, tzinfo=UTC)
BILLER_V2 = make_key_set(
    party_id=BILLER,
    version=2,
    keys=[entry("biller-2")],
    signer=KEYS["biller-1"],
    previous=KeyChain.verify([BILLER_V1]).latest,
    create_time=ROTATION,
    expire_time=ROTATION + YEAR,
    message_id=next_id(),
)
CONSUMER_V1 = make_key_set(
    party_id=CONSUMER,
    version=1,
    keys=[entry("consumer-1"), entry("consumer-2")],
    signer=KEYS["consumer-1"],
    previous=None,
    create_time=T0,
    expire_time=T0 + YEAR,
    message_id=next_id(),
)
# consumer-1 is found compromised; version 2, signed by the surviving consumer-2,
# revokes it from the estimated moment of compromise (the compromised-key drill).
COMPROMISE, DRILL = datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 4, 10, tzinfo=UTC)
CONSUMER_V2 = make_key_set(
    party_id=CONSUMER,
    version=2,
    keys=[entry("consumer-1"), entry("consumer-2")],
    signer=KEYS["consumer-2"],
    previous=KeyChain.verify([CONSUMER_V1]).latest,
    create_time=DRILL,
    expire_time=DRILL + YEAR,
    revocations={KEYS["consumer-1"].keyid: COMPROMISE},
    revocation_reasons={KEYS["consumer-1"].keyid: "compromised"},
    message_id=next_id(),
)
CHAINS = {BILLER: [BILLER_V1, BILLER_V2], CONSUMER: [CONSUMER_V1, CONSUMER_V2]}
SIGNER = {BILLER: "biller-1", CONSUMER: "consumer-1"}


def header(
    sender: str,
    *,
    at: datetime,
    thread: bytes | None = None,
    sequence: int = 0,
    previous: bytes = b"",
    lifetime: timedelta = HOUR,
) -> header_pb2.Header:
    recipient = CONSUMER if sender == BILLER else BILLER
    return new_header(
        sender=sender,
        recipient=recipient,
        thread_id=thread or next_id(),
        sequence=sequence,
        previous_digest=previous,
        now=at,
        lifetime=lifetime,
        message_id=next_id(),
    )


def resign(envelope: envelope_pb2.Envelope, key: SigningKey, change: Callable[[Any], None]) -> envelope_pb2.Envelope:
    """Parse, change and sign again: the signature is good, something else is wrong."""
    message = PAYLOAD_TYPES[envelope.payload_type]()
    message.ParseFromString(envelope.payload)
    change(message)
    return seal(message, key)


# --- The bill and two threads ---------------------------------------------------------------
BILL_FACTS = BillFacts(
    bill_id="bill-2026-03",
    account_id="acct-1001",
    amount_due=eur("120.00"),
    issue_date=date(2026, 3, 1),
    due_date=date(2026, 3, 31),
    description="Electricity, March 2026",
    options=AdvertisedOptions(
        deferral=DeferralOption(max_days=30, fee=eur("5.00")),
        instalments=InstalmentOption(
            max_count=6, min_amount=eur("20.00"), min_interval_days=14, max_interval_days=35, max_first_delay_days=30
        ),
        early_payment=EarlyPaymentDiscount(pay_by_date=date(2026, 3, 15), discount=eur("3.00")),
    ),
)
BILL_TIME = datetime(2026, 3, 1, 8, tzinfo=UTC)


def make_bill(facts: BillFacts = BILL_FACTS) -> envelope_pb2.Envelope:
    message = bill_pb2.Bill(header=header(BILLER, at=BILL_TIME, lifetime=timedelta(hours=24)))
    message.MergeFrom(facts.to_proto())
    return seal(message, KEYS["biller-1"])


BILL = make_bill()
PLAN_8 = build_terms(TermsKind.INSTALMENT_PLAN, BILL_FACTS.amount_due, monthly_dates(date(2026, 4, 15), 8))
PLAN_6 = build_terms(TermsKind.INSTALMENT_PLAN, BILL_FACTS.amount_due, monthly_dates(date(2026, 4, 15), 6))
DEFERRAL = build_terms(
    TermsKind.DEFERRAL, BILL_FACTS.amount_due, [date(2026, 4, 30)], [Line(LineKind.FEE, "deferral fee", eur("5.00"))]
)


@dataclass
class Thread:
    """Builds a negotiation thread message by message; each move is signed by its sender's key."""

    start: datetime
    bill: envelope_pb2.Envelope = field(default_factory=lambda: BILL)
    id: bytes = field(default_factory=next_id)
    envelopes: list[envelope_pb2.Envelope] = field(default_factory=list)

    def move(
        self,
        move: Move,
        *,
        after: timedelta = MINUTE,
        key: str | None = None,
        sequence: int | None = None,
        previous: bytes | None = None,
        at: datetime | None = None,
    ) -> envelope_pb2.Envelope:
        position = len(self.envelopes)
        sender = CONSUMER if position % 2 == 0 else BILLER
        at = self.start + after * position if at is None else at
        head = header(
            sender,
            at=at,
            thread=self.id,
            sequence=position if sequence is None else sequence,
            previous=(digest(self.envelopes[-1]) if self.envelopes else b"") if previous is None else previous,
        )
        envelope = seal(payload_of(move, head, bill_id=BILL_FACTS.bill_id), KEYS[key or SIGNER[sender]])
        self.envelopes.append(envelope)
        return envelope

    def open(
        self,
        terms: Any,
        *,
        max_rounds: int = 4,
        bill_digest: bytes | None = None,
        deadline: datetime | None = None,
    ) -> envelope_pb2.Envelope:
        deadline = self.start + timedelta(days=2) if deadline is None else deadline
        return self.move(Open(terms, max_rounds, deadline, digest(self.bill) if bill_digest is None else bill_digest))

    def last_digest(self) -> bytes:
        return digest(self.envelopes[-1])

    def bundle(self) -> dict[str, object]:
        return Bundle(key_sets=CHAINS, bill=self.bill, thread=self.envelopes).to_json()


def agreed_thread() -> Thread:
    """Consumer asks for 8 instalments (outside options), biller counters with 6, consumer accepts."""
    thread = Thread(datetime(2026, 3, 5, 9, tzinfo=UTC))
    thread.open(PLAN_8)
    thread.move(Offer(PLAN_6))
    thread.move(Accept(thread.last_digest()))
    return thread


# --- Cases ---------------------------------------------------------------------------------
CASES: list[dict[str, object]] = []


def case(case_id: str, comment: str, requirement: str, kind: str, reason: str | None, **body: object) -> None:
    CASES.append(
        {
            "id": case_id,
            "comment": comment,
            "requirement": requirement,
            "kind": kind,
            **body,
            "expected": "valid" if reason is None else "invalid",
            "reason": reason,
        }
    )


def message_case(
    case_id: str,
    comment: str,
    requirement: str,
    envelope: envelope_pb2.Envelope,
    reason: str | None,
    *,
    sender: str,
    accept: list[str],
    now: datetime,
    recipient: str | None = None,
) -> None:
    context = {
        "sender": sender,
        "recipient": recipient or (CONSUMER if sender == BILLER else BILLER),
        "now": now.isoformat(),
        "accept": accept,
    }
    case(case_id, comment, requirement, "message", reason, envelope=envelope_to_json(envelope), context=context)


NEGOTIATION = [f"parley.v1.{name}" for name in ("ThreadOpen", "Offer", "Accept", "Reject", "Withdraw")]


def valid_messages() -> None:
    thread = agreed_thread()
    at = thread.start + HOUR
    message_case(
        "valid-bill",
        "A bill signed by the biller's version-1 key before the rotation.",
        "ENV-3",
        BILL,
        None,
        sender=BILLER,
        accept=["parley.v1.Bill"],
        now=BILL_TIME + MINUTE,
    )
    names = ("thread-open", "counter-offer", "accept")
    for index, (name, envelope) in enumerate(zip(names, thread.envelopes, strict=True)):
        sender = CONSUMER if index % 2 == 0 else BILLER
        message_case(
            f"valid-{name}",
            f"Message {index} of an agreed thread.",
            "ENV-3",
            envelope,
            None,
            sender=sender,
            accept=NEGOTIATION,
            now=at,
        )
    other = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    other.open(PLAN_8)
    reject = other.move(Reject(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY, "eight instalments is too many"))
    message_case(
        "valid-reject",
        "A biller's rejection.",
        "ENV-3",
        reject,
        None,
        sender=BILLER,
        accept=NEGOTIATION,
        now=at + timedelta(days=1),
    )
    withdrawn = Thread(datetime(2026, 3, 6, 10, tzinfo=UTC))
    withdrawn.open(PLAN_8)
    withdrawn.move(Offer(PLAN_6))
    withdraw = withdrawn.move(Withdraw("paid in cash at the counter"))
    message_case(
        "valid-withdraw",
        "A consumer's withdrawal.",
        "ENV-3",
        withdraw,
        None,
        sender=CONSUMER,
        accept=NEGOTIATION,
        now=at + timedelta(days=1),
    )

    when = datetime(2026, 3, 7, 12, tzinfo=UTC)
    others: list[tuple[str, str, Message]] = [
        (
            "enrolment-request",
            CONSUMER,
            enrolment_pb2.EnrolmentRequest(
                header=header(CONSUMER, at=when),
                account_id="acct-1001",
                code="7KQ2-MX4D-9RTB",
                consumer_key_set=CONSUMER_V1,
            ),
        ),
        (
            "enrolment-confirmation",
            BILLER,
            enrolment_pb2.EnrolmentConfirmation(
                header=header(BILLER, at=when, sequence=1, previous=hashlib.sha256(b"request").digest()),
                account_id="acct-1001",
                consumer_party_id=CONSUMER,
            ),
        ),
        ("account-query", CONSUMER, account_pb2.AccountQuery(header=header(CONSUMER, at=when), account_id="acct-1001")),
        (
            "erasure-request",
            CONSUMER,
            account_pb2.ErasureRequest(header=header(CONSUMER, at=when), account_id="acct-1001"),
        ),
        (
            "erasure-confirmation",
            BILLER,
            account_pb2.ErasureConfirmation(
                header=header(BILLER, at=when, sequence=1, previous=hashlib.sha256(b"erasure").digest()),
                account_id="acct-1001",
                erased_count=1,
            ),
        ),
        (
            "payment-intent",
            CONSUMER,
            payment_pb2.PaymentIntent(
                header=header(CONSUMER, at=when),
                intent_id="intent-0001",
                account_id="acct-1001",
                bill_id="bill-2026-03",
                agreement_digest=thread.last_digest(),
                instalment_index=0,
                amount=PLAN_6.schedule[0].amount.to_proto(),
            ),
        ),
        (
            "payment-instructions",
            BILLER,
            payment_pb2.PaymentInstructions(
                header=header(BILLER, at=when, sequence=1, previous=hashlib.sha256(b"intent").digest()),
                intent_id="intent-0001",
                amount=PLAN_6.schedule[0].amount.to_proto(),
                rail="sepa-credit-transfer",
                payee_name="Energy Example Ltd",
                payee_account="DE89370400440532013000",
                payment_reference="ACCT1001-0001",
            ),
        ),
        (
            "receipt",
            BILLER,
            payment_pb2.Receipt(
                header=header(BILLER, at=when, sequence=2, previous=hashlib.sha256(b"instructions").digest()),
                intent_id="intent-0001",
                amount_received=PLAN_6.schedule[0].amount.to_proto(),
                rail_reference="SCT-20260307-0001",
                remaining_balance=eur("100.00").to_proto(),
            ),
        ),
        (
            "event",
            BILLER,
            event_pb2.Event(
                header=header(BILLER, at=when),
                account_id="acct-1001",
                kind=event_pb2.EVENT_KIND_REMINDER,
                bill_id="bill-2026-03",
                reminder_level=1,
                message="A friendly reminder: your bill is due on 31 March.",
            ),
        ),
    ]
    for name, sender, message in others:
        message_case(
            f"valid-{name}",
            f"A valid {message.DESCRIPTOR.name}.",
            "ENV-3",
            seal(message, KEYS[SIGNER[sender]]),
            None,
            sender=sender,
            accept=[message.DESCRIPTOR.full_name],
            now=when + MINUTE,
        )


def envelope_cases() -> None:
    thread = agreed_thread()
    offer = thread.envelopes[1]
    now = thread.start + HOUR
    on_biller = {"sender": BILLER, "accept": NEGOTIATION, "now": now}

    def variant(case_id: str, comment: str, requirement: str, envelope: envelope_pb2.Envelope, reason: str) -> None:
        message_case(case_id, comment, requirement, envelope, reason, **on_biller)  # type: ignore[arg-type]

    flipped = envelope_pb2.Envelope()
    flipped.CopyFrom(offer)
    flipped.signatures[0].sig = bytes([offer.signatures[0].sig[0] ^ 1]) + offer.signatures[0].sig[1:]
    variant("bad-signature", "One bit of the signature flipped.", "ENV-3", flipped, "BAD_SIGNATURE")

    tampered = envelope_pb2.Envelope()
    tampered.CopyFrom(offer)
    tampered.payload = offer.payload[:-1] + bytes([offer.payload[-1] ^ 1])
    variant("tampered-payload", "One bit of the payload flipped after signing.", "ENV-3", tampered, "BAD_SIGNATURE")

    key = KEYS["biller-1"]
    raw = envelope_pb2.Envelope(payload=offer.payload, payload_type=offer.payload_type)
    raw.signatures.add(keyid=key.keyid, sig=key.sign(offer.payload))
    variant(
        "signed-payload-not-pae",
        "The signature covers the raw payload instead of the PAE.",
        "ENV-3",
        raw,
        "BAD_SIGNATURE",
    )

    wrong_len = envelope_pb2.Envelope(payload=offer.payload, payload_type=offer.payload_type)
    bad_pae = pae(offer.payload_type, offer.payload).replace(
        f" {len(offer.payload)} ".encode(), f" {len(offer.payload) + 1} ".encode(), 1
    )
    wrong_len.signatures.add(keyid=key.keyid, sig=key.sign(bad_pae))
    variant(
        "pae-wrong-length", "The signed PAE states the payload length off by one.", "ENV-3", wrong_len, "BAD_SIGNATURE"
    )

    swapped = envelope_pb2.Envelope()
    swapped.CopyFrom(offer)
    swapped.payload_type = "parley.v1.Accept"
    variant(
        "payload-type-swapped",
        "payloadType changed from Offer to Accept after signing.",
        "ENV-3",
        swapped,
        "BAD_SIGNATURE",
    )
    message_case(
        "payload-type-not-for-call",
        "A valid Bill sent where only negotiation moves are accepted.",
        "ENV-5",
        BILL,
        "WRONG_PAYLOAD_TYPE",
        sender=BILLER,
        accept=NEGOTIATION,
        now=BILL_TIME + MINUTE,
    )

    stranger = sign_envelope(KEYS["stranger"], offer.payload_type, offer.payload)
    variant("unknown-key", "Signed by a key in no version of the biller's key set.", "KEY-6", stranger, "UNKNOWN_KEY")

    two = envelope_pb2.Envelope()
    two.CopyFrom(offer)
    two.signatures.add().CopyFrom(offer.signatures[0])
    variant("two-signatures", "Parley envelopes carry exactly one signature.", "ENV-2", two, "MALFORMED_ENVELOPE")
    none = envelope_pb2.Envelope(payload=offer.payload, payload_type=offer.payload_type)
    variant("no-signature", "An unsigned envelope.", "ENV-2", none, "MALFORMED_ENVELOPE")
    huge = sign_envelope(key, offer.payload_type, b"\x00" * (DEFAULT_LIMITS.max_envelope_bytes + 1))
    variant("envelope-too-large", "The envelope exceeds max_envelope_bytes.", "LIM-1", huge, "ENVELOPE_TOO_LARGE")

    unknown = sign_envelope(key, offer.payload_type, offer.payload + b"\xf8\x06\x01")  # field 111, varint 1
    variant(
        "unknown-field",
        "A field the schema does not define, inside the signed body.",
        "ENV-7",
        unknown,
        "UNKNOWN_FIELD",
    )
    nested = resign(offer, key, lambda m: m.terms.MergeFromString(b"\xf8\x06\x01"))
    variant("unknown-field-nested", "An undefined field inside the offer's terms.", "ENV-7", nested, "UNKNOWN_FIELD")
    truncated = sign_envelope(key, offer.payload_type, offer.payload[:-3])
    variant(
        "truncated-payload",
        "A correctly signed payload cut short: it does not parse.",
        "ENV-6",
        truncated,
        "MALFORMED_PAYLOAD",
    )

    def header_case(case_id: str, comment: str, requirement: str, reason: str, change: Callable[[Any], None]) -> None:
        variant(case_id, comment, requirement, resign(offer, key, change), reason)

    header_case(
        "unsupported-version",
        "protocol_version 2.",
        "HDR-1",
        "UNSUPPORTED_VERSION",
        lambda m: setattr(m.header, "protocol_version", 2),
    )
    header_case(
        "short-message-id",
        "An 8-byte message id.",
        "HDR-2",
        "MALFORMED_HEADER",
        lambda m: setattr(m.header, "message_id", b"\x01" * 8),
    )
    header_case(
        "wrong-sender",
        "The header names the consumer as sender; the biller signed.",
        "HDR-3",
        "WRONG_SENDER",
        lambda m: setattr(m.header, "sender", CONSUMER),
    )
    header_case(
        "wrong-recipient",
        "Addressed to another party.",
        "HDR-4",
        "WRONG_RECIPIENT",
        lambda m: setattr(m.header, "recipient", "consumer:bob"),
    )
    header_case(
        "lifetime-too-long",
        "Valid for 25 hours.",
        "HDR-5",
        "LIFETIME_TOO_LONG",
        lambda m: m.header.expire_time.FromDatetime(thread.start + MINUTE + timedelta(hours=25)),
    )
    message_case(
        "expired",
        "Received after expire_time plus the clock skew.",
        "HDR-5",
        offer,
        "MESSAGE_EXPIRED",
        sender=BILLER,
        accept=NEGOTIATION,
        now=thread.start + HOUR + MINUTE + timedelta(seconds=301),
    )
    message_case(
        "not-yet-valid",
        "Created further in the future than the clock skew.",
        "HDR-5",
        offer,
        "MESSAGE_NOT_YET_VALID",
        sender=BILLER,
        accept=NEGOTIATION,
        now=thread.start + MINUTE - timedelta(seconds=301),
    )


def key_validity_cases() -> None:
    before_rotation = datetime(2026, 3, 19, tzinfo=UTC)
    old = seal(
        account_pb2.AccountQuery(header=header(BILLER, at=before_rotation), account_id="acct-1001"), KEYS["biller-1"]
    )
    message_case(
        "rotated-key-old-message",
        "Signed by biller-1 before version 2 rotated it out: still valid.",
        "KEY-10",
        old,
        None,
        sender=BILLER,
        accept=["parley.v1.AccountQuery"],
        now=before_rotation + MINUTE,
    )
    after_rotation = datetime(2026, 3, 21, tzinfo=UTC)
    late = seal(
        account_pb2.AccountQuery(header=header(BILLER, at=after_rotation), account_id="acct-1001"), KEYS["biller-1"]
    )
    message_case(
        "rotated-key-new-message",
        "Signed by biller-1 after version 2 rotated it out.",
        "KEY-10",
        late,
        "UNKNOWN_KEY",
        sender=BILLER,
        accept=["parley.v1.AccountQuery"],
        now=after_rotation + MINUTE,
    )
    compromised_at = COMPROMISE + timedelta(days=2)
    forged = seal(
        account_pb2.AccountQuery(header=header(CONSUMER, at=compromised_at), account_id="acct-1001"), KEYS["consumer-1"]
    )
    message_case(
        "revoked-key",
        "Signed by consumer-1 after its revocation time.",
        "KEY-11",
        forged,
        "KEY_REVOKED",
        sender=CONSUMER,
        accept=["parley.v1.AccountQuery"],
        now=compromised_at + MINUTE,
    )
    early = T0 - timedelta(days=1)
    premature = seal(
        account_pb2.AccountQuery(header=header(CONSUMER, at=early), account_id="acct-1001"), KEYS["consumer-2"]
    )
    message_case(
        "key-not-yet-valid",
        "Created before the key's not_before.",
        "KEY-10",
        premature,
        "KEY_NOT_VALID",
        sender=CONSUMER,
        accept=["parley.v1.AccountQuery"],
        now=early + MINUTE,
    )


def keyset_cases() -> None:
    def chain_case(
        case_id: str,
        comment: str,
        requirement: str,
        envelopes: list[envelope_pb2.Envelope],
        reason: str | None,
        *,
        pin: bytes | None = None,
        now: datetime | None = None,
    ) -> None:
        case(
            case_id,
            comment,
            requirement,
            "keyset",
            reason,
            envelopes=[envelope_to_json(e) for e in envelopes],
            pin=None if pin is None else pin.hex(),
            now=None if now is None else now.isoformat(),
        )

    fingerprint = digest(BILLER_V1)
    chain_case(
        "keyset-v1-pinned",
        "A self-signed version 1 matching the pinned fingerprint.",
        "KEY-12",
        [BILLER_V1],
        None,
        pin=fingerprint,
    )
    chain_case(
        "keyset-rotation",
        "Version 2 signed by the version-1 key.",
        "KEY-9",
        [BILLER_V1, BILLER_V2],
        None,
        pin=fingerprint,
        now=ROTATION + HOUR,
    )
    chain_case(
        "keyset-revocation",
        "Version 2 signed by a surviving key revokes a compromised one.",
        "KEY-11",
        [CONSUMER_V1, CONSUMER_V2],
        None,
    )
    chain_case(
        "keyset-pin-mismatch",
        "The chain starts at another identity than the pinned one.",
        "KEY-12",
        [CONSUMER_V1],
        "PIN_MISMATCH",
        pin=fingerprint,
    )
    old_again = resign(CONSUMER_V1, KEYS["consumer-2"], lambda m: None)
    chain_case(
        "keyset-rollback",
        "A version-1 set, signed by a current key, offered after version 2.",
        "KEY-8",
        [CONSUMER_V1, CONSUMER_V2, old_again],
        "KEYSET_ROLLBACK",
    )

    def version_3(keyset: keys_pb2.KeySet) -> None:
        keyset.version, keyset.header.sequence = 3, 2

    skipped = resign(BILLER_V2, KEYS["biller-1"], version_3)
    chain_case(
        "keyset-skipped-version",
        "Version 3 directly after version 1.",
        "KEY-8",
        [BILLER_V1, skipped],
        "KEYSET_VERSION_SKIPPED",
    )
    self_signed = resign(BILLER_V2, KEYS["biller-2"], lambda m: None)
    chain_case(
        "keyset-rotation-wrong-signer",
        "Version 2 signed only by its own new key.",
        "KEY-9",
        [BILLER_V1, self_signed],
        "KEYSET_WRONG_SIGNER",
    )
    foreign_root = resign(BILLER_V1, KEYS["stranger"], lambda m: None)
    chain_case(
        "keyset-v1-not-self-signed",
        "Version 1 signed by a key it does not contain.",
        "KEY-9",
        [foreign_root],
        "KEYSET_WRONG_SIGNER",
    )
    bad_keyid = resign(BILLER_V1, KEYS["biller-1"], lambda m: setattr(m.keys[0], "keyid", "0" * 32))
    chain_case(
        "keyset-keyid-mismatch", "A keyid that is not the hash of its key.", "KEY-7", [bad_keyid], "KEYSET_INVALID"
    )
    consumer_v3 = make_key_set(
        party_id=CONSUMER,
        version=3,
        keys=[entry("consumer-2")],
        signer=KEYS["consumer-2"],
        previous=KeyChain.verify([CONSUMER_V1, CONSUMER_V2]).latest,
        create_time=DRILL + HOUR,
        expire_time=DRILL + YEAR,
        message_id=next_id(),
    )
    forgetful = resign(consumer_v3, KEYS["consumer-2"], lambda m: m.ClearField("revocations"))
    chain_case(
        "keyset-revocation-dropped",
        "Version 3 forgets version 2's revocation.",
        "KEY-11",
        [CONSUMER_V1, CONSUMER_V2, forgetful],
        "KEYSET_INVALID",
    )
    chain_case(
        "keyset-expired",
        "The newest version has expired (freeze attack).",
        "KEY-13",
        [BILLER_V1, BILLER_V2],
        "KEYSET_EXPIRED",
        now=ROTATION + YEAR + HOUR,
    )
    unknown = resign(BILLER_V1, KEYS["biller-1"], lambda m: m.MergeFromString(b"\xf8\x06\x01"))
    chain_case(
        "keyset-unknown-field", "An undefined field in a self-signed version 1.", "ENV-7", [unknown], "UNKNOWN_FIELD"
    )


def bundle_cases() -> None:
    def bundle_case(case_id: str, comment: str, requirement: str, thread: Thread, reason: str | None) -> None:
        case(case_id, comment, requirement, "bundle", reason, bundle=thread.bundle())

    bundle_case(
        "bundle-agreed-after-counter", "Plan of 8 asked, 6 countered, accepted.", "BND-1", agreed_thread(), None
    )
    at_once = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    at_once.open(DEFERRAL)
    at_once.move(Accept(at_once.last_digest()))
    bundle_case(
        "bundle-options-accepted-at-once",
        "A deferral inside the advertised options, accepted at once.",
        "NEG-12",
        at_once,
        None,
    )

    gap = agreed_thread()
    gap.envelopes.pop()
    gap.move(Accept(gap.last_digest()), sequence=3)
    bundle_case(
        "bundle-sequence-gap", "The acceptance claims sequence 3 after message 1.", "HDR-6", gap, "SEQUENCE_MISMATCH"
    )
    chain_break = agreed_thread()
    chain_break.envelopes.pop()
    chain_break.move(Accept(chain_break.last_digest()), previous=hashlib.sha256(b"elsewhere").digest())
    bundle_case(
        "bundle-previous-digest-mismatch",
        "The acceptance chains to a message not in the thread.",
        "HDR-7",
        chain_break,
        "PREVIOUS_DIGEST_MISMATCH",
    )
    stale = agreed_thread()
    stale.envelopes.pop()
    stale.move(Accept(digest(stale.envelopes[0])))
    bundle_case(
        "bundle-accept-wrong-digest",
        "The consumer 'accepts' its own opening, not the last offer.",
        "NEG-9",
        stale,
        "ACCEPT_DIGEST_MISMATCH",
    )
    unsummed = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    unsummed.open(PLAN_8)
    unsummed.move(Offer(PLAN_6))
    unsummed.envelopes[-1] = resign(
        unsummed.envelopes[-1], KEYS["biller-1"], lambda m: setattr(m.terms.schedule[0].amount, "amount_minor", 2001)
    )
    unsummed.move(Accept(unsummed.last_digest()))
    bundle_case(
        "bundle-schedule-does-not-sum",
        "The counter-offer's instalments sum to one cent more than its total.",
        "TRM-8",
        unsummed,
        "SCHEDULE_SUM_MISMATCH",
    )
    rejected = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    rejected.open(PLAN_8)
    rejected.move(Reject(negotiation_pb2.REJECT_REASON_OUT_OF_POLICY))
    bundle_case(
        "bundle-not-agreed", "The thread ends in a rejection: there is no agreement.", "BND-4", rejected, "NOT_AGREED"
    )
    dishonoured = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    dishonoured.open(DEFERRAL)
    dishonoured.move(Offer(PLAN_6))
    dishonoured.move(Accept(dishonoured.last_digest()))
    bundle_case(
        "bundle-options-not-honoured",
        "The biller countered an offer inside its own advertised options.",
        "NEG-12",
        dishonoured,
        "OPTIONS_NOT_HONOURED",
    )
    one_round = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    one_round.open(PLAN_8, max_rounds=1)
    one_round.move(Offer(PLAN_6))
    one_round.move(Accept(one_round.last_digest()))
    bundle_case(
        "bundle-round-limit",
        "A counter-offer in a thread opened with max_rounds 1.",
        "NEG-5",
        one_round,
        "ROUND_LIMIT_EXCEEDED",
    )
    late = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    late.open(PLAN_8)
    late.move(Offer(PLAN_6))
    late.move(Accept(late.last_digest()), after=timedelta(days=1, hours=1))
    bundle_case(
        "bundle-after-deadline",
        "The acceptance is created after the thread's deadline.",
        "NEG-6",
        late,
        "NEGOTIATION_DEADLINE_PASSED",
    )
    other_bill = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    other_bill.open(PLAN_8, bill_digest=hashlib.sha256(b"another bill").digest())
    other_bill.move(Offer(PLAN_6))
    other_bill.move(Accept(other_bill.last_digest()))
    bundle_case(
        "bundle-wrong-bill-digest",
        "The opening names a different version of the bill.",
        "NEG-2",
        other_bill,
        "BILL_DIGEST_MISMATCH",
    )
    forged = agreed_thread()
    forged_terms = envelope_pb2.Envelope()
    forged_terms.CopyFrom(forged.envelopes[1])
    forged_terms.payload = forged_terms.payload.replace(b"\xd0\x0f", b"\xe8\x07")  # 20.00 -> 10.00 somewhere
    forged.envelopes[1] = forged_terms
    bundle_case(
        "bundle-forged-terms",
        "The accepted offer's amounts were edited after signing.",
        "ENV-3",
        forged,
        "BAD_SIGNATURE",
    )
    total = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    total.open(PLAN_8)
    total.move(Offer(PLAN_6))
    total.envelopes[-1] = resign(
        total.envelopes[-1], KEYS["biller-1"], lambda m: setattr(m.terms.total, "amount_minor", 11000)
    )
    total.move(Accept(total.last_digest()))
    bundle_case(
        "bundle-total-mismatch",
        "The counter-offer's total is not principal plus fees minus discounts.",
        "TRM-7",
        total,
        "TOTAL_MISMATCH",
    )
    turn = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    turn.open(PLAN_8)
    turn.move(Offer(PLAN_6), key="consumer-1")
    bundle_case(
        "bundle-signed-by-wrong-party",
        "Message 1 (the biller's move) is signed by the consumer.",
        "NEG-7",
        turn,
        "UNKNOWN_KEY",
    )


# --- Protocol v1.1 cases (issue 14); generated after the v1 cases so those keep their bytes -------
MICROSECOND = timedelta(microseconds=1)
SKEW = DEFAULT_LIMITS.max_clock_skew
LIFETIME = DEFAULT_LIMITS.max_message_lifetime


def keyset_case(
    case_id: str, comment: str, requirement: str, envelopes: list[envelope_pb2.Envelope], reason: str | None
) -> None:
    case(
        case_id,
        comment,
        requirement,
        "keyset",
        reason,
        envelopes=[envelope_to_json(e) for e in envelopes],
        pin=None,
        now=None,
    )


def bundle_of(case_id: str, comment: str, requirement: str, bundle: dict[str, object], reason: str | None) -> None:
    case(case_id, comment, requirement, "bundle", reason, bundle=bundle)


def accepted_at_once(bill: envelope_pb2.Envelope = BILL, terms: Any = DEFERRAL) -> Thread:
    """A deferral inside the options, accepted at once by the biller: the shortest agreed thread."""
    thread = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC), bill=bill)
    thread.open(terms)
    thread.move(Accept(thread.last_digest()))
    return thread


def set_nanos(field: str, nanos: int) -> Callable[[Any], None]:
    """A change to a header Timestamp's nanos (HDR-16 vectors)."""
    return lambda m: setattr(getattr(m.header, field), "nanos", nanos)


def time_precision_cases() -> None:
    """HDR-16: whole microseconds; and each time comparison at its boundary, exact and one microsecond past."""
    thread = agreed_thread()
    offer = thread.envelopes[1]
    created = thread.start + MINUTE
    key = KEYS["biller-1"]
    on_biller: dict[str, Any] = {"sender": BILLER, "accept": NEGOTIATION}

    def offer_case(
        case_id: str, comment: str, requirement: str, change: Callable[[Any], None], reason: str | None
    ) -> None:
        message_case(
            case_id, comment, requirement, resign(offer, key, change), reason, now=thread.start + HOUR, **on_biller
        )

    def one_ns_past_limit(message: Any) -> None:
        message.header.expire_time.FromDatetime(created + LIFETIME)
        message.header.expire_time.nanos = 1

    offer_case(
        "time-create-nanos",
        "create_time carries 1 ns beyond a whole second: not a whole number of microseconds.",
        "HDR-16",
        set_nanos("create_time", 1),
        "MALFORMED_HEADER",
    )
    offer_case(
        "time-lifetime-at-limit",
        "expire_time - create_time is exactly max_message_lifetime (86,400 s).",
        "HDR-5",
        lambda m: m.header.expire_time.FromDatetime(created + LIFETIME),
        None,
    )
    offer_case(
        "time-lifetime-limit-plus-1us",
        "A lifetime of 86,400 s + 1 µs.",
        "HDR-5",
        lambda m: m.header.expire_time.FromDatetime(created + LIFETIME + MICROSECOND),
        "LIFETIME_TOO_LONG",
    )
    offer_case(
        "time-lifetime-limit-plus-1ns",
        "A lifetime of 86,400 s + 1 ns: the expire_time is not whole microseconds, refused before any comparison.",
        "HDR-16",
        one_ns_past_limit,
        "MALFORMED_HEADER",
    )
    expire = created + HOUR
    for case_id, comment, now, reason in (
        ("time-not-yet-valid-at-skew", "create_time is exactly now + skew.", created - SKEW, None),
        (
            "time-not-yet-valid-skew-plus-1us",
            "create_time is now + skew + 1 µs.",
            created - SKEW - MICROSECOND,
            "MESSAGE_NOT_YET_VALID",
        ),
        ("time-expired-at-skew", "expire_time is exactly now - skew.", expire + SKEW, None),
        (
            "time-expired-skew-plus-1us",
            "expire_time is now - skew - 1 µs.",
            expire + SKEW + MICROSECOND,
            "MESSAGE_EXPIRED",
        ),
    ):
        message_case(case_id, comment, "HDR-5", offer, reason, now=now, **on_biller)

    # KEY-10 at the end of a key's window: biller-2 signs until its not_after, exclusive.
    not_after = T0 + YEAR
    for case_id, comment, at, reason in (
        ("time-key-window-last-microsecond", "Created 1 µs before the key's not_after.", not_after - MICROSECOND, None),
        (
            "time-key-window-at-not-after",
            "Created exactly at the key's not_after (excluded).",
            not_after,
            "KEY_NOT_VALID",
        ),
    ):
        query = seal(account_pb2.AccountQuery(header=header(BILLER, at=at), account_id="acct-1001"), KEYS["biller-2"])
        message_case(
            case_id, comment, "KEY-10", query, reason, sender=BILLER, accept=["parley.v1.AccountQuery"], now=at + MINUTE
        )
    keyset_case(
        "time-keyset-key-not-after-nanos",
        "A key's not_after 1 ns after a whole second: the key set is malformed.",
        "HDR-16",
        [resign(BILLER_V1, KEYS["biller-1"], lambda m: setattr(m.keys[0].not_after, "nanos", 1))],
        "KEYSET_INVALID",
    )
    keyset_case(
        "time-keyset-create-nanos",
        "A key set version whose header create_time carries 1 ns.",
        "HDR-16",
        [resign(BILLER_V1, KEYS["biller-1"], set_nanos("create_time", 1))],
        "MALFORMED_HEADER",
    )

    # NEG-6: a move at the deadline is in time; 1 µs later it is not; 1 ns later it is malformed.
    start = datetime(2026, 3, 6, 9, tzinfo=UTC)
    deadline = start + timedelta(days=2)
    for case_id, comment, at, reason in (
        ("time-accept-at-deadline", "The acceptance is created exactly at the deadline.", deadline, None),
        (
            "time-accept-deadline-plus-1us",
            "The acceptance is created 1 µs after the deadline.",
            deadline + MICROSECOND,
            "NEGOTIATION_DEADLINE_PASSED",
        ),
    ):
        thread = Thread(start)
        thread.open(PLAN_8)
        thread.move(Offer(PLAN_6))
        thread.move(Accept(thread.last_digest()), at=at)
        bundle_of(case_id, comment, "NEG-6", thread.bundle(), reason)
    thread = Thread(start)
    thread.open(PLAN_8)
    thread.move(Offer(PLAN_6))
    thread.move(Accept(thread.last_digest()), at=deadline)
    thread.envelopes[-1] = resign(thread.envelopes[-1], KEYS["consumer-1"], set_nanos("create_time", 1))
    bundle_of(
        "time-accept-deadline-plus-1ns",
        "The acceptance is created 1 ns after the deadline: malformed, not late.",
        "HDR-16",
        thread.bundle(),
        "MALFORMED_HEADER",
    )

    # NEG-4 / LIM-5: the opening's deadline at most max_negotiation_time after its create_time.
    longest = DEFAULT_LIMITS.max_negotiation_time
    for case_id, comment, extra, reason in (
        ("time-deadline-at-limit", "The opening's deadline is exactly create_time + 7 days.", timedelta(0), None),
        (
            "time-deadline-limit-plus-1us",
            "The opening's deadline is create_time + 7 days + 1 µs.",
            MICROSECOND,
            "NEGOTIATION_LIMITS_INVALID",
        ),
    ):
        thread = Thread(start)
        thread.open(DEFERRAL, deadline=start + longest + extra)
        thread.move(Accept(thread.last_digest()))
        bundle_of(case_id, comment, "LIM-5", thread.bundle(), reason)
    thread = Thread(start)
    thread.open(DEFERRAL, deadline=start + longest)
    thread.envelopes[0] = resign(thread.envelopes[0], KEYS["consumer-1"], lambda m: setattr(m.deadline, "nanos", 1))
    thread.move(Accept(thread.last_digest()))
    bundle_of(
        "time-deadline-limit-plus-1ns",
        "The opening's deadline is create_time + 7 days + 1 ns: not whole microseconds.",
        "HDR-16",
        thread.bundle(),
        "NEGOTIATION_LIMITS_INVALID",
    )


def currency_bill(code: str) -> tuple[envelope_pb2.Envelope, Any]:
    """A bill of 120 units and a deferral accepted at once, in `code` (re-signed when `code` is not in the table)."""
    known = code if code in currency_minor_units() else "XCG"
    money = Money.parse("120.00", known)
    facts = BillFacts(
        bill_id="bill-2026-03",
        account_id="acct-1001",
        amount_due=money,
        issue_date=date(2026, 3, 1),
        due_date=date(2026, 3, 31),
        description="Electricity, March 2026",
        options=AdvertisedOptions(deferral=DeferralOption(max_days=30, fee=Money.parse("5.00", known))),
    )
    bill = make_bill(facts)
    if known != code:

        def recode(message: Any) -> None:
            message.amount_due.currency_code = code
            message.options.deferral.fee.currency_code = code

        bill = resign(bill, KEYS["biller-1"], recode)
    terms = build_terms(
        TermsKind.DEFERRAL, money, [date(2026, 4, 30)], [Line(LineKind.FEE, "deferral fee", Money.parse("5.00", known))]
    )
    return bill, terms


def currency_cases() -> None:
    """TRM-1, TRM-17: the shipped table decides; codes withdrawn from it and new ones at its edition."""
    bill, terms = currency_bill("XCG")
    bundle_of(
        "currency-xcg-in-table",
        "A bill and agreement in XCG (Caribbean guilder), in the table's edition.",
        "TRM-17",
        accepted_at_once(bill, terms).bundle(),
        None,
    )
    for code, comment in (
        ("ANG", "A bill in ANG (Netherlands Antillean guilder), withdrawn before the table's edition."),
        ("CUC", "A bill in CUC (Cuban convertible peso), withdrawn before the table's edition."),
    ):
        bill, terms = currency_bill(code)
        bundle_of(
            f"currency-{code.lower()}-withdrawn",
            comment,
            "TRM-17",
            accepted_at_once(bill, terms).bundle(),
            "UNKNOWN_CURRENCY",
        )


def bundle_form_cases() -> None:
    """BND-9: an envelope in a bundle that is not DSSE JSON makes the bundle invalid, MALFORMED_ENVELOPE."""
    good = accepted_at_once().bundle()

    def edited(change: Callable[[Any], None]) -> dict[str, object]:
        document: dict[str, object] = json.loads(json.dumps(good))
        change(document)
        return document

    bundle_of(
        "bundle-json-payload-not-canonical-base64",
        "The acceptance's payload is base64 without its padding.",
        "BND-9",
        edited(lambda d: d["thread"][1].__setitem__("payload", d["thread"][1]["payload"].rstrip("="))),
        "MALFORMED_ENVELOPE",
    )
    bundle_of(
        "bundle-json-keyset-extra-member",
        "A key set envelope with a member DSSE JSON does not have.",
        "BND-9",
        edited(lambda d: d["keySets"][CONSUMER][0].__setitem__("extra", 1)),
        "MALFORMED_ENVELOPE",
    )
    bundle_of(
        "bundle-json-bill-signatures-not-array",
        "The bill's signatures member is an object, not an array.",
        "BND-9",
        edited(lambda d: d["bill"].__setitem__("signatures", d["bill"]["signatures"][0])),
        "MALFORMED_ENVELOPE",
    )


def bill_position_cases() -> None:
    """BIL-6: a bill is a one-message thread: sequence 0, empty previous_digest."""

    def at_sequence_1(message: Any) -> None:
        message.header.sequence = 1

    def with_previous(message: Any) -> None:
        message.header.previous_digest = hashlib.sha256(b"elsewhere").digest()

    for case_id, comment, change, reason in (
        ("bill-at-sequence-1", "A bill at sequence 1.", at_sequence_1, "SEQUENCE_MISMATCH"),
        (
            "bill-with-previous-digest",
            "A bill at sequence 0 chained to a previous message.",
            with_previous,
            "PREVIOUS_DIGEST_MISMATCH",
        ),
    ):
        bill = resign(BILL, KEYS["biller-1"], change)
        bundle_of(case_id, comment, "BIL-6", accepted_at_once(bill).bundle(), reason)


def missing_amount_cases() -> None:
    """TRM-16: a required Money left unset reads as an empty Money: UNKNOWN_CURRENCY in decoding order."""

    def bill_without(path: str) -> Callable[[Any], None]:
        *parents, name = path.split(".")

        def change(message: Any) -> None:
            target = message
            for parent in parents:
                target = getattr(target, parent)
            target.ClearField(name)

        return change

    for case_id, path in (
        ("missing-bill-amount-due", "amount_due"),
        ("missing-bill-instalments-min-amount", "options.instalments.min_amount"),
        ("missing-bill-early-payment-discount", "options.early_payment.discount"),
    ):
        bill = resign(BILL, KEYS["biller-1"], bill_without(path))
        bundle_of(
            case_id, f"The bill's {path} is not set.", "TRM-16", accepted_at_once(bill).bundle(), "UNKNOWN_CURRENCY"
        )
    for case_id, comment, change in (
        ("missing-terms-total", "The opening's terms have no total.", lambda m: m.terms.ClearField("total")),
        (
            "missing-terms-principal",
            "The opening's terms have no principal.",
            lambda m: m.terms.ClearField("principal"),
        ),
        (
            "missing-line-amount",
            "The opening's fee line has no amount.",
            lambda m: m.terms.lines[0].ClearField("amount"),
        ),
    ):
        thread = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
        thread.open(DEFERRAL)
        thread.envelopes[0] = resign(thread.envelopes[0], KEYS["consumer-1"], change)
        thread.move(Accept(thread.last_digest()))
        bundle_of(case_id, comment, "TRM-16", thread.bundle(), "UNKNOWN_CURRENCY")


def first_version_cases() -> None:
    """KEY-22: holding nothing, a receiver judges the first version as if it held version 0."""

    def numbered(version: int) -> Callable[[Any], None]:
        def change(keyset: Any) -> None:
            keyset.version, keyset.header.sequence = version, max(version - 1, 0)

        return change

    keyset_case(
        "keyset-first-version-0",
        "A chain whose first version is numbered 0.",
        "KEY-22",
        [resign(BILLER_V1, KEYS["biller-1"], numbered(0))],
        "KEYSET_ROLLBACK",
    )
    keyset_case(
        "keyset-first-version-2",
        "A chain whose first version is numbered 2, with nothing held.",
        "KEY-22",
        [resign(BILLER_V1, KEYS["biller-1"], numbered(2))],
        "KEYSET_VERSION_SKIPPED",
    )


def header_bytes(**fields: Any) -> bytes:
    """Field 1 (the header) of a payload, holding only `fields`: merged into the real header by the parser."""
    body = header_pb2.Header(**fields).SerializeToString()
    return b"\x0a" + bytes([len(body)]) + body


def parsing_cases() -> None:
    """ENV-14: payloads parse by the protobuf binary rules; these inputs pin down the corners."""
    offer = agreed_thread().envelopes[1]
    key = KEYS["biller-1"]
    now = datetime(2026, 3, 5, 10, tzinfo=UTC)

    def raw_case(case_id: str, comment: str, requirement: str, payload: bytes, reason: str | None) -> None:
        envelope = sign_envelope(key, offer.payload_type, payload)
        message_case(case_id, comment, requirement, envelope, reason, sender=BILLER, accept=NEGOTIATION, now=now)

    raw_case(
        "parse-non-minimal-varint",
        "The header is given again with sequence 1 as a two-byte varint (0x81 0x00): accepted, same value.",
        "ENV-14",
        offer.payload + b"\x0a\x03\x20\x81\x00",
        None,
    )
    raw_case(
        "parse-repeated-singular-last-wins",
        "A header naming another recipient, then the real header: the last value of a singular field wins.",
        "ENV-14",
        header_bytes(recipient="consumer:bob") + offer.payload,
        None,
    )
    raw_case(
        "parse-repeated-singular-last-is-wrong",
        "The real header, then one naming another recipient: the last value wins, so the recipient is wrong.",
        "ENV-14",
        offer.payload + header_bytes(recipient="consumer:bob"),
        "WRONG_RECIPIENT",
    )
    raw_case(
        "parse-invalid-utf8",
        "The header's sender given again as the bytes C3 28, which are not UTF-8.",
        "ENV-14",
        offer.payload + b"\x0a\x04\x2a\x02\xc3\x28",
        "MALFORMED_PAYLOAD",
    )
    raw_case(
        "parse-group-undefined-field",
        "A well-formed group (wire types 3 and 4) as field 99: an unknown field.",
        "ENV-14",
        offer.payload + b"\x9b\x06\x08\x01\x9c\x06",
        "UNKNOWN_FIELD",
    )
    raw_case(
        "parse-group-defined-field",
        "Field 2 (terms) as an empty group: a defined number with the wrong wire type is an unknown field.",
        "ENV-14",
        offer.payload + b"\x13\x14",
        "UNKNOWN_FIELD",
    )
    raw_case(
        "parse-group-unterminated",
        "A group for field 99 that is never ended.",
        "ENV-14",
        offer.payload + b"\x9b\x06\x08\x01",
        "MALFORMED_PAYLOAD",
    )
    raw_case(
        "parse-end-group-without-start",
        "An end-group tag for field 99 with no group open.",
        "ENV-14",
        offer.payload + b"\x9c\x06",
        "MALFORMED_PAYLOAD",
    )
    raw_case(
        "parse-field-number-zero",
        "A varint at field number 0, which protobuf never allows.",
        "ENV-14",
        offer.payload + b"\x00\x01",
        "MALFORMED_PAYLOAD",
    )


def renegotiation_cases() -> None:
    """BND-5, TRM-11: a renegotiation after a half-paid plan broke restates the outstanding balance, which the
    bundle does not show; the verifier takes it from the opening's principal when positive, in the bill's
    currency and at most the amount due (60.00 of the 120.00 bill here), else the amount due."""

    def renegotiated(terms: Any, *, change: Callable[[Any], None] | None = None) -> Thread:
        thread = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
        thread.open(terms)
        if change is not None:
            thread.envelopes[0] = resign(thread.envelopes[0], KEYS["consumer-1"], change)
        thread.move(Accept(thread.last_digest()))
        return thread

    def plan_of(amount: Money, first: date = date(2026, 4, 15)) -> Any:
        return build_terms(TermsKind.INSTALMENT_PLAN, amount, monthly_dates(first, 2))

    def zero_principal(message: Any) -> None:
        message.terms.principal.amount_minor = 0

    bundle_of(
        "bundle-renegotiated-outstanding-balance",
        "A renegotiation after 60.00 of the 120.00 bill was received: 2 x 30.00 restating 60.00, accepted.",
        "BND-5",
        renegotiated(plan_of(eur("60.00"))).bundle(),
        None,
    )
    bundle_of(
        "bundle-renegotiated-above-amount-due",
        "An opening restating 130.00, more than the 120.00 due: judged against the amount due.",
        "BND-5",
        renegotiated(plan_of(eur("130.00"))).bundle(),
        "PRINCIPAL_MISMATCH",
    )
    bundle_of(
        "bundle-renegotiated-other-currency",
        "An opening restating GBP 60.00 of a EUR bill.",
        "BND-5",
        renegotiated(plan_of(Money.parse("60.00", "GBP"))).bundle(),
        "CURRENCY_MISMATCH",
    )
    bundle_of(
        "bundle-renegotiated-zero-principal",
        "An opening restating a principal of 0.00: refused as an amount before the balance is taken from it.",
        "BND-5",
        renegotiated(plan_of(eur("60.00")), change=zero_principal).bundle(),
        "AMOUNT_OUT_OF_RANGE",
    )
    countered = Thread(datetime(2026, 3, 6, 9, tzinfo=UTC))
    countered.open(plan_of(eur("60.00"), date(2026, 8, 15)))
    countered.move(Offer(PLAN_6))
    countered.move(Accept(countered.last_digest()))
    bundle_of(
        "bundle-renegotiated-counter-restates-more",
        "An opening restating 60.00, countered with 6 instalments of the whole 120.00 and accepted.",
        "BND-5",
        countered.bundle(),
        "PRINCIPAL_MISMATCH",
    )


def reenrolment_cases() -> None:
    """ENR-12, BIL-7, EVT-11: acct-1001 re-bound from consumer:alice to consumer:bob on 2026-03-10.

    Made last, so that the ids they draw leave every earlier case's bytes as they were. The unpaid bill is
    presented again to bob — a new Bill signed to him, a fresh one-message thread, same bill id and terms —
    and his own log starts at sequence 0 with its BILL_ISSUED naming that presentation.
    """
    bob, account_id, rebound = "consumer:bob", BILL_FACTS.account_id, datetime(2026, 3, 10, 9, tzinfo=UTC)
    bob_v1 = make_key_set(
        party_id=bob,
        version=1,
        keys=[entry("consumer-bob")],
        signer=KEYS["consumer-bob"],
        previous=None,
        create_time=T0,
        expire_time=T0 + YEAR,
        message_id=next_id(),
    )

    def to(recipient: str, sender: str, *, at: datetime, thread: bytes, sequence: int = 0, previous: bytes = b"",
           lifetime: timedelta = HOUR) -> header_pb2.Header:  # fmt: skip
        return new_header(
            sender=sender,
            recipient=recipient,
            thread_id=thread,
            sequence=sequence,
            previous_digest=previous,
            now=at,
            lifetime=lifetime,
            message_id=next_id(),
        )

    again = bill_pb2.Bill(header=to(bob, BILLER, at=rebound, thread=next_id(), lifetime=timedelta(hours=24)))
    again.MergeFrom(BILL_FACTS.to_proto())
    presented = seal(again, KEYS["biller-1"])
    message_case(
        "reenrol-bill-presented-again",
        "acct-1001 re-bound to consumer:bob: its unpaid bill presented again to him (same bill_id and terms, a fresh "
        "thread at sequence 0, recipient consumer:bob).",
        "ENR-12",
        presented,
        None,
        now=rebound + MINUTE,
        sender=BILLER,
        accept=["parley.v1.Bill"],
        recipient=bob,
    )
    message_case(
        "reenrol-bill-of-earlier-holder",
        "The bill as presented to consumer:alice, served to consumer:bob after the re-enrolment.",
        "BIL-7",
        BILL,
        "WRONG_RECIPIENT",
        now=BILL_TIME + MINUTE,
        sender=BILLER,
        accept=["parley.v1.Bill"],
        recipient=bob,
    )
    log_id = events_thread_id(BILLER, account_id)

    def bill_issued(recipient: str, sequence: int, previous: bytes, bill: envelope_pb2.Envelope) -> Any:
        return seal(
            event_pb2.Event(
                header=to(recipient, BILLER, at=rebound, thread=log_id, sequence=sequence, previous=previous),
                account_id=account_id,
                kind=event_pb2.EVENT_KIND_BILL_ISSUED,
                bill_id=BILL_FACTS.bill_id,
                amount=BILL_FACTS.amount_due.to_proto(),
                date=BILL_FACTS.due_date.isoformat(),
                related_digest=digest(bill),
            ),
            KEYS["biller-1"],
        )

    message_case(
        "reenrol-event-0-of-new-log",
        "Event 0 of consumer:bob's own log of acct-1001 (the account's event log id): BILL_ISSUED naming the bill as "
        "presented to him.",
        "EVT-11",
        bill_issued(bob, 0, b"", presented),
        None,
        now=rebound + MINUTE,
        sender=BILLER,
        accept=["parley.v1.Event"],
        recipient=bob,
    )
    message_case(
        "reenrol-event-of-earlier-holders-log",
        "An event of consumer:alice's log of acct-1001 (sequence 1), served to consumer:bob after the re-enrolment.",
        "EVT-11",
        bill_issued(CONSUMER, 1, hashlib.sha256(b"alice's event 0").digest(), BILL),
        "WRONG_RECIPIENT",
        now=rebound + MINUTE,
        sender=BILLER,
        accept=["parley.v1.Event"],
        recipient=bob,
    )

    def agreed_by_bob(bill: envelope_pb2.Envelope) -> dict[str, object]:
        """bob opens a deferral inside the options on `bill`; the biller accepts it at once."""
        start, thread = rebound + HOUR, next_id()
        opening = seal(
            payload_of(
                Open(DEFERRAL, 4, start + timedelta(days=2), digest(bill)),
                to(BILLER, bob, at=start, thread=thread),
                bill_id=BILL_FACTS.bill_id,
            ),
            KEYS["consumer-bob"],
        )
        accept = seal(
            payload_of(
                Accept(digest(opening)),
                to(bob, BILLER, at=start + MINUTE, thread=thread, sequence=1, previous=digest(opening)),
            ),
            KEYS["biller-1"],
        )
        chains = {BILLER: CHAINS[BILLER], bob: [bob_v1]}
        return Bundle(key_sets=chains, bill=bill, thread=[opening, accept]).to_json()

    bundle_of(
        "bundle-reenrolled-agreement",
        "consumer:bob's agreement on the bill as presented to him after the re-enrolment.",
        "BIL-7",
        agreed_by_bob(presented),
        None,
    )
    bundle_of(
        "bundle-reenrolled-earlier-presentation",
        "consumer:bob's agreement on the bill as presented to consumer:alice: the bill is not addressed to him.",
        "BIL-7",
        agreed_by_bob(BILL),
        "WRONG_RECIPIENT",
    )


def revision_1_2_cases() -> None:
    """ENV-15 (revision 1.2): a string holding U+0000 is MALFORMED_PAYLOAD. Made after every other case, so that
    whatever it draws leaves their bytes as they were."""
    offer = agreed_thread().envelopes[1]
    now = datetime(2026, 3, 5, 10, tzinfo=UTC)
    nul = header_bytes(recipient=CONSUMER + "\0")  # merged into the header: the recipient, with U+0000 at its end
    envelope = sign_envelope(KEYS["biller-1"], offer.payload_type, offer.payload + nul)
    message_case(
        "parse-nul-in-string",
        "The header given again with the recipient followed by U+0000: refused before the recipient is compared.",
        "ENV-15",
        envelope,
        "MALFORMED_PAYLOAD",
        sender=BILLER,
        accept=NEGOTIATION,
        now=now,
    )


def document() -> dict[str, object]:
    CASES.clear()
    valid_messages()
    envelope_cases()
    key_validity_cases()
    keyset_cases()
    bundle_cases()
    time_precision_cases()
    currency_cases()
    bundle_form_cases()
    bill_position_cases()
    missing_amount_cases()
    first_version_cases()
    parsing_cases()
    renegotiation_cases()
    reenrolment_cases()
    revision_1_2_cases()
    keys = {
        name: {"keyid": key.keyid, "publicKey": base64.b64encode(key.public_key.raw).decode(), "seed": key.seed.hex()}
        for name, key in KEYS.items()
    }
    return {
        "schema": SCHEMA,
        "notes": "Parley v1 test vectors; see docs/VECTORS.md. Keys are test keys: never use them.",
        "numberOfTests": len(CASES),
        "keys": keys,
        "keySets": {party: [envelope_to_json(e) for e in chain] for party, chain in CHAINS.items()},
        "currencies": {"edition": CURRENCY_TABLE_EDITION, "minorUnits": currency_minor_units()},
        "tests": CASES,
    }


def render() -> str:
    return json.dumps(document(), indent=1, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed vectors differ")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale; run python scripts/gen_vectors.py")
            return 1
        print("test vectors are fresh")
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(CASES)} cases to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
