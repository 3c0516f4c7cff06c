"""Negotiation (§9): alternating offers, turns, rounds, the exact accept."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from google.protobuf.message import Message

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    DEFERRAL_FEE,
    NEG,
    NEGOTIATION_TYPES,
    OUTCOME,
    BillerTarget,
    Customer,
    IssuedBill,
    accepted,
    agreed_thread,
    countered_thread,
    digest_of,
    expect,
    inside_options,
    money,
    negotiate,
    open_thread,
    outcome_name,
    outside_options,
    terms,
    thread_id_of,
    thread_of,
    thread_unchanged,
)
from agent.conformance.client import Refusal
from agent.conformance.runner import Skip, Suite, Violation
from agent.protocol.errors import ProtocolError, Reason
from agent.protocol.limits import DEFAULT_LIMITS
from agent.protocol.messages import PAYLOAD_TYPES, open_envelope
from agent.protocol.moves import thread_message
from agent.protocol.negotiation import Negotiation, Role
from agent.protocol.terms import BillFacts
from parley.v1 import bill_pb2, envelope_pb2, negotiation_pb2
from parley.v1 import terms_pb2 as negotiation_terms

suite: Suite[BillerTarget] = Suite("biller/negotiation")

EARLY_DISCOUNT = 300  # EUR 3.00 off for paying in full by the early-payment date


@suite.case(
    "NEG-12/options-accepted-at-once",
    description="An opening inside the advertised options is accepted at once, in the same call",
    quote="When the pending offer is the consumer's and its terms are *within the bill's options*, the biller's next "
    "move MUST be an Accept of it; any other biller move (a counter-Offer, a Reject, a Withdraw) is a violation, "
    "`OPTIONS_NOT_HONOURED`.",
    needs=NEG,
    covers=("BIL-4",),
)
async def options_accepted_at_once(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    opening, answer = await open_thread(ctx, customer, bill, inside_options(bill))
    accepted(answer, "an opening inside the advertised options")
    if not answer.HasField("reply") or answer.reply.payload_type != "parley.v1.Accept":
        got = answer.reply.payload_type if answer.HasField("reply") else "no reply"
        raise Violation(f"an opening inside the advertised options was answered with {got}, not an Accept")
    reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what="the Accept")
    message: Any = reply.message
    if message.offer_digest != digest_of(opening) or reply.header.previous_digest != digest_of(opening):
        raise Violation("the Accept does not name the opening's digest")
    if reply.header.sequence != 1 or reply.header.thread_id != thread_id_of(opening):
        raise Violation("the Accept is not at sequence 1 of the opening's thread")
    if answer.outcome != OUTCOME.Value("NEGOTIATION_OUTCOME_AGREED"):
        raise Violation(f"the answer reports outcome {outcome_name(answer)}, not AGREED")
    await thread_unchanged(ctx, customer, [opening, answer.reply], OUTCOME.Value("NEGOTIATION_OUTCOME_AGREED"))


async def _accepted_at_once(ctx: BillerTarget, customer: Customer, bill: IssuedBill, offer: Any, what: str) -> None:
    """An opening with `offer` must be answered, in the same call, by an Accept (NEG-12)."""
    _, answer = await open_thread(ctx, customer, bill, offer)
    accepted(answer, f"an opening {what}")
    got = answer.reply.payload_type if answer.HasField("reply") else "no reply"
    if got != "parley.v1.Accept":
        raise Violation(
            f"an opening {what} — inside the options, at their bound — was answered with {got}, not an Accept"
        )


@suite.case(
    "NEG-12/options-at-their-bounds",
    description="Openings exactly at each advertised bound (deferral days; plan count, amount, interval, first "
    "delay; early pay-by date) are accepted at once",
    quote="When the pending offer is the consumer's and its terms are *within the bill's options*, the biller's next "
    "move MUST be an Accept of it",
    needs=NEG,
)
async def options_at_their_bounds(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    days = ctx.standard_options().deferral.max_days
    await _accepted_at_once(
        ctx,
        customer,
        bill,
        terms(
            negotiation_terms.TERMS_KIND_DEFERRAL,
            [(bill.due_date + timedelta(days=days), AMOUNT_DUE + DEFERRAL_FEE)],
            lines=[(negotiation_terms.LINE_KIND_FEE, DEFERRAL_FEE)],
        ),
        f"deferring to exactly {days} days after the due date (deferral.max_days)",
    )
    checked = ["deferral.max_days"]
    options = ctx.standard_options()
    if options.HasField("instalments") and 0 < options.instalments.max_count <= ctx.limits.max_instalments:
        plan = options.instalments
        count = plan.max_count
        amount = AMOUNT_DUE // count
        if amount * count == AMOUNT_DUE and amount == plan.min_amount.amount_minor:
            planned = await ctx.issue_bill(customer)
            first = planned.due_date + timedelta(days=plan.max_first_delay_days)
            schedule = [(first + timedelta(days=plan.max_interval_days * index), amount) for index in range(count)]
            await _accepted_at_once(
                ctx,
                customer,
                planned,
                terms(negotiation_terms.TERMS_KIND_INSTALMENT_PLAN, schedule),
                f"in {count} instalments of {amount} minor units, the first {plan.max_first_delay_days} days after "
                f"the due date, every {plan.max_interval_days} days (max_count, min_amount, max_first_delay_days, "
                "max_interval_days)",
            )
            checked.append("the instalment plan's four bounds")
    early_by = ctx.today() + timedelta(days=10)
    early = bill_pb2.AdvertisedOptions()
    early.CopyFrom(options)
    early.early_payment.CopyFrom(
        bill_pb2.EarlyPaymentDiscount(pay_by_date=early_by.isoformat(), discount=money(EARLY_DISCOUNT))
    )
    discounted = await ctx.issue_bill(customer, options=early)
    await _accepted_at_once(
        ctx,
        customer,
        discounted,
        terms(
            negotiation_terms.TERMS_KIND_PAY_IN_FULL,
            [(early_by, AMOUNT_DUE - EARLY_DISCOUNT)],
            lines=[(negotiation_terms.LINE_KIND_DISCOUNT, EARLY_DISCOUNT)],
        ),
        f"paying in full on exactly the early-payment pay_by_date {early_by}, less its discount",
    )
    checked.append("early_payment.pay_by_date")
    return f"accepted at once at: {', '.join(checked)}"


@suite.case(
    "TRM-7/counter-offer-terms",
    description="Terms are judged in every Offer, not only the opening: a counter at sequence 2 whose total is off "
    "by a cent is TOTAL_MISMATCH",
    quote="`total` MUST equal `principal + Σ FEE − Σ DISCOUNT − Σ SETTLEMENT_REDUCTION` over the lines, exactly, in "
    "minor units; else `TOTAL_MISMATCH`.",
    needs=NEG,
    covers=("NEG-8",),
)
async def counter_offer_terms(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    wrong = terms(
        negotiation_terms.TERMS_KIND_DEFERRAL,
        [(bill.due_date + timedelta(days=25), AMOUNT_DUE + DEFERRAL_FEE + 1)],
        lines=[(negotiation_terms.LINE_KIND_FEE, DEFERRAL_FEE)],
        total=AMOUNT_DUE + DEFERRAL_FEE + 1,
    )
    offer = customer.party.move(thread, negotiation_pb2.Offer(terms=wrong))
    expect(await negotiate(ctx, offer), Reason.TOTAL_MISMATCH, "a counter-offer at sequence 2, its total a cent over")
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))


_REPLY_OUTCOMES = {
    "parley.v1.Offer": "NEGOTIATION_OUTCOME_OPEN",
    "parley.v1.Accept": "NEGOTIATION_OUTCOME_AGREED",
    "parley.v1.Reject": "NEGOTIATION_OUTCOME_REJECTED",
    "parley.v1.Withdraw": "NEGOTIATION_OUTCOME_WITHDRAWN",
}


@suite.case(
    "NEG-11/reply-in-same-call",
    description="An opening outside the options is answered in the same call by a signed move at sequence 1, with a "
    "matching outcome",
    quote="The biller MUST answer each consumer move within the same `Negotiate` call: when the consumer's move "
    "leaves the thread open with the biller to move, `NegotiateResponse.reply` carries the biller's signed move (next "
    "sequence, `previous_digest` = digest of the consumer's move) and `outcome` the thread's state after that reply",
    needs=NEG,
    covers=("NEG-13", "ENV-8"),
)
async def reply_in_same_call(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    opening, answer = await open_thread(ctx, customer, bill, outside_options(bill))
    accepted(answer, "an opening outside the advertised options")
    if not answer.HasField("reply"):
        raise Violation(f"no reply; outcome {outcome_name(answer)}")
    reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what="the reply")
    if reply.header.sequence != 1 or reply.header.previous_digest != digest_of(opening):
        raise Violation("the reply is not at sequence 1 chained to the opening")
    expected = _REPLY_OUTCOMES[answer.reply.payload_type]
    if outcome_name(answer) != expected:
        raise Violation(f"a {answer.reply.payload_type} reply came with outcome {outcome_name(answer)}, not {expected}")
    if answer.reply.payload_type == "parley.v1.Offer":
        _check_counter_terms(reply.message, bill)
    return f"answered with {answer.reply.payload_type}"


def _check_counter_terms(offer: Any, bill: IssuedBill) -> None:
    """NEG-16: the biller signs no offer whose terms the rules refuse (§8, with the bill)."""
    from agent.protocol.terms import BillFacts, Terms, validate_against_bill, validate_terms  # noqa: PLC0415

    try:
        facts = BillFacts.from_proto(bill.bill)
        counter = Terms.from_proto(offer.terms)
        validate_terms(counter)
        validate_against_bill(counter, facts)
    except ProtocolError as error:
        raise Violation(
            f"the biller's counter-offer has invalid terms (NEG-16): {error.reason.name}: {error.detail}"
        ) from error


@suite.case(
    "NEG-7/turns",
    description="The consumer moves at even sequences and the biller answers at the odd one after, in order",
    quote="The parties MUST move in turn: the consumer at even sequences (0, 2, 4, …), the biller at odd ones.",
    needs=NEG,
)
async def turns(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    offer = customer.party.move(thread, negotiation_pb2.Offer(terms=outside_options(bill)))
    answer = accepted(await negotiate(ctx, offer), "a counter to the biller's counter, at sequence 2")
    thread.append(offer)
    if answer.HasField("reply"):
        reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what="the reply at sequence 3")
        if reply.header.sequence != 3 or reply.header.previous_digest != digest_of(offer):
            raise Violation("the biller's reply to sequence 2 is not at sequence 3 chained to it")
        thread.append(answer.reply)
    stored = await thread_of(ctx, customer, thread_id_of(thread[0]))
    senders = [PAYLOAD_TYPES[m.payload_type].FromString(m.payload).header.sender for m in stored.messages]  # type: ignore[attr-defined]
    expected = [customer.party_id if i % 2 == 0 else ctx.biller_id for i in range(len(thread))]
    if senders != expected or [m.SerializeToString() for m in stored.messages] != [
        m.SerializeToString() for m in thread
    ]:
        raise Violation(f"GetThread does not hold the thread in order, consumer at even sequences: senders {senders}")


@suite.case(
    "NEG-1/thread-open-position",
    description="A ThreadOpen inside a thread is WRONG_PAYLOAD_TYPE; a move opening no known thread is NOT_FOUND",
    quote="A `ThreadOpen` at any other sequence, or any other move at sequence 0, is refused with `WRONG_PAYLOAD_TYPE`",
    needs=NEG,
    covers=("HDR-10",),
)
async def thread_open_position(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    header = {"thread_id": thread_id_of(thread[0]), "sequence": 2, "previous_digest": digest_of(thread[-1])}
    reopening = customer.party.open(bill.bill_id, bill.digest, outside_options(bill), header=header)
    expect(await negotiate(ctx, reopening), Reason.WRONG_PAYLOAD_TYPE, "a ThreadOpen at sequence 2 of the thread")
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))
    stray = negotiation_pb2.Offer(header=customer.party.header(), terms=outside_options(bill))
    expect(await negotiate(ctx, customer.party.sign(stray)), Reason.NOT_FOUND, "an Offer at sequence 0 of no thread")


@suite.case(
    "HDR-6/negotiation-sequence",
    description="A move at a sequence other than the thread's next is SEQUENCE_MISMATCH and changes nothing",
    quote="A receiver MUST refuse a message whose `sequence` is not the next one of its thread with "
    "`SEQUENCE_MISMATCH`.",
    needs=NEG,
)
async def negotiation_sequence(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    for sequence in (3, 1):
        move = customer.party.move(thread, negotiation_pb2.Withdraw(), header={"sequence": sequence})
        expect(await negotiate(ctx, move), Reason.SEQUENCE_MISMATCH, f"a Withdraw at sequence {sequence}, not 2")
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))
    accepted(await negotiate(ctx, customer.party.move(thread, negotiation_pb2.Withdraw())), "a Withdraw at sequence 2")


@suite.case(
    "HDR-7/negotiation-previous-digest",
    description="A move chained to another message than the thread's last is PREVIOUS_DIGEST_MISMATCH and changes "
    "nothing",
    quote="`previous_digest` MUST be empty at sequence 0 and MUST be the digest (ENV-11) of message `sequence − 1` of "
    "the same thread otherwise. A receiver MUST refuse any other value with `PREVIOUS_DIGEST_MISMATCH`.",
    needs=NEG,
)
async def negotiation_previous_digest(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    stale = customer.party.move(thread, negotiation_pb2.Withdraw(), header={"previous_digest": digest_of(thread[0])})
    expect(await negotiate(ctx, stale), Reason.PREVIOUS_DIGEST_MISMATCH, "a Withdraw chained to the opening")
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))
    accepted(
        await negotiate(ctx, customer.party.move(thread, negotiation_pb2.Withdraw())), "a correctly chained Withdraw"
    )


@suite.case(
    "NEG-5/round-limit",
    description="An offer beyond max_rounds is the violation ROUND_LIMIT_EXCEEDED: recorded, thread PROTOCOL_ERROR, "
    "a retry gets the same error",
    quote="A thread MUST NOT hold more offers than its `max_rounds`: an `Offer` made when the thread already holds "
    "`max_rounds` offers (the opening's counting as round 1) is a violation, `ROUND_LIMIT_EXCEEDED`.",
    needs=NEG,
)
async def round_limit(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill, max_rounds=2)
    offer = customer.party.move(thread, negotiation_pb2.Offer(terms=outside_options(bill)))
    expect(await negotiate(ctx, offer), Reason.ROUND_LIMIT_EXCEEDED, "a third offer in a thread of max_rounds 2")
    expect(await negotiate(ctx, offer), Reason.ROUND_LIMIT_EXCEEDED, "the same violating offer, retried (NEG-18)")
    await thread_unchanged(ctx, customer, [*thread, offer], OUTCOME.Value("NEGOTIATION_OUTCOME_PROTOCOL_ERROR"))


@suite.case(
    "NEG-9/accept-stale-digest",
    description="An Accept naming another digest than the pending offer is the violation ACCEPT_DIGEST_MISMATCH",
    quote="An `Accept` MUST name, in `offer_digest`, exactly the digest of the message (`ThreadOpen` or `Offer`) that "
    "carried the other party's pending offer […] An Accept with no pending offer of the other party, or naming any "
    "other digest, is a violation, `ACCEPT_DIGEST_MISMATCH`.",
    needs=NEG,
)
async def accept_stale_digest(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    stale = customer.party.move(thread, negotiation_pb2.Accept(offer_digest=digest_of(thread[0])))
    expect(await negotiate(ctx, stale), Reason.ACCEPT_DIGEST_MISMATCH, "an Accept naming the consumer's own opening")
    expect(await negotiate(ctx, stale), Reason.ACCEPT_DIGEST_MISMATCH, "the same violating Accept, retried (NEG-18)")
    await thread_unchanged(ctx, customer, [*thread, stale], OUTCOME.Value("NEGOTIATION_OUTCOME_PROTOCOL_ERROR"))


@suite.case(
    "NEG-9/accept-exact",
    description="An Accept naming exactly the biller's pending offer ends the thread AGREED, with no reply",
    quote="when the consumer's move ended the thread (Accept, Reject, Withdraw), `reply` is absent and `outcome` is "
    "the thread's outcome",
    needs=NEG,
    covers=("ENV-11",),
)
async def accept_exact(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    accept = customer.party.move(thread, negotiation_pb2.Accept(offer_digest=digest_of(thread[-1])))
    answer = accepted(await negotiate(ctx, accept), "an Accept naming the biller's counter-offer")
    if answer.HasField("reply") or outcome_name(answer) != "NEGOTIATION_OUTCOME_AGREED":
        raise Violation(
            f"the Accept was answered with a reply or outcome {outcome_name(answer)}, not AGREED and no reply"
        )
    await thread_unchanged(ctx, customer, [*thread, accept], OUTCOME.Value("NEGOTIATION_OUTCOME_AGREED"))


@suite.case(
    "NEG-14/terminal-refuses",
    description="Every move on a thread that has an outcome is refused with THREAD_CLOSED, and nothing changes",
    quote="A thread that has an outcome is closed for good: every further move on it MUST be refused with "
    "`THREAD_CLOSED`, and nothing in the thread changes.",
    needs=NEG,
)
async def terminal_refuses(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await agreed_thread(ctx, customer, bill)
    moves: list[tuple[str, Message]] = [
        ("an Offer", negotiation_pb2.Offer(terms=outside_options(bill))),
        ("a Withdraw", negotiation_pb2.Withdraw()),
        ("an Accept of the biller's Accept", negotiation_pb2.Accept(offer_digest=digest_of(thread[-1]))),
    ]
    for name, message in moves:
        expect(await negotiate(ctx, customer.party.move(thread, message)), Reason.THREAD_CLOSED, f"{name} after AGREED")
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_AGREED"))


async def _closed_thread(
    ctx: BillerTarget, customer: Customer, bill: IssuedBill, how: str
) -> tuple[list[envelope_pb2.Envelope], str]:
    """A thread the consumer closed `how` ("rejected", "withdrawn", "protocol error") after the biller's counter,
    and the outcome it must then have (the last move is part of the thread, the evidence for a violation)."""
    thread = await countered_thread(ctx, customer, bill)
    closing: Message
    if how == "rejected":
        closing = negotiation_pb2.Reject(reason=negotiation_pb2.REJECT_REASON_UNAFFORDABLE)
        outcome, reason = "NEGOTIATION_OUTCOME_REJECTED", None
    elif how == "withdrawn":
        closing, outcome, reason = negotiation_pb2.Withdraw(), "NEGOTIATION_OUTCOME_WITHDRAWN", None
    else:  # an Accept naming another digest than the pending offer: the violation ACCEPT_DIGEST_MISMATCH
        closing = negotiation_pb2.Accept(offer_digest=digest_of(thread[0]))
        outcome, reason = "NEGOTIATION_OUTCOME_PROTOCOL_ERROR", Reason.ACCEPT_DIGEST_MISMATCH
    move = customer.party.move(thread, closing)
    answer = await negotiate(ctx, move)
    if reason is None:
        accepted(answer, f"the consumer's closing move ({how})")
    else:
        expect(answer, reason, "an Accept of the consumer's own opening (the thread's violation)")
    thread.append(move)
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value(outcome))
    return thread, outcome


@suite.case(
    "NEG-14/closed-states",
    description="Threads ended REJECTED, WITHDRAWN or PROTOCOL_ERROR refuse every further move with THREAD_CLOSED",
    quote="A thread that has an outcome is closed for good: every further move on it MUST be refused with "
    "`THREAD_CLOSED`, and nothing in the thread changes.",
    needs=NEG,
    covers=("NEG-13", "NEG-22"),  # GetThread holds the violation's evidence, with the outcome
)
async def closed_states(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    for how in ("rejected", "withdrawn", "protocol error"):
        bill = await ctx.issue_bill(customer)
        thread, outcome = await _closed_thread(ctx, customer, bill, how)
        moves: list[tuple[str, Message]] = [
            ("an Offer", negotiation_pb2.Offer(terms=outside_options(bill))),
            ("an Accept of the biller's counter", negotiation_pb2.Accept(offer_digest=digest_of(thread[1]))),
            ("a Withdraw", negotiation_pb2.Withdraw()),
        ]
        for name, message in moves:
            late = customer.party.move(thread, message)
            expect(await negotiate(ctx, late), Reason.THREAD_CLOSED, f"{name} on a thread ended {how}")
        await thread_unchanged(ctx, customer, thread, OUTCOME.Value(outcome))
    return "REJECTED, WITHDRAWN and PROTOCOL_ERROR threads stay closed"


@suite.case(
    "NEG-15/check-order",
    description="Moves breaking two §9.5 checks get the first one's reason: closed, sequence, previous digest, "
    "refusals before violations",
    quote="A receiver MUST apply the negotiation checks in this order, stop at the first that fails, and treat the "
    "failure as the last column says",
    needs=NEG,
    covers=("HDR-6", "HDR-7", "NEG-14"),
)
async def check_order(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    agreed = await agreed_thread(ctx, customer, await ctx.issue_bill(customer))
    wrong_chain = {"sequence": 7, "previous_digest": secrets.token_bytes(32)}
    closed_and_unchained = customer.party.move(agreed, negotiation_pb2.Withdraw(), header=wrong_chain)
    expect(
        await negotiate(ctx, closed_and_unchained),
        Reason.THREAD_CLOSED,
        "a Withdraw on an AGREED thread at a wrong sequence and previous digest (check 1 comes first)",
    )
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    unchained = customer.party.move(thread, negotiation_pb2.Offer(terms=outside_options(bill)), header=wrong_chain)
    expect(
        await negotiate(ctx, unchained),
        Reason.SEQUENCE_MISMATCH,
        "an Offer at a wrong sequence with a wrong previous digest (check 2 before 3)",
    )
    stale_accept = customer.party.move(
        thread,
        negotiation_pb2.Accept(offer_digest=digest_of(thread[0])),
        header={"previous_digest": secrets.token_bytes(32)},
    )
    expect(
        await negotiate(ctx, stale_accept),
        Reason.PREVIOUS_DIGEST_MISMATCH,
        "an Accept of the wrong offer with a wrong previous digest (a refusal, check 3, comes before the violation "
        "of check 9, and does not end the thread)",
    )
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))


@suite.case(
    "NEG-2/bill-digest-mismatch",
    description="An opening naming another digest than the bill's is refused with BILL_DIGEST_MISMATCH",
    quote="a biller MUST refuse an opening whose `bill_digest` is not the digest of the bill it issued under "
    "`bill_id`, with `BILL_DIGEST_MISMATCH`.",
    needs=NEG,
)
async def bill_digest_mismatch(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    wrong = customer.party.open(bill.bill_id, secrets.token_bytes(32), inside_options(bill))
    expect(await negotiate(ctx, wrong), Reason.BILL_DIGEST_MISMATCH, "an opening naming a random bill digest")
    _, answer = await open_thread(ctx, customer, bill, inside_options(bill))
    accepted(answer, "a correct opening on the same bill (the refused one must have changed nothing)")


@suite.case(
    "NEG-4/limits-invalid",
    description="An opening whose max_rounds or deadline is outside the announced limits is NEGOTIATION_LIMITS_INVALID",
    quote="A biller MUST refuse, with `NEGOTIATION_LIMITS_INVALID`, an opening whose limits are outside its "
    "`Limits` (§14) […] the opening requires `1 ≤ max_rounds ≤ Limits.max_rounds` and `create_time < deadline ≤ "
    "create_time + Limits.max_negotiation_time` […] A missing `deadline` is refused with the same reason.",
    needs=NEG,
    covers=("LIM-4", "LIM-5"),
)
async def limits_invalid(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    max_rounds = ctx.limits.max_rounds or DEFAULT_LIMITS.max_rounds
    longest = timedelta(seconds=ctx.limits.max_negotiation_seconds) or DEFAULT_LIMITS.max_negotiation_time
    now = ctx.now()
    for name, options in (
        (f"max_rounds {max_rounds + 1}", {"max_rounds": max_rounds + 1}),
        ("max_rounds 0", {"max_rounds": 0}),
        ("a deadline beyond max_negotiation_seconds", {"deadline": now + longest + timedelta(minutes=5)}),
        ("a deadline before its creation", {"deadline": now - timedelta(minutes=1)}),
        ("no deadline", {"no_deadline": True}),
    ):
        opening = customer.party.open(
            bill.bill_id, bill.digest, inside_options(bill), header={"create_time": now}, **options
        )
        expect(await negotiate(ctx, opening), Reason.NEGOTIATION_LIMITS_INVALID, f"an opening with {name}")
    _, answer = await open_thread(ctx, customer, bill, inside_options(bill), max_rounds=max_rounds)
    accepted(answer, f"an opening with max_rounds {max_rounds} (the refused ones must have changed nothing)")


@suite.case(
    "NEG-3/not-negotiable",
    description="An opening on a bill already under an arrangement is refused with BILL_NOT_NEGOTIABLE",
    quote="A biller MUST refuse an opening on a bill that is not negotiable, with `BILL_NOT_NEGOTIABLE`. A bill is not "
    "negotiable when […] it is under an active arrangement (a thread on it ended `AGREED` […])",
    needs=NEG,
)
async def not_negotiable(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    await agreed_thread(ctx, customer, bill)
    _, answer = await open_thread(ctx, customer, bill, outside_options(bill))
    expect(answer, Reason.BILL_NOT_NEGOTIABLE, "a second opening on a bill whose thread ended AGREED")


@suite.case(
    "NEG-10/reject-form",
    description="A Reject with an unspecified or undefined reason, or an over-long note, is MALFORMED_PAYLOAD",
    quote="A `Reject` MUST carry a defined `RejectReason` other than `REJECT_REASON_UNSPECIFIED`; "
    "`REJECT_REASON_UNSPECIFIED` or a number the enum does not define is refused with `MALFORMED_PAYLOAD` […] and the "
    "`note` of a `Reject` or `Withdraw` MUST be at most 200 characters (`MAX_TEXT_CHARS`), else `MALFORMED_PAYLOAD`.",
    needs=NEG,
    covers=("ENV-13",),
)
async def reject_form(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill)
    out_of_policy = negotiation_pb2.REJECT_REASON_OUT_OF_POLICY
    for name, message in (
        ("an unspecified reason", negotiation_pb2.Reject(reason=negotiation_pb2.REJECT_REASON_UNSPECIFIED)),
        ("reason number 99", negotiation_pb2.Reject(reason=99)),  # type: ignore[arg-type]
        ("a 201-character note", negotiation_pb2.Reject(reason=out_of_policy, note="n" * 201)),
        ("a Withdraw with a 201-character note", negotiation_pb2.Withdraw(note="n" * 201)),
    ):
        move = customer.party.move(thread, message)
        expect(await negotiate(ctx, move), Reason.MALFORMED_PAYLOAD, f"a move with {name}")
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_OPEN"))
    answer = accepted(
        await negotiate(ctx, customer.party.move(thread, negotiation_pb2.Reject(reason=out_of_policy, note="n" * 200))),
        "a Reject with a defined reason and a 200-character note",
    )
    if outcome_name(answer) != "NEGOTIATION_OUTCOME_REJECTED":
        raise Violation(f"the Reject left the thread {outcome_name(answer)}, not REJECTED (NEG-13)")


@suite.case(
    "LIM-7/open-threads-boundary",
    description="max_open_threads_per_account open threads are allowed; one more opening is TOO_MANY_OPEN_THREADS",
    quote="A biller MUST refuse an opening on an account that already has `max_open_threads_per_account` threads in "
    "state `OPEN` […] with `TOO_MANY_OPEN_THREADS`.",
    needs=NEG,
    covers=("LIM-10",),
)
async def open_threads_boundary(ctx: BillerTarget) -> str:
    most = ctx.limits.max_open_threads_per_account or DEFAULT_LIMITS.max_open_threads_per_account
    if most > 50:
        raise Skip(f"max_open_threads_per_account is {most}: too many threads to open in a case")
    customer = await ctx.enrolled()
    for _ in range(most):  # each countered, so each stays OPEN with the consumer to move
        await countered_thread(ctx, customer, await ctx.issue_bill(customer))
    bill = await ctx.issue_bill(customer)
    _, answer = await open_thread(ctx, customer, bill, outside_options(bill))
    expect(answer, Reason.TOO_MANY_OPEN_THREADS, f"opening {most + 1} with {most} threads OPEN on the account")
    return f"max_open_threads_per_account {most}"


def _plan_of_eight(bill: IssuedBill) -> negotiation_terms.Terms:
    """A plan of 8 instalments 14 days apart, above the standard options' max_count of 6 (remainder rule)."""
    count = 8
    base, remainder = divmod(AMOUNT_DUE, count)
    return terms(
        negotiation_terms.TERMS_KIND_INSTALMENT_PLAN,
        [(bill.due_date + timedelta(days=14 * i), base + (1 if i < remainder else 0)) for i in range(count)],
    )


