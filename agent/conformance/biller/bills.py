"""Bills (§7): how a bill is presented — a one-message thread to its consumer, signed once, never changed."""

from __future__ import annotations

from datetime import timedelta

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    DUE_IN_DAYS,
    FIXTURES,
    BillerTarget,
    Customer,
    IssuedBill,
    agreed_thread,
    expect,
    get_bill,
    money,
    read_ok,
)
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.limits import AMOUNT_MAJOR_DIGITS
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


@suite.case(
    "BIL-2/invalid-bill-refused",
    description="A bill conformance control is asked to issue invalid is refused with the reason of its first "
    "failing check, and never presented",
    quote="A bill MUST be valid. A biller MUST NOT sign an invalid bill, and a consumer or verifier MUST refuse one, "
    "with the reason of the first failing check in this order",
    needs=(FIXTURES,),
)
async def invalid_bill_refused(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    today = ctx.today()
    due = today + timedelta(days=DUE_IN_DAYS)
    standard = ctx.standard_options()
    in_dollars = bill_pb2.AdvertisedOptions()
    in_dollars.CopyFrom(standard)
    in_dollars.deferral.fee.currency_code = "USD"

    def early(pay_by: str, discount: int) -> bill_pb2.AdvertisedOptions:
        options = bill_pb2.AdvertisedOptions()
        options.CopyFrom(standard)
        options.early_payment.CopyFrom(bill_pb2.EarlyPaymentDiscount(pay_by_date=pay_by, discount=money(discount)))
        return options

    past_the_ceiling = bill_pb2.AdvertisedOptions()
    past_the_ceiling.CopyFrom(standard)
    past_the_ceiling.deferral.fee.CopyFrom(money(500))
    ceiling = 10 ** (AMOUNT_MAJOR_DIGITS + 2) - 1  # the largest amount in EUR (TRM-3)

    invalid = (  # (what is wrong, amount due, due date, options, the reason of the first failing check of BIL-2)
        ("amount_due zero", 0, due, standard, Reason.AMOUNT_OUT_OF_RANGE),
        ("a deferral fee in USD on a bill in EUR, and amount_due zero (check 3 before 4)", 0, due, in_dollars,
         Reason.CURRENCY_MISMATCH),
        ("due_date two days before the issue date", AMOUNT_DUE, today - timedelta(days=2), standard,
         Reason.INVALID_TERMS),
        ("an early payment by a day after due_date", AMOUNT_DUE, due,
         early((due + timedelta(days=1)).isoformat(), 1_000), Reason.INVALID_TERMS),
        ("an early-payment discount equal to amount_due", AMOUNT_DUE, due, early(today.isoformat(), AMOUNT_DUE),
         Reason.AMOUNT_OUT_OF_RANGE),
        ("the largest amount due and a deferral fee (check 9: no terms could take the option)", ceiling, due,
         past_the_ceiling, Reason.AMOUNT_OUT_OF_RANGE),
    )  # fmt: skip
    for what, amount, due_date, options, reason in invalid:
        answer = await ctx.conn.issue_test_bill(customer.account_id, money(amount), due_date.isoformat(), options)
        expect(answer, reason, f"IssueTestBill of a bill with {what}")
    listed = await read_ok(ctx, customer)
    if listed.bills:
        raise Violation(f"the account lists {len(listed.bills)} bill(s) after only invalid bills were asked for")
    await ctx.issue_bill(customer)
    return f"{len(invalid)} invalid bills refused, none presented; a valid one then issued"
