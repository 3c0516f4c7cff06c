"""The operator console's pages (read-only): outcomes, accounts, bills, threads, arrangements, payments, events.

Built on the web kit (agent/web, docs/WEB.md): opened by a token on loopback (or TLS + client certificates),
strict headers, templates and charts from the wheel. Every page reads one snapshot of the store
(`records.read_snapshot`) and writes nothing; no page has a form, so there is nothing to post.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeVar

import jinja2
from aiohttp import web
from markupsafe import Markup

from agent.clock import Clock
from agent.protocol.moves import NegotiationPayload
from agent.protocol.terms import Money, Terms
from agent.stores import open_biller_store
from agent.stores.base import BillRecord, BillStatus, ThreadOutcome
from agent.stores.biller_sql import SqlBillerStore
from agent.web import Bar, StepState, TimelineStep, WebConfig, bar_chart, create_web_app, render, timeline
from parley.v1 import event_pb2, negotiation_pb2
from reference_biller.console.records import (
    ArrangementRow,
    BillRow,
    EventRow,
    PaymentRow,
    Snapshot,
    ThreadRow,
    parse_payload,
    read_snapshot,
)
from reference_biller.console.words import day_text, describe_terms, event_text, moment_text, reject_reason_text
from reference_biller.outcomes import Month, Outcomes, Ratio, Window, compute_outcomes

__all__ = ["PAGE_SIZE", "PERIOD_MONTHS", "ConsoleSettings", "console_web_config", "create_console_app"]

PAGE_SIZE = 25  # rows in a drill-down list; older ones are on the next pages
PERIOD_MONTHS = 12  # the outcome figures cover at most the last twelve calendar months
T = TypeVar("T")


@dataclass(frozen=True)
class ConsoleSettings:
    store_location: str  # a SQLite path, sqlite:///PATH or postgresql://... (agent.stores.open_biller_store)
    clock: Clock  # what "today" is for the figures' period and the cure windows


_SETTINGS = web.AppKey("console_settings", ConsoleSettings)
_STORE = web.AppKey("console_store", SqlBillerStore)


async def _snapshot(request: web.Request) -> Snapshot:
    return await read_snapshot(request.app[_STORE])


def _today(request: web.Request) -> date:
    return request.app[_SETTINGS].clock.now().date()


@dataclass(frozen=True)
class Page:
    """One page of a drill-down list."""

    items: Sequence[Any]
    number: int
    count: int
    total: int

    @property
    def previous(self) -> int | None:
        return self.number - 1 if self.number > 1 else None

    @property
    def next(self) -> int | None:
        return self.number + 1 if self.number < self.count else None


def _page(request: web.Request, items: Sequence[T]) -> Page:
    count = max(1, -(-len(items) // PAGE_SIZE))
    try:
        number = min(max(1, int(request.query.get("page", "1"))), count)
    except ValueError:
        number = 1
    start = (number - 1) * PAGE_SIZE
    return Page(items[start : start + PAGE_SIZE], number, count, len(items))


# --- Outcomes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One outcome figure as the page shows it: a headline, a sentence, and a chart over the months."""

    key: str
    title: str
    headline: str
    sentence: str
    chart: Markup | None
    tone: str = ""  # good / warn / bad, or "" when there is nothing to judge
    note: str = ""  # e.g. the months a chart has no bar for


def _monthly_chart(
    months: Sequence[tuple[Month, Window]], pick: Callable[[Window], Ratio], title: str, *, per_mille: bool = True
) -> Markup | None:
    """One bar per month that has something to count (a month with nothing to count has no bar, not a zero),
    in per mille shown as whole percent, or in tenths shown with one decimal."""
    bars = [
        Bar(month.label(), pick(window).per_mille() if per_mille else pick(window).tenths())
        for month, window in months
        if pick(window).defined
    ]
    if not bars:
        return None
    return bar_chart(
        bars,
        title=title,
        format_value=_percent_of_per_mille if per_mille else _tenths_text,
        height=200,
    )


def _percent_of_per_mille(per_mille: int) -> str:
    return f"{_round_half_up_div(per_mille, 10)} %"


def _empty_months(months: Sequence[tuple[Month, Window]], pick: Callable[[Window], Ratio]) -> str:
    """Which months between the first and the last bar have nothing to count, said so the gap is not misread."""
    defined = [index for index, (_, window) in enumerate(months) if pick(window).defined]
    if not defined:
        return ""
    inner = months[defined[0] : defined[-1] + 1]
    empty = [month.label() for month, window in inner if not pick(window).defined]
    return f"No bar for {', '.join(empty)}: nothing to count that month." if empty else ""


