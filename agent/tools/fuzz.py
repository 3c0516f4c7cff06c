"""Fuzzing every BillerService RPC on a live biller: `parley fuzz`.

A `Fuzzer` serves a `BillerAgent` on 127.0.0.1 (real gRPC, a real SQLite file,
a manual clock) and builds a fixture through the wire: an enrolled consumer
with an agreed bill, a paid payment intent with its receipt, a bill with an
open thread waiting for the consumer's move, a fresh bill, and a spare account
with an unused enrolment code. From the fixture's valid requests (templates),
hypothesis draws inputs at three layers:

- `raw`: the request's bytes mutated (bit flips, truncation, random bytes,
  repeats, fields of the wrong wire type) and sent through a raw-bytes method,
  so malformed protobuf reaches the server;
- `envelope`: the valid signed envelope mutated (bits of payload or signature,
  payloadType, keyid, extra or missing signatures, another RPC's envelope);
- `signed`: the signed body mutated and PROPERLY re-signed with the sender's
  key, so it passes the signature check and reaches the rules: extreme dates,
  times and amounts, wrong or mismatched currencies, huge repeated fields,
  undefined enum values, unknown fields, wrong payload types, wrong header
  fields (ids of the wrong length, sequence, previous digest, sender,
  recipient, expired times), hostile disclosures.

After every input the oracle checks that the server still answers Hello; that
the answer is not UNKNOWN or INTERNAL; that an error carries exactly one
`google.rpc.ErrorInfo` (domain parley.v1) whose reason is one of
`agent.protocol.errors.Reason` with that reason's gRPC code (ERR-1, ERR-2), except
RESOURCE_EXHAUSTED from gRPC's own receive limit on an oversized request; and
that a refused input changed nothing stored, but for what the spec lets a
refusal record (`refusal_effect_problem`). Accepted inputs (a mutation can
stay valid) may change the store: they are counted apart; an accepted input
that changed the store, and a violation, are sent again, and the retry must
get the same answer byte for byte and change nothing (HDR-12, NEG-18). The
fixture is built afresh after any change, so later inputs still reach deep
paths.

One event loop and one server serve the whole run. `--seed` fixes what
hypothesis draws; the fixture's keys and ids are fresh on every run, so a
finding is reported with the exact request bytes and the mutations that made
them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import secrets
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import hypothesis
import hypothesis.configuration
from google.protobuf import descriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from agent.biller import BillerAgent, OfferContext
from agent.clock import ManualClock
from agent.conformance.peers import PeerPolicy, PeerRail, SignedParty, timestamp
from agent.protocol.dsse import digest, sign_envelope
from agent.protocol.errors import ERROR_DOMAIN, Reason
from agent.protocol.keys import SigningKey
from agent.protocol.keysets import KEYSET_PAYLOAD_TYPE, first_key_set
from agent.protocol.limits import DEFAULT_LIMITS, Limits
from agent.protocol.messages import PAYLOAD_TYPES, encode_varint, new_message_id
from agent.protocol.terms import (
    AdvertisedOptions,
    DeferralOption,
    HardshipProgramme,
    InstalmentOption,
    Money,
    Terms,
    TermsKind,
    build_terms,
    monthly_dates,
)
from agent.stores.biller_sqlite import SqliteBillerStore
from agent.tools.fuzz_command import RPCS
from agent.tools.json_output import emit_json
from agent.transport.server import BillerServer, serve_biller
from parley.v1 import (
    biller_service_pb2,
    enrolment_pb2,
    envelope_pb2,
    keys_pb2,
    negotiation_pb2,
    terms_pb2,
)

BILLER_ID = "biller:fuzz.example"
SERVICE = "parley.v1.BillerService"
LAYERS = ("raw", "envelope", "signed")
START = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
STORE_FILE = "biller.sqlite"
# The limits of the spec, but a rate limit no fuzzing run reaches: the manual clock never refills
# the buckets, and inputs should reach the rules behind LIM-8 rather than stop at it.
FUZZ_LIMITS = dataclasses.replace(DEFAULT_LIMITS, rate_limit_per_second=1_000_000, rate_limit_burst=1_000_000_000)
BATCH = 25  # inputs per hypothesis run; the budget is checked between runs
PROGRESS_SECONDS = 5.0  # a progress line this often, so a long run is never silent
CALL_TIMEOUT = 10.0  # seconds: a unary answer slower than this is a hang, reported as a finding
WATCH_WAIT = 0.3  # seconds to wait for a WatchEvents stream's first event (an open, quiet stream is an answer)
SHOWN_REQUEST_BYTES = 4096  # request bytes shown in a finding's text (the JSON report carries them all)

# Refusals that may legitimately change the store, and how (docs/PROTOCOL.md):
# - a violation (NEG-15 checks 7-10) records the move as evidence, ends the thread PROTOCOL_ERROR and
#   records the error for retries (HDR-11, NEG-18);
# - a move after the deadline (NEG-15 check 5b) marks the thread EXPIRED;
# - a wrong enrolment code counts against the account and may lock it (ENR-5).
VIOLATIONS = frozenset(
    {Reason.OUT_OF_TURN, Reason.ROUND_LIMIT_EXCEEDED, Reason.ACCEPT_DIGEST_MISMATCH, Reason.OPTIONS_NOT_HONOURED}
)


def _eur(minor: int) -> Money:
    return Money.of(minor, "EUR")


BILL_AMOUNT = _eur(120_00)
DUE = date(2026, 3, 31)
FIRST_INSTALMENT = date(2026, 4, 15)
OPTIONS = AdvertisedOptions(
    deferral=DeferralOption(max_days=30, fee=_eur(5_00)),
    instalments=InstalmentOption(
        max_count=6, min_amount=_eur(20_00), min_interval_days=14, max_interval_days=35, max_first_delay_days=30
    ),
    hardship_programmes=(
        HardshipProgramme(
            programme_id="hardship-12",
            description="Fees waived, up to 12 monthly instalments",
            fees_waived=True,
            max_deferral_days=60,
            max_instalments=12,
            min_instalment_amount=_eur(5_00),
            max_interval_days=35,
            max_first_delay_days=45,
            requires_disclosure=True,
        ),
    ),
)


def _plan(count: int, programme: str = "") -> terms_pb2.Terms:
    """`count` monthly instalments of the fixture's bill (3 are inside its options, 8 outside)."""
    dates = monthly_dates(FIRST_INSTALMENT, count)
    return build_terms(TermsKind.INSTALMENT_PLAN, BILL_AMOUNT, dates, hardship_programme_id=programme).to_proto()


def _six_monthly(context: OfferContext) -> Terms:
    return build_terms(TermsKind.INSTALMENT_PLAN, context.bill.amount_due, monthly_dates(FIRST_INSTALMENT, 6))


def fuzz_policy() -> PeerPolicy:
    """Advertises `OPTIONS`; counters anything outside them with 6 monthly instalments."""
    return PeerPolicy(OPTIONS, _six_monthly)


FUZZ_RAIL = PeerRail(payee_name="Fuzz Energy Ltd", reference_prefix="FZ")


# === The store, seen from outside =====================================================================

TableRows = tuple[tuple[str, ...], Counter[tuple[object, ...]]]
StoreDump = dict[str, TableRows]


def dump_store(path: Path) -> StoreDump:
    """Every row of every table, with the column names, read through a separate connection."""
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        dump: StoreDump = {}
        for table in tables:
            cursor = db.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names read from sqlite_master
            columns = tuple(column[0] for column in cursor.description)
            dump[table] = (columns, Counter(cursor.fetchall()))
        return dump


