"""What the console reads of the biller's store: one consistent snapshot, and one thread in full.

`BillerStore` has no reads that list every account, every thread or every settled payment (the protocol
never needs them), so the snapshot is read here, in one read transaction, with the store's own
dialect-neutral SQL plumbing (`SqlBillerStore._in_read`: SQLite and PostgreSQL alike). Nothing is
written. Disclosures, enrolment codes and key material are never selected: no page can show them.

Everything is read per request and kept in memory only while the page renders: fine for a reference
biller's few thousand bills; a large biller would want these reads paginated in the store (see the report
in docs/CONSOLE.md, "Known limits").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from agent.protocol.moves import NEGOTIATION_TYPES, NegotiationPayload
from agent.protocol.terms import Currency, Money, Terms
from agent.stores.base import BillStatus, ThreadOutcome
from agent.stores.biller_sql import Db, SqlBillerStore
from agent.stores.sqlite_base import dt
from parley.v1 import bill_pb2, envelope_pb2, event_pb2, negotiation_pb2
from reference_biller.outcomes import ArrangementFact, BillFact, EventFact, PaymentFact, ThreadFact

__all__ = [
    "MANUAL_REFERENCE_PREFIX",
    "AccountRow",
    "ArrangementRow",
    "BillRow",
    "EventRow",
    "PaymentRow",
    "Snapshot",
    "ThreadRow",
    "parse_payload",
    "read_snapshot",
]

MANUAL_REFERENCE_PREFIX = "manual:"  # `parley biller settle` records its settlements under this (backoffice_cli)
_PAYLOADS: dict[str, type[NegotiationPayload]] = {cls.DESCRIPTOR.full_name: cls for cls in NEGOTIATION_TYPES}


def _money(minor: int, currency: str) -> Money:
    return Money(Currency.of(currency), minor)


def parse_payload(envelope: bytes) -> NegotiationPayload | None:
    """A stored negotiation message's payload (the store keeps only verified or self-signed messages)."""
    parsed = envelope_pb2.Envelope.FromString(envelope)
    payload_type = _PAYLOADS.get(parsed.payload_type)
    return None if payload_type is None else payload_type.FromString(parsed.payload)


def offered_terms(envelope: bytes) -> Terms | None:
    payload = parse_payload(envelope)
    if isinstance(payload, negotiation_pb2.ThreadOpen | negotiation_pb2.Offer) and payload.HasField("terms"):
        return Terms.from_proto(payload.terms)
    return None


@dataclass(frozen=True)
class AccountRow:
    account_id: str
    holder_name: str
    created_at: datetime
    enrolled: bool
    enrolment_locked: bool


@dataclass(frozen=True)
class BillRow:
    bill_id: str
    account_id: str
    amount: Money
    due_on: date
    issued_at: datetime
    status: BillStatus
    description: str

    @property
    def issued_on(self) -> date:
        return self.issued_at.astimezone(UTC).date()


@dataclass(frozen=True)
class ThreadRow:
    thread_id: bytes
    account_id: str
    bill_id: str
    outcome: ThreadOutcome
    opened_at: datetime
    deadline: datetime
    moves: int
    reject_reason: int | None  # the Reject's reason when the thread ended in one


@dataclass(frozen=True)
class ArrangementRow:
    thread_id: bytes
    account_id: str
    bill_id: str
    agreed_at: datetime
    accept_digest: bytes
    terms: Terms | None
    bill_status: BillStatus
    paid_minor: int


@dataclass(frozen=True)
class PaymentRow:
    account_id: str
    intent_id: str
    bill_id: str
    agreement_digest: bytes
    instalment_index: int
    amount: Money
    payment_reference: str
    asked_at: datetime
    settled_at: datetime | None
    by_hand: bool


@dataclass(frozen=True)
class EventRow:
    account_id: str
    sequence: int
    kind: int
    bill_id: str
    thread_id: bytes
    created_at: datetime
    amount: Money | None
    day: str
    level: int
    message: str

    @property
    def kind_name(self) -> str:
        return event_pb2.EventKind.Name(event_pb2.EventKind.ValueType(self.kind)).removeprefix("EVENT_KIND_")


