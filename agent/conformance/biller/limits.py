"""Limits (§14): the budgets a biller keeps per party — signed requests (LIM-8) and open event streams (LIM-14).

These cases spend a party's budget on purpose, so each works on a fresh party of its own: no other case shares
its bucket or its streams.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from datetime import timedelta

from agent.conformance.biller.target import (
    FIXTURES,
    BillerTarget,
    Customer,
    list_bills,
    publish,
    read_ok,
)
from agent.conformance.client import Answer, Refusal
from agent.conformance.runner import Skip, Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.keys import SigningKey
from agent.protocol.limits import MAX_KEYS_PER_SET

suite: Suite[BillerTarget] = Suite("biller/limits")

MAX_BATCHES = 12  # bursts of burst + 1 requests sent before the suite gives up waiting for RATE_LIMITED
STREAMS_TRIED = 32  # open streams per party the suite tries before calling the bound missing
STREAM_WAIT = 10.0  # seconds for a stream's first event or its refusal


def _refused_for(answer: Answer, reason: Reason) -> bool:
    return isinstance(answer, Refusal) and answer.reason == reason.name


@suite.case(
    "LIM-8/budget-per-party",
    description="Requests from one party beyond rate_limit_burst are refused RATE_LIMITED, and listing more keys "
    "does not multiply the budget",
    quote="A biller MUST rate-limit signed requests per signing party (one bucket for the party, however many keys "
    "its key set lists and whatever version signed: listing more keys or rotating MUST NOT multiply the budget) with "
    "a token bucket that refills at `rate_limit_per_second` and holds at most `rate_limit_burst` tokens, refusing a "
    "request that finds the bucket empty with `RATE_LIMITED`",
    needs=(FIXTURES,),
)
async def budget_per_party(ctx: BillerTarget) -> str:
    burst, rate = ctx.limits.rate_limit_burst, ctx.limits.rate_limit_per_second
    if not burst or not rate:
        raise Skip("Hello announces no rate_limit_burst / rate_limit_per_second to check against")
    # Every key the party may list signs in turn: a biller keeping one bucket per key would grant their sum.
    keys = [SigningKey.generate() for _ in range(MAX_KEYS_PER_SET - 1)]
    customer = await ctx.enrolled(ctx.new_party(extra_keys=keys))
    signers = [customer.party.key, *keys]
    granted, sent = 0, 0
    started = time.monotonic()
    for _ in range(MAX_BATCHES):
        batch = [
            customer.party.query(customer.account_id, key=signers[(sent + i) % len(signers)]) for i in range(burst + 1)
        ]
        sent += len(batch)
        answers = await asyncio.gather(*(list_bills(ctx, query) for query in batch))
        others = [a for a in answers if isinstance(a, Refusal) and not _refused_for(a, Reason.RATE_LIMITED)]
        if others:
            raise Violation(f"a well-formed ListBills was refused with {others[0].describe()}, not RATE_LIMITED")
        granted += sum(1 for a in answers if not isinstance(a, Refusal))
        if any(_refused_for(a, Reason.RATE_LIMITED) for a in answers):
            break
    else:
        raise Violation(f"{sent} ListBills from one party, {burst + 1} at a time, and none was refused RATE_LIMITED")
    elapsed = time.monotonic() - started
    # The most one bucket can grant in `elapsed`: full at the start, refilled at `rate` since (+1 s of slack for
    # the time between the biller's clock reading and ours).
    most = burst + rate * (elapsed + 1.0)
    if granted > most:
        raise Violation(
            f"{granted} requests were granted in {elapsed:.1f} s where one bucket allows at most {most:.0f} "
            f"({len(signers)} keys signed in turn: a bucket per key multiplies the budget)"
        )
    return f"RATE_LIMITED after {granted} granted in {elapsed:.1f} s ({len(signers)} keys in turn)"


async def _open_stream(ctx: BillerTarget, customer: Customer, streams: AsyncExitStack) -> Refusal | None:
    """Open one more WatchEvents stream for `customer`: None once its first event arrived, else its refusal."""
    stream = await streams.enter_async_context(ctx.conn.watch(customer.party.query(customer.account_id)))
    first = await stream.next(STREAM_WAIT)
    if isinstance(first, Refusal):
        return first
    if first is None:
        raise Violation("a WatchEvents stream ended without an event or a refusal (the account has a bill)")
    return None


@suite.case(
    "LIM-14/streams-per-party",
    description="One party's open WatchEvents streams are bounded: one more is refused TOO_MANY_STREAMS",
    quote="A biller MUST bound the `WatchEvents` streams one party holds open at once (reference biller: 4 per "
    "process), refusing one more with `TOO_MANY_STREAMS` (`RESOURCE_EXHAUSTED`).",
    needs=("events", FIXTURES),
)
async def streams_per_party(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    await ctx.issue_bill(customer)  # so that a stream the biller keeps delivers event 0 at once
    async with AsyncExitStack() as streams:
        for held in range(STREAMS_TRIED):
            try:
                refusal = await _open_stream(ctx, customer, streams)
            except TimeoutError:
                raise Violation(f"stream {held + 1} gave neither event 0 nor a refusal in {STREAM_WAIT:g} s") from None
            if refusal is None:
                continue
            if refusal.reason != Reason.TOO_MANY_STREAMS.name:
                raise Violation(f"stream {held + 1} was refused with {refusal.describe()}, not TOO_MANY_STREAMS")
            if held == 0:
                raise Violation("the party's first stream was refused TOO_MANY_STREAMS")
            return f"{held} streams held, the next refused TOO_MANY_STREAMS"
    raise Violation(f"one party held {STREAMS_TRIED} WatchEvents streams open at once and none was refused")


PUBLISHES_TRIED = 50  # key set versions one party publishes in a day before the suite calls the bound missing


@suite.case(
    "LIM-15/publishes-per-day",
    description="One party's key set publishes in a day are bounded: one more is refused KEYSET_CHAIN_FULL",
    quote="A biller MUST bound the versions one party may publish per day (reference biller: 4, per process, "
    "`KEYSET_CHAIN_FULL`)",
    needs=(FIXTURES,),
)
async def publishes_per_day(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    party = customer.party
    for published in range(PUBLISHES_TRIED):
        version = party.next_key_set([party.key_spec(party.key, ctx.now() - timedelta(days=1))])
        answer = await publish(ctx, version)
        if not isinstance(answer, Refusal):
            party.adopt(version)
            continue
        if answer.reason != Reason.KEYSET_CHAIN_FULL.name:
            raise Violation(f"publish {published + 1} of the day was refused with {answer.describe()}")
        if published == 0:
            raise Violation("the party's first publish of the day was refused KEYSET_CHAIN_FULL")
        await read_ok(ctx, customer)  # the versions it accepted still serve
        return f"{published} versions published, the next refused KEYSET_CHAIN_FULL"
    raise Violation(f"one party published {PUBLISHES_TRIED} key set versions in a day and none was refused")
