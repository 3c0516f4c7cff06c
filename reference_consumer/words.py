"""What the household reads: terms, events, outcomes and money in plain words, never enum names.

One place for these phrases, so `consumer run`, `consumer status`, notifications and the web pages
built on them say the same thing the same way.
"""

from __future__ import annotations

import itertools
from datetime import date

from agent.protocol.terms import LineKind, Money, Terms, TermsKind
from agent.stores.base import ApprovalState, IntentState, ThreadOutcome
from parley.v1 import event_pb2

_EVENT_WORDS: dict[int, str] = {
    event_pb2.EVENT_KIND_BILL_ISSUED: "bill issued",
    event_pb2.EVENT_KIND_REMINDER: "reminder",
    event_pb2.EVENT_KIND_ARRANGEMENT_ACTIVE: "arrangement active",
    event_pb2.EVENT_KIND_INSTALMENT_DUE: "instalment due",
    event_pb2.EVENT_KIND_PAYMENT_RECEIVED: "payment received, thank you",
    event_pb2.EVENT_KIND_INSTALMENT_MISSED: "instalment missed",
    event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN: "arrangement ended by the biller",
    event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED: "the biller offers to agree new terms",
}

_OUTCOME_WORDS = {
    ThreadOutcome.OPEN: "negotiating",
    ThreadOutcome.AGREED: "agreed",
    ThreadOutcome.REJECTED: "rejected: no arrangement",
    ThreadOutcome.WITHDRAWN: "withdrawn: no arrangement",
    ThreadOutcome.EXPIRED: "expired: no arrangement",
    ThreadOutcome.PROTOCOL_ERROR: "stopped: the biller broke the protocol",
}

_PAYMENT_WORDS = {
    IntentState.CREATED: "asked the biller where to pay",
    IntentState.INSTRUCTED: "instructions received, not paid yet",
    IntentState.SENDING: "in doubt: check with the bank",
    IntentState.PAID: "paid",
    IntentState.REFUSED: "refused: the biller's instructions did not verify, so nothing was paid",
    # PAY-17: never paid, and never payable; the same pay() call started the payment again.
    IntentState.LAPSED: "lapsed unpaid: too late to pay under these instructions, so a new payment was started",
}

_APPROVAL_WORDS = {
    ApprovalState.PENDING: "waiting for your answer",
    ApprovalState.APPROVED: "approved, not sent yet",
    ApprovalState.SENT: "approved and sent",
    ApprovalState.DECLINED: "declined",
    ApprovalState.LAPSED: "lapsed",
}

ACTION_WORDS = {"open": "propose", "counter": "counter-offer", "accept": "accept the biller's offer"}


def money_text(amount: Money) -> str:
    """ "EUR 12.00"."""
    return str(amount)


def money_document(amount: Money) -> dict[str, object]:
    """Money in a JSON document: exact minor units, the currency, and the text a person reads (never a float)."""
    return {"minor": amount.minor, "currency": amount.currency.code, "text": str(amount)}


def _monthly(dates: tuple[date, ...]) -> bool:
    return all(
        (later.year * 12 + later.month) - (earlier.year * 12 + earlier.month) == 1
        for earlier, later in itertools.pairwise(dates)
    )


def describe_terms(terms: Terms) -> str:
    """Terms in plain words: "pay in full: EUR 97.00 by 2026-03-05", "3 monthly instalments of EUR 40.00,
    2026-04-01 to 2026-06-01 (fee EUR 1.50)"."""
    schedule = terms.schedule
    first = schedule[0].due_date
    if terms.kind is TermsKind.INSTALMENT_PLAN:
        amounts = {instalment.amount.minor for instalment in schedule}
        each = str(schedule[0].amount) if len(amounts) == 1 else f"about {schedule[0].amount}"
        every = "monthly " if _monthly(tuple(i.due_date for i in schedule)) else ""
        text = f"{len(schedule)} {every}instalments of {each}, {first} to {schedule[-1].due_date}"
    elif terms.kind is TermsKind.DEFERRAL:
        text = f"pay later: {terms.total} on {first}"
    elif terms.kind is TermsKind.SETTLEMENT:
        text = f"settle for {terms.total} by {first}"
    elif any(line.kind is LineKind.DISCOUNT for line in terms.lines):
        text = f"pay early: {terms.total} by {first}"
    else:
        text = f"pay in full: {terms.total} by {first}"
    extras = [f"{line.kind.name.lower().replace('_', ' ')} {line.amount}" for line in terms.lines]
    if terms.hardship_programme_id:
        extras.append(f"hardship programme {terms.hardship_programme_id}")
    return f"{text} ({', '.join(extras)})" if extras else text


def event_words(kind: int) -> str:
    return _EVENT_WORDS.get(kind, "news from the biller")


def outcome_words(outcome: ThreadOutcome | None) -> str:
    return "not opened" if outcome is None else _OUTCOME_WORDS[outcome]


def payment_words(state: IntentState, *, held: bool = True) -> str:
    """Where a payment stands; `held` False for refused instructions the household set aside."""
    if state is IntentState.REFUSED and not held:
        return "refused and set aside by you: never paid, kept as evidence; the payment is asked for anew"
    return _PAYMENT_WORDS[state]


def payment_next_step(state: IntentState, *, held: bool = True) -> str:
    """What the household can do about a payment the bot will not move on alone, or "" when there is nothing."""
    if state is IntentState.SENDING:
        return (
            "The bot handed this payment to your bank and never heard back, so it will not hand it over again. "
            "Ask your bank whether it was paid, then tell the bot what the bank said."
        )
    if state is IntentState.REFUSED and held:
        return (
            "Nothing was paid: the biller's payment instructions did not pass the bot's checks, and it will not ask "
            "again on its own. Tell the biller; once they have fixed it, let the bot ask for new instructions."
        )
    return ""


def payment_next_command(state: IntentState, intent_id: str, *, held: bool = True) -> str:
    """The command that takes `payment_next_step`, or ""."""
    if state is IntentState.SENDING:
        return f"parley consumer resolve-payment {intent_id} --paid --bank-reference REF (or --not-paid)"
    if state is IntentState.REFUSED and held:
        return f"parley consumer retry-payment {intent_id}"
    return ""


def approval_words(state: ApprovalState) -> str:
    return _APPROVAL_WORDS[state]


__all__ = [
    "ACTION_WORDS",
    "approval_words",
    "describe_terms",
    "event_words",
    "money_document",
    "money_text",
    "outcome_words",
    "payment_next_command",
    "payment_next_step",
    "payment_words",
]