@dataclass(frozen=True)
class Snapshot:
    accounts: tuple[AccountRow, ...]
    bills: tuple[BillRow, ...]
    threads: tuple[ThreadRow, ...]
    arrangements: tuple[ArrangementRow, ...]
    payments: tuple[PaymentRow, ...]
    events: tuple[EventRow, ...]

    # --- as facts for reference_biller.outcomes ---

    def bill_facts(self) -> list[BillFact]:
        return [
            BillFact(
                bill.bill_id,
                bill.account_id,
                bill.amount.minor,
                bill.amount.currency.code,
                bill.issued_on,
                bill.due_on,
                bill.status is BillStatus.PAID,
            )
            for bill in self.bills
        ]

    def thread_facts(self) -> list[ThreadFact]:
        return [
            ThreadFact(
                thread.thread_id,
                thread.bill_id,
                thread.opened_at.date(),
                thread.reject_reason == negotiation_pb2.REJECT_REASON_DISPUTED,
            )
            for thread in self.threads
        ]

    def arrangement_facts(self) -> list[ArrangementFact]:
        return [
            ArrangementFact(
                arrangement.thread_id,
                arrangement.bill_id,
                arrangement.agreed_at.astimezone(UTC).date(),
                arrangement.terms.total.minor if arrangement.terms else 0,
                arrangement.terms.hardship_programme_id if arrangement.terms else "",
            )
            for arrangement in self.arrangements
        ]

    def payment_facts(self) -> list[PaymentFact]:
        thread_of = {arrangement.accept_digest: arrangement.thread_id for arrangement in self.arrangements}
        return [
            PaymentFact(
                payment.bill_id,
                thread_of.get(payment.agreement_digest),
                payment.amount.minor,
                payment.settled_at.astimezone(UTC).date(),
                payment.by_hand,
            )
            for payment in self.payments
            if payment.settled_at is not None
        ]

    def event_facts(self) -> list[EventFact]:
        return [
            EventFact(event.kind, event.bill_id, event.thread_id, event.created_at.astimezone(UTC).date())
            for event in self.events
        ]

    def broken_on(self) -> dict[bytes, datetime]:
        """Each broken arrangement's thread and when the biller declared it broken (its ARRANGEMENT_BROKEN event)."""
        return {
            event.thread_id: event.created_at
            for event in reversed(self.events)
            if event.kind == event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN and event.thread_id
        }

    def first_day(self) -> date | None:
        days = [bill.issued_on for bill in self.bills] + [a.created_at.date() for a in self.accounts]
        return min(days) if days else None


def _description(envelope: bytes) -> str:
    bill = bill_pb2.Bill.FromString(envelope_pb2.Envelope.FromString(envelope).payload)
    return bill.description


def _event(row: tuple[Any, ...]) -> EventRow:
    account_id, sequence, kind, envelope = row
    event = event_pb2.Event.FromString(envelope_pb2.Envelope.FromString(bytes(envelope)).payload)
    return EventRow(
        account_id=account_id,
        sequence=int(sequence),
        kind=int(kind),
        bill_id=event.bill_id,
        thread_id=bytes(event.thread_id),
        created_at=event.header.create_time.ToDatetime(tzinfo=UTC),
        amount=Money.from_proto(event.amount) if event.HasField("amount") else None,
        day=event.date,
        level=event.reminder_level,
        message=event.message,
    )


