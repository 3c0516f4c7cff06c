"""Cases that move the biller's clock (AdvanceClock, CNF-4)."""

from __future__ import annotations

from datetime import UTC, timedelta

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    DEFERRAL_FEE,
    FIXTURES,
    NEG,
    NEGOTIATION_TYPES,
    OUTCOME,
    OUTSIDE_DAYS,
    SHOULD,
    BillerTarget,
    Customer,
    accepted,
    agreed_thread,
    countered_thread,
    deferral,
    digest_of,
    enrol,
    expect,
    first_event,
    get_bill,
    list_bills,
    negotiate,
    open_thread,
    outside_options,
    pay,
    payment_intent,
    publish,
    query_envelope,
    read_ok,
    setup,
    terms,
    thread_id_of,
    thread_of,
    thread_unchanged,
)
from agent.conformance.client import EventStream, Refusal
from agent.conformance.runner import Skip, Suite, Violation
from agent.protocol.errors import Reason
from agent.protocol.limits import MAX_KEYSET_VERSIONS
from parley.v1 import biller_service_pb2, event_pb2, keys_pb2, negotiation_pb2, terms_pb2

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
    "NEG-6/just-past-deadline",
    description="A move a minute after the deadline — inside the clock skew — is NEGOTIATION_DEADLINE_PASSED all "
    "the same",
    quote="A receiver MUST refuse a move received after the thread's `deadline` — `now > deadline`, where `now` is the "
    "receiver's own clock at reception […] — with `NEGOTIATION_DEADLINE_PASSED`",
    needs=NEG,
)
async def just_past_deadline(ctx: BillerTarget) -> None:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    thread = await countered_thread(ctx, customer, bill, deadline=ctx.now() + timedelta(hours=1))
    await ctx.advance_clock(3600 + 60)
    late = customer.party.move(thread, negotiation_pb2.Offer(terms=outside_options(bill)))
    expect(
        await negotiate(ctx, late),
        Reason.NEGOTIATION_DEADLINE_PASSED,
        f"an Offer a minute after the deadline (the skew is {ctx.skew})",
    )
    await thread_unchanged(ctx, customer, thread, OUTCOME.Value("NEGOTIATION_OUTCOME_EXPIRED"))


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


async def _broken(ctx: BillerTarget, customer: Customer, bill_id: str) -> bool:
    """Whether the account's log holds ARRANGEMENT_BROKEN for `bill_id` (read until the log goes quiet)."""
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        while True:
            try:
                envelope = await stream.next(QUIET)
            except TimeoutError:
                return False
            if envelope is None or isinstance(envelope, Refusal):
                return False
            event = event_pb2.Event.FromString(envelope.payload)
            if event.kind == event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN and event.bill_id == bill_id:
                return True


QUIET = 3.0  # seconds without a new event after which an account's log is taken as read


