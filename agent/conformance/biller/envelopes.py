"""Envelope form and signature (§3), with the envelope test vectors."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    FIXTURES,
    NEG,
    BillerTarget,
    accepted,
    expect,
    list_bills,
    money,
    negotiate,
    outside_options,
    pay,
    query_envelope,
    read_ok,
    vector,
)
from agent.conformance.client import refusal_of
from agent.conformance.peers import (
    UNKNOWN_FIELD,
    duplicate_signature,
    flip_payload,
    flip_signature,
    sign_payload_not_pae,
    sign_wrong_pae_length,
    strip_signatures,
    swap_payload_type,
    truncated,
    with_unknown_field,
)
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.keys import SigningKey
from agent.protocol.messages import encode_varint
from parley.v1 import account_pb2, biller_service_pb2, envelope_pb2

suite: Suite[BillerTarget] = Suite("biller/envelopes")


@suite.case(
    "ENV-2/two-signatures",
    description="Vector two-signatures, delivered as generated, is refused with MALFORMED_ENVELOPE",
    quote="An envelope MUST carry exactly one signature. A receiver MUST refuse an envelope with no signature or "
    "with two or more with `MALFORMED_ENVELOPE`, even when one of them would verify.",
)
async def two_signatures_vector(ctx: BillerTarget) -> None:
    expect(await list_bills(ctx, vector("two-signatures")), Reason.MALFORMED_ENVELOPE, "vector two-signatures")


@suite.case(
    "ENV-2/no-signature",
    description="Vector no-signature, delivered as generated, is refused with MALFORMED_ENVELOPE",
    quote="A receiver MUST refuse an envelope with no signature or with two or more with `MALFORMED_ENVELOPE`",
)
async def no_signature_vector(ctx: BillerTarget) -> None:
    expect(await list_bills(ctx, vector("no-signature")), Reason.MALFORMED_ENVELOPE, "vector no-signature")


@suite.case(
    "ENV-2/enrolled-signer",
    description="A query by an enrolled party with a second signature, or none, is refused with MALFORMED_ENVELOPE",
    quote="A receiver MUST refuse an envelope with no signature or with two or more with `MALFORMED_ENVELOPE`, "
    "even when one of them would verify.",
    needs=(FIXTURES,),
)
async def two_signatures_enrolled(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    good = query_envelope(customer)
    expect(await list_bills(ctx, duplicate_signature(good)), Reason.MALFORMED_ENVELOPE, "a valid signature, twice")
    expect(await list_bills(ctx, strip_signatures(good)), Reason.MALFORMED_ENVELOPE, "no signature")
    await read_ok(ctx, customer)


@suite.case(
    "ENV-1/request-not-an-envelope",
    description="A ListBills request whose query field holds bytes that are no Envelope encoding is MALFORMED_ENVELOPE",
    quote="An envelope MUST be well formed … A receiver MUST refuse any other envelope with `MALFORMED_ENVELOPE`.",
)
async def request_not_an_envelope(ctx: BillerTarget) -> str:
    # ListBillsRequest field 1 (query), 2 bytes: an Envelope whose field 1 announces a length never completed.
    garbage = b"\x0a\x02\x0a\xff"
    method: Any = ctx.conn.channel.unary_unary(
        "/parley.v1.BillerService/ListBills",
        request_serializer=None,
        response_deserializer=biller_service_pb2.ListBillsResponse.FromString,
    )
    try:
        await method(garbage, timeout=ctx.conn.call_timeout)
    except grpc.aio.AioRpcError as error:
        refusal = refusal_of("ListBills", error)
        ctx.conn.refusals.append(refusal)
        expect(refusal, Reason.MALFORMED_ENVELOPE, "a request whose envelope bytes do not parse")
        return refusal.describe()
    raise Violation("a request whose envelope bytes do not parse was answered, not refused with MALFORMED_ENVELOPE")


@suite.case(
    "ENV-1/malformed-form",
    description="A bad keyid form, signature length, payloadType length or empty payload is MALFORMED_ENVELOPE",
    quote="An envelope MUST be well formed: `payload` non-empty; `payload_type` of 1 to 128 characters; and its "
    "signature's `keyid` exactly 32 lowercase hex characters […] and `sig` exactly 64 bytes. A receiver MUST refuse "
    "any other envelope with `MALFORMED_ENVELOPE`.",
    needs=(FIXTURES,),
)
async def malformed_form(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()

    def variant(name: str) -> envelope_pb2.Envelope:
        envelope = query_envelope(customer)
        signature = envelope.signatures[0]
        if name == "upper-case keyid":
            signature.keyid = signature.keyid.upper()
        elif name == "31-character keyid":
            signature.keyid = signature.keyid[:31]
        elif name == "63-byte sig":
            signature.sig = signature.sig[:63]
        elif name == "65-byte sig":
            signature.sig = signature.sig + b"\0"
        elif name == "129-character payloadType":
            envelope.payload_type = "parley.v1." + "A" * 119
        elif name == "empty payloadType":
            envelope.payload_type = ""
        elif name == "empty payload":
            envelope.payload = b""
        return envelope

    for name in (
        "upper-case keyid",
        "31-character keyid",
        "63-byte sig",
        "65-byte sig",
        "129-character payloadType",
        "empty payloadType",
        "empty payload",
    ):
        expect(await list_bills(ctx, variant(name)), Reason.MALFORMED_ENVELOPE, f"an envelope with a {name}")


Mutation = Callable[[envelope_pb2.Envelope, SigningKey], envelope_pb2.Envelope]


def _mutated_query_case(
    case_id: str, vector_id: str, description: str, mutate: Mutation, *, covers: tuple[str, ...] = ()
) -> None:
    """A signed query by an enrolled party, broken as vector `vector_id` is, must be refused with BAD_SIGNATURE."""

    @suite.case(
        case_id,
        description=description,
        quote="The signature MUST be an Ed25519 signature (RFC 8032 […]) over `PAE(payload_type, payload)` computed "
        "from the exact bytes of `payload` and `payload_type` as received. A receiver MUST verify it […] and MUST "
        "refuse the message with `BAD_SIGNATURE` when it does not verify.",
        needs=(FIXTURES,),
        covers=covers,
    )
    async def body(ctx: BillerTarget) -> str:
        customer = await ctx.enrolled()
        envelope = mutate(query_envelope(customer), customer.party.key)
        expect(await list_bills(ctx, envelope), Reason.BAD_SIGNATURE, f"a query broken as vector {vector_id} is")
        await read_ok(ctx, customer)
        return f"as vector {vector_id}"


_mutated_query_case(
    "ENV-3/bad-signature",
    "bad-signature",
    "A query with one signature bit flipped is refused with BAD_SIGNATURE",
    lambda envelope, _key: flip_signature(envelope),
)
_mutated_query_case(
    "ENV-3/tampered-payload",
    "tampered-payload",
    "A query with one payload bit flipped after signing is refused with BAD_SIGNATURE",
    lambda envelope, _key: flip_payload(envelope),  # in account_id, the query's last field: it still parses
    covers=("ENV-4",),
)
_mutated_query_case(
    "ENV-3/signed-payload-not-pae",
    "signed-payload-not-pae",
    "A query signed over its raw payload instead of the PAE is refused with BAD_SIGNATURE",
    sign_payload_not_pae,
)
_mutated_query_case(
    "ENV-3/pae-wrong-length",
    "pae-wrong-length",
    "A query signed over a PAE stating the wrong payload length is refused with BAD_SIGNATURE",
    sign_wrong_pae_length,
)


@suite.case(
    "ENV-3/payload-type-swapped",
    description="A ThreadOpen relabelled parley.v1.Offer after signing is refused with BAD_SIGNATURE (vector "
    "payload-type-swapped)",
    quote="An envelope whose `payload_type` was changed from `parley.v1.Offer` to `parley.v1.Accept` after signing, "
    "received where both are accepted, fails at step 4 (`BAD_SIGNATURE`), because the type is part of what is signed",
    needs=NEG,
)
async def payload_type_swapped(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    opening = customer.party.open(bill.bill_id, bill.digest, outside_options(bill))
    swapped = swap_payload_type(opening, "parley.v1.Offer")
    expect(await negotiate(ctx, swapped), Reason.BAD_SIGNATURE, "a ThreadOpen relabelled Offer after signing")


@suite.case(
    "ENV-5/payload-type-not-for-call",
    description="Vector payload-type-not-for-call (a Bill), delivered as generated to ListBills, is WRONG_PAYLOAD_TYPE",
    quote="A receiver MUST refuse an envelope whose `payload_type` is not, as an exact string, one of the types the "
    "RPC (§2.2) or the thread position (§5.1) accepts, with `WRONG_PAYLOAD_TYPE`.",
)
async def payload_type_not_for_call_vector(ctx: BillerTarget) -> None:
    envelope = vector("payload-type-not-for-call")
    expect(await list_bills(ctx, envelope), Reason.WRONG_PAYLOAD_TYPE, "vector payload-type-not-for-call")


@suite.case(
    "ENV-5/wrong-type-for-call",
    description="An enrolled party's messages sent to the wrong RPC are refused with WRONG_PAYLOAD_TYPE",
    quote="A receiver MUST refuse an envelope whose `payload_type` is not, as an exact string, one of the types the "
    "RPC (§2.2) or the thread position (§5.1) accepts, with `WRONG_PAYLOAD_TYPE`.",
    needs=(FIXTURES,),
)
async def wrong_type_for_call(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    intent = customer.party.intent(customer.account_id, bill.bill_id, "cf-wrong-call", money(AMOUNT_DUE))
    expect(await list_bills(ctx, intent), Reason.WRONG_PAYLOAD_TYPE, "a PaymentIntent sent to ListBills")
    expect(
        await pay(ctx, query_envelope(customer)),
        Reason.WRONG_PAYLOAD_TYPE,
        "an AccountQuery sent to CreatePaymentIntent",
    )
    renamed = customer.party.sign(
        account_pb2.AccountQuery(header=customer.party.header(), account_id=customer.account_id)
    )
    renamed.payload_type = "parley.v1.accountquery"
    expect(await list_bills(ctx, renamed), Reason.WRONG_PAYLOAD_TYPE, "payloadType 'parley.v1.accountquery' (case)")


@suite.case(
    "ENV-6/truncated-payload",
    description="A correctly signed payload that does not parse is refused with MALFORMED_PAYLOAD (vector "
    "truncated-payload)",
    quote="A receiver MUST refuse a verified payload that does not parse as the message its `payload_type` names "
    "with `MALFORMED_PAYLOAD`.",
    needs=(FIXTURES,),
)
async def truncated_payload(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    cut = truncated(query_envelope(customer), customer.party.key)
    expect(await list_bills(ctx, cut), Reason.MALFORMED_PAYLOAD, "a query cut short, then signed")


@suite.case(
    "ENV-7/unknown-field",
    description="A signed payload with an undefined field is refused with UNKNOWN_FIELD (vector unknown-field)",
    quote="A receiver MUST refuse a signed payload containing any field that the version-1 schema of its message "
    "does not define — at the top level or in any nested message […] — with `UNKNOWN_FIELD`.",
    needs=(FIXTURES,),
    covers=("ENV-4",),
)
async def unknown_field(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    payload = query_envelope(customer).payload
    extended = with_unknown_field(query_envelope(customer), customer.party.key)
    expect(await list_bills(ctx, extended), Reason.UNKNOWN_FIELD, "a query with field 111 appended")
    # A defined field number with the wrong wire type counts as unknown: account_id (2) as a varint.
    retyped = customer.party.sign_bytes("parley.v1.AccountQuery", payload + b"\x10\x01")
    expect(await list_bills(ctx, retyped), Reason.UNKNOWN_FIELD, "a query with field 2 sent as a varint")


@suite.case(
    "ENV-7/unknown-field-nested",
    description="An undefined field inside the signed header is refused with UNKNOWN_FIELD (vector "
    "unknown-field-nested)",
    quote="A receiver MUST refuse a signed payload containing any field that the version-1 schema of its message "
    "does not define — at the top level or in any nested message […] — with `UNKNOWN_FIELD`.",
    needs=(FIXTURES,),
)
async def unknown_field_nested(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    header = customer.party.header().SerializeToString() + UNKNOWN_FIELD
    rest = account_pb2.AccountQuery(account_id=customer.account_id).SerializeToString()
    payload = b"\x0a" + encode_varint(len(header)) + header + rest
    nested = customer.party.sign_bytes("parley.v1.AccountQuery", payload)
    expect(await list_bills(ctx, nested), Reason.UNKNOWN_FIELD, "a query whose header carries field 111")


@suite.case(
    "ENV-15/nul-in-string",
    description="A signed payload with U+0000 in a string field, at the top level or nested, is MALFORMED_PAYLOAD",
    quote="A receiver MUST refuse a signed payload in which any `string` field, at any depth (repeated fields "
    "included), contains the code point U+0000, with `MALFORMED_PAYLOAD`",
    needs=(FIXTURES,),
)
async def nul_in_string(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    query = query_envelope(customer, bill_id="cf-bill\0")
    expect(await list_bills(ctx, query), Reason.MALFORMED_PAYLOAD, "a query whose bill_id holds U+0000")
    header = customer.party.header()
    header.recipient += "\0"  # nested, and checked before the recipient is (step 6 before step 7)
    nested = customer.party.sign(account_pb2.AccountQuery(header=header, account_id=customer.account_id))
    expect(await list_bills(ctx, nested), Reason.MALFORMED_PAYLOAD, "a query whose header's recipient holds U+0000")
    accepted(await list_bills(ctx, query_envelope(customer)), "the same query without U+0000")


@suite.case(
    "AUZ-2/not-enrolled",
    description="A request signed by a key no enrolled party lists is refused with NOT_ENROLLED",
    quote="A biller MUST refuse a signed request (any RPC but `Hello`, `GetKeySets` and `Enrol`) whose `keyid` no "
    "enrolled party's chain lists with `NOT_ENROLLED`",
)
async def not_enrolled(ctx: BillerTarget) -> None:
    stranger = ctx.new_party()
    query = stranger.query(f"cf-nobody-{secrets.token_hex(4)}")
    expect(await list_bills(ctx, query), Reason.NOT_ENROLLED, "a query by a party that never enrolled")


@suite.case(
    "AUZ-2/unknown-key-vector",
    description="Vector unknown-key, delivered as generated to Negotiate, is refused with NOT_ENROLLED",
    quote="it MUST resolve the keyid among the chains of all its enrolled parties, refusing with `NOT_ENROLLED` when "
    "none lists it (AUZ-2)",
    needs=("negotiation",),
)
async def unknown_key_vector(ctx: BillerTarget) -> None:
    expect(await negotiate(ctx, vector("unknown-key")), Reason.NOT_ENROLLED, "vector unknown-key")


@suite.case(
    "ENV-10/check-order",
    description="Requests breaking two §3.8 checks at once are refused with the reason of the first",
    quote="A receiver MUST check a received envelope in the order below and refuse it with the reason of the first "
    "check it fails, so that every conforming implementation reports the same reason for the same input.",
    needs=(FIXTURES,),
    covers=("ENV-4",),
)
async def check_order(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    key = customer.party.key
    elsewhere = {"recipient": f"{ctx.biller_id}.elsewhere"}
    long_ago = {"recipient": f"{ctx.biller_id}.elsewhere", "create_time": ctx.now() - timedelta(days=3)}
    intent = customer.party.intent(customer.account_id, "bill-conformance", "cf-order", money(AMOUNT_DUE))
    pairs: list[tuple[str, envelope_pb2.Envelope, Reason]] = [
        ("two signatures on an Intent sent to ListBills (step 1 before 2)", duplicate_signature(intent),
         Reason.MALFORMED_ENVELOPE),
        ("an Intent sent to ListBills with a flipped signature (step 2 before 4)", flip_signature(intent),
         Reason.WRONG_PAYLOAD_TYPE),
        ("a flipped signature over an unknown field (step 4 before 6)",
         flip_signature(with_unknown_field(query_envelope(customer), key)), Reason.BAD_SIGNATURE),
        ("a flipped signature over a header for another recipient (step 4 before 7)",
         flip_signature(query_envelope(customer, header=elsewhere)), Reason.BAD_SIGNATURE),
        ("an unknown field beside a header for another recipient (step 6 before 7)",
         with_unknown_field(query_envelope(customer, header=elsewhere), key), Reason.UNKNOWN_FIELD),
        ("an expired query for another recipient (step 7 before 10)",
         query_envelope(customer, header=long_ago), Reason.WRONG_RECIPIENT),
    ]  # fmt: skip
    for what, envelope, reason in pairs:
        expect(await list_bills(ctx, envelope), reason, what)
    await read_ok(ctx, customer)
    return f"{len(pairs)} pairs of defects"
