"""Re-enrolment (§6.2 ENR-11, ENR-12; BIL-7, EVT-11): an account re-bound to a new party with a second code.

The second code comes from conformance control (`IssueTestEnrolmentCode`, CNF-4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.conformance.biller.target import (
    EVENT_WAIT,
    FIXTURES,
    BillerTarget,
    Customer,
    IssuedBill,
    accepted,
    agreed_thread,
    digest_of,
    enrol,
    expect,
    get_bill,
    get_thread,
    list_bills,
    read_events_until,
    thread_id_of,
)
from agent.conformance.client import Refusal
from agent.conformance.runner import Suite, Violation
from agent.protocol.errors import Reason
from parley.v1 import bill_pb2, biller_service_pb2, enrolment_pb2, event_pb2

suite: Suite[BillerTarget] = Suite("biller/reenrolment")


def _terms_of(bill: bill_pb2.Bill) -> bytes:
    """A bill without its header: its id, account, amounts, dates and options (what a re-presentation keeps)."""
    copy = bill_pb2.Bill()
    copy.CopyFrom(bill)
    copy.ClearField("header")
    return copy.SerializeToString(deterministic=True)


async def _presented_again(ctx: BillerTarget, second: Customer, bills: list[IssuedBill]) -> dict[str, IssuedBill]:
    """BIL-7: the unpaid bills, each presented again to the new party — same bill, a fresh one-message thread."""
    account_id = second.account_id
    listed = accepted(await list_bills(ctx, second.party.query(account_id)), "ListBills by the new party")
    presented: dict[str, IssuedBill] = {}
    for envelope in listed.bills:
        bill: Any = ctx.verify(
            envelope, (bill_pb2.Bill,), second, live=False, what="a bill served to the new party (BIL-7)"
        ).message
        if bill.header.sequence != 0 or bill.header.previous_digest:
            raise Violation(f"bill {bill.bill_id!r} presented again is not a one-message thread (BIL-1)")
        presented[bill.bill_id] = dataclasses.replace(
            next((b for b in bills if b.bill_id == bill.bill_id), bills[0]),
            envelope=envelope,
            digest=digest_of(envelope),
            bill=bill,
        )
    for issued in bills:
        again = presented.get(issued.bill_id)
        if again is None:
            raise Violation(f"the unpaid bill {issued.bill_id!r} is not presented to the new party (ENR-12)")
        if again.bill.header.thread_id == issued.bill.header.thread_id:
            raise Violation(f"bill {issued.bill_id!r} is presented again in the first party's thread, not a fresh one")
        if _terms_of(again.bill) != _terms_of(issued.bill):
            raise Violation(f"bill {issued.bill_id!r} presented again differs from the first presentation's terms")
        got = accepted(
            await get_bill(ctx, second.party.query(account_id, bill_id=issued.bill_id)), "GetBill by the new party"
        )
        if got.bill.SerializeToString() != again.envelope.SerializeToString():
            raise Violation(f"GetBill({issued.bill_id!r}) serves another envelope than ListBills (BIL-1, BIL-7)")
    return presented


async def _own_log(ctx: BillerTarget, second: Customer, presented: dict[str, IssuedBill], first_thread: bytes) -> int:
    """EVT-11: the new party's own log from 0, BILL_ISSUED naming the presentations it was served."""
    async with ctx.conn.watch(second.party.query(second.account_id)) as stream:
        log = await read_events_until(stream, second, ctx, set(presented), 0)
    for envelope in log:
        event = event_pb2.Event.FromString(envelope.payload)
        if first_thread and event.thread_id == first_thread:
            raise Violation("the new party's log carries an event of the first party's thread (ENR-12)")
        named = presented.get(event.bill_id) if event.kind == event_pb2.EVENT_KIND_BILL_ISSUED else None
        if named is not None and event.related_digest != named.digest:
            raise Violation(
                f"BILL_ISSUED of {event.bill_id!r} in the new party's log does not name the bill as presented to "
                "it (ENR-12)"
            )
    return len(log)