@suite.case(
    "PAY-16/outstanding-after-broken-plan",
    description="Once a half-paid plan breaks only the outstanding balance is payable; the full amount or the "
    "plan's instalment is PAYMENT_AMOUNT_MISMATCH",
    quote="A bill's *outstanding balance* is its `amount_due` less every amount received for it (under any agreement "
    "or none). When an arrangement breaks, its fees, discounts and settlement reductions lapse: what is owed is the "
    "outstanding balance.",
    needs=("negotiation", "instalments", "events", FIXTURES),
    covers=("EVT-7",),
)
async def outstanding_after_broken_plan(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    bill = await ctx.issue_bill(customer)
    half = AMOUNT_DUE // 2
    plan = terms(
        terms_pb2.TERMS_KIND_INSTALMENT_PLAN,
        [(bill.due_date, half), (bill.due_date + timedelta(days=14), AMOUNT_DUE - half)],
    )
    _, answer = await open_thread(ctx, customer, bill, plan)
    reply = accepted(answer, "a two-instalment plan inside the advertised options").reply
    if reply.payload_type != "parley.v1.Accept":
        raise Skip(f"the biller answered a plan inside its options with {reply.payload_type}, not an Accept")
    agreement = digest_of(reply)
    first = payment_intent(customer, bill, "cf-plan-0", half, agreement_digest=agreement)
    setup(await pay(ctx, first), "the plan's first instalment")
    setup(await ctx.conn.settle_payments(), "SettlePayments")
    await ctx.advance_clock((bill.due_date - ctx.today()).days * 86_400 + 45 * 86_400)  # the 2nd is weeks overdue
    if not await _broken(ctx, customer, bill.bill_id):
        raise Violation("the second instalment is 31 days overdue and no ARRANGEMENT_BROKEN was appended (EVT-7)")
    second = payment_intent(
        customer, bill, "cf-plan-1", AMOUNT_DUE - half, agreement_digest=agreement, instalment_index=1
    )
    expect(await pay(ctx, second), Reason.PAYMENT_AMOUNT_MISMATCH, "the broken plan's second instalment")
    whole = payment_intent(customer, bill, "cf-whole", AMOUNT_DUE)
    expect(await pay(ctx, whole), Reason.PAYMENT_AMOUNT_MISMATCH, "the full amount due, half of it already received")
    rest = payment_intent(customer, bill, "cf-rest", AMOUNT_DUE - half)
    accepted(await pay(ctx, rest), "the outstanding balance, without agreement")
    return f"paid {half}, broken, then only {AMOUNT_DUE - half} accepted"


async def _log(ctx: BillerTarget, customer: Customer) -> list[event_pb2.Event]:
    """The account's whole event log, read from 0 until it goes quiet."""
    events: list[event_pb2.Event] = []
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        while True:
            try:
                envelope = await stream.next(QUIET)
            except TimeoutError:
                return events
            if envelope is None or isinstance(envelope, Refusal):
                return events
            events.append(event_pb2.Event.FromString(envelope.payload))


@suite.case(
    "EVT-7/delinquency-events",
    description="Weeks of an unpaid bill and an unpaid plan: reminders carry an amount at levels 1 to 3; "
    "INSTALMENT_MISSED precedes ARRANGEMENT_BROKEN",
    quote="When an instalment is unpaid at its date plus the biller's grace period, the biller MUST append "
    "`INSTALMENT_MISSED`; if its policy then ends the arrangement it MUST append `ARRANGEMENT_BROKEN`",
    needs=("negotiation", "instalments", "events", FIXTURES),
    covers=("EVT-2",),
)
async def delinquency_events(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    # Due tomorrow, so that two weeks past the due date cost the shared clock little (KEY-16 runs after this).
    unpaid = await ctx.issue_bill(customer, due_in_days=1)  # under no arrangement: reminded
    planned = await ctx.issue_bill(customer, due_in_days=1)
    half = AMOUNT_DUE // 2
    plan = terms(
        terms_pb2.TERMS_KIND_INSTALMENT_PLAN,
        [(planned.due_date, half), (planned.due_date + timedelta(days=14), AMOUNT_DUE - half)],
    )
    opening, answer = await open_thread(ctx, customer, planned, plan)
    reply = accepted(answer, "a two-instalment plan inside the advertised options").reply
    if reply.payload_type != "parley.v1.Accept":
        raise Skip(f"the biller answered a plan inside its options with {reply.payload_type}, not an Accept")
    # Day by day through the weeks around the due date, so that a biller reminding once a day escalates in order.
    for day in range(-3, 16):
        target = planned.due_date + timedelta(days=day)
        if target > ctx.today():
            await ctx.advance_clock((target - ctx.today()).days * 86_400)
    events = await _log(ctx, customer)
    problems: list[str] = []
    for event in events:
        where = f"{event_pb2.EventKind.Name(event.kind)} at sequence {event.header.sequence}"
        if event.kind == event_pb2.EVENT_KIND_REMINDER:
            if not 1 <= event.reminder_level <= 3:
                problems.append(f"{where}: reminder_level {event.reminder_level}, not 1 to 3")
            if not event.HasField("amount") or event.amount.amount_minor <= 0 or not event.bill_id or not event.date:
                problems.append(f"{where}: a reminder without its bill_id, amount owed and date")
    about = [event for event in events if event.bill_id == planned.bill_id]
    kinds = [event.kind for event in about]
    if event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN in kinds:
        broken = kinds.index(event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN)
        missed = [event for event in about[:broken] if event.kind == event_pb2.EVENT_KIND_INSTALMENT_MISSED]
        if not missed:
            problems.append("ARRANGEMENT_BROKEN with no INSTALMENT_MISSED before it")
        elif (missed[0].thread_id, missed[0].amount.amount_minor, missed[0].date, missed[0].related_digest) != (
            thread_id_of(opening),
            half,
            planned.due_date.isoformat(),
            digest_of(reply),
        ):
            problems.append("INSTALMENT_MISSED is not about the first instalment (thread, amount, date, agreement)")
    elif event_pb2.EVENT_KIND_INSTALMENT_MISSED not in kinds:
        problems.append("the plan's first instalment is 15 days overdue and no INSTALMENT_MISSED was appended")
    if problems:
        raise Violation("; ".join(problems))
    names = {unpaid.bill_id: "unpaid", planned.bill_id: "planned"}
    levels = [
        f"{names.get(event.bill_id, '?')} {event.reminder_level}"
        for event in events
        if event.kind == event_pb2.EVENT_KIND_REMINDER
    ]
    return f"{len(events)} events; reminder levels {levels}; " + ", ".join(
        event_pb2.EventKind.Name(kind).removeprefix("EVENT_KIND_") for kind in kinds
    )


STREAM_END_WAIT = 40.0  # seconds for a stream to notice its end: the recheck bound (30 s, EVT-10) and some slack


async def _stream_end(stream: EventStream, what: str) -> Refusal:
    """Read `stream` until it fails; a Violation if it ends cleanly or stays open STREAM_END_WAIT seconds."""
    while True:
        try:
            answer = await stream.next(STREAM_END_WAIT)
        except TimeoutError:
            raise Violation(f"{what}: the stream stayed open {STREAM_END_WAIT:g} s") from None
        if isinstance(answer, Refusal):
            return answer
        if answer is None:
            raise Violation(f"{what}: the stream ended without an error saying why")


@suite.case(
    "EVT-9/stream-lifetime",
    description="A WatchEvents stream ends MESSAGE_EXPIRED once the clock passes its query's expire_time plus the "
    "skew; a fresh query resumes it",
    quote="A `WatchEvents` stream lives no longer than the query that opened it: the biller MUST end the stream, at "
    "the latest when its clock reaches the query's `expire_time` plus `max_clock_skew` (the moment HDR-5 would refuse "
    "the query as `MESSAGE_EXPIRED`), with the error `MESSAGE_EXPIRED`",
    needs=("events", FIXTURES),
)
async def stream_lifetime(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    await ctx.issue_bill(customer)
    lifetime = timedelta(minutes=10)
    query = customer.party.query(customer.account_id, header={"lifetime": lifetime})
    async with ctx.conn.watch(query) as stream:
        await first_event(stream, "event 0 of a fresh stream")
        await ctx.advance_clock(int((lifetime + ctx.skew).total_seconds()) + 60)
        ended = await _stream_end(stream, "a minute after the query's expire_time plus the skew")
    if ended.reason != Reason.MESSAGE_EXPIRED.name:
        raise Violation(f"the stream of an expired query ended with {ended.describe()}, not MESSAGE_EXPIRED")
    async with ctx.conn.watch(customer.party.query(customer.account_id, start_sequence=1)) as stream:
        await ctx.issue_bill(customer)
        await first_event(stream, "resuming from the cursor with a fresh query")
    return "ended MESSAGE_EXPIRED; resumed from sequence 1"


@suite.case(
    "NEG-23/no-deal-already-late",
    description="On bills weeks past due, the biller neither accepts an opening dated in the past nor counters with a "
    "date before its today",
    quote="A biller MUST NOT sign a counter-offer, nor an `Accept` that NEG-12 does not oblige it to make, whose terms "
    "schedule a date before its today",
    needs=NEG,
)
async def no_deal_already_late(ctx: BillerTarget) -> str:
    customer = await ctx.enrolled()
    late_bill, other_bill = await ctx.issue_bill(customer), await ctx.issue_bill(customer)
    # Past the due date by more than the outside-options deferral: its date is five days gone, every window closed.
    await ctx.advance_clock(((late_bill.due_date - ctx.today()).days + OUTSIDE_DAYS + 5) * 86_400)
    openings = (
        ("a deferral dated five days ago", late_bill, outside_options(late_bill)),
        ("a deferral ten days from now, far outside the windows", other_bill, deferral(other_bill, OUTSIDE_DAYS + 15)),
    )
    said = []
    for what, bill, offer in openings:
        _, answer = await open_thread(ctx, customer, bill, offer)
        setup(answer, f"an opening with {what}")
        reply = ctx.verify(answer.reply, NEGOTIATION_TYPES, customer, live=True, what=f"the answer to {what}")
        today = reply.header.create_time.ToDatetime(tzinfo=UTC).date()  # TRM-18: the UTC date of create_time
        kind = answer.reply.payload_type.removeprefix("parley.v1.")
        if isinstance(reply.message, negotiation_pb2.Accept):
            signed = list(offer.schedule)  # an Accept signs the offer's terms
        elif isinstance(reply.message, negotiation_pb2.Offer):
            signed = list(reply.message.terms.schedule)
        else:
            said.append(f"{what}: {kind}")
            continue
        early = [entry.due_date for entry in signed if entry.due_date < today.isoformat()]
        if early:
            raise Violation(f"answering {what}, the biller signed an {kind} dated {', '.join(early)}, before {today}")
        said.append(f"{what}: {kind} dated {signed[0].due_date} or later")
    return "; ".join(said)


@suite.case(
    "KEY-16/biller-renews",
    description="After months of moved clock, the biller's newest key set version has a quarter of its lifetime "
    "ahead and lists two keys",
    quote="A party SHOULD publish a new version well before its newest version expires (RECOMMENDED: once less than a "
    "quarter of its lifetime remains), and SHOULD keep at least two keys in every version",
    level=SHOULD,
)
async def biller_renews(ctx: BillerTarget) -> str:
    answer = accepted(await ctx.conn.call("GetKeySets", biller_service_pb2.GetKeySetsRequest()), "GetKeySets")
    newest = keys_pb2.KeySet.FromString(answer.key_sets[-1].payload)
    created = newest.header.create_time.ToDatetime(tzinfo=UTC)
    expires = newest.header.expire_time.ToDatetime(tzinfo=UTC)
    left, lifetime = expires - ctx.now(), expires - created
    if left < lifetime / 4:
        raise Violation(f"the biller's newest version {newest.version} has {left} of its {lifetime} left")
    if len(newest.keys) < 2:
        raise Violation(f"the biller's newest version {newest.version} lists {len(newest.keys)} key, not two or more")
    return f"version {newest.version}: {left.days} of {lifetime.days} days left, {len(newest.keys)} keys"