@dataclass(frozen=True)
class TableChange:
    """Rows a step added to and removed from one table (a changed row is one of each)."""

    columns: tuple[str, ...]
    added: tuple[dict[str, object], ...]
    removed: tuple[dict[str, object], ...]


def store_changes(before: StoreDump, after: StoreDump) -> dict[str, TableChange]:
    """The tables whose rows differ, with what changed."""
    changes = {}
    for table in sorted(set(before) | set(after)):
        columns, old = before.get(table, ((), Counter()))
        columns, new = after.get(table, (columns, Counter()))
        if old != new:
            changes[table] = TableChange(
                columns,
                tuple(dict(zip(columns, row, strict=True)) for row in (new - old).elements()),
                tuple(dict(zip(columns, row, strict=True)) for row in (old - new).elements()),
            )
    return changes


def _one_row_changed(change: TableChange | None, column: str, values: frozenset[object]) -> bool:
    """`change` replaced exactly one row by one whose `column` is in `values`."""
    return (
        change is not None and len(change.added) == 1 and len(change.removed) == 1 and change.added[0][column] in values
    )


def refusal_effect_problem(rpc: str, reason: Reason, changes: dict[str, TableChange]) -> str | None:
    """Why `changes` are not what refusing `rpc` with `reason` may store (None when they are).

    Only these refusals may write anything: a negotiation violation stores the
    move as evidence, ends the thread and records the error (NEG-15, HDR-11);
    a move past the deadline expires the thread (NEG-15 check 5b); a wrong
    enrolment code is counted on the account (ENR-5), or, for an account id the
    biller does not know, against that id's hash (ENR-3). Every other refusal
    changes nothing (§2.5, NEG-15 "refused").
    """
    if not changes:
        return None
    tables = set(changes)
    if rpc == "Negotiate" and reason in VIOLATIONS:
        messages, replay = changes.get("messages"), changes.get("replay_cache")
        if (
            tables == {"messages", "threads", "replay_cache"}
            and messages is not None
            and (len(messages.added), len(messages.removed)) == (1, 0)
            and _one_row_changed(changes["threads"], "outcome", frozenset({"protocol_error"}))
            and replay is not None
            and (len(replay.added), len(replay.removed)) == (1, 0)
            and replay.added[0]["error_reason"] == reason.name
        ):
            return None
    elif rpc == "Negotiate" and reason is Reason.NEGOTIATION_DEADLINE_PASSED:
        if tables == {"threads"} and _one_row_changed(changes["threads"], "outcome", frozenset({"expired"})):
            return None
    elif rpc == "Enrol" and reason is Reason.ENROLMENT_CODE_INVALID:
        attempts = frozenset(range(1, FUZZ_LIMITS.enrolment_max_attempts + 1))
        if tables == {"accounts"} and _one_row_changed(changes["accounts"], "failed_enrolment_attempts", attempts):
            return None
        # An account id the biller does not know: the wrong code is counted against the id's hash (ENR-3), a
        # first guess as a new row, a later one as that row's count, so that probing for account ids is
        # limited as guessing a known account's code is.
        guesses = changes.get("enrolment_guesses")
        first_guess = (
            guesses is not None
            and (len(guesses.added), len(guesses.removed)) == (1, 0)
            and guesses.added[0]["failed_attempts"] == 1
        )
        if tables == {"enrolment_guesses"} and (first_guess or _one_row_changed(guesses, "failed_attempts", attempts)):
            return None
    return f"refused with {reason.name} but changed the store: {_describe(changes)}"


def _describe(changes: dict[str, TableChange]) -> str:
    return ", ".join(f"{table} +{len(c.added)} -{len(c.removed)}" for table, c in changes.items())


# === Templates: the fixture's valid requests ===========================================================


def _envelope_field(request: Message) -> str | None:
    """The name of the request's signed envelope field (None for Hello and GetKeySets)."""
    for field_descriptor in request.DESCRIPTOR.fields:
        if field_descriptor.message_type is envelope_pb2.Envelope.DESCRIPTOR:
            return field_descriptor.name
    return None


@dataclass(frozen=True)
class Template:
    """A valid request of one RPC and, for signed RPCs, the body its envelope signs and who signs it."""

    rpc: str
    name: str
    request: Message
    payload: Message | None = None
    signer: SigningKey | None = None
    disclosure: negotiation_pb2.Disclosure | None = None

    @property
    def envelope(self) -> envelope_pb2.Envelope | None:
        name = _envelope_field(self.request)
        return None if name is None else getattr(self.request, name)

    def with_envelope(self, envelope: envelope_pb2.Envelope, disclosure: bytes | None = None) -> Message:
        """This request carrying `envelope` (and, for a Negotiate, `disclosure` instead of its own)."""
        request = type(self.request)()
        request.CopyFrom(self.request)
        name = _envelope_field(request)
        assert name is not None, f"{self.rpc} carries no envelope"
        getattr(request, name).CopyFrom(envelope)
        if disclosure is not None:
            request.disclosure = disclosure  # type: ignore[attr-defined]
        return request


@dataclass(frozen=True, repr=False)
class Fixture:
    """The valid requests of each RPC (`templates`), reaching a fresh consumer's state on every path."""

    serial: int
    templates: dict[str, list[Template]]

    def __repr__(self) -> str:  # hypothesis shows strategy arguments: the templates would make kilobytes
        return f"Fixture(#{self.serial})"


async def _call(channel: grpc.aio.Channel, rpc: str, request: Message, answer: type[Message]) -> Any:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, Any] = channel.unary_unary(
        f"/{SERVICE}/{rpc}", request_serializer=None, response_deserializer=answer.FromString
    )
    return await method(request.SerializeToString(), timeout=CALL_TIMEOUT)


