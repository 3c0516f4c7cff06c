"""What the household's pages show, built from the status document (`reference_consumer.status`): pure functions.

The pages never read the store themselves: everything they show comes from the one status document that
`parley consumer status --json` prints, so the page and the command cannot disagree, and whatever the document
keeps out (keys, enrolment codes, disclosures, other households) the pages keep out too. The cash-flow picture
is the reference strategy's own model (`CashFlow`), fed with the instalments still to pay: exact minor units.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from markupsafe import Markup

from agent.protocol.errors import ProtocolError
from agent.protocol.moves import NEGOTIATION_TYPES, move_of
from agent.protocol.negotiation import Accept, Offer, Open, Reject, Role, Withdraw
from agent.protocol.terms import Instalment, Money
from agent.web import Marker, StepState, TimelineStep, line_chart, timeline
from parley.v1 import envelope_pb2
from reference_consumer.profile import Profile
from reference_consumer.strategy import CashFlow, format_minor
from reference_consumer.words import describe_terms

__all__ = [
    "CASH_FLOW_DAYS",
    "BillTracker",
    "HappeningLine",
    "bill_key",
    "cash_flow_chart",
    "negotiation_moves",
    "rows",
    "short_fingerprint",
    "superseded",
    "tracker",
]

Document = Mapping[str, Any]
Row = Mapping[str, Any]

CASH_FLOW_DAYS = 62  # the chart looks at least two months ahead: two pay days, the next bills' due dates
CASH_FLOW_MAX_DAYS = 190  # and never further than about six months, where a plan's last instalments may fall
FINGERPRINT_SHOWN = 16  # hex characters of a fingerprint shown in the text; the full one on hover and on detail


def rows(document: Document, key: str) -> list[Row]:
    """The document's list under `key`, keeping only objects (the document is ours, but a page never crashes)."""
    found = document.get(key)
    return [row for row in found if isinstance(row, Mapping)] if isinstance(found, list) else []


_PAYLOADS = {payload.DESCRIPTOR.full_name: payload for payload in NEGOTIATION_TYPES}


def negotiation_moves(messages: Sequence[envelope_pb2.Envelope], biller_name: str) -> tuple[str, ...]:
    """A thread's signed messages (verified when stored) as sentences, in order: who moved, and what."""
    said = []
    for sequence, envelope in enumerate(messages):
        who = "Your bot" if Role.at(sequence) is Role.CONSUMER else biller_name
        payload_type = _PAYLOADS.get(envelope.payload_type)
        try:
            move = None if payload_type is None else move_of(payload_type.FromString(envelope.payload))
        except (ProtocolError, ValueError):
            move = None
        if isinstance(move, Open):
            shared = " (sharing your circumstances, for that purpose only)" if move.disclosure_digest else ""
            said.append(f"{who} proposed {describe_terms(move.terms)}{shared}")
        elif isinstance(move, Offer):
            said.append(f"{who} answered with {describe_terms(move.terms)}")
        elif isinstance(move, Accept):
            said.append(f"{who} accepted")
        elif isinstance(move, Reject):
            said.append(f"{who} said no" + (f": “{move.note}”" if move.note else ""))
        elif isinstance(move, Withdraw):
            said.append(f"{who} withdrew" + (f": “{move.note}”" if move.note else ""))
        else:
            said.append(f"{who} sent a message this page cannot show")
    return tuple(said)


def superseded(document: Document) -> set[str]:
    """Thread ids of agreements no longer standing because a later one on the same bill replaced them (the
    biller ended the first plan after a missed instalment, and a new one was agreed)."""
    latest: dict[tuple[str, str], str] = {}
    every = []
    for agreement in rows(document, "agreements"):
        latest[(agreement["biller"], agreement["bill_id"])] = agreement["thread_id"]
        every.append(agreement["thread_id"])
    return set(every) - set(latest.values())


def bill_key(biller: str, bill_id: str) -> str:
    """A bill's address in the pages: ids chosen by billers may hold any character, a hash of them holds none."""
    return hashlib.sha256(f"{biller}\0{bill_id}".encode()).hexdigest()[:20]


def short_fingerprint(fingerprint: str | None) -> str:
    """The first characters of a pinned fingerprint, in groups of four, for reading aloud against the biller's."""
    if not fingerprint:
        return "not pinned yet"
    head = fingerprint[:FINGERPRINT_SHOWN]
    return " ".join(head[index : index + 4] for index in range(0, len(head), 4)) + " …"


@dataclass(frozen=True)
class HappeningLine:
    """One thing that happened to a bill, for the list under its tracker."""

    when: str  # ISO 8601 date or time, sorts as text
    text: str
    detail: str = ""
    timed: bool = True  # False: `when` only places the line (a payment with no receipt yet has no time of its own)


