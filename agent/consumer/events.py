"""Events (PROTOCOL.md §11): the account's signed log, watched from a stored cursor, resumable (EVT-5).

Each event is verified and chained before it is stored, the cursor moving in the same transaction, so
a reconnecting or restarted agent loses none and repeats none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

import grpc

from agent.consumer.errors import EventLogForked, EventLogFull
from agent.consumer.party import BillerSession, Party
from agent.consumer.receive import Receiver, envelope_of, event_facts
from agent.consumer.results import AccountEvent
from agent.consumer.sessions import Sessions
from agent.logs import log_step
from agent.protocol.errors import ProtocolError, Reason, RemoteProtocolError
from agent.protocol.events import events_thread_id
from agent.protocol.messages import Verified, check_sequence
from agent.stores.base import ConsumerStore, EventCursor, ReceivedEventRecord, StoreConflict
from agent.transport.client import RetryPolicy, is_transient
from agent.transport.status import CallError
from parley.v1 import envelope_pb2, event_pb2

logger = logging.getLogger("parley.consumer")

_WATCH_MAX_BACKOFF_STEP = 10


class _BrokenLog(Exception):
    """An event that cannot be taken (verification, gap, broken chain): reconnect from the cursor."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(str(error))
        self.error = error


def event_view(record: ReceivedEventRecord) -> AccountEvent:
    envelope = envelope_of(record.envelope)
    body = event_pb2.Event.FromString(envelope.payload)  # verified when stored
    verified = Verified(body, envelope, record.digest, envelope.signatures[0].keyid)
    return event_facts(verified, record.biller_party_id, record.account_id)


MAX_STORED_EVENTS = 100_000
"""The most events of one account's log a consumer stores by default: decades of a real account's log (a bill
brings about ten), and a bound on what a flooding biller can make us keep. Every read of the stored log reads
at most this many, so it reads the whole log."""


class EventWatch:
    """The events phase: `watch` an account's log live, or read what was taken already."""

    def __init__(
        self,
        party: Party,
        store: ConsumerStore,
        receiver: Receiver,
        sessions: Sessions,
        *,
        retry: RetryPolicy,
        failure_limit: int,
        max_stored_events: int = MAX_STORED_EVENTS,
    ) -> None:
        self._max_stored_events = max_stored_events
        self._party = party
        self._store = store
        self._receiver = receiver
        self._sessions = sessions
        self._retry = retry
        self._failure_limit = failure_limit

    async def watch(self, biller: str, account_id: str | None) -> AsyncGenerator[AccountEvent, None]:
        """See `ConsumerAgent.watch`."""
        (account,) = await self._sessions.accounts(biller, account_id, one=True)
        session = await self._sessions.get(biller)
        await self._sessions.require(session, "events")
        log_id = events_thread_id(biller, account)
        failures = 0
        while True:
            cursor = await self._store.event_cursor(biller, account)
            query = self._party.query(biller, account, start_sequence=cursor.next_sequence)
            try:
                async with contextlib.aclosing(session.client.watch_events(query)) as stream:
                    async for envelope in stream:
                        event = await self._take(session, account, log_id, envelope, cursor)
                        if event is None:
                            continue
                        cursor = EventCursor(event.sequence + 1, event.digest)
                        failures = 0
                        yield event
            except CallError as error:
                if error.code is grpc.StatusCode.CANCELLED:
                    return  # the agent was closed
                if error.reason is Reason.MESSAGE_EXPIRED:
                    # EVT-10: the stream's query's time is up, not a failure: resume from the cursor with a fresh
                    # query (after the shortest back-off, so a biller that ends every stream at once is not hammered).
                    log_step(logger, "watch-renewing", biller=biller, account=account)
                    failures = 0
                elif not is_transient(error):
                    raise
                else:
                    log_step(logger, "watch-reconnecting", biller=biller, account=account, code=error.code.name)
            except _BrokenLog as broken:
                log_step(
                    logger,
                    "watch-bad-event",
                    logging.WARNING,
                    biller=biller,
                    account=account,
                    reason=broken.error.reason.name,
                    detail=broken.error.detail,
                    resume_from=cursor.next_sequence,
                )
                if failures >= self._failure_limit:
                    raise broken.error from broken
            failures += 1
            await asyncio.sleep(self._retry.delay(min(failures, _WATCH_MAX_BACKOFF_STEP)))

    async def stored(self, biller: str, account_id: str | None, start: int) -> list[AccountEvent]:
        (account,) = await self._sessions.accounts(biller, account_id, one=True)
        records = await self._store.stored_events(biller, account, start, limit=MAX_STORED_EVENTS)
        return [event_view(record) for record in records]

    async def _take(
        self,
        session: BillerSession,
        account: str,
        log_id: bytes,
        envelope: envelope_pb2.Envelope,
        cursor: EventCursor,
    ) -> AccountEvent | None:
        """Verify one streamed event and store it with the cursor; None for a duplicate."""
        try:
            verified = await self._receiver.open_event(session, envelope, log_id)
            header = verified.header
            if header.sequence < cursor.next_sequence:
                stored = await self._store.stored_events(session.biller, account, header.sequence, 1)
                if stored and stored[0].digest != verified.digest:
                    raise EventLogForked(header.sequence, envelope_of(stored[0].envelope), envelope)
                return None
            check_sequence(header, expected_sequence=cursor.next_sequence, expected_previous=cursor.last_digest)
            if header.sequence >= self._max_stored_events:
                raise EventLogFull(session.biller, account, self._max_stored_events)
            event = event_facts(verified, session.biller, account)
        except (EventLogForked, EventLogFull):
            raise
        except RemoteProtocolError as error:
            raise _BrokenLog(error) from error
        record = ReceivedEventRecord(
            session.biller,
            account,
            event.sequence,
            envelope.SerializeToString(),
            verified.digest,
            event.kind,
            self._party.now(),
        )
        try:
            await self._store.append_event(record, previous_digest=cursor.last_digest)
        except StoreConflict as conflict:  # another watcher of this store took it first
            raise _BrokenLog(conflict) from conflict
        return event


__all__ = ["EventWatch", "event_view"]
