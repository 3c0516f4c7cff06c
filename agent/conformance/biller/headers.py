"""Headers and the validity window (§5)."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    Customer,
    accepted,
    enrol,
    expect,
    list_bills,
    pay,
    payment_intent,
    query_envelope,
    read_ok,
)
from agent.conformance.runner import Suite
from agent.protocol.errors import Reason
from parley.v1 import (
    account_pb2,
    biller_service_pb2,
    envelope_pb2,
)

suite: Suite[BillerTarget] = Suite("biller/headers")


def _signed_query(customer: Customer, edit: Any) -> envelope_pb2.Envelope:
    """A query whose header `edit(header)` changed (or cleared) before signing."""
    query = account_pb2.AccountQuery(header=customer.party.header(), account_id=customer.account_id)
    edit(query)
    return customer.party.sign(query)


@suite.case(
    "HDR-1/unsupported-version",
    description="A message whose protocol_version is not 1 (0 included) is refused with UNSUPPORTED_VERSION",
    quote="A receiver MUST refuse a message whose `protocol_version` it does not speak — `0` included — with "
    "`UNSUPPORTED_VERSION`.",
    needs=(FIXTURES,),
    covers=("VER-1",),
)
async def unsupported_version(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    for version in (2, 0):
        query = query_envelope(customer, header={"protocol_version": version})
        expect(await list_bills(ctx, query), Reason.UNSUPPORTED_VERSION, f"a query with protocol_version {version}")


@suite.case(
    "HDR-2/malformed-header",
    description="A missing header or a header field of the wrong length or form is refused with MALFORMED_HEADER",
    quote="A header MUST be present and well formed […] A receiver MUST refuse any other header, or a missing one, "
    "with `MALFORMED_HEADER`.",
    needs=(FIXTURES,),
)
async def malformed_header(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    edits: dict[str, Any] = {
        "no header": lambda q: q.ClearField("header"),
        "a 15-byte message_id": lambda q: setattr(q.header, "message_id", q.header.message_id[:15]),
        "a 17-byte thread_id": lambda q: setattr(q.header, "thread_id", q.header.thread_id + b"\0"),
        "a 31-byte previous_digest": lambda q: setattr(q.header, "previous_digest", b"\1" * 31),
        "no create_time": lambda q: q.header.ClearField("create_time"),
        "no expire_time": lambda q: q.header.ClearField("expire_time"),
        "nanos out of range": lambda q: setattr(q.header.create_time, "nanos", 1_000_000_000),
    }
    for name, edit in edits.items():
        expect(await list_bills(ctx, _signed_query(customer, edit)), Reason.MALFORMED_HEADER, f"a query with {name}")


@suite.case(
    "HDR-3/wrong-sender",
    description="A header naming another party as sender is refused with WRONG_SENDER",
    quote="`sender` MUST be the party id of the party whose chain holds the signing key (the expected sender, §3.8). "
    "A receiver MUST refuse a mismatch with `WRONG_SENDER`",
    needs=(FIXTURES,),
)
async def wrong_sender(ctx: BillerTarget) -> None:
    customer, other = await ctx.enrolled(), await ctx.enrolled()
    for sender in (other.party_id, "consumer:cf-nobody"):
        query = query_envelope(customer, header={"sender": sender})
        expect(await list_bills(ctx, query), Reason.WRONG_SENDER, f"a query claiming sender {sender!r}")


@suite.case(
    "HDR-4/wrong-recipient",
    description="A request not addressed to the biller is refused with WRONG_RECIPIENT",
    quote="A receiver MUST refuse a message not addressed to it with `WRONG_RECIPIENT`.",
    needs=(FIXTURES,),
)
async def wrong_recipient(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    for recipient in (
        "biller:other.example",
        "",
        ctx.biller_id.upper() if ctx.biller_id.upper() != ctx.biller_id else "",
    ):
        query = query_envelope(customer, header={"recipient": recipient})
        expect(await list_bills(ctx, query), Reason.WRONG_RECIPIENT, f"a query addressed to {recipient!r}")


@suite.case(
    "HDR-5/lifetime-too-long",
    description="A lifetime above the maximum, zero or negative is refused with LIFETIME_TOO_LONG",
    quote="A sender MUST set `0 < expire_time − create_time ≤ max_message_lifetime_seconds` […]; a receiver MUST "
    "refuse any other lifetime with `LIFETIME_TOO_LONG`",
    needs=(FIXTURES,),
    covers=("LIM-3",),
)
async def lifetime_too_long(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    now = ctx.now()
    for name, expire in (
        ("max lifetime + 1 s", now + ctx.max_lifetime + timedelta(seconds=1)),
        ("zero", now),
        ("negative", now - timedelta(seconds=1)),
    ):
        query = query_envelope(customer, header={"create_time": now, "expire_time": expire})
        expect(await list_bills(ctx, query), Reason.LIFETIME_TOO_LONG, f"a query with a {name} lifetime")
    await read_ok(ctx, customer, header={"create_time": now, "expire_time": now + ctx.max_lifetime})


@suite.case(
    "HDR-5/expired",
    description="A live message whose expire_time is more than the skew ago is refused with MESSAGE_EXPIRED",
    quote="A receiver MUST refuse […] a live message (§1.6) when `expire_time < now − skew`, with `MESSAGE_EXPIRED`",
    needs=(FIXTURES,),
)
async def expired(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    expire = ctx.now() - ctx.skew - timedelta(seconds=60)
    query = query_envelope(customer, header={"create_time": expire - timedelta(minutes=10), "expire_time": expire})
    expect(await list_bills(ctx, query), Reason.MESSAGE_EXPIRED, "a query that expired skew + 60 s ago")


@suite.case(
    "HDR-5/not-yet-valid",
    description="A message created more than the skew ahead is refused with MESSAGE_NOT_YET_VALID",
    quote="A receiver MUST refuse a message when `create_time > now + skew`, with `MESSAGE_NOT_YET_VALID`",
    needs=(FIXTURES,),
)
async def not_yet_valid(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    query = query_envelope(customer, header={"create_time": ctx.now() + ctx.skew + timedelta(seconds=60)})
    expect(await list_bills(ctx, query), Reason.MESSAGE_NOT_YET_VALID, "a query created skew + 60 s ahead")


@suite.case(
    "LIM-2/skew-tolerated",
    description="Messages created up to the skew ahead, or expired up to the skew ago, are accepted",
    quote="Receivers MUST tolerate, and tolerate no more than, `max_clock_skew` between the sender's clock and their "
    "own in the checks of HDR-5, adding the skew to their own `now`, never to received times",
    needs=(FIXTURES,),
)
async def skew_tolerated(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    margin = timedelta(seconds=60)
    await read_ok(ctx, customer, header={"create_time": ctx.now() + ctx.skew - margin})
    expire = ctx.now() - ctx.skew + margin
    await read_ok(ctx, customer, header={"create_time": expire - timedelta(minutes=10), "expire_time": expire})


@suite.case(
    "HDR-6/query-sequence",
    description="A query (a one-message thread) at a sequence other than 0 is refused with SEQUENCE_MISMATCH",
    quote="The first message of a thread MUST carry `sequence` 0 […] A receiver MUST refuse a message whose "
    "`sequence` is not the next one of its thread with `SEQUENCE_MISMATCH`.",
    needs=(FIXTURES,),
)
async def query_sequence(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    query = query_envelope(customer, header={"sequence": 1})
    expect(await list_bills(ctx, query), Reason.SEQUENCE_MISMATCH, "a query at sequence 1")


@suite.case(
    "HDR-7/query-previous-digest",
    description="A query (sequence 0) with a previous_digest is refused with PREVIOUS_DIGEST_MISMATCH",
    quote="`previous_digest` MUST be empty at sequence 0 […] A receiver MUST refuse any other value with "
    "`PREVIOUS_DIGEST_MISMATCH`.",
    needs=(FIXTURES,),
)
async def query_previous_digest(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    query = query_envelope(customer, header={"previous_digest": secrets.token_bytes(32)})
    expect(
        await list_bills(ctx, query), Reason.PREVIOUS_DIGEST_MISMATCH, "a query at sequence 0 with a previous_digest"
    )


async def _first_messages_refused(ctx: BillerTarget, header: dict[str, Any], reason: Reason, what: str) -> str:
    """A PaymentIntent, an EnrolmentRequest and (when announced) an ErasureRequest — each the first message of a
    thread of its own — carrying `header` are refused with `reason`, and none took effect: the same requests with
    a correct header then succeed (the intent id is free, the code unspent, the erasure still to be confirmed)."""
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    intent_id = f"cf-{secrets.token_hex(4)}"
    expect(await pay(ctx, payment_intent(customer, bill, intent_id, header=header)), reason, f"a PaymentIntent {what}")
    accepted(await pay(ctx, payment_intent(customer, bill, intent_id)), "the same intent with a correct header")
    account = await ctx.new_account()
    party = ctx.new_party()
    request = party.enrolment(account.account_id, account.enrolment_code, header=header)
    expect(await enrol(ctx, request), reason, f"an EnrolmentRequest {what}")
    accepted(
        await enrol(ctx, party.enrolment(account.account_id, account.enrolment_code)),
        "the same enrolment with a correct header (the refused one must not have spent the code)",
    )
    checked = "PaymentIntent, EnrolmentRequest"
    if "erasure" in ctx.features:
        erasure = customer.party.erasure(customer.account_id, header=header)
        rpc = biller_service_pb2.RequestErasureRequest(request=erasure)
        expect(await ctx.conn.call("RequestErasure", rpc), reason, f"an ErasureRequest {what}")
        checked += ", ErasureRequest"
    return f"checked on {checked}"


@suite.case(
    "HDR-6/first-message-sequence",
    description="A PaymentIntent, EnrolmentRequest or ErasureRequest at sequence 1 is SEQUENCE_MISMATCH, without "
    "effect",
    quote="The first message of a thread MUST carry `sequence` 0 […] A receiver MUST refuse a message whose "
    "`sequence` is not the next one of its thread with `SEQUENCE_MISMATCH`.",
    needs=(FIXTURES,),
)
async def first_message_sequence(ctx: BillerTarget) -> str:
    return await _first_messages_refused(ctx, {"sequence": 1}, Reason.SEQUENCE_MISMATCH, "at sequence 1")


@suite.case(
    "HDR-7/first-message-previous-digest",
    description="A PaymentIntent, EnrolmentRequest or ErasureRequest with a previous_digest is "
    "PREVIOUS_DIGEST_MISMATCH, without effect",
    quote="`previous_digest` MUST be empty at sequence 0 […] A receiver MUST refuse any other value with "
    "`PREVIOUS_DIGEST_MISMATCH`.",
    needs=(FIXTURES,),
)
async def first_message_previous_digest(ctx: BillerTarget) -> str:
    header = {"previous_digest": secrets.token_bytes(32)}
    return await _first_messages_refused(ctx, header, Reason.PREVIOUS_DIGEST_MISMATCH, "with a previous_digest")