def _round_half_up_div(value: int, divisor: int) -> int:
    return (2 * value + divisor) // (2 * divisor)


def _tenths_text(tenths: int) -> str:
    return f"{tenths // 10}.{tenths % 10}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _was(count: int) -> str:
    return "was" if count == 1 else "were"


def _tone(ratio: Ratio, good: int, bad: int) -> str:
    """good at or above `good` per mille, bad below `bad`; for figures where more is better."""
    if not ratio.defined:
        return ""
    value = ratio.per_mille()
    return "good" if value >= good else "bad" if value < bad else "warn"


def _figures(outcomes: Outcomes) -> list[Figure]:
    period, months = outcomes.period, outcomes.months
    figures = []
    ratio = period.self_service
    figures.append(
        Figure(
            "self-service",
            "Resolved without a person",
            ratio.percent_text(),
            f"{ratio.numerator} of {_plural(ratio.denominator, 'bill')} paid in full needed no one from the team "
            "(no dispute handed to a person, no payment keyed in by hand)."
            if ratio.defined
            else "No bill has been paid in full in this period yet.",
            _monthly_chart(months, lambda window: window.self_service, "Bills resolved without a person, by month"),
            _tone(ratio, 800, 500),
            note=_empty_months(months, lambda window: window.self_service),
        )
    )
    ratio = period.kept
    figures.append(
        Figure(
            "kept",
            "Arrangements kept",
            ratio.percent_text(),
            (f"{ratio.numerator} kept, {period.broken} broken" if ratio.defined else "No arrangement has ended yet")
            + f"; {period.running_arrangements} still running.",
            _monthly_chart(months, lambda window: window.kept, "Arrangements kept, of those that ended, by month"),
            _tone(ratio, 800, 600),
            note=_empty_months(months, lambda window: window.kept),
        )
    )
    ratio = period.cure
    pending = f" {period.cure_pending} more are still inside their 30 days." if period.cure_pending else ""
    figures.append(
        Figure(
            "cure",
            "Cured after a missed instalment",
            ratio.percent_text(),
            (
                f"{ratio.numerator} of {_plural(ratio.denominator, 'arrangement')} with a missed instalment "
                f"{_was(ratio.numerator)} back on track "
                "(paid off or newly arranged) within 30 days."
                if ratio.defined
                else "No missed instalment has had its 30 days yet."
            )
            + pending,
            _monthly_chart(months, lambda window: window.cure, "Cure rate after a missed instalment, by month missed"),
            _tone(ratio, 600, 300),
            note=_empty_months(months, lambda window: window.cure),
        )
    )
    days = period.days_to_pay
    median = days.median
    figures.append(
        Figure(
            "days-to-pay",
            "Days to pay",
            "–" if median is None else f"{median} days",
            f"Half the bills paid in full took {median} days or less from issue; "
            f"{days.on_time.percent_text()} were paid by their due date."
            if median is not None
            else "No bill has been paid in full in this period yet.",
            bar_chart(
                [Bar(label, count) for label, count in days.bands()],
                title="Bills paid in full, by days from issue to payment",
                format_value=str,
                height=200,
            )
            if days.days
            else None,
        )
    )
    ratio = period.reminders_per_paid_bill
    figures.append(
        Figure(
            "reminders",
            "Reminders per paid bill",
            ratio.decimal_text(),
            f"{_plural(ratio.numerator, 'reminder')} {_was(ratio.numerator)} sent about "
            f"{_plural(ratio.denominator, 'bill')} paid in full."
            if ratio.defined
            else "No bill has been paid in full in this period yet.",
            _monthly_chart(
                months,
                lambda window: window.reminders_per_paid_bill,
                "Reminders per paid bill, by month paid",
                per_mille=False,
            ),
            note=_empty_months(months, lambda window: window.reminders_per_paid_bill),
        )
    )
    ratio = period.hardship_uptake
    programmes = ", ".join(f"{programme}: {count}" for programme, count in period.hardship_programmes)
    figures.append(
        Figure(
            "hardship",
            "Hardship programme uptake",
            ratio.percent_text(),
            f"{ratio.numerator} of {_plural(ratio.denominator, 'arrangement')} agreed "
            f"{'is' if ratio.numerator == 1 else 'are'} on a hardship programme"
            + (f" ({programmes})." if programmes else ".")
            if ratio.defined
            else "No arrangement has been agreed in this period yet.",
            _monthly_chart(months, lambda window: window.hardship_uptake, "Hardship programme uptake, by month"),
            note=_empty_months(months, lambda window: window.hardship_uptake),
        )
    )
    return figures


