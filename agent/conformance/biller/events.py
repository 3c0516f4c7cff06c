"""Events (§11): the signed account log, its cursor and the watch stream."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    DEFERRAL_FEE,
    EVENT_WAIT,
    FIXTURES,
    BillerTarget,
    Customer,
    accepted,
    agreed_thread,
    digest_of,
    expect,
    first_event,
    get_receipt,
    list_bills,
    money,
    pay,
    payment_intent,
    publish,
    read_events_until,
    setup,
    thread_id_of,
)
from agent.conformance.client import Refusal
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.keys import SigningKey
from parley.v1 import envelope_pb2, event_pb2, payment_pb2

suite: Suite[BillerTarget] = Suite("biller/events")
REFUSAL_WAIT = 5.0  # seconds for a refusal of a watch to arrive: it needs no event, only the request


@suite.case(
    "EVT-1/signed-chained-log",
    description="The event log is the account's signed chain from sequence 0, BILL_ISSUED naming the bill exactly",
    quote="The biller MUST keep, per account, an append-only log of signed events: payloadType `parley.v1.Event`, "
    "`sender` = the biller, `recipient` = the consumer party enrolled on the account, `header.thread_id` = the "
    "account's event log id (§5.2), `header.sequence` = the event's position in the log from 0 without gaps, "
    "`header.previous_digest` = the digest of the event before it",
    needs=("events", FIXTURES),
    covers=("HDR-15", "VER-3"),
)
async def signed_chained_log(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bills = [await ctx.issue_bill(customer), await ctx.issue_bill(customer)]
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        events = await read_events_until(stream, customer, ctx, {b.bill_id for b in bills}, 0)
    by_bill = {}
    for envelope in events:
        event = event_pb2.Event.FromString(envelope.payload)
        if event.kind == event_pb2.EVENT_KIND_BILL_ISSUED:
            by_bill[event.bill_id] = event
    for bill in bills:
        event = by_bill[bill.bill_id]
        if (
            event.amount != bill.bill.amount_due
            or event.date != bill.bill.due_date
            or event.related_digest != bill.digest
        ):
            raise Violation(
                f"BILL_ISSUED of {bill.bill_id} does not carry the amount due, the due date and the bill's digest "
                "(EVT-2)"
            )
    return f"{len(events)} events verified"


@suite.case(
    "EVT-3/cursor-out-of-range",
    description="WatchEvents from beyond the end of the log is refused with CURSOR_OUT_OF_RANGE",
    quote="the biller MUST refuse a `start_sequence` greater than the log's next sequence (the number of events in the "
    "log) with `CURSOR_OUT_OF_RANGE`.",
    needs=("events", FIXTURES),
)
async def cursor_out_of_range(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    async with ctx.conn.watch(customer.party.query(customer.account_id, start_sequence=1 << 40)) as stream:
        try:
            answer = await stream.next(EVENT_WAIT)
        except TimeoutError:
            raise Violation("WatchEvents from sequence 2^40 neither failed nor ended") from None
    if not isinstance(answer, Refusal):
        raise Violation("WatchEvents from sequence 2^40 of a short log was served, not refused")
    expect(answer, Reason.CURSOR_OUT_OF_RANGE, "WatchEvents from sequence 2^40")


async def _log_size(ctx: BillerTarget, customer: Customer, bill_id: str) -> int:
    """The account's log length now: read from 0 until the bill's event, then a quiet second."""
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        size = len(await read_events_until(stream, customer, ctx, {bill_id}, 0))
        while True:  # whatever else the biller logged by now (a quiet second: the end of the log so far)
            try:
                extra = await stream.next(1.0)
            except TimeoutError:
                return size
            if not isinstance(extra, envelope_pb2.Envelope):
                raise Violation("the watch from sequence 0 ended or failed while the log was being read")
            size += 1


@suite.case(
    "EVT-3/cursor-boundary",
    description="WatchEvents from the log's next sequence waits for new events; from one past it, CURSOR_OUT_OF_RANGE",
    quote="the biller MUST refuse a `start_sequence` greater than the log's next sequence (the number of events in "
    "the log) with `CURSOR_OUT_OF_RANGE`. A `start_sequence` equal to the next sequence is valid and yields only "
    "events appended from then on",
    needs=("events", FIXTURES),
    covers=("EVT-4",),
)
async def cursor_boundary(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    size = await _log_size(ctx, customer, bill.bill_id)
    # The log may grow between counting it and probing one past its end (a scheduler of another replica
    # appends a reminder): a probe that is served is judged only if the log did not grow meanwhile.
    for _ in range(3):
        past_end = customer.party.query(customer.account_id, start_sequence=size + 1)
        what = f"WatchEvents from {size + 1}, one past the log's next sequence {size}"
        async with ctx.conn.watch(past_end) as stream:
            try:
                answer: object = await stream.next(REFUSAL_WAIT)
            except TimeoutError:
                answer = None
        if answer is not None:
            break
        grown = await _log_size(ctx, customer, bill.bill_id)
        if grown == size:
            raise Violation(f"{what}, was served (no refusal within {REFUSAL_WAIT:g} s)")
        size = grown
    if not isinstance(answer, Refusal):
        raise Violation(f"{what}, delivered an event instead of being refused")
    expect(answer, Reason.CURSOR_OUT_OF_RANGE, what)
    async with ctx.conn.watch(customer.party.query(customer.account_id, start_sequence=size)) as stream:
        later = await ctx.issue_bill(customer)
        events = await read_events_until(stream, customer, ctx, {later.bill_id}, size)
    return f"a log of {size} events; the watch from {size} delivered the {len(events)} appended after it"


@suite.case(
    "EVT-4/resume-from-cursor",
    description="A resumed watch delivers every event from its cursor, same bytes, no gap or duplicate, then live "
    "events",
    quote="The biller MUST stream every event with sequence ≥ `start_sequence`, in increasing sequence order without "
    "gaps, and then each new event as it is appended, for as long as the stream stays open.",
    needs=("events", FIXTURES),
)
async def resume_from_cursor(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    first = [await ctx.issue_bill(customer) for _ in range(3)]
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        seen = await read_events_until(stream, customer, ctx, {b.bill_id for b in first}, 0)
    later = [await ctx.issue_bill(customer) for _ in range(2)]
    cursor = 1
    async with ctx.conn.watch(customer.party.query(customer.account_id, start_sequence=cursor)) as stream:
        resumed = await read_events_until(stream, customer, ctx, {b.bill_id for b in later}, cursor)
        overlap = seen[cursor:]
        if [e.SerializeToString() for e in resumed[: len(overlap)]] != [e.SerializeToString() for e in overlap]:
            raise Violation("the resumed stream delivered the already-seen events with other bytes (EVT-1)")
        live = await ctx.issue_bill(customer)
        tail = await read_events_until(stream, customer, ctx, {live.bill_id}, cursor + len(resumed))
    return f"resumed at {cursor}: {len(resumed)} events, then {len(tail)} live"


@suite.case(
    "EVT-2/event-fields",
    description="BILL_ISSUED, ARRANGEMENT_ACTIVE and PAYMENT_RECEIVED carry exactly the fields EVT-2 lists; no "
    "reminder level outside REMINDER",
    quote="Every event MUST have one of the kinds below […] and be emitted when the table says, with the fields it "
    "lists; `reminder_level` is 1 to 3 on a reminder and 0 on every other kind, and `message` (text for people, at "
    "most 500 characters) is never interpreted.",
    needs=("events", "negotiation", FIXTURES),
)
async def event_fields(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    agreed_bill, paid_bill = await ctx.issue_bill(customer), await ctx.issue_bill(customer)
    opening, accept = await agreed_thread(ctx, customer, agreed_bill)
    setup(await pay(ctx, payment_intent(customer, paid_bill, "cf-fields")), "a PaymentIntent for the second bill")
    setup(await ctx.conn.settle_payments(), "SettlePayments")
    query = customer.party.query(customer.account_id, intent_id="cf-fields")
    receipt = accepted(await get_receipt(ctx, query), "GetReceipt after SettlePayments").receipt
    received = payment_pb2.Receipt.FromString(receipt.payload).amount_received
    sentinel = await ctx.issue_bill(customer)  # its BILL_ISSUED comes after every event the steps above caused
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        envelopes = await read_events_until(stream, customer, ctx, {sentinel.bill_id}, 0)
    bills = {bill.bill_id: bill for bill in (agreed_bill, paid_bill, sentinel)}
    problems: list[str] = []
    kinds: list[str] = []
    for envelope in envelopes:
        event = event_pb2.Event.FromString(envelope.payload)
        kind = event_pb2.EventKind.Name(event.kind)
        kinds.append(kind)
        where = f"{kind} at sequence {event.header.sequence}"
        if event.kind == event_pb2.EVENT_KIND_REMINDER:
            if not 1 <= event.reminder_level <= 3:
                problems.append(f"{where}: reminder_level {event.reminder_level}, not 1 to 3")
        elif event.reminder_level:
            problems.append(f"{where}: reminder_level {event.reminder_level} on a kind that is not a reminder")
        if len(event.message) > 500:
            problems.append(f"{where}: a message of {len(event.message)} characters")
        if event.bill_id not in bills:
            problems.append(f"{where}: bill_id {event.bill_id!r} is not one of the account's bills")
            continue
        bill = bills[event.bill_id]
        got: tuple[Any, ...]
        if event.kind == event_pb2.EVENT_KIND_BILL_ISSUED:
            got = (event.amount, event.date, event.related_digest)
            want: tuple[Any, ...] = (bill.bill.amount_due, bill.bill.due_date, bill.digest)
            what = f"the amount due, due date and digest of bill {bill.bill_id}"
        elif event.kind == event_pb2.EVENT_KIND_ARRANGEMENT_ACTIVE:
            got = (event.bill_id, event.thread_id, event.amount, event.related_digest)
            want = (agreed_bill.bill_id, thread_id_of(opening), money(AMOUNT_DUE + DEFERRAL_FEE), digest_of(accept))
            what = "the agreed bill, thread, total and the Accept's digest"
        elif event.kind == event_pb2.EVENT_KIND_PAYMENT_RECEIVED:
            got = (event.bill_id, event.amount, event.related_digest)
            want = (paid_bill.bill_id, received, digest_of(receipt))
            what = "the paid bill, the amount received and the receipt's digest"
        else:
            continue
        if got != want:
            problems.append(f"{where}: not {what}")
    if "EVENT_KIND_ARRANGEMENT_ACTIVE" not in kinds:
        problems.append("no ARRANGEMENT_ACTIVE after the thread ended AGREED")
    if problems:
        raise Violation("; ".join(problems))
    return f"{len(envelopes)} events: {', '.join(k.removeprefix('EVENT_KIND_') for k in kinds)}"


@suite.case(
    "EVT-10/key-dropped-mid-stream",
    description="An open stream whose query's key a newer key set version drops ends with the reason a fresh request "
    "signed by that key gets",
    quote="A `WatchEvents` stream MUST stay authorized for as long as it is open, not only when it starts: the biller "
    "MUST end it, with the reason a fresh request would get, as soon as the signer of its query is no longer bound to "
    "the account (a re-enrolment, ENR-11: `ACCOUNT_ACCESS_DENIED`) or the key that signed the query is no longer in "
    "force now",
    needs=("events", FIXTURES),
)
async def key_dropped_mid_stream(ctx: BillerTarget) -> str:
    spare = SigningKey.generate()
    customer = await ctx.enrolled(ctx.new_party(extra_keys=[spare]))
    party = customer.party
    await ctx.issue_bill(customer)
    async with ctx.conn.watch(party.query(customer.account_id, key=spare)) as stream:
        await first_event(stream, "event 0 of a stream opened with the spare key")
        version = party.next_key_set([party.key_spec(party.key, ctx.now() - timedelta(days=1))])  # spare dropped
        accepted(await publish(ctx, version), "version 2, without the spare key")
        party.adopt(version)
        try:
            ended = await stream.next(STREAM_END_WAIT)
        except TimeoutError:
            raise Violation(f"the stream stayed open {STREAM_END_WAIT:g} s after its key was dropped") from None
    if not isinstance(ended, Refusal):
        raise Violation("the stream went on (or ended without a reason) after its key was dropped")
    fresh = await list_bills(ctx, party.query(customer.account_id, key=spare))
    if not isinstance(fresh, Refusal):
        raise Violation("a fresh request signed by the dropped key was served")
    if ended.reason != fresh.reason:
        raise Violation(f"the stream ended with {ended.reason}; a fresh request gets {fresh.reason}")
    return f"ended {ended.reason}, as a fresh request"


STREAM_END_WAIT = 40.0  # seconds: the recheck bound (30 s, EVT-10) and some slack
