"""Enrolment codes' form, times in microseconds, thanks for a payment (ENR-7, HDR-14, HDR-16, EVT-6)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from agent.conformance.biller.target import (
    FIXTURES,
    SHOULD,
    BillerTarget,
    Customer,
    accepted,
    digest_of,
    enrol,
    expect,
    first_event,
    get_receipt,
    inside_options,
    list_bills,
    negotiate,
    pay,
    payment_intent,
    publish,
    query_envelope,
    read_ok,
    setup,
)
from agent.conformance.peers import KeySpec
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.messages import PAYLOAD_TYPES
from parley.v1 import envelope_pb2, event_pb2

suite: Suite[BillerTarget] = Suite("biller/codes_and_times")


_CODE_FORM = re.compile(r"[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}")


@suite.case(
    "ENR-7/code-normalised",
    description="Codes are three hyphenated groups of four Crockford base32 characters, compared after normalisation",
    quote="An enrolment code MUST be 12 characters drawn independently and uniformly from Crockford's base32 alphabet "
    "[…] written as three groups of four joined by hyphens […] the biller MUST apply the same normalisation before "
    "comparing.",
    needs=(FIXTURES,),
)
async def code_normalised(ctx: BillerTarget) -> str:
    # The aliases (O for 0, I and L for 1) can only be typed for a code holding a 0 or a 1; about half of
    # all codes hold neither, so ask for fresh accounts until one does (10 tries leave a chance of 0.05 %).
    for _ in range(10):
        account = await ctx.new_account()
        code = account.enrolment_code
        if not _CODE_FORM.fullmatch(code):
            raise Violation(f"the enrolment code {code!r} is not three groups of four Crockford base32 characters")
        if "0" in code or "1" in code:
            break
    typed = " ".join(code.replace("-", "").lower().replace("0", "o").replace("1", "l"))
    party = ctx.new_party()
    accepted(await enrol(ctx, party.enrolment(account.account_id, typed)), f"Enrol with the code typed as {typed!r}")
    return f"{code} accepted as {typed!r}"


@suite.case(
    "HDR-14/microsecond-times",
    description="The biller writes times in whole microseconds and gives its replies short lifetimes",
    quote="Senders SHOULD write times in whole microseconds (`nanos` a multiple of 1,000), since some implementations "
    "compare times at microsecond precision, and SHOULD choose the shortest lifetime that serves the message",
    level=SHOULD,
    needs=(FIXTURES,),
)
async def microsecond_times(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    answer = accepted(await pay(ctx, payment_intent(customer, bill, "cf-times")), "a PaymentIntent")
    assert customer.confirmation is not None
    for what, envelope in (
        ("the enrolment confirmation", customer.confirmation.confirmation),
        ("the bill", bill.envelope),
        ("the payment instructions", answer.instructions),
    ):
        header = PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload).header  # type: ignore[attr-defined]
        if header.create_time.nanos % 1000 or header.expire_time.nanos % 1000:
            raise Violation(f"{what} carries times with nanosecond digits")
        lifetime = header.expire_time.ToDatetime() - header.create_time.ToDatetime()
        if lifetime > ctx.max_lifetime:
            raise Violation(f"{what} has a lifetime of {lifetime}, above the maximum")


@suite.case(
    "EVT-6/payment-thanked",
    description="A settled payment is followed by a PAYMENT_RECEIVED event naming the receipt",
    quote="[A biller] SHOULD thank the consumer on every payment with a `PAYMENT_RECEIVED` event.",
    level=SHOULD,
    needs=("events", FIXTURES),
)
async def payment_thanked(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    setup(await pay(ctx, payment_intent(customer, bill, "cf-thanks")), "a PaymentIntent")
    setup(await ctx.conn.settle_payments(), "SettlePayments")
    receipt = await get_receipt(ctx, customer.party.query(customer.account_id, intent_id="cf-thanks"))
    setup(receipt, "GetReceipt after SettlePayments")
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        while True:
            envelope = await first_event(stream, "waiting for PAYMENT_RECEIVED")
            event = event_pb2.Event.FromString(envelope.payload)
            if event.kind == event_pb2.EVENT_KIND_PAYMENT_RECEIVED and event.bill_id == bill.bill_id:
                break
    if event.related_digest != digest_of(receipt.receipt):
        raise Violation("PAYMENT_RECEIVED does not name the receipt's digest (EVT-2)")


def _with_nanos(customer: Customer, envelope: envelope_pb2.Envelope, change: Callable[[Any], None]) -> Any:
    """The envelope's message with one time given a sub-microsecond part, signed again by the customer."""
    message = PAYLOAD_TYPES[envelope.payload_type].FromString(envelope.payload)
    change(message)
    return customer.party.sign(message)


@suite.case(
    "HDR-16/whole-microseconds",
    description="A sub-microsecond time is refused by the check reading it: MALFORMED_HEADER, "
    "NEGOTIATION_LIMITS_INVALID (deadline), KEYSET_INVALID (key)",
    quote="Every `google.protobuf.Timestamp` in a signed payload MUST be a whole number of microseconds: `nanos` a "
    "multiple of 1,000. A receiver MUST refuse any other as a malformed time, with the reason of the check that reads "
    "that field",
    needs=("negotiation", FIXTURES),
)
async def whole_microseconds(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)

    def header_nanos(message: Any) -> None:
        message.header.create_time.nanos += 1

    def deadline_nanos(message: Any) -> None:
        message.deadline.nanos += 1

    query = _with_nanos(customer, query_envelope(customer), header_nanos)
    expect(await list_bills(ctx, query), Reason.MALFORMED_HEADER, "a query created at a time with 1 ns over a µs")
    opening = customer.party.open(
        bill.bill_id, bill.digest, inside_options(bill), deadline=ctx.now() + timedelta(hours=1)
    )
    expect(
        await negotiate(ctx, _with_nanos(customer, opening, deadline_nanos)),
        Reason.NEGOTIATION_LIMITS_INVALID,
        "an opening whose deadline has 1 ns over a µs",
    )
    party = customer.party
    start = ctx.now() - timedelta(days=1)
    window = KeySpec(party.key.public_key, start, start + timedelta(days=90, microseconds=1))
    version = party.next_key_set([window])

    def key_nanos(message: Any) -> None:
        message.keys[0].not_after.nanos += 1

    expect(
        await publish(ctx, _with_nanos(customer, version, key_nanos)),
        Reason.KEYSET_INVALID,
        "a key's not_after with 1 ns over a µs",
    )
    await read_ok(ctx, customer)  # none of them changed anything
    return "header, deadline and key window refused"
