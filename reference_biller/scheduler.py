"""The reference biller's scheduler: reminders, instalment notices and missed-instalment handling.

`tick(agent, config, now, store=...)` looks at every enrolled account and appends
the events that are due at `now` (EVT-2, EVT-6, EVT-7):

- **Reminders** for an unpaid bill that no arrangement covers and no open
  negotiation is about: a courteous one `before_due_days` before the due date
  (level 1), then after it at `after_due_days` = [courteous, firm, final]
  (levels 1, 2, 3). Levels never decrease and at most one reminder per bill is
  sent per tick, so a clock that jumps weeks still escalates in order. After a
  broken arrangement the same escalation restarts from the day it broke, for
  what is still owed.
- **INSTALMENT_DUE** `before_due_days` before each unpaid instalment of an
  active arrangement.
- **INSTALMENT_MISSED** when an instalment is still unpaid once `grace_days`
  whole days have passed after its date; then **ARRANGEMENT_BROKEN** (the rest
  of the arrangement falls due) and `offer_renegotiation`, which appends
  **RENEGOTIATION_OFFERED** and makes the bill negotiable again (NEG-3).
- The thanks, **PAYMENT_RECEIVED**, are appended by `record_settlement` itself
  with each receipt, so the scheduler never sends them.

What was already sent is read from the account's signed event log, never kept
in memory: running `tick` twice at the same `now`, or after a restart, appends
nothing twice, and a crash between two steps of the missed-instalment sequence
is finished by the next tick. Ticks of one agent are serialized in-process;
replicas sharing one store (PostgreSQL) each run the scheduler. An account's
pass first looks, reading only, whether anything is due; only then does it take
a lease in the store (`Leases`, settled by its primary key) and run again from
fresh reads, so one replica at a time reads the log and appends: the others skip
the account until their next tick, and nothing is sent twice. Only accounts with
a bill not paid yet are looked at (`BillerStore.accounts_owing`, one query).

Dates are UTC calendar dates of `now`. Money that reached the rail but is not
settled yet (`rail.pending_intents`) holds off reminders and missed-instalment
handling for what it pays.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from agent.biller import Arrangement, BillerAgent
from agent.protocol.limits import MAX_NOTE_CHARS
from agent.protocol.terms import Money, format_date, outstanding_balance, parse_date, shift_days
from agent.stores.base import BillerStore, BillRecord, BillStatus
from agent.stores.biller_sql import Leases
from parley.v1 import bill_pb2, envelope_pb2, event_pb2
from reference_biller.config import BillerConfig
from reference_biller.rail import SimulatedRail

logger = logging.getLogger("parley.reference_biller.scheduler")

REMINDER = event_pb2.EVENT_KIND_REMINDER
INSTALMENT_DUE = event_pb2.EVENT_KIND_INSTALMENT_DUE
INSTALMENT_MISSED = event_pb2.EVENT_KIND_INSTALMENT_MISSED
ARRANGEMENT_BROKEN = event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN
RENEGOTIATION_OFFERED = event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED

_LOG_BATCH = 500
PASS_LEASE = timedelta(minutes=5)  # a replica that dies mid-pass holds the account this long at most
_locks: weakref.WeakKeyDictionary[BillerAgent, asyncio.Lock] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LoggedEvent:
    """What the scheduler needs of one event of the account's log."""

    sequence: int
    kind: int
    bill_id: str
    thread_id: bytes
    day: date | None
    level: int
    amount: Money | None
    created: datetime


class EventLog:
    """An account's event log, parsed (the biller signed it, so it parses)."""

    def __init__(self, events: Sequence[LoggedEvent]) -> None:
        self.events = tuple(events)

    @classmethod
    async def read(cls, store: BillerStore, account_id: str) -> EventLog:
        events: list[LoggedEvent] = []
        batch = await store.events(account_id, 0, _LOG_BATCH)
        while batch:
            for record in batch:
                event = event_pb2.Event.FromString(envelope_pb2.Envelope.FromString(record.envelope).payload)
                events.append(
                    LoggedEvent(
                        sequence=record.sequence,
                        kind=event.kind,
                        bill_id=event.bill_id,
                        thread_id=event.thread_id,
                        day=parse_date(event.date) if event.date else None,
                        level=event.reminder_level,
                        amount=Money.from_proto(event.amount) if event.HasField("amount") else None,
                        created=event.header.create_time.ToDatetime(tzinfo=UTC),
                    )
                )
            # A short batch is the log's end: no read to find it empty.
            batch = await store.events(account_id, len(events), _LOG_BATCH) if len(batch) == _LOG_BATCH else []
        return cls(events)

    def find(
        self, kind: int, bill_id: str, *, thread_id: bytes | None = None, day: date | None = None, after: int = -1
    ) -> list[LoggedEvent]:
        """Events of `kind` about the bill (and thread, and date, when given) after sequence `after`."""
        return [
            e
            for e in self.events
            if e.kind == kind
            and e.bill_id == bill_id
            and e.sequence > after
            and (thread_id is None or e.thread_id == thread_id)
            and (day is None or e.day == day)
        ]