def _read(db: Db) -> Snapshot:
    accounts = tuple(
        AccountRow(account_id, holder, dt(created), party is not None, bool(locked))
        for account_id, holder, created, locked, party in db.execute(
            """SELECT a.account_id, a.holder_name, a.created_at, a.enrolment_locked, b.party_id
               FROM accounts a LEFT JOIN bindings b ON b.account_id = a.account_id ORDER BY a.account_id"""
        )
    )
    bills = tuple(
        BillRow(
            bill_id,
            account_id,
            _money(int(amount), currency),
            date.fromisoformat(due),
            dt(issued),
            BillStatus(status),
            _description(bytes(envelope)),
        )
        for bill_id, account_id, amount, currency, due, status, issued, envelope in db.execute(
            """SELECT bill_id, account_id, amount_minor, currency, due_date, status, issued_at, envelope
               FROM bills ORDER BY issued_at, bill_id"""
        )
    )
    last_rejects: dict[bytes, int] = {}
    for thread_id, envelope in db.execute(
        """SELECT m.thread_id, m.envelope FROM messages m JOIN threads t ON t.thread_id = m.thread_id
           WHERE t.outcome = ? AND m.payload_type = ?""",
        (ThreadOutcome.REJECTED.value, negotiation_pb2.Reject.DESCRIPTOR.full_name),
    ):
        payload = parse_payload(bytes(envelope))
        if isinstance(payload, negotiation_pb2.Reject):
            last_rejects[bytes(thread_id)] = payload.reason
    threads = tuple(
        ThreadRow(
            bytes(thread_id),
            account_id,
            bill_id,
            ThreadOutcome(outcome),
            dt(opened),
            dt(deadline),
            int(moves),
            last_rejects.get(bytes(thread_id)),
        )
        for thread_id, account_id, bill_id, outcome, opened, deadline, moves in db.execute(
            """SELECT t.thread_id, t.account_id, t.bill_id, t.outcome, t.opened_at, t.deadline,
                      (SELECT COUNT(*) FROM messages m WHERE m.thread_id = t.thread_id)
               FROM threads t ORDER BY t.opened_at, t.thread_id"""
        )
    )
    payments = tuple(
        PaymentRow(
            account_id,
            intent_id,
            bill_id,
            bytes(agreement),
            int(index),
            _money(int(settled_minor if settled_minor is not None else amount), currency),
            reference,
            dt(created),
            None if settled is None else dt(settled),
            rail is not None and str(rail).startswith(MANUAL_REFERENCE_PREFIX),
        )
        for (
            account_id,
            intent_id,
            bill_id,
            agreement,
            index,
            amount,
            currency,
            reference,
            created,
            settled_minor,
            settled,
            rail,
        ) in db.execute(
            """SELECT p.account_id, p.intent_id, p.bill_id, p.agreement_digest, p.instalment_index, p.amount_minor,
                      p.currency, p.payment_reference, p.created_at, s.amount_minor, s.settled_at, s.rail_reference
               FROM payment_intents p
               LEFT JOIN settlements s ON s.account_id = p.account_id AND s.intent_id = p.intent_id
               ORDER BY p.created_at, p.account_id, p.intent_id"""
        )
    )
    paid_towards: dict[bytes, int] = {}
    for payment in payments:
        if payment.settled_at is not None and payment.agreement_digest:
            so_far = paid_towards.get(payment.agreement_digest, 0)
            paid_towards[payment.agreement_digest] = so_far + payment.amount.minor
    arrangements = tuple(
        ArrangementRow(
            bytes(thread_id),
            account_id,
            bill_id,
            dt(agreed),
            bytes(accept),
            offered_terms(bytes(offer)),
            BillStatus(status),
            paid_towards.get(bytes(accept), 0),
        )
        for thread_id, account_id, bill_id, agreed, accept, offer, status in db.execute(
            """SELECT t.thread_id, t.account_id, t.bill_id, t.agreed_at, t.accept_digest, m.envelope, b.status
               FROM threads t JOIN messages m ON m.digest = t.offer_digest JOIN bills b ON b.bill_id = t.bill_id
               WHERE t.outcome = ? ORDER BY t.agreed_at, t.thread_id""",
            (ThreadOutcome.AGREED.value,),
        )
    )
    events = tuple(
        _event(row)
        for row in db.execute(
            "SELECT account_id, sequence, kind, envelope FROM binding_events ORDER BY account_id, party_id, sequence"
        )
    )
    return Snapshot(accounts, bills, threads, arrangements, payments, events)


async def read_snapshot(store: SqlBillerStore) -> Snapshot:
    """Every account, bill, thread, arrangement, payment and event, from one read transaction."""
    return await store._in_read(_read)  # the console's own reads: see the module docstring