async def build_fixture(agent: BillerAgent, channel: grpc.aio.Channel, serial: int) -> Fixture:
    """Accounts, bills, threads and payments for a fresh consumer, made through the wire where a consumer would."""
    clock = agent.clock.now
    pb = biller_service_pb2
    account_id, spare_id = f"acct-fuzz-{serial}", f"acct-spare-{serial}"
    consumer = SignedParty.create(BILLER_ID, clock=clock, party_id=f"consumer:fuzz-{serial}")
    newcomer = SignedParty.create(BILLER_ID, clock=clock, party_id=f"consumer:fuzz-new-{serial}")
    for account in (account_id, spare_id):
        await agent.create_account(account, "Fuzz Household")
    code = await agent.issue_enrolment_code(account_id)
    spare_code = await agent.issue_enrolment_code(spare_id)
    await _call(channel, "Enrol", pb.EnrolRequest(request=consumer.enrolment(account_id, code)), pb.EnrolResponse)

    async def bill(description: str) -> tuple[str, bytes]:
        """A new bill on the account, and the digest of its envelope as the consumer reads it (NEG-2)."""
        bill_id = await agent.issue_bill(account_id, BILL_AMOUNT, DUE, description, issue_date=date(2026, 3, 1))
        query = pb.GetBillRequest(query=consumer.query(account_id, bill_id=bill_id))
        answer = await _call(channel, "GetBill", query, pb.GetBillResponse)
        return bill_id, digest(answer.bill)

    # An agreed bill (3 instalments are inside the options: accepted at once, NEG-12), its first instalment paid.
    agreed_bill, agreed_digest = await bill("agreed")
    opening = consumer.open(agreed_bill, agreed_digest, _plan(3))
    agreed = await _call(channel, "Negotiate", pb.NegotiateRequest(move=opening), pb.NegotiateResponse)
    agreement_digest = digest(agreed.reply)
    agreed_thread = [opening, agreed.reply]
    first = terms_pb2.Money(currency_code="EUR", amount_minor=40_00)
    paid = consumer.intent(account_id, agreed_bill, "intent-0", first, agreement_digest=agreement_digest)
    await _call(
        channel, "CreatePaymentIntent", pb.CreatePaymentIntentRequest(intent=paid), pb.CreatePaymentIntentResponse
    )
    await agent.record_settlement(account_id, "intent-0", _eur(40_00), f"rail-{serial}")

    # A bill with an open thread: 8 instalments are outside the options, so the biller counters.
    open_bill, open_digest = await bill("negotiating")
    thread = [consumer.open(open_bill, open_digest, _plan(8))]
    countered = await _call(channel, "Negotiate", pb.NegotiateRequest(move=thread[0]), pb.NegotiateResponse)
    thread.append(countered.reply)
    fresh_bill, fresh_digest = await bill("fresh")
    hardship = negotiation_pb2.Disclosure(
        salt=secrets.token_bytes(16),
        circumstances=negotiation_pb2.Circumstances(
            purpose=negotiation_pb2.DISCLOSURE_PURPOSE_ASSESS_HARDSHIP, hardship=True, next_pay_date="2026-04-01"
        ),
    )
    thread_id = negotiation_pb2.ThreadOpen.FromString(thread[0].payload).header.thread_id

    def query(**fields: Any) -> envelope_pb2.Envelope:
        return consumer.query(account_id, **fields)

    def signed(rpc: str, name: str, request: Message, envelope: envelope_pb2.Envelope, **extra: Any) -> Template:
        payload = PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload)
        signer = extra.pop("signer", consumer.key)
        return Template(rpc, name, request, payload, signer, **extra)

    def negotiate(
        name: str, move: envelope_pb2.Envelope, disclosure: negotiation_pb2.Disclosure | None = None
    ) -> Template:
        request = pb.NegotiateRequest(move=move, disclosure=disclosure.SerializeToString() if disclosure else b"")
        return signed("Negotiate", name, request, move, disclosure=disclosure)

    counter_digest = digest(thread[-1])
    key_set_v2 = consumer.next_key_set([consumer.key_spec(consumer.key, clock() - timedelta(days=1))])
    enrolment = newcomer.enrolment(spare_id, spare_code)
    hardship_open = consumer.open(
        fresh_bill,
        fresh_digest,
        _plan(10, "hardship-12"),
        disclosure_digest=hashlib.sha256(hardship.SerializeToString()).digest(),
    )
    second = terms_pb2.Money(currency_code="EUR", amount_minor=40_00)

    def pay(name: str, intent: envelope_pb2.Envelope) -> Template:
        return signed("CreatePaymentIntent", name, pb.CreatePaymentIntentRequest(intent=intent), intent)

    templates = [
        Template("Hello", "hello", pb.HelloRequest(protocol_versions=[1], client_name="parley-fuzz")),
        Template("GetKeySets", "consumer", pb.GetKeySetsRequest(party_id=consumer.party_id)),
        Template("GetKeySets", "biller", pb.GetKeySetsRequest(party_id=BILLER_ID, after_version=0)),
        signed("PublishKeySet", "v2", pb.PublishKeySetRequest(key_set=key_set_v2), key_set_v2),
        signed("Enrol", "spare", pb.EnrolRequest(request=enrolment), enrolment, signer=newcomer.key),
        signed("ListBills", "all", pb.ListBillsRequest(query=(q := query())), q),
        signed("GetBill", "agreed", pb.GetBillRequest(query=(q := query(bill_id=agreed_bill))), q),
        signed("GetThread", "open", pb.GetThreadRequest(query=(q := query(thread_id=thread_id))), q),
        signed("GetReceipt", "paid", pb.GetReceiptRequest(query=(q := query(intent_id="intent-0"))), q),
        signed("WatchEvents", "from-0", pb.WatchEventsRequest(query=(q := query(start_sequence=0))), q),
        signed("RequestErasure", "all", pb.RequestErasureRequest(request=(e := consumer.erasure(account_id))), e),
        negotiate("open", consumer.open(fresh_bill, fresh_digest, _plan(8))),
        negotiate("open-hardship", hardship_open, hardship),
        negotiate("offer", consumer.move(thread, negotiation_pb2.Offer(terms=_plan(6)))),
        negotiate("accept", consumer.move(thread, negotiation_pb2.Accept(offer_digest=counter_digest))),
        negotiate(
            "reject",
            consumer.move(thread, negotiation_pb2.Reject(reason=negotiation_pb2.REJECT_REASON_UNAFFORDABLE, note="no")),
        ),
        negotiate("withdraw", consumer.move(thread, negotiation_pb2.Withdraw(note="later"))),
        # Valid in form but refused as they stand (NEG-3, NEG-14, PAY-2), or a retry of an intent (PAY-2),
        # so that mutations explore around those rules.
        negotiate("open-agreed-bill", consumer.open(agreed_bill, agreed_digest, _plan(8))),
        negotiate("offer-on-agreed-thread", consumer.move(agreed_thread, negotiation_pb2.Offer(terms=_plan(6)))),
        pay(
            "instalment-1",
            consumer.intent(
                account_id, agreed_bill, "intent-1", second, agreement_digest=agreement_digest, instalment_index=1
            ),
        ),
        pay("fresh-bill-in-full", consumer.intent(account_id, fresh_bill, "intent-full", BILL_AMOUNT.to_proto())),
        pay(
            "intent-0-again",
            consumer.intent(account_id, agreed_bill, "intent-0", first, agreement_digest=agreement_digest),
        ),
        pay(
            "intent-0-other-amount",
            consumer.intent(
                account_id,
                agreed_bill,
                "intent-0",
                terms_pb2.Money(currency_code="EUR", amount_minor=40_01),
                agreement_digest=agreement_digest,
            ),
        ),
    ]
    by_rpc: dict[str, list[Template]] = {rpc: [] for rpc in RPCS}
    for template in templates:
        by_rpc[template.rpc].append(template)
    return Fixture(serial, by_rpc)


# === Inputs ===========================================================================================


@dataclass(frozen=True)
class FuzzInput:
    """One request to send as it is: the RPC, how it was made, and its bytes."""

    rpc: str
    layer: str
    template: str
    mutations: tuple[str, ...]
    request: bytes

    def describe(self) -> str:
        return f"{self.rpc} [{self.layer}] {self.template}: {'; '.join(self.mutations)}"


Draw = Callable[[st.SearchStrategy[Any]], Any]


def _flip_bits(draw: Draw, data: bytes) -> tuple[bytes, str]:
    if not data:
        return b"\x01", "flip: empty, sent one byte"
    flipped = bytearray(data)
    bits = draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=8))
    for bit in bits:
        flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped), f"flip bits {bits}"


def _truncate(draw: Draw, data: bytes) -> tuple[bytes, str]:
    cut = draw(st.integers(0, max(len(data) - 1, 0)))
    return data[:cut], f"truncate to {cut} of {len(data)} bytes"


