"""Authorization (§6.3, §6.4): nobody reads, watches, negotiates or pays on another's account."""

from __future__ import annotations

import secrets

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    EVENT_WAIT,
    FIXTURES,
    NEG,
    BillerTarget,
    Customer,
    IssuedBill,
    accepted,
    agreed_thread,
    expect,
    get_bill,
    get_receipt,
    get_thread,
    inside_options,
    list_bills,
    money,
    negotiate,
    open_thread,
    outside_options,
    pay,
    setup,
    thread_id_of,
)
from agent.conformance.client import Refusal
from agent.conformance.peers import resign
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from parley.v1 import negotiation_pb2

suite: Suite[BillerTarget] = Suite("biller/authorization")


async def _victim(ctx: BillerTarget) -> tuple[Customer, IssuedBill, str, bytes]:
    """A customer with a bill, a payment intent on it and (with negotiation) a thread: what others must not touch."""
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    intent_id = f"cf-victim-{secrets.token_hex(4)}"
    intent = customer.party.intent(customer.account_id, bill.bill_id, intent_id, money(AMOUNT_DUE))
    setup(await pay(ctx, intent), "the victim's own payment intent")
    thread_id = b""
    if "negotiation" in ctx.features:
        other_bill = await ctx.issue_bill(customer)
        thread_id = thread_id_of((await agreed_thread(ctx, customer, other_bill))[0])
    return customer, bill, intent_id, thread_id


@suite.case(
    "AUZ-1/read-other-account",
    description="A second enrolled consumer can never read the first's account: ACCOUNT_ACCESS_DENIED",
    quote="Every request that names an account — `AccountQuery`, `PaymentIntent` and `ErasureRequest`, by "
    "`account_id` — MUST be refused with `ACCOUNT_ACCESS_DENIED` unless its signer's party is bound to that account, "
    "including when the account does not exist",
    needs=(FIXTURES,),
)
async def read_other_account(ctx: BillerTarget) -> None:
    victim, bill, intent_id, thread_id = await _victim(ctx)
    intruder = (await ctx.enrolled()).party
    account = victim.account_id
    denied = Reason.ACCOUNT_ACCESS_DENIED
    expect(await list_bills(ctx, intruder.query(account)), denied, "ListBills on another consumer's account")
    expect(await get_bill(ctx, intruder.query(account, bill_id=bill.bill_id)), denied, "GetBill of another's bill")
    expect(
        await get_receipt(ctx, intruder.query(account, intent_id=intent_id)), denied, "GetReceipt of another's intent"
    )
    if thread_id:
        expect(
            await get_thread(ctx, intruder.query(account, thread_id=thread_id)), denied, "GetThread of another's thread"
        )
    nowhere = f"cf-no-such-account-{secrets.token_hex(4)}"
    expect(await list_bills(ctx, intruder.query(nowhere)), denied, "ListBills on an account that does not exist")


@suite.case(
    "AUZ-3/read-not-on-account",
    description="Naming another consumer's bill, thread or intent under one's own account is NOT_FOUND",
    quote="A biller MUST look up the bill, thread or intent a request names only after AUZ-1 has passed, and only on "
    "the signer's bound accounts: one that does not exist there — whether it does not exist at all or belongs to "
    "another account — MUST be refused with `NOT_FOUND`.",
    needs=(FIXTURES,),
    covers=("AUZ-5",),
)
async def read_not_on_account(ctx: BillerTarget) -> None:
    _, bill, intent_id, thread_id = await _victim(ctx)
    intruder = await ctx.enrolled()
    party, own = intruder.party, intruder.account_id
    missing = Reason.NOT_FOUND
    expect(await get_bill(ctx, party.query(own, bill_id=bill.bill_id)), missing, "GetBill of another's bill")
    expect(await get_receipt(ctx, party.query(own, intent_id=intent_id)), missing, "GetReceipt of another's intent")
    if thread_id:
        expect(await get_thread(ctx, party.query(own, thread_id=thread_id)), missing, "GetThread of another's thread")
    expect(
        await get_bill(ctx, party.query(own, bill_id="cf-no-such-bill")),
        missing,
        "GetBill of a bill that does not exist",
    )


@suite.case(
    "AUZ-1/watch-other-account",
    description="A second enrolled consumer can never watch the first's events: ACCOUNT_ACCESS_DENIED",
    quote="Every request that names an account […] MUST be refused with `ACCOUNT_ACCESS_DENIED` unless its signer's "
    "party is bound to that account",
    needs=("events", FIXTURES),
)
async def watch_other_account(ctx: BillerTarget) -> None:
    victim = await ctx.enrolled()
    await ctx.issue_bill(victim)
    intruder = (await ctx.enrolled()).party
    async with ctx.conn.watch(intruder.query(victim.account_id)) as stream:
        try:
            answer = await stream.next(EVENT_WAIT)
        except TimeoutError:
            raise Violation("WatchEvents on another's account neither failed nor ended") from None
    if answer is None or not isinstance(answer, Refusal):
        raise Violation("WatchEvents on another consumer's account was served, not refused")
    expect(answer, Reason.ACCOUNT_ACCESS_DENIED, "WatchEvents on another consumer's account")