def _period_start(snapshot: Snapshot, today: date) -> date:
    earliest = Month.of(today)
    for _ in range(PERIOD_MONTHS - 1):
        earliest = Month(earliest.year - (earliest.month == 1), (earliest.month - 2) % 12 + 1)
    first = snapshot.first_day() or today
    return min(today, max(first, earliest.first_day))


async def outcomes_page(request: web.Request) -> web.Response:
    snapshot, today = await _snapshot(request), _today(request)
    first = _period_start(snapshot, today)
    outcomes = compute_outcomes(
        bills=snapshot.bill_facts(),
        threads=snapshot.thread_facts(),
        arrangements=snapshot.arrangement_facts(),
        payments=snapshot.payment_facts(),
        events=snapshot.event_facts(),
        first=first,
        today=today,
    )
    return render(
        request,
        "outcomes.html",
        section="outcomes",
        figures=_figures(outcomes),
        outcomes=outcomes,
        period=f"{day_text(first)} to {day_text(today)}",
        accounts=len(snapshot.accounts),
        open_threads=sum(1 for thread in snapshot.threads if thread.outcome is ThreadOutcome.OPEN),
    )


# --- Drill-down lists -------------------------------------------------------------------------------------


def _arrangement_view(arrangement: ArrangementRow, broken_on: dict[bytes, datetime]) -> dict[str, Any]:
    terms = arrangement.terms
    broken = broken_on.get(arrangement.thread_id)
    if broken is not None:
        standing, tone = f"broken on {day_text(broken.date())}", "bad"
    elif terms is not None and arrangement.paid_minor >= terms.total.minor:
        standing, tone = "kept: paid in full", "good"
    else:
        standing, tone = "running", ""
    return {
        "standing": standing,
        "tone": tone,
        "row": arrangement,
        "terms": describe_terms(terms) if terms else "(terms unreadable)",
        "total": str(terms.total) if terms else "",
        "paid": str(Money(terms.total.currency, arrangement.paid_minor)) if terms else "",
        "agreed": day_text(arrangement.agreed_at.date()),
        "thread": arrangement.thread_id.hex(),
    }


async def accounts_page(request: web.Request) -> web.Response:
    snapshot = await _snapshot(request)
    bills_of: dict[str, int] = {}
    unpaid_of: dict[str, dict[str, list[Money]]] = {}  # account → currency → amounts of bills not paid
    for bill in snapshot.bills:
        bills_of[bill.account_id] = bills_of.get(bill.account_id, 0) + 1
        if bill.status is not BillStatus.PAID:
            unpaid_of.setdefault(bill.account_id, {}).setdefault(bill.amount.currency.code, []).append(bill.amount)
    rows = [
        {
            "account": account,
            "bills": bills_of.get(account.account_id, 0),
            "unpaid": _unpaid_text(unpaid_of.get(account.account_id, {})),
        }
        for account in snapshot.accounts
    ]
    return render(request, "accounts.html", section="accounts", page=_page(request, rows))


def _unpaid_text(by_currency: dict[str, list[Money]]) -> str:
    """`EUR 448.00 (2 bills)`: what the account's bills not yet paid were issued for, per currency."""
    if not by_currency:
        return "nothing"
    parts = []
    for amounts in by_currency.values():
        total = Money(amounts[0].currency, sum(amount.minor for amount in amounts))
        parts.append(f"{total} ({_plural(len(amounts), 'bill')})")
    return ", ".join(parts)


async def account_page(request: web.Request) -> web.Response:
    snapshot = await _snapshot(request)
    account_id = request.match_info["account_id"]
    found = [account for account in snapshot.accounts if account.account_id == account_id]
    if not found:
        raise web.HTTPNotFound(text="No such account.\n")
    events = [event for event in snapshot.events if event.account_id == account_id]
    broken_on = snapshot.broken_on()
    return render(
        request,
        "account.html",
        section="accounts",
        account=found[0],
        created=day_text(found[0].created_at.date()),
        bills=[_bill_view(bill) for bill in snapshot.bills if bill.account_id == account_id],
        threads=[_thread_view(thread) for thread in snapshot.threads if thread.account_id == account_id],
        arrangements=[_arrangement_view(a, broken_on) for a in snapshot.arrangements if a.account_id == account_id],
        payments=[_payment_view(p) for p in snapshot.payments if p.account_id == account_id],
        events=[_event_view(event) for event in reversed(events)][:PAGE_SIZE],
        more_events=max(0, len(events) - PAGE_SIZE),
    )