async def _watch_refused(ctx: BillerTarget, customer: Customer) -> None:
    """ENR-11, AUZ-1: the party the account left cannot watch it."""
    async with ctx.conn.watch(customer.party.query(customer.account_id)) as stream:
        try:
            refused = await stream.next(EVENT_WAIT)
        except TimeoutError:
            raise Violation("WatchEvents by the party the account left neither failed nor ended") from None
    if not isinstance(refused, Refusal):
        raise Violation("WatchEvents by the party the account left was served, not refused")
    expect(refused, Reason.ACCOUNT_ACCESS_DENIED, "WatchEvents by the party the account left")


@suite.case(
    "ENR-12/re-enrolment",
    description="A second code re-binds an account: the open bills are signed anew to the new party, its log starts "
    "at 0, the first is refused",
    quote="When an enrolment binds an account to a party, the biller MUST, in the same atomic step as ENR-11: present "
    "to that party every bill of the account not yet paid and not yet presented to it — a new `Bill` signed to it as "
    "BIL-1 says (fresh `thread_id`, `recipient` = that party), with the same `bill_id` and terms […] The log of the "
    "binding (account, party) starts at sequence 0 and carries only events addressed to that party",
    needs=(FIXTURES,),
    covers=("ENR-11", "BIL-7", "EVT-11"),
)
async def re_enrolment(ctx: BillerTarget) -> str:
    events, negotiation = "events" in ctx.features, "negotiation" in ctx.features
    account = await ctx.new_account()
    account_id = account.account_id
    first = Customer(ctx.new_party(), account_id)
    accepted(await enrol(ctx, first.party.enrolment(account_id, account.enrolment_code)), "the first party's Enrol")
    bills = [await ctx.issue_bill(first)]  # open: presented again to the new party, which negotiates on it below
    first_thread = b""
    if negotiation:  # the first party's own thread (with its agreement) on a second bill: not the new party's
        bills.append(await ctx.issue_bill(first))
        first_thread = thread_id_of((await agreed_thread(ctx, first, bills[1]))[0])
    if events:
        async with ctx.conn.watch(first.party.query(account_id)) as stream:
            await read_events_until(stream, first, ctx, {b.bill_id for b in bills}, 0)

    # A second code for the bound account, and a new party enrolled with it (ENR-11).
    code = await ctx.new_code(account_id)
    second = Customer(ctx.new_party(), account_id)
    answer: biller_service_pb2.EnrolResponse = accepted(
        await enrol(ctx, second.party.enrolment(account_id, code)), "the new party's Enrol with the account's new code"
    )
    confirmation: Any = ctx.verify(
        answer.confirmation, (enrolment_pb2.EnrolmentConfirmation,), second, live=True, what="the confirmation"
    ).message
    if confirmation.consumer_party_id != second.party_id:
        raise Violation(f"the re-enrolment's confirmation names {confirmation.consumer_party_id!r}, not the new party")

    presented = await _presented_again(ctx, second, bills)
    log = await _own_log(ctx, second, presented, first_thread) if events else 0

    # ENR-11, AUZ-1: the first party is refused; AUZ-5: its thread is not the new party's.
    expect(
        await list_bills(ctx, first.party.query(account_id)),
        Reason.ACCOUNT_ACCESS_DENIED,
        "ListBills by the party the account left",
    )
    if events:
        await _watch_refused(ctx, first)
    if negotiation:
        expect(
            await get_thread(ctx, second.party.query(account_id, thread_id=first_thread)),
            Reason.NOT_FOUND,
            "GetThread by the new party of the first party's thread",
        )
        await agreed_thread(ctx, second, presented[bills[0].bill_id])  # NEG-2: naming its own presentation
    return f"{len(presented)} bills presented again, {log} events in the new party's log"