@dataclass(frozen=True)
class _Stage:
    """One step of a bill's reminder escalation."""

    index: int  # 0 before the date, then 1..3 after it
    level: int
    trigger: date


async def tick(
    agent: BillerAgent,
    config: BillerConfig,
    now: datetime,
    *,
    store: BillerStore,
    rail: SimulatedRail | None = None,
    accounts: Iterable[str] | None = None,
) -> list[envelope_pb2.Envelope]:
    """Append every event due at `now` on `accounts` (default: every account of the store that owes
    something); returns them in order.

    `store` is the agent's store (read-only here: every write goes through the
    agent). Accounts not enrolled yet are skipped (events go to the bound consumer), and so are accounts
    whose bills are all paid (`store.accounts_owing`): nothing about them can fall due.
    A failure on one account is logged and does not stop the others.
    """
    lock = _locks.setdefault(agent, asyncio.Lock())
    async with lock:
        # One read finds the accounts with something to follow; the rest cost nothing (no lease, no log read):
        # on PostgreSQL each skipped account saved ten round trips. A round grows with what is owed, never
        # with every account the biller has.
        owing = await store.accounts_owing()
        if accounts is None:
            ids = list(owing)
        else:
            owes = set(owing)
            ids = [account_id for account_id in dict.fromkeys(accounts) if account_id in owes]
        emitted: list[envelope_pb2.Envelope] = []
        for account_id in ids:
            try:
                emitted += await _leased_pass(
                    _AccountTick(agent, store=store, config=config, rail=rail, account_id=account_id, now=now)
                )
            except Exception:
                logger.exception("scheduler tick failed on account %s", account_id)
            # The round runs on the worker's event loop between RPCs, and on SQLite an account that has nothing
            # due is read without ever suspending (reads run on the loop): without this, every request waited
            # for the whole round (0.6 s at 2,000 owing accounts, measured), now for one account's look.
            await asyncio.sleep(0)
        return emitted


async def _leased_pass(account: _AccountTick) -> list[envelope_pb2.Envelope]:
    """Run the account's pass while holding its lease; nothing if another process holds it.

    Most passes find nothing due (a reminder falls due on one day of a week), so a pass first looks
    without the lease, which costs two durable writes (claim, release): only when something is due is
    the lease taken and the pass run again from fresh reads, as another replica may have appended
    meanwhile.
    """
    store = account.store
    if not isinstance(store, Leases):  # a store only one process uses
        return await account.run()
    if not await account.finds_something_due():
        return []
    name, holder = f"scheduler:{account.account_id}", secrets.token_hex(16)
    if not await store.claim_lease(name, holder, account.now, account.now + PASS_LEASE):
        logger.info("scheduler: account %s is being handled by another process", account.account_id)
        return []
    try:
        return await account.run()
    finally:
        await store.release_lease(name, holder)


class _SomethingDue(Exception):
    """A looking pass (`_AccountTick.finds_something_due`) reached an event it would append."""


