"""The account event log (PROTOCOL.md §5.2, EVT-*): signed events appended by the biller, watched by the consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from agent.biller.party import BillerParty, stored_envelope
from agent.biller.receive import log_read
from agent.protocol.errors import Reason, RemoteProtocolError
from agent.protocol.events import MAX_REMINDER_LEVEL, events_thread_id
from agent.protocol.limits import MAX_NOTE_CHARS, MAX_OPEN_STREAMS_PER_PARTY, MAX_STREAM_RECHECK_INTERVAL
from agent.protocol.terms import Money, outstanding_balance
from agent.stores.base import PendingEvent
from parley.v1 import envelope_pb2, event_pb2

_WATCH_BATCH = 100


class EventsPhase:
    def __init__(self, party: BillerParty, *, watch_poll_interval: timedelta) -> None:
        self.party = party
        self.watch_poll_interval = watch_poll_interval
        self._recheck_seconds = min(watch_poll_interval, MAX_STREAM_RECHECK_INTERVAL).total_seconds()
        self._open_streams: dict[str, int] = {}  # party -> open WatchEvents streams (LIM-14); no party, no entry

    def pending_event(
        self,
        account_id: str,
        kind: event_pb2.EventKind.ValueType,
        now: datetime,
        *,
        party_id: str | None = None,
        bill_id: str = "",
        thread_id: bytes = b"",
        amount: Money | None = None,
        day: date | None = None,
        reminder_level: int = 0,
        message: str = "",
        related_digest: bytes = b"",
    ) -> PendingEvent:
        """An event, signed by the store once its recipient and cursor position are known (EVT-1): in the log
        of the party bound to the account when it is appended, or of `party_id` (its own thread or payment,
        ENR-12)."""
        party = self.party
        log_id = events_thread_id(party.party_id, account_id)

        def seal_at(recipient: str, sequence: int, previous_digest: bytes) -> envelope_pb2.Envelope:
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

        return PendingEvent(account_id, kind, seal_at, party_id)

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
        await party.bound_consumer(account_id)  # LookupError, ValueError: no account, no log
        event = self.pending_event(
            account_id,
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
        # EVT-7: the arrangement in force is the bill's latest agreement (a renegotiation replaces the one before,
        # whose thread stays agreed): the offer names the arrangement just broken, not the first one ever agreed.
        thread_id = next((a.thread_id for a in reversed(arrangements) if a.bill_id == bill_id), b"")
        await party.bound_consumer(bill.account_id)
        received = Money.of(await party.store.received_minor(bill_id), bill.currency)
        owed = outstanding_balance(Money.of(bill.amount_minor, bill.currency), [received])  # PAY-16
        event = self.pending_event(
            bill.account_id,
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
        """EVT-3, EVT-4: check the query now, then stream the log from start_sequence and follow it live,
        for as long as the query lives and stays authorized (EVT-10), and the party holds at most
        its share of streams (LIM-14)."""
        receive = self.party.receive
        query = await receive.query(envelope, "WatchEvents")
        signer = envelope.signatures[0].keyid  # verified by `query`, as was the header
        party_id = await receive.party_of(signer)
        length = await self.party.store.event_count(query.account_id, party_id)  # the signer's own log (ENR-12)
        if query.start_sequence > length:
            raise RemoteProtocolError(
                Reason.CURSOR_OUT_OF_RANGE, f"start_sequence {query.start_sequence} is beyond the log's end {length}"
            )
        watch = Watch(
            party_id=party_id,
            keyid=signer,
            account_id=query.account_id,
            expire_time=query.header.expire_time.ToDatetime(tzinfo=UTC),
        )
        log_read("WatchEvents", query.account_id, start_sequence=query.start_sequence)
        return self.follow(watch, query.start_sequence)

    def _open_stream(self, party_id: str) -> None:
        """LIM-14: count the stream against its party, refused past MAX_OPEN_STREAMS_PER_PARTY."""
        open_streams = self._open_streams.get(party_id, 0)
        if open_streams >= MAX_OPEN_STREAMS_PER_PARTY:
            raise RemoteProtocolError(
                Reason.TOO_MANY_STREAMS, f"at most {MAX_OPEN_STREAMS_PER_PARTY} open event streams per party"
            )
        self._open_streams[party_id] = open_streams + 1

    def _close_stream(self, party_id: str) -> None:
        remaining = self._open_streams.pop(party_id, 1) - 1
        if remaining > 0:
            self._open_streams[party_id] = remaining

    async def check_watch(self, watch: Watch) -> None:
        """EVT-10: the stream's query is still authorized now, with the reason a fresh request would get:
        its signer still bound to the account (AUZ-1; a re-enrolment, ENR-11, moves the account away),
        its key still in force (KEY-10, KEY-11, KEY-14: not revoked, not dropped by a newer version, inside
        its window; the chain fresh, KEY-13), and the query still alive (EVT-10: MESSAGE_EXPIRED at its
        expire_time plus the clock skew)."""
        party = self.party
        now = party.clock.now()
        if now >= watch.expire_time + party.limits.max_clock_skew:  # EVT-10: when HDR-5 would refuse the query
            raise RemoteProtocolError(Reason.MESSAGE_EXPIRED, f"the stream's query expired at {watch.expire_time}")
        chain = await party.receive.consumer_chain(watch.party_id)  # cached by the chain's tip: one row read
        chain.check_key_at(watch.keyid, now)
        chain.check_fresh(now)
        await party.receive.authorize(watch.party_id, watch.account_id)

    async def follow(self, watch: Watch, cursor: int) -> AsyncIterator[envelope_pb2.Envelope]:
        """Stream the log from `cursor`, in order without gaps, then each new event (EVT-4); the query's
        authorization is checked again after every batch and wake-up, so at least every
        `watch_poll_interval` and never less often than MAX_STREAM_RECHECK_INTERVAL (EVT-10)."""
        party, account_id = self.party, watch.account_id
        self._open_stream(watch.party_id)  # in the generator, so that its `finally` is sure to close it
        try:
            while True:
                wakeup = party.wakeups.event(account_id)  # taken before reading, so no append is missed
                batch = await party.store.events(account_id, cursor, _WATCH_BATCH, watch.party_id)
                for record in batch:
                    yield stored_envelope(record.envelope)
                    cursor = record.sequence + 1
                if not batch:
                    # Appends by this process set the event; other processes' are found by polling, and so
                    # are re-enrolments and expiry. A key set published here wakes its party's streams.
                    changed = party.wakeups.party_event(watch.party_id)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(_first(wakeup, changed), self._recheck_seconds)
                await self.check_watch(watch)  # before reading on: the query was checked when the stream began
        finally:
            self._close_stream(watch.party_id)


@dataclass(frozen=True)
class Watch:
    """An open WatchEvents stream: who asked, with which key, for which account, until when (EVT-10)."""

    party_id: str
    keyid: str
    account_id: str
    expire_time: datetime


async def _first(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


__all__ = ["EventsPhase", "Watch"]