def _mutate_raw(draw: Draw, data: bytes) -> tuple[bytes, str]:
    """Malformed protobuf: the request's bytes damaged, repeated, or extended with ill-typed fields."""
    kind = draw(st.sampled_from(("flip", "truncate", "random", "insert", "repeat", "wire-type")))
    if kind == "flip":
        return _flip_bits(draw, data)
    if kind == "truncate":
        return _truncate(draw, data)
    if kind == "random":
        noise: bytes = draw(st.binary(max_size=512))
        return noise, f"random {len(noise)} bytes"
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        noise = draw(st.binary(min_size=1, max_size=64))
        return data[:at] + noise + data[at:], f"insert {noise.hex()} at {at}"
    if kind == "repeat":
        times = draw(st.sampled_from((2, 3, 17, 200, 5000)))
        return data * times, f"request repeated {times} times"
    number = draw(st.sampled_from((1, 2, 3, 4, 7, 15, 99, 536_870_911)))
    wire_type = draw(st.integers(0, 7))
    tail = draw(st.binary(max_size=16))
    key = encode_varint(number << 3 | wire_type)
    return data + key + tail, f"field {number} as wire type {wire_type} + {tail.hex()}"


def _mutate_envelope(draw: Draw, envelope: envelope_pb2.Envelope, others: Sequence[envelope_pb2.Envelope]) -> str:
    """A valid signed envelope damaged in place (most of these fail the signature or form checks)."""
    kind = draw(
        st.sampled_from(
            (
                "flip-payload",
                "flip-sig",
                "truncate-payload",
                "truncate-sig",
                "payload-type",
                "keyid",
                "extra-signature",
                "no-signature",
                "random-payload",
                "other-envelope",
            )
        )
    )
    signature = envelope.signatures[0] if envelope.signatures else envelope.signatures.add()
    if kind == "flip-payload":
        envelope.payload, label = _flip_bits(draw, envelope.payload)
    elif kind == "flip-sig":
        signature.sig, label = _flip_bits(draw, signature.sig)
    elif kind == "truncate-payload":
        envelope.payload, label = _truncate(draw, envelope.payload)
    elif kind == "truncate-sig":
        signature.sig, label = _truncate(draw, signature.sig)
    elif kind == "payload-type":
        envelope.payload_type = draw(
            st.sampled_from((*sorted(PAYLOAD_TYPES), "", "parley.v1.Nothing", "parley.v1.offer", "x" * 129))
            | st.text(max_size=40)
        )
        label = repr(envelope.payload_type)
    elif kind == "keyid":
        signature.keyid = draw(
            st.sampled_from(("", signature.keyid.upper(), signature.keyid[:-1], signature.keyid + "0"))
            | st.binary(min_size=16, max_size=16).map(bytes.hex)
            | st.text(max_size=40)
        )
        label = repr(signature.keyid)
    elif kind == "extra-signature":
        extra = envelope.signatures.add()
        extra.keyid = signature.keyid
        extra.sig = draw(st.just(signature.sig) | st.binary(min_size=64, max_size=64))
        label = "same" if extra.sig == signature.sig else "random"
    elif kind == "no-signature":
        del envelope.signatures[:]
        label = ""
    elif kind == "random-payload":
        envelope.payload = draw(st.binary(max_size=256))
        label = f"{len(envelope.payload)} bytes"
    else:
        if not others:
            return "other-envelope: none"
        envelope.CopyFrom(draw(st.sampled_from(others)))
        label = envelope.payload_type
    return f"{kind} {label}".strip()


# --- Hostile values for the fields of signed bodies ---------------------------------------------------

FD = descriptor.FieldDescriptor
_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
YEAR_1 = -62_135_596_800  # 0001-01-01T00:00:00Z in Unix seconds: the Timestamp range's start
YEAR_10000 = 253_402_300_800  # 10000-01-01T00:00:00Z: just past the range's end
# Boundaries: signs, the protocol's counts (36 instalments, 10 rounds), the amount ceiling of a
# two-decimal currency (999,999,999.99) and just over it, the Timestamp range and nanos.
_SPECIAL_INTS = (
    0, 1, -1, 2, 10, 11, 36, 37, 99, 999_999_999, 10**9, 10**11 - 1, 10**11, 10**12,
    YEAR_1, YEAR_1 - 1, YEAR_10000 - 1, YEAR_10000, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1,
)  # fmt: skip
CURRENCIES = ("EUR", "USD", "JPY", "BHD", "CLF", "XXX", "XTS", "XAU", "EURO", "eur", "", "€", "E\x00R", "ZZZ")
DATES = (
    "0001-01-01", "9999-12-31", "10000-01-01", "2026-02-29", "2026-02-30", "2026-13-01", "2026-00-10",
    "2026-4-15", "20260415", "2026-04-15T00:00:00Z", " 2026-04-15", "2026-04-15\n", "-001-01-01", "", "1970-01-01",
    "2026-03-31", "2026-03-30", "2026-04-01", "2028-02-29", "２０２６-04-15",
)  # fmt: skip
STRINGS = (
    "", " ", "\x00", "a" * 65, "a" * 201, "a" * 501, "x" * 70_000, "é" * 64, "\ud7ff\ue000", "../../etc/passwd",
    "'; DROP TABLE bills; --", "%s%n", BILLER_ID, "consumer:", "consumer:Ünicode", "biller:other.example",
)  # fmt: skip
TIME_OFFSETS = (
    timedelta(0), timedelta(seconds=-301), timedelta(seconds=301), timedelta(hours=-2), timedelta(hours=2),
    timedelta(hours=25), timedelta(days=-400), timedelta(days=8), timedelta(days=400), timedelta(days=-(365 * 60)),
)  # fmt: skip


def _int_values(field_descriptor: FD) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field_descriptor.type]
    specials = [value for value in _SPECIAL_INTS if low <= value <= high]
    if field_descriptor.enum_type is not None:
        specials += [value.number for value in field_descriptor.enum_type.values]
    return st.sampled_from(specials) | st.integers(low, high)


def _hostile_values(field_descriptor: FD) -> st.SearchStrategy[Any]:
    """Values of the field's wire type chosen to break the rules that read it."""
    name, kind = field_descriptor.name, field_descriptor.type
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        if name == "currency_code":
            return st.sampled_from(CURRENCIES) | st.text(max_size=4)
        if "date" in name:
            return st.sampled_from(DATES) | st.dates().map(date.isoformat)
        return st.sampled_from(STRINGS) | st.text(max_size=40)
    if kind == FD.TYPE_BYTES:
        sized = st.sampled_from((0, 1, 15, 16, 17, 31, 32, 33, 64)).flatmap(lambda n: st.binary(min_size=n, max_size=n))
        return sized | st.just(b"\x00" * 70_000)
    if kind in _INT_RANGES:
        return _int_values(field_descriptor)
    raise AssertionError(f"no hostile values for field type {kind}")


PathStep = tuple[str, int | None]
FieldPath = tuple[PathStep, ...]


def _field_paths(message: Message, prefix: FieldPath = ()) -> Iterator[tuple[FieldPath, FD]]:
    """Every field of `message` (set or not), and of every submessage present, as a path from the top."""
    for field_descriptor in cast(Sequence[FD], message.DESCRIPTOR.fields):  # the stubs' union of two classes
        path = (*prefix, (field_descriptor.name, None))
        yield path, field_descriptor
        if field_descriptor.message_type is None:
            continue
        if field_descriptor.is_repeated:
            for index, item in enumerate(getattr(message, field_descriptor.name)):
                yield from _field_paths(item, (*prefix, (field_descriptor.name, index)))
        elif message.HasField(field_descriptor.name):
            yield from _field_paths(getattr(message, field_descriptor.name), path)


