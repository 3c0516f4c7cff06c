"""Privacy (§12): disclosures and erasure."""

from __future__ import annotations

import base64
import hashlib
from datetime import date, timedelta

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    accepted,
    digest_of,
    expect,
    inside_options,
    negotiate,
    thread_id_of,
    thread_of,
)
from agent.conformance.client import Refusal
from agent.conformance.peers import disclosure_bytes
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.limits import MAX_NEXT_PAY_DATE_DAYS
from parley.v1 import account_pb2, biller_service_pb2, negotiation_pb2

suite: Suite[BillerTarget] = Suite("biller/privacy")


@suite.case(
    "PRV-3/disclosure-mismatch",
    description="A disclosure that is not the one the opening commits to, or comes without one, is MALFORMED_PAYLOAD",
    quote="A receiver MUST refuse a `Negotiate` request with `MALFORMED_PAYLOAD` (nothing changes) when a disclosure "
    "comes without a `disclosure_digest` or with any move other than a `ThreadOpen`, when a `disclosure_digest` comes "
    "without a disclosure, when the digest is not 32 bytes or not the SHA-256 of the disclosure bytes",
    needs=("negotiation", "hardship", FIXTURES),
)
async def disclosure_mismatch(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    committed, sent = disclosure_bytes(), disclosure_bytes()
    digest = hashlib.sha256(committed).digest()
    opening = customer.party.open(bill.bill_id, bill.digest, inside_options(bill), disclosure_digest=digest)
    expect(await negotiate(ctx, opening, sent), Reason.MALFORMED_PAYLOAD, "a disclosure other than the committed one")
    expect(await negotiate(ctx, opening), Reason.MALFORMED_PAYLOAD, "a committed disclosure that was not sent")
    plain = customer.party.open(bill.bill_id, bill.digest, inside_options(bill))
    expect(await negotiate(ctx, plain, sent), Reason.MALFORMED_PAYLOAD, "a disclosure beside an opening without digest")
    accepted(await negotiate(ctx, opening, committed), "the opening with the disclosure it commits to")


@suite.case(
    "PRV-9/next-pay-date-bounded",
    description="A disclosure naming a next pay date more than 366 days from the opening is MALFORMED_PAYLOAD",
    quote="A receiver MUST refuse a `Negotiate` request whose disclosure names a `next_pay_date` more than 366 days "
    "(`MAX_NEXT_PAY_DATE_DAYS`) before or after the UTC date of the opening's `create_time`, with "
    "`MALFORMED_PAYLOAD` (nothing changes)",
    needs=("negotiation", "hardship", FIXTURES),
)
async def next_pay_date_bounded(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    today = ctx.today()
    for far in (date(9999, 12, 31), today - timedelta(days=MAX_NEXT_PAY_DATE_DAYS + 1)):
        sent = disclosure_bytes(next_pay_date=far)
        opening = customer.party.open(
            bill.bill_id, bill.digest, inside_options(bill), disclosure_digest=hashlib.sha256(sent).digest()
        )
        expect(await negotiate(ctx, opening, sent), Reason.MALFORMED_PAYLOAD, f"a disclosed next pay date of {far}")
    sent = disclosure_bytes(next_pay_date=today + timedelta(days=30))
    opening = customer.party.open(
        bill.bill_id, bill.digest, inside_options(bill), disclosure_digest=hashlib.sha256(sent).digest()
    )
    accepted(await negotiate(ctx, opening, sent), "the opening with a next pay date 30 days away")


@suite.case(
    "PRV-4/erasure",
    description="RequestErasure answers a signed confirmation at sequence 1 of the request's thread; a retry gets it "
    "again",
    quote="it MUST answer with a signed `ErasureConfirmation` at sequence 1 of the request's thread (`previous_digest` "
    "= the request's digest) whose `erased_count` is the number of disclosures erased (0 when there were none, as on "
    "a repeated request).",
    needs=("erasure", FIXTURES),
    covers=("VER-3",),
)
async def erasure(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    request = customer.party.erasure(customer.account_id)
    rpc = biller_service_pb2.RequestErasureRequest(request=request)
    answer = accepted(await ctx.conn.call("RequestErasure", rpc), "RequestErasure on the signer's own account")
    types = (account_pb2.ErasureConfirmation,)
    verified = ctx.verify(answer.confirmation, types, customer, live=True, what="the erasure confirmation")
    sent = account_pb2.ErasureRequest.FromString(request.payload).header
    header, message = verified.header, verified.message
    if header.sequence != 1 or header.thread_id != sent.thread_id or header.previous_digest != digest_of(request):
        raise Violation("the confirmation is not at sequence 1 of the request's thread, chained to it")
    if message.account_id != customer.account_id or message.erased_count != 0:  # type: ignore[attr-defined]
        raise Violation("the confirmation names another account or erased disclosures that were never made")
    again = accepted(await ctx.conn.call("RequestErasure", rpc), "the same RequestErasure, retried")
    if again.confirmation.SerializeToString() != answer.confirmation.SerializeToString():
        raise Violation("the retried request was answered with another confirmation (HDR-12)")


DISCLOSURE_WAIT = 3.0  # seconds without a new event after which the account's log is taken as read


def _carries(blob: bytes | str, salt: bytes) -> bool:
    """Whether `blob` holds the disclosure's random salt, raw or written out (hex, base64)."""
    if isinstance(blob, str):
        return any(form in blob for form in (salt.hex(), base64.b64encode(salt).decode(), repr(salt)))
    return salt in blob


@suite.case(
    "PRV-7/disclosure-never-echoed",
    description="After a disclosure, GetThread, the account's events and refusals carry only its digest, never "
    "the disclosure",
    quote="A disclosure MUST NOT appear in an agreement bundle (§17), an event, a `GetThread` answer, an error detail "
    "or a log line; only its digest, inside the signed opening, travels with the thread.",
    needs=("negotiation", "hardship", "events", FIXTURES),
)
async def disclosure_never_echoed(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    disclosure = disclosure_bytes()
    salt = negotiation_pb2.Disclosure.FromString(disclosure).salt
    opening = customer.party.open(
        bill.bill_id, bill.digest, inside_options(bill), disclosure_digest=hashlib.sha256(disclosure).digest()
    )
    accepted(await negotiate(ctx, opening, disclosure), "an opening inside the options with its disclosure")
    # The same disclosure beside a move that cannot take one: the refusal must not quote it back.
    other = await ctx.issue_bill(customer)
    plain = customer.party.open(other.bill_id, other.digest, inside_options(other))
    refusal = expect(await negotiate(ctx, plain, disclosure), Reason.MALFORMED_PAYLOAD, "a disclosure without digest")
    if _carries(refusal.describe(), salt):
        raise Violation("the refusal's detail quotes the disclosure")
    thread = await thread_of(ctx, customer, thread_id_of(opening))
    if _carries(thread.SerializeToString(), salt):
        raise Violation("the GetThread answer carries the disclosure")
    seen = 0
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        while True:
            try:
                event = await stream.next(DISCLOSURE_WAIT)
            except TimeoutError:
                break
            if event is None or isinstance(event, Refusal):
                break
            seen += 1
            if _carries(event.SerializeToString(), salt):
                raise Violation(f"event {seen - 1} of the account's log carries the disclosure")
    if not seen:
        raise Violation("the account's event log delivered nothing (two bills were issued)")
    return f"thread and {seen} events checked"
