"""Cases that move the biller's clock (AdvanceClock, CNF-4)."""

from __future__ import annotations

from datetime import timedelta

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    DEFERRAL_FEE,
    FIXTURES,
    NEG,
    OUTCOME,
    BillerTarget,
    accepted,
    agreed_thread,
    countered_thread,
    digest_of,
    enrol,
    expect,
    get_bill,
    list_bills,
    negotiate,
    outside_options,
    pay,
    payment_intent,
    publish,
    query_envelope,
    read_ok,
    setup,
    thread_id_of,
    thread_of,
    thread_unchanged,
)
from agent.conformance.client import Refusal
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.limits import MAX_KEYSET_VERSIONS
from parley.v1 import negotiation_pb2

suite: Suite[BillerTarget] = Suite("biller/clock")


@suite.case(
    "NEG-6/deadline",
    description="A move after the thread's deadline is NEGOTIATION_DEADLINE_PASSED and the thread becomes EXPIRED",
    quote="A receiver MUST refuse a move received after the thread's `deadline` — `now > deadline`, where `now` is the "
    "receiver's own clock at reception […] — with `NEGOTIATION_DEADLINE_PASSED`, and the thread becomes `EXPIRED`.",
    needs=NEG,
    covers=("NEG-14",),  # then closed for good: a further move is THREAD_CLOSED
)
async def deadline(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill, deadline=ctx.now() + timedelta(hours=1))
    await ctx.advance_clock(2 * 3600)
    late = customer.party.move(thread, negotiation_pb2.Offer(terms=outside_options(bill)))
    expect(await negotiate(ctx, late), Reason.NEGOTIATION_DEADLINE_PASSED, "an Offer an hour after the deadline")
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_EXPIRED"))
    again = customer.party.move(thread, negotiation_pb2.Withdraw())
    expect(await negotiate(ctx, again), Reason.THREAD_CLOSED, "a Withdraw on the thread once EXPIRED (NEG-14)")
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_EXPIRED"))


@suite.case(
    "KEY-13/keyset-expired",
    description="Live messages of a party whose newest key set expired are KEYSET_EXPIRED until it publishes a new one",
    quote="A receiver […] MUST NOT accept live messages (§1.6) from a party whose newest version it holds has "
    "expired, until a newer version is obtained (KEY-20).",
    needs=(FIXTURES,),
)
async def keyset_expired(ctx: BillerTarget) -> None:
    party = ctx.new_party(key_set_lifetime=timedelta(days=2))  # created a day ago: expires a day from now
    customer = await ctx.enrolled(party)
    await ctx.advance_clock(2 * 86_400)
    expect(await list_bills(ctx, query_envelope(customer)), Reason.KEYSET_EXPIRED, "a query two days later")
    start = ctx.now() - timedelta(days=1)
    renewed = party.next_key_set([party.key_spec(party.key, start)])
    accepted(await publish(ctx, renewed), "PublishKeySet of a fresh version 2")
    party.adopt(renewed)
    await read_ok(ctx, customer)


@suite.case(
    "ENR-4/code-expired",
    description="The right code presented after it expired (default validity: 30 days) is ENROLMENT_CODE_EXPIRED",
    quote="A code MUST expire a fixed time after issue (default 30 days); a biller MUST refuse a request presenting "
    "the right code after expiry with `ENROLMENT_CODE_EXPIRED`.",
    needs=(FIXTURES,),
)
async def code_expired(ctx: BillerTarget) -> None:
    account = await ctx.new_account()
    await ctx.advance_clock(31 * 86_400)
    party = ctx.new_party()
    request = party.enrolment(account.account_id, account.enrolment_code)
    expect(await enrol(ctx, request), Reason.ENROLMENT_CODE_EXPIRED, "the right code 31 days after issue")


@suite.case(
    "LIM-15/chain-full",
    description="A party's chain holds at most 100 versions: version 101 is KEYSET_CHAIN_FULL even on a fresh day",
    quote="A key set chain MUST have at most 100 versions: a verifier MUST refuse version 101 with "
    "`KEYSET_CHAIN_FULL` (`RESOURCE_EXHAUSTED`)",
    needs=(FIXTURES,),
)
async def chain_full(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    party = customer.party
    days = 0
    while len(party.key_sets) < MAX_KEYSET_VERSIONS:
        version = party.next_key_set([party.key_spec(party.key, ctx.now() - timedelta(days=1))])
        answer = await publish(ctx, version)
        if not isinstance(answer, Refusal):
            party.adopt(version)
            continue
        if answer.reason != Reason.KEYSET_CHAIN_FULL.name or days >= MAX_KEYSET_VERSIONS:
            raise Violation(f"publishing version {len(party.key_sets) + 1} was refused with {answer.describe()}")
        await ctx.advance_clock(86_400)  # the day's publishes are spent (LIM-15): the next day brings more
        days += 1
    await ctx.advance_clock(86_400)  # a fresh day: only the chain's length can refuse version 101
    days += 1
    extra = party.next_key_set([party.key_spec(party.key, ctx.now() - timedelta(days=1))])
    expect(await publish(ctx, extra), Reason.KEYSET_CHAIN_FULL, f"version {MAX_KEYSET_VERSIONS + 1}, on a fresh day")
    await read_ok(ctx, customer)  # the full chain still serves: version 100 signs on
    return f"{MAX_KEYSET_VERSIONS} versions over {days} days; version {MAX_KEYSET_VERSIONS + 1} refused"


@suite.case(
    "NEG-19/thread-kept",
    description="Once an arrangement is paid in full and its dates are long past, GetThread still serves the whole "
    "thread and GetBill the bill, byte for byte",
    quote="Both parties MUST keep, for as long as the arrangement or a claim under it can matter, the signed bill, the "
    "whole thread and both parties' key set chains, so that either can produce an agreement bundle (§17)",
    needs=NEG,
)
async def thread_kept(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await agreed_thread(ctx, customer, bill)
    agreed = payment_intent(
        customer, bill, "cf-kept", AMOUNT_DUE + DEFERRAL_FEE, agreement_digest=digest_of(thread[-1])
    )
    setup(await pay(ctx, agreed), "the agreed deferral's one payment")
    setup(await ctx.conn.settle_payments(), "SettlePayments")
    await ctx.advance_clock(120 * 86_400)  # the deferral's date is weeks behind: the arrangement has ended
    kept = await thread_of(ctx, customer, thread_id_of(thread[0]))
    if [m.SerializeToString() for m in kept.messages] != [m.SerializeToString() for m in thread]:
        raise Violation(f"GetThread serves {len(kept.messages)} messages, not the agreed thread's two, byte for byte")
    answer = await get_bill(ctx, customer.party.query(customer.account_id, bill_id=bill.bill_id))
    served = getattr(answer, "bill", None)
    if served is None or served.SerializeToString() != bill.envelope.SerializeToString():
        raise Violation("GetBill no longer serves the bill as it was presented, once its arrangement ended")