def _parent(message: Message, path: FieldPath) -> Message:
    """The message holding the last field of `path`."""
    for name, index in path[:-1]:
        message = getattr(message, name) if index is None else getattr(message, name)[index]
    return message


def _mutate_field(draw: Draw, message: Message, path: FieldPath, field_descriptor: FD) -> str:
    holder, name = _parent(message, path), path[-1][0]
    where = ".".join(step if index is None else f"{step}[{index}]" for step, index in path)
    repeated = field_descriptor.is_repeated
    if field_descriptor.message_type is not None:
        if field_descriptor.message_type is Timestamp.DESCRIPTOR and not repeated and draw(st.booleans()):
            moment = _timestamp_value(draw)
            getattr(holder, name).CopyFrom(moment)
            return f"{where} = {moment.seconds}s {moment.nanos}ns"
        if repeated and getattr(holder, name) and draw(st.booleans()):
            times = draw(st.sampled_from((2, 3, 7, 37, 300, 2000)))
            items = list(getattr(holder, name))
            getattr(holder, name).extend(items * (times - 1))
            return f"{where} x{times}"
        holder.ClearField(name)
        return f"{where} cleared"
    if repeated:
        values = draw(st.lists(_hostile_values(field_descriptor), max_size=40))
        del getattr(holder, name)[:]
        getattr(holder, name).extend(values)
        return f"{where} = {_short(values)}"
    value = draw(_hostile_values(field_descriptor))
    setattr(holder, name, value)
    return f"{where} = {_short(value)}"


def _timestamp_value(draw: Draw) -> Timestamp:
    """Times around the fixture's now (skew, lifetime, deadline edges) and at the ends of the range."""
    kind = draw(st.sampled_from(("offset", "edge", "nanos")))
    if kind == "offset":
        return timestamp(START + draw(st.sampled_from(TIME_OFFSETS)))
    if kind == "edge":
        return Timestamp(seconds=draw(st.sampled_from((YEAR_1, YEAR_1 - 1, YEAR_10000 - 1, YEAR_10000, 0, -1))))
    return Timestamp(seconds=int(START.timestamp()), nanos=draw(st.sampled_from((-1, 10**9, 2**31 - 1))))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}…({len(text)} chars)"


def _set_everywhere(message: Message, name: str, value: object) -> int:
    """Set every field called `name`, at any depth, to `value`; returns how many were set."""
    count = 0
    for path, field_descriptor in list(_field_paths(message)):
        if field_descriptor.name == name and not field_descriptor.is_repeated:
            setattr(_parent(message, path), name, value)
            count += 1
    return count


def _message_paths(message: Message) -> list[FieldPath]:
    """The top (empty path) and every submessage present, to carry an unknown field."""
    paths: list[FieldPath] = [()]
    for path, field_descriptor in _field_paths(message):
        holder = _parent(message, path)
        name, index = path[-1]
        if field_descriptor.message_type is not None and not field_descriptor.is_repeated:
            if holder.HasField(name):
                paths.append(path)
        elif field_descriptor.message_type is not None and index is not None:
            paths.append(path)
    return paths


def _resolve(message: Message, path: FieldPath) -> Message:
    for name, index in path:
        message = getattr(message, name) if index is None else getattr(message, name)[index]
    return message


# Mutations that set one field everywhere it occurs, so that the amounts or dates of a message stay alike.
EVERYWHERE: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "currency": ("currency_code", st.sampled_from(CURRENCIES)),
    "amount": ("amount_minor", _int_values(terms_pb2.Money.DESCRIPTOR.fields_by_name["amount_minor"])),
    "date": ("due_date", st.sampled_from(DATES)),
}
# Both header times moved by the same offset (the lifetime kept): past the skew, before the key, expired.
SHIFTS = (
    timedelta(seconds=-301), timedelta(seconds=-299), timedelta(seconds=299), timedelta(seconds=301),
    timedelta(hours=-2), timedelta(hours=-25), timedelta(days=-2), timedelta(days=400),
)  # fmt: skip


def _mutate_body(draw: Draw, body: Message) -> str:
    """One semantic mutation of a message body (header included), in place."""
    has_terms = "terms" in body.DESCRIPTOR.fields_by_name
    kinds = ("field",) * 4 + ("time", "shift", "unknown", *EVERYWHERE) + ("terms",) * (4 if has_terms else 0)
    kind = draw(st.sampled_from(kinds))
    if kind == "terms":
        terms, label = _hostile_terms(draw)
        body.terms.CopyFrom(terms)  # type: ignore[attr-defined]
        return f"terms = {label}"
    if kind == "shift" and "header" in body.DESCRIPTOR.fields_by_name:
        offset = draw(st.sampled_from(SHIFTS))
        header = body.header  # type: ignore[attr-defined]
        for stamp in (header.create_time, header.expire_time):
            stamp.seconds = _clamp(stamp.seconds + int(offset.total_seconds()))  # in seconds: may leave the range
        return f"header times shifted by {offset}"
    if kind == "time":
        times = [(path, fd) for path, fd in _field_paths(body) if fd.message_type is Timestamp.DESCRIPTOR]
        if times:
            path, _ = draw(st.sampled_from(times))
            moment = _timestamp_value(draw)
            _parent(body, path).ClearField(path[-1][0])
            getattr(_parent(body, path), path[-1][0]).CopyFrom(moment)
            return f"{path[-1][0]} = {moment.seconds}s {moment.nanos}ns"
    if kind in EVERYWHERE:
        name, values = EVERYWHERE[kind]
        value = draw(values)
        if _set_everywhere(body, name, value):
            return f"every {name} = {_short(value)}"
    if kind == "unknown":
        path = draw(st.sampled_from(_message_paths(body)))
        number = draw(st.sampled_from((15, 99, 1000, 536_870_911)))
        _resolve(body, path).MergeFromString(encode_varint(number << 3) + encode_varint(draw(st.integers(0, 2**32))))
        return f"unknown field {number} in {'.'.join(step for step, _ in path) or 'body'}"
    paths = list(_field_paths(body))
    in_header = [entry for entry in paths if entry[0][0][0] == "header"]
    in_body = [entry for entry in paths if entry[0][0][0] != "header"]
    group = in_header if in_header and (not in_body or draw(st.integers(0, 2)) == 0) else in_body
    path, field_descriptor = draw(st.sampled_from(group))
    return _mutate_field(draw, body, path, field_descriptor)


INT64 = (-(2**63), 2**63 - 1)
FIRST_DATES = (date(1, 1, 1), date(2026, 3, 1), DUE, FIRST_INSTALMENT, date(2026, 5, 5), date(9999, 11, 30))


def _clamp(value: int) -> int:
    return max(INT64[0], min(INT64[1], value))


