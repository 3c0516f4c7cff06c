"""Payments (§10): intents, instructions, receipts."""

from __future__ import annotations

import secrets
from typing import Any

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    DEFERRAL_FEE,
    FIXTURES,
    NEG,
    BillerTarget,
    Customer,
    accepted,
    agreed_thread,
    digest_of,
    expect,
    get_receipt,
    money,
    pay,
    payment_intent,
    setup,
)
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from parley.v1 import payment_pb2

suite: Suite[BillerTarget] = Suite("biller/payments")


@suite.case(
    "PAY-2/same-intent-same-instructions",
    description="The same intent twice gets byte-identical instructions; settlement yields one receipt and never a "
    "second payment",
    quote="every later intent with that `intent_id` and the same content […] is answered with the same "
    "`PaymentInstructions` envelope, byte for byte, whatever the later intent's header says",
    needs=(FIXTURES,),
    covers=("PAY-4", "PAY-6", "PAY-7"),
)
async def same_intent_same_instructions(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    first = payment_intent(customer, bill, "cf-pay-once")
    answer = accepted(await pay(ctx, first), "a PaymentIntent for the bill's amount")
    instructions = answer.instructions
    _check_instructions(ctx, customer, first, instructions)
    for name, intent in (
        ("the very same intent envelope, sent again", first),
        ("a new intent message with the same intent_id and content", payment_intent(customer, bill, "cf-pay-once")),
    ):
        again = accepted(await pay(ctx, intent), name)
        if again.instructions.SerializeToString() != instructions.SerializeToString():
            raise Violation(f"{name} was answered with other instructions: a second payment was instructed")
    setup(await ctx.conn.settle_payments(), "SettlePayments")
    receipt_query = customer.party.query(customer.account_id, intent_id="cf-pay-once")
    receipt = accepted(await get_receipt(ctx, receipt_query), "GetReceipt after SettlePayments")
    _check_receipt(ctx, customer, instructions, receipt.receipt)
    late = accepted(await pay(ctx, first), "the first intent, retried after settlement")
    if late.instructions.SerializeToString() != instructions.SerializeToString():
        raise Violation("the intent retried after settlement was answered with other instructions")
    twice = accepted(
        await get_receipt(ctx, customer.party.query(customer.account_id, intent_id="cf-pay-once")), "GetReceipt again"
    )
    if twice.receipt.SerializeToString() != receipt.receipt.SerializeToString():
        raise Violation("GetReceipt returned another receipt the second time")
    expect(
        await pay(ctx, payment_intent(customer, bill, "cf-pay-twice")),
        Reason.PAYMENT_AMOUNT_MISMATCH,
        "a second intent (new intent_id) paying the settled bill again (PAY-3, PAY-7)",
    )


@suite.case(
    "PAY-4/reference-per-intent",
    description="Two intents of one account, for two bills, are instructed with two different payment references",
    quote="which name the `rail`, `payee_name`, `payee_account`, a non-empty `payment_reference` unique to the intent",
    needs=(FIXTURES,),
)
async def reference_per_intent(ctx: BillerTarget) -> None:
    # The reference is how the biller's bank statement is matched to an intent (PAY-5): shared by two intents, a
    # settlement of one could be taken for the other.
    customer = await ctx.enrolled()
    references: dict[str, str] = {}
    for intent_id in ("cf-reference-1", "cf-reference-2"):
        bill = await ctx.issue_bill(customer)
        intent = payment_intent(customer, bill, intent_id)
        answer = accepted(await pay(ctx, intent), f"a PaymentIntent ({intent_id}) for a new bill's amount")
        _check_instructions(ctx, customer, intent, answer.instructions)
        reference = payment_pb2.PaymentInstructions.FromString(answer.instructions.payload).payment_reference
        if reference in references.values():
            raise Violation(f"intents cf-reference-1 and {intent_id} were both given payment_reference {reference!r}")
        references[intent_id] = reference


def _check_instructions(ctx: BillerTarget, customer: Customer, intent: Any, instructions: Any) -> None:
    """PAY-4: signed, at sequence 1 of the intent's thread, chained to it, for the intent's amount."""
    verified = ctx.verify(
        instructions, (payment_pb2.PaymentInstructions,), customer, live=True, what="the instructions"
    )
    sent = payment_pb2.PaymentIntent.FromString(intent.payload)
    message: Any = verified.message
    header = verified.header
    problems = [
        "not in the intent's thread" if header.thread_id != sent.header.thread_id else "",
        f"at sequence {header.sequence}, not 1" if header.sequence != 1 else "",
        "previous_digest is not the intent's digest" if header.previous_digest != digest_of(intent) else "",
        f"intent_id {message.intent_id!r}" if message.intent_id != sent.intent_id else "",
        "amount differs from the intent's" if message.amount != sent.amount else "",
        "empty payment_reference" if not message.payment_reference else "",
        "no pay_by_time" if not message.HasField("pay_by_time") else "",
    ]
    if any(problems):
        raise Violation("the instructions (PAY-4): " + "; ".join(p for p in problems if p))


def _check_receipt(ctx: BillerTarget, customer: Customer, instructions: Any, receipt: Any) -> None:
    """PAY-6: at sequence 2 chained to the instructions, for the instructed amount."""
    verified = ctx.verify(receipt, (payment_pb2.Receipt,), customer, live=False, what="the receipt")
    instructed = payment_pb2.PaymentInstructions.FromString(instructions.payload)
    message: Any = verified.message
    header = verified.header
    problems = [
        f"at sequence {header.sequence}, not 2" if header.sequence != 2 else "",
        "previous_digest is not the instructions' digest" if header.previous_digest != digest_of(instructions) else "",
        "amount_received differs from the instructed amount" if message.amount_received != instructed.amount else "",
        f"intent_id {message.intent_id!r}" if message.intent_id != instructed.intent_id else "",
    ]
    if any(problems):
        raise Violation("the receipt (PAY-6): " + "; ".join(p for p in problems if p))


@suite.case(
    "PAY-2/idempotency-conflict",
    description="An intent reusing an intent_id with different content is refused with IDEMPOTENCY_CONFLICT",
    quote="an intent that reuses an `intent_id` with different content is refused with `IDEMPOTENCY_CONFLICT`. The "
    "idempotency check comes before every check of PAY-3",
    needs=(FIXTURES,),
)
async def idempotency_conflict(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    setup(await pay(ctx, payment_intent(customer, bill, "cf-conflict")), "a PaymentIntent for the bill's amount")
    expect(
        await pay(ctx, payment_intent(customer, bill, "cf-conflict", AMOUNT_DUE - 1)),
        Reason.IDEMPOTENCY_CONFLICT,
        "the same intent_id for another amount",
    )


@suite.case(
    "PAY-3/amount-mismatch",
    description="An intent for another amount than owed, or an instalment index without agreement, is "
    "PAYMENT_AMOUNT_MISMATCH",
    quote="The biller refuses an intent whose amount differs, whose `instalment_index` is outside the schedule (or not "
    "0 without an agreement), or that pays an instalment or bill already settled (nothing is owed), with "
    "`PAYMENT_AMOUNT_MISMATCH`; an `agreement_digest` that is not the `Accept` of an `AGREED` thread on that bill and "
    "account is `NOT_FOUND`.",
    needs=(FIXTURES,),
)
async def amount_mismatch(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    mismatch = Reason.PAYMENT_AMOUNT_MISMATCH
    expect(
        await pay(ctx, payment_intent(customer, bill, "cf-short", AMOUNT_DUE - 1)), mismatch, "an intent one cent short"
    )
    expect(
        await pay(ctx, payment_intent(customer, bill, "cf-index", instalment_index=1)),
        mismatch,
        "instalment_index 1 without an agreement",
    )
    expect(
        await pay(ctx, payment_intent(customer, bill, "cf-agreement", agreement_digest=secrets.token_bytes(32))),
        Reason.NOT_FOUND,
        "an agreement_digest naming no agreement",
    )
    accepted(await pay(ctx, payment_intent(customer, bill, "cf-right")), "an intent for the amount due")


@suite.case(
    "PAY-1/intent-form",
    description="A malformed intent_id is MALFORMED_PAYLOAD; a bill not on the account is NOT_FOUND",
    quote="A payment MUST start with a `PaymentIntent` signed by the consumer […] whose `intent_id` is 1 to 64 "
    "characters of `[A-Za-z0-9_-]` (else `MALFORMED_PAYLOAD`), whose `account_id` is the signer's account (AUZ-1) "
    "and whose `bill_id` names a bill of that account (`NOT_FOUND` otherwise)",
    needs=(FIXTURES,),
)
async def intent_form(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    for intent_id in ("bad id!", "", "x" * 65, "é"):
        expect(
            await pay(ctx, payment_intent(customer, bill, intent_id)),
            Reason.MALFORMED_PAYLOAD,
            f"intent_id {intent_id[:16]!r}",
        )
    stray = customer.party.intent(customer.account_id, "cf-no-such-bill", "cf-stray", money(AMOUNT_DUE))
    expect(await pay(ctx, stray), Reason.NOT_FOUND, "an intent for a bill that does not exist")


@suite.case(
    "PAY-5/not-settled",
    description="GetReceipt before settlement is PAYMENT_NOT_SETTLED; for an unknown intent, NOT_FOUND",
    quote="`GetReceipt` (a signed `AccountQuery` naming `intent_id`) before settlement MUST fail with "
    "`PAYMENT_NOT_SETTLED`, and for an intent unknown on the account with `NOT_FOUND`.",
    needs=(FIXTURES,),
)
async def not_settled(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    setup(await pay(ctx, payment_intent(customer, bill, "cf-unsettled")), "a PaymentIntent for the bill's amount")
    query = customer.party.query(customer.account_id, intent_id="cf-unsettled")
    expect(await get_receipt(ctx, query), Reason.PAYMENT_NOT_SETTLED, "GetReceipt before settlement")
    unknown = customer.party.query(customer.account_id, intent_id="cf-never-made")
    expect(await get_receipt(ctx, unknown), Reason.NOT_FOUND, "GetReceipt for an intent never made")


@suite.case(
    "PAY-3/agreement",
    description="Under an agreement the intent pays the agreed instalment; the bill's plain amount is then "
    "PAYMENT_AMOUNT_MISMATCH",
    quote="with an `agreement_digest`, the amount of instalment `instalment_index` (zero-based) of the schedule of the "
    "agreement whose `Accept` has that digest, while that agreement is the bill's arrangement in force and within its "
    "date (PAY-15); without one, the bill's outstanding balance (PAY-16), with `instalment_index` 0 — and only while "
    "the bill is not under an active arrangement",
    needs=NEG,
)
async def agreement_payment(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await agreed_thread(ctx, customer, bill)
    agreement = digest_of(thread[-1])
    expect(
        await pay(ctx, payment_intent(customer, bill, "cf-plain")),
        Reason.PAYMENT_AMOUNT_MISMATCH,
        "the bill's amount due, without the agreement, on a bill under arrangement",
    )
    agreed = payment_intent(customer, bill, "cf-agreed", AMOUNT_DUE + DEFERRAL_FEE, agreement_digest=agreement)
    answer = accepted(await pay(ctx, agreed), "the agreed deferral's one payment, naming the agreement")
    _check_instructions(ctx, customer, agreed, answer.instructions)


@suite.case(
    "PAY-14/one-intent-in-flight",
    description="A second intent for a payment already instructed and not settled is PAYMENT_IN_PROGRESS; the first "
    "is still answered as before",
    quote="A biller MUST NOT instruct a new intent (a new `intent_id`) for a payment — a bill's outstanding balance, "
    "or one instalment of one agreement — while another intent for that same payment is instructed, not settled, and "
    "before its `pay_by_time`: it refuses it with `PAYMENT_IN_PROGRESS`",
    needs=(FIXTURES,),
)
async def one_intent_in_flight(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    first = payment_intent(customer, bill, "cf-flight-1")
    instructed = accepted(await pay(ctx, first), "the bill's first intent")
    second = payment_intent(customer, bill, "cf-flight-2")
    expect(await pay(ctx, second), Reason.PAYMENT_IN_PROGRESS, "a second intent while the first is instructed")
    again = accepted(await pay(ctx, first), "the first intent, retried")
    if again.instructions.SerializeToString() != instructed.instructions.SerializeToString():
        raise Violation("the retried first intent got other instructions than the first time (PAY-2)")