def _bill_view(bill: BillRow) -> dict[str, Any]:
    return {
        "row": bill,
        "amount": str(bill.amount),
        "issued": day_text(bill.issued_on),
        "due": day_text(bill.due_on),
        "status": bill.status.value.replace("_", " "),
    }


def _thread_view(thread: ThreadRow) -> dict[str, Any]:
    return {
        "row": thread,
        "id": thread.thread_id.hex(),
        "opened": moment_text(thread.opened_at),
        "outcome": thread.outcome.value.replace("_", " "),
        "reason": "" if thread.reject_reason is None else reject_reason_text(thread.reject_reason),
    }


def _payment_view(payment: PaymentRow) -> dict[str, Any]:
    return {
        "row": payment,
        "amount": str(payment.amount),
        "asked": day_text(payment.asked_at.date()),
        "settled": day_text(payment.settled_at.date()) if payment.settled_at else "",
        "what": "the bill as issued"
        if not payment.agreement_digest
        else f"arrangement, payment {payment.instalment_index + 1}",
    }


def _event_view(event: EventRow) -> dict[str, Any]:
    detail = [str(event.amount)] if event.amount is not None else []
    if event.day:
        detail.append(day_text(date.fromisoformat(event.day)))
    return {
        "row": event,
        "what": event_text(event.kind, event.level),
        "when": moment_text(event.created_at),
        "detail": ", ".join(detail),
        "bad": event.kind in (event_pb2.EVENT_KIND_INSTALMENT_MISSED, event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN),
    }


async def bills_page(request: web.Request) -> web.Response:
    snapshot = await _snapshot(request)
    rows = [_bill_view(bill) for bill in reversed(snapshot.bills)]
    return render(request, "bills.html", section="bills", page=_page(request, rows))


async def threads_page(request: web.Request) -> web.Response:
    snapshot = await _snapshot(request)
    rows = [_thread_view(thread) for thread in reversed(snapshot.threads)]
    return render(request, "threads.html", section="threads", page=_page(request, rows))


async def arrangements_page(request: web.Request) -> web.Response:
    snapshot = await _snapshot(request)
    broken_on = snapshot.broken_on()
    rows = [_arrangement_view(arrangement, broken_on) for arrangement in reversed(snapshot.arrangements)]
    return render(request, "arrangements.html", section="arrangements", page=_page(request, rows))


async def payments_page(request: web.Request) -> web.Response:
    snapshot = await _snapshot(request)
    rows = [_payment_view(payment) for payment in reversed(snapshot.payments)]
    return render(request, "payments.html", section="payments", page=_page(request, rows))


async def events_page(request: web.Request) -> web.Response:
    snapshot = await _snapshot(request)
    events = sorted(snapshot.events, key=lambda event: (event.created_at, event.account_id, event.sequence))
    rows = [_event_view(event) for event in reversed(events)]
    return render(request, "events.html", section="events", page=_page(request, rows))


# --- One thread, move by move ----------------------------------------------------------------------------


def _move_step(payload: NegotiationPayload | None, by: str) -> str:
    """One move in words, as the thread's timeline shows it."""
    if isinstance(payload, negotiation_pb2.ThreadOpen):
        return f"{by} opens: {describe_terms(Terms.from_proto(payload.terms))}"
    if isinstance(payload, negotiation_pb2.Offer):
        return f"{by} counters: {describe_terms(Terms.from_proto(payload.terms))}"
    if isinstance(payload, negotiation_pb2.Accept):
        return f"{by} accepts"
    if isinstance(payload, negotiation_pb2.Reject):
        return f"{by} rejects: {reject_reason_text(payload.reason)}"
    if isinstance(payload, negotiation_pb2.Withdraw):
        return f"{by} withdraws"
    return f"{by}: an unknown move"


