"""The account event log (PROTOCOL.md §5.2, EVT-*): signed events appended by the biller, watched by the consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta

from agent.biller.party import BillerParty, stored_envelope
from agent.biller.receive import log_read
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.events import MAX_REMINDER_LEVEL, events_thread_id
from agent.protocol.limits import MAX_NOTE_CHARS
from agent.protocol.terms import Money
from agent.stores.base import PendingEvent
from parley.v1 import envelope_pb2, event_pb2

_WATCH_BATCH = 100


class EventsPhase:
    def __init__(self, party: BillerParty, *, watch_poll_interval: timedelta) -> None:
        self.party = party
        self.watch_poll_interval = watch_poll_interval

    def pending_event(
        self,
        account_id: str,
        recipient: str,
        kind: event_pb2.EventKind.ValueType,
        now: datetime,
        *,
        bill_id: str = "",
        thread_id: bytes = b"",
        amount: Money | None = None,
        day: date | None = None,
        reminder_level: int = 0,
        message: str = "",
        related_digest: bytes = b"",
    ) -> PendingEvent:
        """An event, signed by the store once its cursor position is known (EVT-1)."""
        party = self.party
        log_id = events_thread_id(party.party_id, account_id)

        def seal_at(sequence: int, previous_digest: bytes) -> envelope_pb2.Envelope:
            event = event_pb2.Event(
                header=party.header(recipient, log_id, sequence, previous_digest, now),
                account_id=account_id,
                kind=kind,
                bill_id=bill_id,
                thread_id=thread_id,
                amount=None if amount is None else amount.to_proto(),
                date="" if day is None else day.isoformat(),
                reminder_level=reminder_level,
                message=message,
                related_digest=related_digest,
            )
            return party.seal(event)

        return PendingEvent(account_id, kind, seal_at)

    async def emit_event(
        self,
        account_id: str,
        kind: event_pb2.EventKind.ValueType,
        *,
        bill_id: str = "",
        thread_id: bytes = b"",
        amount: Money | None = None,
        day: date | None = None,
        reminder_level: int = 0,
        message: str = "",
        related_digest: bytes = b"",
    ) -> envelope_pb2.Envelope:
        """See `BillerAgent.emit_event`."""
        if kind not in event_pb2.EventKind.values() or kind == event_pb2.EVENT_KIND_UNSPECIFIED:
            raise ValueError(f"event kind {kind} is not defined")
        if kind == event_pb2.EVENT_KIND_REMINDER:
            if not 1 <= reminder_level <= MAX_REMINDER_LEVEL:
                raise ValueError(f"a reminder has a reminder_level from 1 to {MAX_REMINDER_LEVEL}")
        elif reminder_level:
            raise ValueError("only a reminder has a reminder_level")
        if len(message) > MAX_NOTE_CHARS:
            raise ValueError(f"message is longer than {MAX_NOTE_CHARS} characters")
        party = self.party
        recipient = await party.bound_consumer(account_id)
        event = self.pending_event(
            account_id,
            recipient,
            kind,
            party.clock.now(),
            bill_id=bill_id,
            thread_id=thread_id,
            amount=amount,
            day=day,
            reminder_level=reminder_level,
            message=message,
            related_digest=related_digest,
        )
        records = await party.store.append_events([event])
        party.wakeups.notify(records)
        return stored_envelope(records[0].envelope)

    async def offer_renegotiation(self, bill_id: str, *, message: str = "") -> envelope_pb2.Envelope:
        """See `BillerAgent.offer_renegotiation`."""
        party = self.party
        bill = await party.store.get_bill(bill_id)
        if bill is None:
            raise LookupError(f"no bill {bill_id!r}")
        arrangements = await party.store.arrangements(bill.account_id, active_only=True)
        thread_id = next((a.thread_id for a in arrangements if a.bill_id == bill_id), b"")
        recipient = await party.bound_consumer(bill.account_id)
        owed = Money.of(bill.amount_minor - await party.store.received_minor(bill_id), bill.currency)  # PAY-16
        event = self.pending_event(
            bill.account_id,
            recipient,
            event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED,
            party.clock.now(),
            bill_id=bill_id,
            thread_id=thread_id,
            amount=owed,
            message=message[:MAX_NOTE_CHARS],
        )
        records = await party.store.reopen_bill(bill_id, [event])
        party.wakeups.notify(records)
        return stored_envelope(records[0].envelope)

    async def watch_events(self, envelope: envelope_pb2.Envelope) -> AsyncIterator[envelope_pb2.Envelope]:
        """EVT-3, EVT-4: check the query now, then stream the log from start_sequence and follow it live."""
        query = await self.party.receive.query(envelope, "WatchEvents")
        length = await self.party.store.event_count(query.account_id)
        if query.start_sequence > length:
            raise RemoteProtocolError(
                Reason.CURSOR_OUT_OF_RANGE, f"start_sequence {query.start_sequence} is beyond the log's end {length}"
            )
        log_read("WatchEvents", query.account_id, start_sequence=query.start_sequence)
        return self.follow(query.account_id, query.start_sequence)

    async def follow(self, account_id: str, cursor: int) -> AsyncIterator[envelope_pb2.Envelope]:
        """Stream the log from `cursor`, in order without gaps, then each new event (EVT-4)."""
        party = self.party
        while True:
            wakeup = party.wakeups.event(account_id)  # taken before reading, so no append is missed
            batch = await party.store.events(account_id, cursor, _WATCH_BATCH)
            for record in batch:
                yield stored_envelope(record.envelope)
                cursor = record.sequence + 1
            if not batch:
                # Appends by this process set the event; other processes' are found by polling.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), self.watch_poll_interval.total_seconds())


__all__ = ["EventsPhase"]
