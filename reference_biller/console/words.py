"""Records in words a collections manager reads at a glance: terms, moves, events, dates."""

from __future__ import annotations

from datetime import UTC, date, datetime

from agent.protocol.terms import LineKind, Terms, TermsKind
from parley.v1 import event_pb2, negotiation_pb2

__all__ = ["day_text", "describe_terms", "event_text", "moment_text", "reject_reason_text"]

_EVENT_WORDS = {
    event_pb2.EVENT_KIND_BILL_ISSUED: "Bill issued",
    event_pb2.EVENT_KIND_REMINDER: "Reminder",
    event_pb2.EVENT_KIND_ARRANGEMENT_ACTIVE: "Arrangement active",
    event_pb2.EVENT_KIND_INSTALMENT_DUE: "Instalment due soon",
    event_pb2.EVENT_KIND_PAYMENT_RECEIVED: "Payment received",
    event_pb2.EVENT_KIND_INSTALMENT_MISSED: "Instalment missed",
    event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN: "Arrangement broken",
    event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED: "New arrangement offered",
}
_REMINDER_LEVELS = {1: "courteous", 2: "firm", 3: "final"}
_REJECT_WORDS = {
    negotiation_pb2.REJECT_REASON_OUT_OF_POLICY: "outside policy",
    negotiation_pb2.REJECT_REASON_UNAFFORDABLE: "unaffordable",
    negotiation_pb2.REJECT_REASON_DISPUTED: "disputed: a person follows up",
    negotiation_pb2.REJECT_REASON_ALREADY_SETTLED: "already settled",
    negotiation_pb2.REJECT_REASON_OTHER: "other",
}


def day_text(day: date) -> str:
    """`6 Mar 2026`."""
    return f"{day.day} {day:%b %Y}"


def moment_text(moment: datetime) -> str:
    """`6 Mar 2026, 09:00 UTC`."""
    moment = moment.astimezone(UTC)
    return f"{day_text(moment.date())}, {moment:%H:%M} UTC"


def describe_terms(terms: Terms) -> str:
    """Terms in one line: "3 instalments of EUR 83.50, 6 Apr 2026 to 6 Jun 2026 (fee EUR 1.50)"."""
    schedule = terms.schedule
    if terms.kind is TermsKind.INSTALMENT_PLAN:
        same = len({instalment.amount.minor for instalment in schedule}) == 1
        each = f"{'' if same else 'about '}{schedule[0].amount}"
        text = (
            f"{len(schedule)} instalments of {each}, "
            f"{day_text(schedule[0].due_date)} to {day_text(schedule[-1].due_date)}"
        )
    elif terms.kind is TermsKind.DEFERRAL:
        text = f"pay {terms.total} later, on {day_text(schedule[0].due_date)}"
    elif terms.kind is TermsKind.SETTLEMENT:
        text = f"settle for {terms.total} on {day_text(schedule[0].due_date)}"
    else:
        text = f"pay {terms.total} by {day_text(schedule[0].due_date)}"
    extras = [f"{_LINE_WORDS[line.kind]} {line.amount}" for line in terms.lines]
    if terms.hardship_programme_id:
        extras.append(f"hardship programme {terms.hardship_programme_id}")
    return f"{text} ({', '.join(extras)})" if extras else text


_LINE_WORDS = {LineKind.FEE: "fee", LineKind.DISCOUNT: "discount", LineKind.SETTLEMENT_REDUCTION: "forgiven"}


def event_text(kind: int, level: int) -> str:
    words = _EVENT_WORDS.get(event_pb2.EventKind.ValueType(kind), f"Event {kind}")
    if kind == event_pb2.EVENT_KIND_REMINDER and level in _REMINDER_LEVELS:
        return f"{words} ({_REMINDER_LEVELS[level]})"
    return words


def reject_reason_text(reason: int) -> str:
    return _REJECT_WORDS.get(negotiation_pb2.RejectReason.ValueType(reason), "unspecified")