_OUTCOME_WORDS = {
    ThreadOutcome.AGREED: "Agreed: the arrangement is signed by both",
    ThreadOutcome.REJECTED: "Ended without agreement",
    ThreadOutcome.WITHDRAWN: "Withdrawn by the customer",
    ThreadOutcome.EXPIRED: "Expired: the deadline passed",
    ThreadOutcome.PROTOCOL_ERROR: "Ended by a protocol error",
}


async def thread_page(request: web.Request) -> web.Response:
    try:
        thread_id = bytes.fromhex(request.match_info["thread_id"])
    except ValueError:
        raise web.HTTPNotFound(text="No such thread.\n") from None
    store = request.app[_STORE]
    thread = await store.get_thread(thread_id)
    if thread is None:
        raise web.HTTPNotFound(text="No such thread.\n")
    bill = await store.get_bill(thread.bill_id)
    steps = []
    for message in thread.messages:
        by = "Customer" if message.sequence % 2 == 0 else "Biller"  # NEG-7: the consumer moves at even sequences
        move = _move_step(parse_payload(message.envelope), by)
        steps.append(TimelineStep(move, StepState.DONE, moment_text(message.received_at)))
    if thread.outcome is ThreadOutcome.OPEN:
        waiting = "customer" if len(thread.messages) % 2 == 0 else "biller"
        steps.append(
            TimelineStep(f"Waiting for the {waiting}", StepState.CURRENT, f"until {moment_text(thread.deadline)}")
        )
    snapshot = await _snapshot(request)
    arrangement = next((a for a in snapshot.arrangements if a.thread_id == thread_id), None)
    if thread.outcome is not ThreadOutcome.OPEN:
        when = "" if arrangement is None else moment_text(arrangement.agreed_at)
        steps.append(TimelineStep(_OUTCOME_WORDS[thread.outcome], StepState.DONE, when))
    schedule = []
    if arrangement is not None and arrangement.terms is not None:
        paid = [p for p in snapshot.payments if p.agreement_digest == arrangement.accept_digest and p.settled_at]
        paid_indexes = {p.instalment_index: p for p in paid}
        for index, instalment in enumerate(arrangement.terms.schedule):
            payment = paid_indexes.get(index)
            schedule.append(
                {
                    "due": day_text(instalment.due_date),
                    "amount": str(instalment.amount),
                    "paid": day_text(payment.settled_at.date()) if payment and payment.settled_at else "",
                }
            )
    return render(
        request,
        "thread.html",
        section="threads",
        thread={
            "account_id": thread.account_id,
            "bill_id": thread.bill_id,
        },  # never the record: it holds the disclosure
        thread_hex=thread_id.hex(),
        bill=None if bill is None else _bill_view(_bill_row(bill, snapshot)),
        chart=timeline(steps, title=f"Negotiation on bill {thread.bill_id}, move by move", width=640),
        opened=moment_text(thread.opened_at),
        schedule=schedule,
        arrangement=None if arrangement is None else _arrangement_view(arrangement, snapshot.broken_on()),
    )


def _bill_row(bill: BillRecord, snapshot: Snapshot) -> BillRow:
    return next(row for row in snapshot.bills if row.bill_id == bill.bill_id)


# --- The app ---------------------------------------------------------------------------------------------


def create_console_app(settings: ConsoleSettings, web_config: WebConfig) -> web.Application:
    """The console as an aiohttp app; it opens the store when it starts and closes it when it stops."""
    app = create_web_app(web_config)
    app[_SETTINGS] = settings

    async def store_context(app: web.Application) -> AsyncIterator[None]:
        app[_STORE] = await open_biller_store(settings.store_location)
        try:
            yield
        finally:
            await app[_STORE].close()

    app.cleanup_ctx.append(store_context)
    app.router.add_get("/", outcomes_page)
    app.router.add_get("/accounts", accounts_page)
    app.router.add_get("/accounts/{account_id}", account_page)
    app.router.add_get("/bills", bills_page)
    app.router.add_get("/threads", threads_page)
    app.router.add_get("/threads/{thread_id}", thread_page)
    app.router.add_get("/arrangements", arrangements_page)
    app.router.add_get("/payments", payments_page)
    app.router.add_get("/events", events_page)
    return app


def console_web_config(title: str, **options: Any) -> WebConfig:
    """The kit's configuration with the console's templates and styles."""
    return WebConfig(
        title=title,
        templates=jinja2.PackageLoader("reference_biller.console", "templates"),
        static_package="reference_biller.console",
        **options,
    )