@dataclass(frozen=True)
class BillTracker:
    bill: Row
    steps: Markup
    happenings: tuple[HappeningLine, ...]
    approvals: tuple[Row, ...]
    agreements: tuple[Row, ...]
    payments: tuple[Row, ...]


def _money(value: object) -> str:
    return str(value.get("text", "")) if isinstance(value, Mapping) else ""


def _of_bill(document: Document, key: str, biller: str, bill_id: str) -> tuple[Row, ...]:
    return tuple(row for row in rows(document, key) if row.get("biller") == biller and row.get("bill_id") == bill_id)


def tracker(document: Document, key: str) -> BillTracker | None:
    """The parcel-tracker view of the bill at `key` (see `bill_key`), or None when the document has no such bill.

    Steps: issued → options weighed → negotiated → agreed → payment instructions → paid → receipt → thanks.
    A later step reached means the earlier ones were passed (a bill paid in full at once has no haggling), so
    every step up to the last one reached is done, the next one is current and the rest are still to come.
    """
    bill = next((row for row in rows(document, "bills") if bill_key(row["biller"], row["bill_id"]) == key), None)
    if bill is None:
        return None
    biller, bill_id = bill["biller"], bill["bill_id"]
    negotiations = _of_bill(document, "negotiations", biller, bill_id)
    approvals = _of_bill(document, "approvals", biller, bill_id)
    agreements = _of_bill(document, "agreements", biller, bill_id)
    payments = _of_bill(document, "payments", biller, bill_id)
    events = _of_bill(document, "events", biller, bill_id)
    upcoming = _of_bill(document, "upcoming", biller, bill_id)
    paid = [payment for payment in payments if payment.get("state") == "paid"]
    receipts = [payment for payment in paid if payment.get("receipt")]
    thanks = [event for event in events if event.get("kind") == "payment_received"]
    latest_negotiation = negotiations[-1] if negotiations else None
    latest_agreement = agreements[-1] if agreements else None
    pending = [approval for approval in approvals if approval.get("state") == "pending"]
    fully_paid = bill.get("state") == "paid" or (not agreements and bool(paid))  # paid without a plan: one payment

    reached = [
        ("Bill issued", True, f"{bill['issue_date']}: {_money(bill['amount'])}, due {bill['due_date']}"),
        (
            "Options weighed",
            bool(negotiations or payments or len(pending) < len(approvals)),
            "waiting for your approval" if pending else "the bot chose what to propose",
        ),
        (
            "Negotiated",
            latest_negotiation is not None and latest_negotiation.get("outcome") != "open",
            str(latest_negotiation["outcome_text"]) if latest_negotiation else "",
        ),
        ("Agreed", latest_agreement is not None, str(latest_agreement["terms"]["text"]) if latest_agreement else ""),
        (
            "Payment instructions",
            any(payment.get("state") in ("instructed", "sending", "paid") for payment in payments),
            next((f"pay {payment['payee']}" for payment in payments if payment.get("payee")), "")
            or (f"the bot pays on {upcoming[0]['due_date']}" if upcoming else ""),
        ),
        # An instalment plan is paid when its last instalment is: until then "Paid" is where it stands, however
        # many receipts and thanks the earlier instalments brought.
        ("Paid", fully_paid, _paid_detail(bill, paid)),
        (
            "Receipt",
            fully_paid and len(receipts) == len(paid),
            "signed by the biller for " + ", ".join(_money(p["receipt"].get("amount_received")) for p in receipts)
            if receipts
            else "",
        ),
        ("Thanks", fully_paid and bool(thanks), str(thanks[-1]["message"] or thanks[-1]["text"]) if thanks else ""),
    ]
    last_reached = max(index for index, (_, done, _) in enumerate(reached) if done)
    steps = []
    for index, (label, _, detail) in enumerate(reached):
        if index <= last_reached:
            steps.append(TimelineStep(label, StepState.DONE, detail))
        elif index == last_reached + 1:
            steps.append(TimelineStep(label, StepState.CURRENT, detail))
        else:
            steps.append(TimelineStep(label, StepState.PENDING))
    drawn = timeline(steps, title=f"Bill {bill_id} from {bill['biller_name']}, step by step", width=560)
    return BillTracker(
        bill=bill,
        steps=drawn,
        happenings=_happenings(events, negotiations, approvals, payments),
        approvals=approvals,
        agreements=agreements,
        payments=payments,
    )