def _hostile_terms(draw: Draw) -> tuple[terms_pb2.Terms, str]:
    """Terms whose arithmetic adds up (total, schedule sum) but whose values are extreme or off the bill.

    Single-field mutations mostly stop at TRM-7/TRM-8; these get past them to the
    checks against the bill, the options and the limits (TRM-9 to TRM-11, NEG-12, LIM-6).
    """
    # Weighted towards the well-formed (the bill's currency and principal, defined kinds, few lines),
    # so that most of these reach the checks against the bill rather than the form checks.
    currency = draw(st.sampled_from(("EUR",) * 6 + ("USD", "JPY", "XXX")))
    principal = draw(st.sampled_from((BILL_AMOUNT.minor,) * 6 + (0, 1, -1, 10**11 - 1, 10**11, 2**62)))
    kind = draw(st.sampled_from((*terms_pb2.TermsKind.values()[1:],) * 3 + (0, 99)))
    line = st.tuples(st.sampled_from((*terms_pb2.LineKind.values(), 99)), st.sampled_from((0, 1, 5_00, 30_00, 10**11)))
    lines = draw(st.lists(line, max_size=2)) if draw(st.booleans()) else []
    if kind == terms_pb2.TERMS_KIND_SETTLEMENT and draw(st.integers(0, 3)):
        lines.insert(
            0, (terms_pb2.LINE_KIND_SETTLEMENT_REDUCTION, draw(st.sampled_from((1, 30_00, BILL_AMOUNT.minor))))
        )
    signs = {terms_pb2.LINE_KIND_FEE: 1}
    total = _clamp(principal + sum(signs.get(line_kind, -1) * amount for line_kind, amount in lines))
    plan = kind == terms_pb2.TERMS_KIND_INSTALMENT_PLAN
    count = draw(st.sampled_from((2, 3, 6, 10, 12, 36, 37, 200) if plan else (1, 1, 1, 1, 0, 2)))
    first, step = draw(st.sampled_from(FIRST_DATES)), draw(st.sampled_from((0, 1, 14, 30, 35, 36, -1)))
    dates = []
    for index in range(count):
        try:
            dates.append((first + timedelta(days=step * index)).isoformat())
        except OverflowError:
            dates.append("9999-12-31")
    share, remainder = divmod(total, count) if count else (0, 0)

    def money(minor: int) -> terms_pb2.Money:
        return terms_pb2.Money(currency_code=currency, amount_minor=_clamp(minor))

    terms = terms_pb2.Terms(
        kind=kind,
        principal=money(principal),
        lines=[terms_pb2.Line(kind=k, description="fuzz", amount=money(amount)) for k, amount in lines],
        total=money(total),
        schedule=[
            terms_pb2.Instalment(due_date=day, amount=money(share + (remainder if index == 0 else 0)))
            for index, day in enumerate(dates)
        ],
        hardship_programme_id=draw(st.sampled_from(("", "", "hardship-12", "nope"))),
    )
    label = f"kind {kind}, {principal} {currency}, {len(lines)} lines, {count} from {first} every {step} days"
    return terms, label


# Mostly one mutation, so that an input breaks one rule and gets past the others to it.
MUTATION_COUNTS = st.sampled_from((1, 1, 1, 1, 2, 2, 3))


def _copy(message: Message) -> Any:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


def _signed_input(draw: Draw, template: Template, others: Sequence[Template]) -> tuple[Message, list[str]]:
    """The template's body mutated and properly signed again by its sender (or the unsigned request mutated)."""
    if template.payload is None:
        request = _copy(template.request)
        return request, [_mutate_body(draw, request) for _ in range(draw(MUTATION_COUNTS))]
    assert template.signer is not None
    body = _copy(template.payload)
    body.header.message_id = new_message_id()  # a fresh id, so that no input is judged as a replay of another
    labels = []
    disclosure = _copy(template.disclosure) if template.disclosure is not None else None
    payload_type = body.DESCRIPTOR.full_name
    for _ in range(draw(MUTATION_COUNTS)):
        kind = draw(st.sampled_from(("body",) * 10 + ("disclosure", "carried-key-set", "payload-type", "other-body")))
        if kind == "disclosure" and disclosure is not None:
            labels.append("disclosure: " + _mutate_body(draw, disclosure))
            body.disclosure_digest = hashlib.sha256(disclosure.SerializeToString()).digest()
        elif kind == "carried-key-set" and isinstance(body, enrolment_pb2.EnrolmentRequest):
            # The key set an enrolment carries is verified as a chain of one (ENR-1 step 3): sign it again too.
            key_set = keys_pb2.KeySet()
            try:
                key_set.ParseFromString(body.consumer_key_set.payload)
            except DecodeError:
                key_set.Clear()  # an earlier mutation broke it: start from an empty key set
            labels.append("carried key set: " + _mutate_body(draw, key_set))
            resigned = sign_envelope(template.signer, KEYSET_PAYLOAD_TYPE, key_set.SerializeToString())
            body.consumer_key_set.CopyFrom(resigned)
        elif kind == "payload-type":
            payload_type = draw(st.sampled_from(sorted(PAYLOAD_TYPES)))
            labels.append(f"signed as {payload_type}")
        elif kind == "other-body" and others:
            other = draw(st.sampled_from(others))
            assert other.payload is not None
            body = _copy(other.payload)
            body.header.message_id = new_message_id()
            payload_type = body.DESCRIPTOR.full_name
            labels.append(f"body of {other.rpc}/{other.name}")
        else:
            labels.append(_mutate_body(draw, body))
    data = body.SerializeToString()
    if draw(st.integers(0, 15)) == 0:
        data, label = _truncate(draw, data)
        labels.append(f"signed payload {label}")
    envelope = sign_envelope(template.signer, payload_type, data)
    disclosure_bytes = disclosure.SerializeToString() if disclosure is not None else None
    return template.with_envelope(envelope, disclosure_bytes), labels


@st.composite
def fuzz_inputs(draw: Draw, fixture: Fixture, rpcs: Sequence[str]) -> FuzzInput:
    """One input for one of `rpcs`, at one of the three layers, from the fixture's templates."""
    rpc = draw(st.sampled_from(rpcs))
    template: Template = draw(st.sampled_from(fixture.templates[rpc]))
    signed = [t for templates in fixture.templates.values() for t in templates if t.payload is not None]
    # Properly signed inputs weigh double: they are the ones that get past the signature to the rules.
    layers = ("raw", "envelope", "signed", "signed") if template.envelope is not None else ("raw", "signed")
    layer = draw(st.sampled_from(layers))
    if layer == "raw":
        data, label = _mutate_raw(draw, template.request.SerializeToString())
        return FuzzInput(rpc, layer, template.name, (label,), data)
    if layer == "envelope":
        assert template.envelope is not None
        envelope = _copy(template.envelope)
        foreign = [t.envelope for t in signed if t.rpc != rpc and t.envelope is not None]
        labels = [_mutate_envelope(draw, envelope, foreign) for _ in range(draw(st.integers(1, 2)))]
        return FuzzInput(rpc, layer, template.name, tuple(labels), template.with_envelope(envelope).SerializeToString())
    others = [t for t in signed if t.payload is not None and type(t.payload) is not type(template.payload)]
    request, labels = _signed_input(draw, template, others)
    return FuzzInput(rpc, layer, template.name, tuple(labels), request.SerializeToString())


# === The oracle and the run ============================================================================


@dataclass
class RpcTally:
    """What one RPC was sent and answered."""

    tried: int = 0
    accepted: int = 0
    changed_store: int = 0  # accepted inputs that changed the store
    layers: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # "OK" or "CODE REASON"


@dataclass(frozen=True)
class Finding:
    """An input the biller mishandled, with everything needed to send it again."""

    index: int
    input: FuzzInput
    problem: str

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "rpc": self.input.rpc,
            "method": f"/{SERVICE}/{self.input.rpc}",
            "layer": self.input.layer,
            "template": self.input.template,
            "mutations": list(self.input.mutations),
            "problem": self.problem,
            "request_base64": base64.b64encode(self.input.request).decode("ascii"),
        }


