"""Replay and idempotency (§5.3)."""

from __future__ import annotations

import secrets

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    FIXTURES,
    NEG,
    OUTCOME,
    BillerTarget,
    accepted,
    expect,
    get_receipt,
    get_thread,
    inside_options,
    money,
    negotiate,
    open_thread,
    pay,
    setup,
    thread_id_of,
    thread_of,
)
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason

suite: Suite[BillerTarget] = Suite("biller/replay")


@suite.case(
    "HDR-8/replayed-intent",
    description="A different PaymentIntent reusing a message id is refused with REPLAYED_MESSAGE, without effect",
    quote="A receiver that has recorded a message from the same `sender` with the same `message_id` MUST treat a "
    "message with the same digest as a retry (HDR-12) and MUST refuse one with a different digest with "
    "`REPLAYED_MESSAGE`.",
    needs=(FIXTURES,),
    covers=("HDR-11",),
)
async def replayed_intent(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    message_id = secrets.token_bytes(16)
    first = customer.party.intent(
        customer.account_id, bill.bill_id, "cf-first", money(AMOUNT_DUE), header={"message_id": message_id}
    )
    setup(await pay(ctx, first), "a PaymentIntent for the bill's amount")
    second = customer.party.intent(
        customer.account_id, bill.bill_id, "cf-second", money(AMOUNT_DUE), header={"message_id": message_id}
    )
    expect(await pay(ctx, second), Reason.REPLAYED_MESSAGE, "another intent with the first one's message id")
    receipt = await get_receipt(ctx, customer.party.query(customer.account_id, intent_id="cf-second"))
    expect(receipt, Reason.NOT_FOUND, "GetReceipt for the replayed intent's id (it must not exist)")


@suite.case(
    "HDR-8/replayed-move",
    description="A different ThreadOpen reusing a message id is refused with REPLAYED_MESSAGE, without effect",
    quote="a different message with an already-seen `message_id` is `REPLAYED_MESSAGE` (HDR-8)",
    needs=NEG,
)
async def replayed_move(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    first_bill, second_bill = await ctx.issue_bill(customer), await ctx.issue_bill(customer)
    message_id = secrets.token_bytes(16)
    _, answer = await open_thread(
        ctx, customer, first_bill, inside_options(first_bill), header={"message_id": message_id}
    )
    setup(answer, "an opening on the first bill")
    replay, answer = await open_thread(
        ctx, customer, second_bill, inside_options(second_bill), header={"message_id": message_id}
    )
    expect(answer, Reason.REPLAYED_MESSAGE, "an opening on the second bill reusing the first opening's message id")
    expect(
        await get_thread(ctx, customer.party.query(customer.account_id, thread_id=thread_id_of(replay))),
        Reason.NOT_FOUND,
        "GetThread for the replayed opening's thread (it must not exist)",
    )
    _, answer = await open_thread(ctx, customer, second_bill, inside_options(second_bill))
    accepted(answer, "a fresh opening on the second bill (the replay must have changed nothing)")


@suite.case(
    "HDR-12/retry-same-answer",
    description="A retried Negotiate gets the original reply byte for byte, and the thread does not change",
    quote="A receiver MUST answer a retry with the original answer — the same signed reply envelope, byte for byte and "
    "never re-signed, or the same error — and MUST NOT apply its effect again.",
    needs=NEG,
    covers=("NEG-18", "ENV-9"),
)
async def retry_same_answer(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    opening, first = await open_thread(ctx, customer, bill, inside_options(bill))
    setup(first, "an opening inside the options")
    again = accepted(await negotiate(ctx, opening), "the very same opening, sent again")
    if again.reply.SerializeToString() != first.reply.SerializeToString():
        raise Violation("the retry was answered with another reply envelope than the original")
    if again.outcome != first.outcome:
        raise Violation(
            f"the retry reports outcome {OUTCOME.Name(again.outcome)}, the original {OUTCOME.Name(first.outcome)}"
        )
    thread = await thread_of(ctx, customer, thread_id_of(opening))
    if len(thread.messages) != 2:
        raise Violation(f"after the retry the thread holds {len(thread.messages)} messages, not 2 (a second effect)")
