"""What is still owed under an agreed arrangement: the one reading of "paid" and "unpaid" instalments.

An arrangement's schedule (its agreed `Terms`) lists instalments by index; each settled payment
names the index it paid (PAY-3). The biller (which instalment an intent may pay, what a scheduler
reminds of), the consumer (which instalment to pay next) and an offline reader all ask this module.
Once the biller ends an arrangement (EVT-7) it sets no payment any more: what is owed is the bill's
outstanding balance (PAY-16): `outstanding_balance`, defined beside the bill's facts in `terms` and
re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.protocol.terms import Instalment, Terms, outstanding_balance
from parley.v1 import event_pb2

# EVT-7: the events by which a biller ends the arrangement their `thread_id` names: ARRANGEMENT_BROKEN, and
# RENEGOTIATION_OFFERED, which reopens the bill (NEG-3) and names the arrangement that was in force.
ENDING_EVENTS = (event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED)


def unpaid_instalments(terms: Terms, paid: Iterable[int]) -> tuple[tuple[int, Instalment], ...]:
    """(index, instalment) of each scheduled payment whose index is not in `paid`, in schedule order."""
    settled = frozenset(paid)
    return tuple((index, instalment) for index, instalment in enumerate(terms.schedule) if index not in settled)


def ended_arrangements(events: Iterable[event_pb2.Event]) -> frozenset[bytes]:
    """The thread ids of the arrangements an account's events say the biller ended (EVT-7)."""
    return frozenset(event.thread_id for event in events if event.kind in ENDING_EVENTS and event.thread_id)


__all__ = ["ENDING_EVENTS", "ended_arrangements", "outstanding_balance", "unpaid_instalments"]
