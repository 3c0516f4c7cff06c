"""Bills (§7): how a bill is presented — a one-message thread to its consumer, signed once, never changed."""

from __future__ import annotations

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    Customer,
    IssuedBill,
    agreed_thread,
    get_bill,
    read_ok,
)
from agent.conformance.runner import Suite, Violation
from agent.protocol.messages import Verified
from parley.v1 import bill_pb2, envelope_pb2

suite: Suite[BillerTarget] = Suite("biller/bills")


def _listed(response: object, bill_id: str) -> envelope_pb2.Envelope:
    for envelope in getattr(response, "bills", ()):
        if bill_pb2.Bill.FromString(envelope.payload).bill_id == bill_id:
            return envelope  # type: ignore[no-any-return]
    raise Violation(f"ListBills on the account does not list bill {bill_id!r}, which GetBill returned")


async def _served(ctx: BillerTarget, customer: Customer, bill: IssuedBill) -> tuple[bytes, bytes]:
    """The bill's envelope as ListBills and as GetBill serve it now, serialized."""
    listed = _listed(await read_ok(ctx, customer), bill.bill_id)
    answer = await get_bill(ctx, customer.party.query(customer.account_id, bill_id=bill.bill_id))
    fetched: envelope_pb2.Envelope | None = getattr(answer, "bill", None)
    if fetched is None:
        raise Violation(f"GetBill of the customer's own bill {bill.bill_id!r} was refused")
    return listed.SerializeToString(), fetched.SerializeToString()


@suite.case(
    "BIL-1/one-message-thread",
    description="Each bill is a one-message thread signed to the enrolled consumer; ListBills and GetBill serve the "
    "same envelope byte for byte",
    quote="A biller MUST present each bill to the consumer bound to its account as a `Bill` signed by the biller: a "
    "one-message thread (fresh random `thread_id`, sequence 0, empty `previous_digest`), `recipient` = that consumer's "
    "party id. It MUST sign a bill's presentation once, when it first presents the bill to that consumer (at issue, or "
    "at enrolment for bills issued before), and serve that same envelope, byte for byte, on every later `ListBills`, "
    "`GetBill` and bundle",
    needs=(FIXTURES,),
)
async def one_message_thread(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bills = [await ctx.issue_bill(customer), await ctx.issue_bill(customer)]
    threads = set()
    for bill in bills:
        verified: Verified[bill_pb2.Bill] = ctx.verify(  # type: ignore[assignment]
            bill.envelope, (bill_pb2.Bill,), customer, live=False, what=f"bill {bill.bill_id}"
        )
        header = verified.header
        if header.sender != ctx.biller_id or header.recipient != customer.party_id:
            raise Violation(f"bill {bill.bill_id} is not from the biller to the enrolled consumer")
        if header.sequence != 0 or header.previous_digest:
            raise Violation(f"bill {bill.bill_id} is not a one-message thread (sequence 0, no previous_digest)")
        if len(header.thread_id) != 16:
            raise Violation(f"bill {bill.bill_id} has a thread_id of {len(header.thread_id)} bytes, not 16 (HDR-6)")
        threads.add(header.thread_id)
        listed, fetched = await _served(ctx, customer, bill)
        if listed != fetched or fetched != bill.envelope.SerializeToString():
            raise Violation(f"bill {bill.bill_id} was served as different envelopes by ListBills and GetBill")
    if len(threads) != len(bills):
        raise Violation("two bills share a thread_id: each bill is a thread of its own with a fresh random id")


@suite.case(
    "BIL-5/never-changes",
    description="A bill under an arrangement is served exactly as first presented: its later state is told by "
    "threads and events, never by editing the bill",
    quote="`bill_id` MUST be unique among the biller's bills, and a presented bill MUST NOT change: a correction is a "
    "new bill with a new `bill_id`. The bill's later state — paid, under an arrangement, reminded — is told by events "
    "(§11), receipts (§10) and threads (§9), never by editing the bill.",
    needs=("negotiation", FIXTURES),
)
async def never_changes(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill, other = await ctx.issue_bill(customer), await ctx.issue_bill(customer)
    if bill.bill_id == other.bill_id:
        raise Violation(f"two bills issued to one account share bill_id {bill.bill_id!r}")
    await agreed_thread(ctx, customer, bill)
    listed, fetched = await _served(ctx, customer, bill)
    first = bill.envelope.SerializeToString()
    if listed != first or fetched != first:
        raise Violation("the bill's envelope changed once an arrangement was agreed on it (it must never change)")