@suite.case(
    "AUZ-3/negotiate-other-bill",
    description="A second enrolled consumer can never negotiate on the first's bill or thread: NOT_FOUND",
    quote="A `ThreadOpen` names a bill by `bill_id` and a later move names its thread by `thread_id` only; they are "
    "refused with `NOT_FOUND` unless the bill, or the thread, is on an account bound to the signer.",
    needs=NEG,
)
async def negotiate_other_bill(ctx: BillerTarget) -> None:
    victim = await ctx.enrolled()
    bill, other_bill = await ctx.issue_bill(victim), await ctx.issue_bill(victim)
    thread = await agreed_thread(ctx, victim, other_bill)
    intruder = (await ctx.enrolled()).party
    opening = intruder.open(bill.bill_id, bill.digest, inside_options(bill))
    expect(await negotiate(ctx, opening), Reason.NOT_FOUND, "a ThreadOpen on another consumer's bill")
    offer = intruder.move(thread, negotiation_pb2.Offer(terms=outside_options(other_bill)))
    expect(await negotiate(ctx, offer), Reason.NOT_FOUND, "an Offer on another consumer's thread")
    _, answer = await open_thread(ctx, victim, bill, inside_options(bill))
    accepted(answer, "the owner's own opening on the bill (the intruder's must have changed nothing)")


@suite.case(
    "AUZ-1/pay-other-account",
    description="A second enrolled consumer can never pay on the first's account (ACCOUNT_ACCESS_DENIED) or bill "
    "(NOT_FOUND)",
    quote="Every request that names an account — `AccountQuery`, `PaymentIntent` and `ErasureRequest`, by "
    "`account_id` — MUST be refused with `ACCOUNT_ACCESS_DENIED` unless its signer's party is bound to that account",
    needs=(FIXTURES,),
)
async def pay_other_account(ctx: BillerTarget) -> None:
    victim = await ctx.enrolled()
    bill = await ctx.issue_bill(victim)
    intruder = await ctx.enrolled()
    theirs = intruder.party.intent(victim.account_id, bill.bill_id, "cf-intruder", money(AMOUNT_DUE))
    expect(await pay(ctx, theirs), Reason.ACCOUNT_ACCESS_DENIED, "a PaymentIntent on another consumer's account")
    own = intruder.party.intent(intruder.account_id, bill.bill_id, "cf-intruder", money(AMOUNT_DUE))
    expect(await pay(ctx, own), Reason.NOT_FOUND, "a PaymentIntent on one's own account naming another's bill")
    intent = victim.party.intent(victim.account_id, bill.bill_id, "cf-intruder", money(AMOUNT_DUE))
    accepted(await pay(ctx, intent), "the owner's own intent with the same intent_id (the intruder's changed nothing)")


@suite.case(
    "AUZ-4/query-shape",
    description="A query with a required field empty, or a field the RPC does not take, is MALFORMED_PAYLOAD",
    quote="a biller MUST refuse a query with a required field empty or another field set with `MALFORMED_PAYLOAD`.",
    needs=(FIXTURES,),
)
async def query_shape(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    party, account = customer.party, customer.account_id
    malformed = Reason.MALFORMED_PAYLOAD
    expect(await list_bills(ctx, party.query(account, bill_id="cf-bill")), malformed, "ListBills naming a bill_id")
    expect(await get_bill(ctx, party.query(account)), malformed, "GetBill without a bill_id")
    expect(await get_receipt(ctx, party.query(account)), malformed, "GetReceipt without an intent_id")
    expect(await list_bills(ctx, party.query(account, start_sequence=3)), malformed, "ListBills with a start_sequence")


@suite.case(
    "KEY-6/keyid-of-another-party",
    description="A query signed by one enrolled party under another party's keyid is refused with BAD_SIGNATURE",
    quote="A biller receiving a consumer request has no single expected sender: it MUST resolve the keyid among the "
    "chains of all its enrolled parties, refusing with `NOT_ENROLLED` when none lists it (AUZ-2), and the party "
    "whose chain lists it is then the expected sender.",
    needs=(FIXTURES,),
)
async def keyid_of_another_party(ctx: BillerTarget) -> None:
    owner, other = await ctx.enrolled(), await ctx.enrolled()
    borrowed = resign(owner.party.query(owner.account_id), owner.party.key, keyid=other.party.key.keyid)
    expect(
        await list_bills(ctx, borrowed),
        Reason.BAD_SIGNATURE,
        "a query signed by its sender's key under another enrolled party's keyid (step 4 of §3.8, before the "
        "sender check of step 7)",
    )