@dataclass
class FuzzReport:
    """A run's inputs per RPC, outcomes and findings."""

    seed: int
    seconds: float = 0.0
    inputs: int = 0
    fixtures_built: int = 0
    retries: int = 0  # effectful inputs sent twice, to check that the retry is answered as the original
    tallies: dict[str, RpcTally] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings and self.inputs > 0

    def to_json(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "inputs": self.inputs,
            "fixtures_built": self.fixtures_built,
            "retries": self.retries,
            "rpcs": {
                rpc: {
                    "tried": tally.tried,
                    "accepted": tally.accepted,
                    "changed_store": tally.changed_store,
                    "layers": dict(tally.layers),
                    "outcomes": dict(tally.outcomes.most_common()),
                }
                for rpc, tally in self.tallies.items()
            },
            "findings": [finding.to_json() for finding in self.findings],
        }


@dataclass(frozen=True)
class Answer:
    """How the biller answered one request: gRPC code, the answer's bytes, the trailer's google.rpc.Status bytes."""

    code: grpc.StatusCode
    response: bytes | None = None
    status_details: bytes | None = None


def judge(answer: Answer, request_size: int, limits: Limits) -> tuple[str, Reason | None, str | None]:
    """(outcome label, the Parley reason, the problem if the answer breaks ERR-1/ERR-2)."""
    code = answer.code
    if code is grpc.StatusCode.OK:
        return "OK", None, None
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return code.name, None, f"{code.name} for a client's input (ERR-2)"
    if answer.status_details is None:
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and request_size > limits.grpc_max_receive_bytes:
            return f"{code.name} (gRPC receive limit)", None, None
        return code.name, None, f"{code.name} without a google.rpc.Status (ERR-1)"
    status = status_pb2.Status.FromString(answer.status_details)
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    if len(infos) != 1:
        return code.name, None, f"{code.name} with {len(infos)} ErrorInfo details, not one (ERR-1)"
    info = infos[0]
    label = f"{code.name} {info.reason}"
    reason = Reason.__members__.get(info.reason)
    if info.domain != ERROR_DOMAIN or reason is None:
        return label, None, f"ErrorInfo {info.domain}/{info.reason} is not a parley.v1 reason (ERR-1)"
    if reason.grpc_code != code.name or status.code != code.value[0]:
        return label, reason, f"{info.reason} came with {code.name}, not {reason.grpc_code} (ERR-1)"
    return label, reason, None