def _paid_detail(bill: Row, paid: Sequence[Row]) -> str:
    if not paid:
        return ""
    if bill.get("state") == "paid":
        return f"all paid: {', '.join(_money(payment['amount']) for payment in paid)}"
    return f"{len(paid)} of {paid[0].get('of', '?')} instalments paid"


def _happenings(
    events: Sequence[Row], negotiations: Sequence[Row], approvals: Sequence[Row], payments: Sequence[Row]
) -> tuple[HappeningLine, ...]:
    """Everything that happened to the bill, oldest first: what the biller said, what the bot did, what you said.

    Lines are built in the order things happen to a bill (issued, asked, negotiated, the biller's news, paid)
    and sorted by time, stably: lines of the same minute keep that order. A payment without a time (no receipt
    yet) goes last.
    """
    issued = [event for event in events if event.get("kind") == "bill_issued"]
    news = [event for event in events if event.get("kind") != "bill_issued"]
    lines = [_event_line(event) for event in issued]
    for approval in approvals:
        lines.append(
            HappeningLine(
                str(approval.get("created_at") or ""),
                f"The bot asked you: {approval['action_text']} {approval['terms']['text']}",
                str(approval["state_text"]),
            )
        )
    for negotiation in negotiations:
        opened = str(negotiation.get("opened_at") or "")
        lines.append(HappeningLine(opened, "The bot opened a negotiation with the biller"))
        if negotiation.get("outcome") != "open":
            lines.append(HappeningLine(opened, f"The negotiation ended: {negotiation['outcome_text']}"))
    lines += [_event_line(event) for event in news]
    latest = max((line.when for line in lines), default="")
    for payment in payments:
        receipt = payment.get("receipt") or {}
        reference = f" · bank reference {payment['bank_reference']}" if payment.get("bank_reference") else ""
        lines.append(
            HappeningLine(
                str(receipt.get("received_at") or latest),
                f"Payment {payment['instalment']} of {payment['of']}: {_money(payment['amount'])}",
                str(payment["state_text"]) + reference,
                timed=bool(receipt.get("received_at")),
            )
        )
    return tuple(sorted(lines, key=lambda line: line.when))


def _event_line(event: Row) -> HappeningLine:
    details = [_money(event.get("amount")), f"for {event['date']}" if event.get("date") else ""]
    if event.get("kind") == "reminder" and event.get("reminder_level"):
        details.append(f"reminder {event['reminder_level']}")
    if event.get("message"):
        details.append(f"“{event['message']}”")
    text = f"{event['biller_name']}: {event['text']}"
    return HappeningLine(str(event.get("received_at") or ""), text, " · ".join(d for d in details if d))


def cash_flow_chart(profile: Profile, document: Document, today: date) -> Markup:
    """The projected end-of-day balance, day by day, against the buffer, with pay days and every due date.

    The reference strategy's own model: the balance in the profile, income on pay days, outgoings, and every
    instalment still to pay across billers (the document's `upcoming`). Points are drawn where the balance
    changes, so a steady fortnight is one flat step, not fourteen dots.
    """
    currency = profile.currency
    committed = [
        Instalment(date.fromisoformat(row["due_date"]), Money(profile.balance.currency, row["amount"]["minor"]))
        for row in rows(document, "upcoming")
        if row["amount"]["currency"] == currency and date.fromisoformat(row["due_date"]) >= today
    ]
    last_due = max((payment.due_date for payment in committed), default=today)
    days = min(max(CASH_FLOW_DAYS, (last_due - today).days + 14), CASH_FLOW_MAX_DAYS)
    end = today + timedelta(days=days)
    flow = CashFlow(profile, today)
    points: list[tuple[date, int]] = []
    for offset in range(days + 1):
        day = today + timedelta(days=offset)
        balance = flow.balance_on(day, committed)
        if not points or points[-1][1] != balance or day == end:
            points.append((day, balance))
    markers = [Marker(day, "Pay day", "payday") for day in flow.paydays(today, end)]
    names = {row["biller"]: row["biller_name"] for row in rows(document, "upcoming")}
    due_on: dict[date, list[str]] = {}
    for row in rows(document, "upcoming"):
        due = date.fromisoformat(row["due_date"])
        if today <= due <= end:
            due_on.setdefault(due, []).append(str(names.get(row["biller"], row["biller"])))
    markers += [Marker(day, " + ".join(sorted(set(who))), "due") for day, who in sorted(due_on.items())]

    def money(minor: int) -> str:
        return format_minor(currency, minor)

    return line_chart(
        points,
        title="Your projected balance, day by day",
        format_value=money,
        threshold=profile.buffer.minor,
        threshold_label=f"Buffer {money(profile.buffer.minor)}",
        markers=markers,
        width=720,
        height=320,
    )
