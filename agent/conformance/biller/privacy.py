"""Privacy (§12): disclosures and erasure."""

from __future__ import annotations

import hashlib

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    accepted,
    digest_of,
    expect,
    inside_options,
    negotiate,
)
from agent.conformance.peers import disclosure_bytes
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from parley.v1 import account_pb2, biller_service_pb2

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