class Fuzzer:
    """A live biller, its fixture, and the oracle, driven one input at a time on one event loop."""

    def __init__(
        self,
        state_dir: Path,
        *,
        seed: int = 0,
        rpcs: Sequence[str] = RPCS,
        defect: Callable[[BillerAgent], None] | None = None,
    ) -> None:
        unknown = sorted(set(rpcs) - set(RPCS))
        if unknown or not rpcs:
            raise ValueError(f"not BillerService RPCs: {unknown}" if unknown else "no RPC to fuzz")
        self.state_dir, self.rpcs, self._defect = state_dir, tuple(rpcs), defect
        self.report = FuzzReport(seed, tallies={rpc: RpcTally() for rpc in self.rpcs})
        self._serial = itertools.count(1)
        self._dead = False
        self._store: SqliteBillerStore | None = None
        self._server: BillerServer | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        """Store, agent, server on a free 127.0.0.1 port, channel, and the first fixture."""
        self.clock = clock = ManualClock(START)  # moves only when a caller advances it
        key = SigningKey.generate()
        self._store = store = await SqliteBillerStore.open(self.state_dir / STORE_FILE)
        self.agent = BillerAgent(
            party_id=BILLER_ID,
            signing_key=key,
            key_sets=[first_key_set(BILLER_ID, key, clock.now() - timedelta(days=1))],
            store=store,
            policy=fuzz_policy(),
            rail=FUZZ_RAIL,
            clock=clock,
            limits=FUZZ_LIMITS,
        )
        if self._defect is not None:
            self._defect(self.agent)
        self._server = await serve_biller(self.agent, "127.0.0.1:0", insecure=True)
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self._server.port}")
        await self._new_fixture()

    async def stop(self) -> None:
        """Close the channel, stop the server at once and close the store: whatever `start` got to."""
        try:
            if self._channel is not None:
                await self._channel.close()
            if self._server is not None:
                await self._server.stop(None)
        finally:
            if self._store is not None:
                await self._store.close()

    @property
    def channel(self) -> grpc.aio.Channel:
        assert self._channel is not None, "the fuzzer has not started"
        return self._channel

    async def _new_fixture(self) -> None:
        self.fixture = await build_fixture(self.agent, self.channel, next(self._serial))
        self.report.fixtures_built += 1
        self._baseline = dump_store(self.state_dir / STORE_FILE)

    async def _send(self, fuzz_input: FuzzInput) -> Answer:
        path = f"/{SERVICE}/{fuzz_input.rpc}"
        try:
            if fuzz_input.rpc == "WatchEvents":
                stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(
                    path, request_serializer=None, response_deserializer=None
                )
                call = stream(fuzz_input.request, timeout=WATCH_WAIT)
                async for event in call:
                    call.cancel()  # one event proves the stream was accepted
                    return Answer(grpc.StatusCode.OK, response=event)
                return Answer(grpc.StatusCode.OK)
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
                path, request_serializer=None, response_deserializer=None
            )
            response = await unary(fuzz_input.request, timeout=CALL_TIMEOUT)
            return Answer(grpc.StatusCode.OK, response=response)
        except grpc.aio.AioRpcError as error:
            if fuzz_input.rpc == "WatchEvents" and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                return Answer(grpc.StatusCode.OK)  # an accepted watch with nothing to send yet
            details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
            return Answer(error.code(), status_details=details if isinstance(details, bytes) else None)

    async def _alive(self) -> bool:
        hello: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            f"/{SERVICE}/Hello", request_serializer=None, response_deserializer=None
        )
        request = biller_service_pb2.HelloRequest(protocol_versions=[1]).SerializeToString()
        try:
            await hello(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def try_input(self, fuzz_input: FuzzInput) -> None:
        """Send one input and check every oracle; a changed store gets a fresh fixture."""
        report = self.report
        report.inputs += 1
        tally = report.tallies[fuzz_input.rpc]
        tally.tried += 1
        tally.layers[fuzz_input.layer] += 1
        answer = await self._send(fuzz_input)
        outcome, reason, problem = judge(answer, len(fuzz_input.request), self.agent.limits)
        tally.outcomes[outcome] += 1
        problems = [problem] if problem else []
        accepted = answer.code is grpc.StatusCode.OK
        tally.accepted += accepted
        if not await self._alive():
            problems.append("the server no longer answers Hello")
            self._dead = True
        changes = store_changes(self._baseline, dump_store(self.state_dir / STORE_FILE))
        if changes and accepted:
            tally.changed_store += 1
        elif changes and reason is not None:
            effect = refusal_effect_problem(fuzz_input.rpc, reason, changes)
            problems += [effect] if effect else []
        elif changes:
            problems.append(f"refused ({outcome}) but changed the store: {_describe(changes)}")
        if changes and not self._dead and not problems and (accepted or reason in VIOLATIONS):
            problems += await self._retry_problems(fuzz_input, answer)
        report.findings += [Finding(report.inputs, fuzz_input, text) for text in problems]
        if changes and not self._dead:
            await self._new_fixture()

    async def _retry_problems(self, fuzz_input: FuzzInput, first: Answer) -> list[str]:
        """HDR-12, NEG-18: the same bytes again get the same answer, byte for byte, and change nothing more."""
        self.report.retries += 1
        settled = dump_store(self.state_dir / STORE_FILE)
        again = await self._send(fuzz_input)
        problems = []
        if (again.code, again.response, again.status_details) != (first.code, first.response, first.status_details):
            first_label, _, _ = judge(first, len(fuzz_input.request), self.agent.limits)
            again_label, _, _ = judge(again, len(fuzz_input.request), self.agent.limits)
            problems.append(f"a retry was answered {again_label}, not as the original {first_label} (HDR-12)")
        changes = store_changes(settled, dump_store(self.state_dir / STORE_FILE))
        if changes:
            problems.append(f"a retry changed the store again: {_describe(changes)} (HDR-12)")
        return problems

    def finished(self, budget: Budget) -> bool:
        return (
            self._dead
            or time.monotonic() >= budget.deadline
            or (budget.max_inputs is not None and self.report.inputs >= budget.max_inputs)
            or (budget.stop_on_finding and bool(self.report.findings))
        )


@dataclass(frozen=True)
class Budget:
    """When a run ends: at `deadline` (time.monotonic), after `max_inputs`, or at the first finding if asked."""

    deadline: float
    max_inputs: int | None
    stop_on_finding: bool


def run_fuzz(
    *,
    seconds: float | None = None,
    max_inputs: int | None = None,
    seed: int = 0,
    rpcs: Sequence[str] = RPCS,
    defect: Callable[[BillerAgent], None] | None = None,
    stop_on_finding: bool = False,
    progress: Callable[[str], None] | None = None,
) -> FuzzReport:
    """Fuzz a live biller until `seconds` pass or `max_inputs` were sent (at least one must be given).

    hypothesis draws each input inside a `@given` run of `BATCH` examples,
    seeded from `seed` and the batch number; the server's event loop runs
    the input between draws. `defect` patches the agent before it serves
    (the tests break a biller on purpose to show that the oracle notices).
    `progress` is given a line every PROGRESS_SECONDS (the CLI prints it on stderr).
    """
    if seconds is None and max_inputs is None:
        raise ValueError("give seconds or max_inputs")
    loop = asyncio.new_event_loop()
    try:
        with tempfile.TemporaryDirectory(prefix="parley-fuzz-") as state_dir:
            fuzzer = Fuzzer(Path(state_dir), seed=seed, rpcs=rpcs, defect=defect)
            try:
                loop.run_until_complete(fuzzer.start())
                started = time.monotonic()  # the budget is fuzzing time, the start-up not counted
                deadline = started + seconds if seconds is not None else float("inf")
                budget = Budget(deadline, max_inputs, stop_on_finding)
                next_progress = started + PROGRESS_SECONDS
                for batch in itertools.count():
                    if fuzzer.finished(budget):
                        break
                    _run_batch(fuzzer, loop, seed * 1_000_003 + batch, budget)
                    if progress is not None and time.monotonic() >= next_progress:
                        next_progress += PROGRESS_SECONDS
                        report = fuzzer.report
                        of = f" of {seconds:g}" if seconds is not None else ""
                        progress(
                            f"fuzz: {time.monotonic() - started:.0f}{of} s, {report.inputs} inputs, "
                            f"{len(report.findings)} finding(s)"
                        )
                fuzzer.report.seconds = time.monotonic() - started
            finally:
                loop.run_until_complete(fuzzer.stop())
            return fuzzer.report
    finally:
        loop.close()


def _run_batch(
    fuzzer: Fuzzer,
    loop: asyncio.AbstractEventLoop,
    batch_seed: int,
    budget: Budget,
) -> None:
    @hypothesis.seed(batch_seed)
    @hypothesis.settings(
        max_examples=BATCH,
        deadline=None,
        database=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
    )
    @hypothesis.given(st.data())
    def one_input(data: st.DataObject) -> None:
        if fuzzer.finished(budget):
            return
        fuzz_input = data.draw(fuzz_inputs(fuzzer.fixture, fuzzer.rpcs))
        loop.run_until_complete(fuzzer.try_input(fuzz_input))

    # What the strategy draws depends on the fixture (rebuilt after a change) and on the budget
    # (spent mid-batch): hypothesis notices when it revisits a choice sequence and stops the batch.
    # Every input sent so far was judged; the next batch starts afresh.
    with contextlib.suppress(hypothesis.errors.FlakyStrategyDefinition):
        one_input()


# === `parley fuzz` ====================================================================================


def print_report(report: FuzzReport, out: Console) -> None:
    """Inputs per RPC and layer, outcomes by gRPC code and reason, and each finding with its reproducer."""
    inputs = Table(title=f"parley fuzz: {report.inputs} inputs in {report.seconds:.1f} s (seed {report.seed})")
    for column in ("RPC", "inputs", *LAYERS, "accepted", "changed store"):
        inputs.add_column(column, justify="left" if column == "RPC" else "right")
    for rpc, tally in report.tallies.items():
        layers = (str(tally.layers[layer]) for layer in LAYERS)
        inputs.add_row(rpc, str(tally.tried), *layers, str(tally.accepted), str(tally.changed_store))
    out.print(inputs)
    outcomes = Table(title="outcomes by gRPC code and reason (per RPC in --json)")
    for column in ("gRPC code", "reason", "answers"):
        outcomes.add_column(column, justify="right" if column == "answers" else "left")
    total: Counter[str] = Counter()
    for tally in report.tallies.values():
        total.update(tally.outcomes)
    for label, count in total.most_common():
        code, _, reason = label.partition(" ")
        outcomes.add_row(code, reason, str(count))
    out.print(outcomes)
    for finding in report.findings:
        request = finding.input.request
        shown = base64.b64encode(request[:SHOWN_REQUEST_BYTES]).decode("ascii")
        out.print(f"[red]FINDING[/red] #{finding.index} {finding.problem}\n  {finding.input.describe()}")
        out.print(f"  reproduce: send these {len(request)} bytes (base64) to /{SERVICE}/{finding.input.rpc}:")
        out.print(f"  {shown}{'…' if len(request) > SHOWN_REQUEST_BYTES else ''}", soft_wrap=True, markup=False)
    verdict = "no findings" if report.ok else f"{len(report.findings)} finding(s)"
    out.print(f"{report.inputs} inputs, {report.retries} retried, {report.fixtures_built} fixtures built: {verdict}")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fuzz_command(args: argparse.Namespace, out: Console) -> int:
    """`parley fuzz` (its options: `agent.tools.fuzz_command`)."""
    # Every input is refused on purpose: the biller's warnings about them would bury the report.
    parley_logger = logging.getLogger("parley")
    level = parley_logger.level
    parley_logger.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="parley-fuzz-hypothesis-") as scratch:
        hypothesis.configuration.set_hypothesis_home_dir(scratch)  # its caches, not a .hypothesis/ in the cwd
        try:
            report = run_fuzz(seconds=args.seconds, seed=args.seed, rpcs=args.rpc or RPCS, progress=_progress)
        finally:
            hypothesis.configuration.set_hypothesis_home_dir(None)  # back to the default, for a caller's later use
            parley_logger.setLevel(level)  # an in-process caller (a test, an embedding) keeps its logging
    print_report(report, out)
    emit_json(args, report.to_json(), out)
    return 0 if report.ok else 1