# Openings a biller may well counter: outside the standard options in each dimension they bound.
_OUTSIDE: dict[str, Any] = {
    "a deferral beyond the advertised maximum": outside_options,
    "a plan of 8 instalments": _plan_of_eight,
}


@suite.case(
    "NEG-16/own-moves-valid",
    description="Every counter-offer the biller signs passes the rules it applies to the consumer's moves",
    quote="Each party MUST apply this section's rules, in the order of NEG-15, to every negotiation message it "
    "receives, and MUST NOT sign a move that those rules would refuse or treat as a violation",
    needs=NEG,
)
async def own_moves_valid(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    judged = 0
    for what, make in _OUTSIDE.items():
        bill = await ctx.issue_bill(customer)
        opening, answer = await open_thread(ctx, customer, bill, make(bill))
        if isinstance(answer, Refusal) or not answer.HasField("reply"):
            continue  # refused or left unanswered: no move of the biller's to judge
        sent = open_envelope(
            opening, NEGOTIATION_TYPES, sender_keys=customer.party.chain, recipient=ctx.biller_id, now=None
        )
        reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what=f"the answer to {what}")
        negotiation = Negotiation(bill=BillFacts.from_proto(bill.bill), bill_digest=bill.digest, role=Role.CONSUMER)
        now = ctx.now()
        negotiation.send(thread_message(sent, Role.CONSUMER), now)  # type: ignore[arg-type]
        try:
            negotiation.receive(thread_message(reply, Role.BILLER), now)  # type: ignore[arg-type]
        except ProtocolError as error:
            raise Violation(
                f"the biller's answer to {what} breaks its own rules: {error.reason.name}: {error.detail}"
            ) from error
        judged += 1
    if not judged:
        raise Skip("the biller answered no opening outside its options with a move of its own")
    return f"{judged} biller moves judged"