class _AccountTick:
    """One account's pass of a tick."""

    def __init__(
        self,
        agent: BillerAgent,
        *,
        store: BillerStore,
        config: BillerConfig,
        rail: SimulatedRail | None,
        account_id: str,
        now: datetime,
    ) -> None:
        self.agent, self.store, self.rail = agent, store, rail
        self.reminders = config.reminders
        self.account_id = account_id
        self.today = now.date()
        self.now = now
        self.emitted: list[envelope_pb2.Envelope] = []
        self.log = EventLog(())
        self.in_flight: set[tuple[str, bytes, int]] = set()  # (bill, agreement digest, instalment index)
        self.looking = False  # True: stop at the first event due instead of appending it

    async def finds_something_due(self) -> bool:
        """The pass, reading only: would it append anything now?"""
        try:
            await self.run(looking=True)
        except _SomethingDue:
            return True
        return False

    async def run(self, *, looking: bool = False) -> list[envelope_pb2.Envelope]:
        self.looking, self.emitted, self.in_flight = looking, [], set()
        account = await self.agent.account(self.account_id)
        if account is None or account.consumer_party_id is None:
            return []
        self.log = await EventLog.read(self.store, self.account_id)
        await self._read_in_flight()
        for arrangement in await self.agent.arrangements(self.account_id, active_only=False):
            if arrangement.active:
                await self._follow(arrangement)
        if self.emitted:  # a broken arrangement reopens its bill: see the log and bills as they are now
            self.log = await EventLog.read(self.store, self.account_id)
        open_threads = set(await self.store.open_thread_bills(self.account_id, self.now))
        for bill in await self.store.list_bills(self.account_id):
            if bill.status is BillStatus.OPEN and bill.bill_id not in open_threads:
                await self._remind(bill)
        return self.emitted

    async def _read_in_flight(self) -> None:
        if self.rail is None:
            return
        for intent_id in self.rail.pending_intents(self.account_id):
            intent = await self.store.get_payment_intent(self.account_id, intent_id)
            if intent is not None:
                self.in_flight.add((intent.bill_id, intent.agreement_digest, intent.instalment_index))

    async def _emit(
        self,
        kind: event_pb2.EventKind.ValueType,
        bill_id: str,
        message: str,
        *,
        amount: Money,
        thread_id: bytes = b"",
        day: date | None = None,
        reminder_level: int = 0,
        related_digest: bytes = b"",
    ) -> None:
        if self.looking:
            raise _SomethingDue
        envelope = await self.agent.emit_event(
            self.account_id,
            kind,
            bill_id=bill_id,
            thread_id=thread_id,
            amount=amount,
            day=day,
            reminder_level=reminder_level,
            message=message[:MAX_NOTE_CHARS],
            related_digest=related_digest,
        )
        self.emitted.append(envelope)
        logger.info("event %s account=%s bill=%s", event_pb2.EventKind.Name(kind), self.account_id, bill_id)

    # --- Arrangements (EVT-7) ---------------------------------------------------------------------------

    async def _follow(self, arrangement: Arrangement) -> None:
        bill_id, thread_id = arrangement.bill_id, arrangement.thread_id
        log = self.log
        broken = log.find(ARRANGEMENT_BROKEN, bill_id, thread_id=thread_id)
        if broken:  # ended earlier: only the renegotiation offer may still be missing (a crash between steps)
            await self._offer_renegotiation(arrangement, broken[0].sequence)
            return
        schedule = arrangement.terms.schedule
        count = len(schedule)
        paid = arrangement.paid_instalments | {
            index
            for (bill, agreement, index) in self.in_flight
            if (bill, agreement) == (bill_id, arrangement.agreement_digest)
        }
        # Day counts compared as differences of dates: no sum of a date and a period, so no date overflows.
        notice_days, grace_days = self.reminders.before_due_days, self.reminders.grace_days

        async def notify(kind: event_pb2.EventKind.ValueType, amount: Money, text: str, day: date | None) -> None:
            await self._emit(
                kind,
                bill_id,
                text,
                amount=amount,
                day=day,
                thread_id=thread_id,
                related_digest=arrangement.agreement_digest,
            )

        for index, instalment in enumerate(schedule):
            if index in paid:
                continue
            due, amount, number = instalment.due_date, instalment.amount, f"{index + 1} of {count}"
            if (self.today - due).days > grace_days:
                if not log.find(INSTALMENT_MISSED, bill_id, thread_id=thread_id, day=due):
                    text = (
                        f"We have not received instalment {number} of your plan ({amount}, due {format_date(due)}). "
                        "If something has changed, tell us: we can find a new plan together."
                    )
                    await notify(INSTALMENT_MISSED, amount, text, due)
                # PAY-16: a broken plan's fees and reductions lapse; the outstanding balance is owed — the bill's
                # amount due less everything received for it (a renegotiated plan's principal already left out
                # what was received before it, so it is no base to subtract from).
                bill = await self.store.get_bill(bill_id)
                assert bill is not None, "an arrangement's bill is stored"
                received = Money.of(await self.store.received_minor(bill_id), bill.currency)
                owed = outstanding_balance(Money.of(bill.amount_minor, bill.currency), [received])
                text = f"As instalment {number} was missed, your plan has ended and the remaining {owed} is now due."
                await notify(ARRANGEMENT_BROKEN, owed, text, None)
                await self._offer_renegotiation(arrangement, None)
                return
            if 0 <= (due - self.today).days <= notice_days and not log.find(
                INSTALMENT_DUE, bill_id, thread_id=thread_id, day=due
            ):
                text = (
                    f"A reminder that instalment {number} of your plan, {amount}, is due on {format_date(due)}. "
                    "Thank you for keeping to it."
                )
                await notify(INSTALMENT_DUE, amount, text, due)

    async def _offer_renegotiation(self, arrangement: Arrangement, broken_at: int | None) -> None:
        """RENEGOTIATION_OFFERED for the bill, unless the log has one after the break at `broken_at`.

        `broken_at` is None when the break was appended in this very pass.
        """
        if broken_at is not None and self.log.find(RENEGOTIATION_OFFERED, arrangement.bill_id, after=broken_at):
            return
        if self.looking:
            raise _SomethingDue
        try:
            envelope = await self.agent.offer_renegotiation(
                arrangement.bill_id,
                message="We would like to help you get back on track: propose a new payment plan for this bill "
                "in your app and we will answer straight away.",
            )
        except LookupError as gone:  # paid or reopened meanwhile
            logger.info("no renegotiation offered on bill %s: %s", arrangement.bill_id, gone)
            return
        self.emitted.append(envelope)
        logger.info("event RENEGOTIATION_OFFERED account=%s bill=%s", self.account_id, arrangement.bill_id)

    # --- Reminders (EVT-6) ------------------------------------------------------------------------------

    async def _remind(self, bill: BillRecord) -> None:
        if (bill.bill_id, b"", 0) in self.in_flight:
            return  # paid; the money is on its way
        broken = self.log.find(ARRANGEMENT_BROKEN, bill.bill_id)
        description = bill_pb2.Bill.FromString(envelope_pb2.Envelope.FromString(bill.envelope).payload).description
        if broken and broken[-1].amount is not None:
            anchor, owed = broken[-1].created.date(), broken[-1].amount
            what = f"the remaining {owed} of {description}"
        else:
            anchor, owed = bill.due_date, Money.of(bill.amount_minor, bill.currency)
            what = f"{description} for {owed}"
        stage = self._next_stage(bill.bill_id, anchor)
        if stage is None:
            return
        since = (self.today - anchor).days
        texts = (
            f"A friendly reminder: {what} is due on {format_date(anchor)}. You can pay it, or ask for more time "
            "or a payment plan, in your app.",
            f"Our records show {what}, due on {format_date(anchor)}, is still open. If you have already paid, "
            "thank you; if you need more time, you can ask for it in your app.",
            f"{what[0].upper()}{what[1:]} is now {since} days overdue. Please pay it, or agree a payment plan in "
            "your app, as soon as you can.",
            f"Final reminder: {what} has been overdue since {format_date(anchor)}. Please pay it or agree a plan "
            "with us in the next few days, so that we do not have to take further steps.",
        )
        await self._emit(
            REMINDER, bill.bill_id, texts[stage.index], amount=owed, day=anchor, reminder_level=stage.level
        )

    def _next_stage(self, bill_id: str, anchor: date) -> _Stage | None:
        """The next step of the escalation about `anchor`, if its day has come (one step per tick)."""
        config = self.reminders
        stages = [_Stage(0, 1, shift_days(anchor, -config.before_due_days))] if config.before_due_days else []
        stages += [_Stage(i + 1, i + 1, shift_days(anchor, days)) for i, days in enumerate(config.after_due_days)]
        sent = [
            (e.level if e.level > 1 or e.created.date() >= anchor else 0)
            for e in self.log.find(REMINDER, bill_id, day=anchor)
        ]
        done = max(sent, default=-1)
        for stage in stages:
            if stage.index <= done:
                continue
            if stage.index == 0 and self.today >= anchor:
                continue  # too late for the reminder before the date
            return stage if self.today >= stage.trigger else None
        return None


__all__ = ["EventLog", "LoggedEvent", "tick"]
