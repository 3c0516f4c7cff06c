"""Two biller replicas on one PostgreSQL database: races settled by the database, never by a process.

Two `parley biller serve --store postgresql://...` processes share the database
and the identity (one state directory holding the signing key); a scripted,
signed consumer (agent/conformance) sends the same or competing requests to both
at once. Each race runs several times. After each, the database is read directly:
exactly one outcome stored, no payment twice, and the account's event log gapless
and chained.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from agent.conformance.biller.target import (
    AMOUNT_DUE,
    DEFERRAL_FEE,
    BillerTarget,
    Customer,
    IssuedBill,
    agreed_thread,
    connect,
    countered_thread,
    get_receipt,
    money,
    negotiate,
    pay,
    thread_id_of,
)
from agent.conformance.client import Refusal
from agent.protocol.dsse import digest
from agent.stores import BillStatus, open_biller_store
from agent.stores.biller_sql import SqlBillerStore
from agent.tools.pg_server import ThrowawayPostgres
from parley.v1 import biller_service_pb2, envelope_pb2, event_pb2, negotiation_pb2

START_TIMEOUT = 30.0
ROUNDS = 4
STREAM_WAIT = 15.0  # > the agent's watch_poll_interval (5 s): how late another process's event may come
AGREED = negotiation_pb2.NEGOTIATION_OUTCOME_AGREED
WITHDRAWN = negotiation_pb2.NEGOTIATION_OUTCOME_WITHDRAWN
CONFIGURED_ACCOUNT = "acct-1001"  # reference_biller/sample.toml: ticked by both replicas' schedulers


@dataclass(frozen=True)
class Replicas:
    targets: tuple[str, str]
    dsn: str
    state_dir: Path  # the identity both serve with


def _stdout_lines(stream: IO[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@contextmanager
def _replica(dsn: str, state_dir: Path, log: Path) -> Iterator[str]:
    """A `parley biller serve` process on the shared store, until the block ends (SIGTERM, then kill)."""
    command = [sys.executable, "-m", "agent.cli", "biller", "serve", "--insecure", "--conformance-control"]
    command += ["--listen", "127.0.0.1:0", "--state-dir", str(state_dir), "--store", dsn]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert process.stdout is not None
        lines = _stdout_lines(process.stdout)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                name, _, value = lines.get(timeout=0.2).partition(" ")
            except queue.Empty:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the replica did not start: {log.read_text()}") from None
                continue
            if name == "listening":
                yield value.split()[0]
                break
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def replicas(postgres_server: ThrowawayPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two replicas on a new database; the first creates the identity, then the second shares it."""
    dsn = postgres_server.create_database("replicas")
    root = tmp_path_factory.mktemp("replicas")
    with ExitStack() as stack:
        first = stack.enter_context(_replica(dsn, root / "state", root / "replica-a.log"))
        second = stack.enter_context(_replica(dsn, root / "state", root / "replica-b.log"))
        yield Replicas((first, second), dsn, root / "state")


@asynccontextmanager
async def both(replicas: Replicas) -> AsyncIterator[tuple[BillerTarget, BillerTarget, SqlBillerStore]]:
    """Conformance connections to the two replicas, and the shared store read directly."""
    store = await open_biller_store(replicas.dsn)
    try:
        async with (
            connect(replicas.targets[0], insecure=True) as first,
            connect(replicas.targets[1], insecure=True) as second,
        ):
            yield first, second, store
    finally:
        await store.close()


async def logged_events(store: SqlBillerStore, account_id: str) -> list[event_pb2.Event]:
    """The account's event log, checked gapless and chained (EVT-1) as stored."""
    records = await store.events(account_id, 0, 10_000)
    events, previous = [], b""
    for position, record in enumerate(records):
        envelope = envelope_pb2.Envelope.FromString(record.envelope)
        event = event_pb2.Event.FromString(envelope.payload)
        assert (record.sequence, event.header.sequence) == (position, position)
        assert event.header.previous_digest == previous
        assert digest(envelope) == record.digest
        previous = record.digest
        events.append(event)
    return events


def stored_answer_or_refusal(answers: list[object], *reasons: str) -> list[object]:
    """The successful answers; every other answer is a refusal with one of `reasons`."""
    for answer in answers:
        if isinstance(answer, Refusal):
            assert answer.reason in reasons, answer.describe()
    return [answer for answer in answers if not isinstance(answer, Refusal)]


async def countered(
    replica: BillerTarget, customer: Customer
) -> tuple[IssuedBill, list[envelope_pb2.Envelope], envelope_pb2.Envelope]:
    """A new bill, a thread on it the biller countered, and the customer's Accept of the counter (not sent)."""
    bill = await replica.issue_bill(customer)
    thread = await countered_thread(replica, customer, bill)
    return bill, thread, customer.party.move(thread, negotiation_pb2.Accept(offer_digest=digest(thread[1])))


def test_racing_accepts_of_one_offer_agree_once(replicas: Replicas) -> None:
    async def race() -> None:
        async with both(replicas) as (first, second, store):
            customer = await first.enrolled()
            for _ in range(ROUNDS):
                bill, thread, accept = await countered(first, customer)
                answers = await asyncio.gather(negotiate(first, accept), negotiate(second, accept))
                # The loser answers as for a retry (the stored answer), or names the conflict.
                agreed = stored_answer_or_refusal(list(answers), "REPLAYED_MESSAGE", "SEQUENCE_MISMATCH")
                assert agreed
                assert all(answer.outcome == AGREED for answer in agreed)  # type: ignore[attr-defined]
                stored = await store.get_thread(thread_id_of(thread[0]))
                assert stored is not None
                assert [m.envelope for m in stored.messages] == [m.SerializeToString() for m in (*thread, accept)]
                arrangements = await store.arrangements(customer.account_id, active_only=True)
                assert [a.bill_id for a in arrangements].count(bill.bill_id) == 1
            await logged_events(store, customer.account_id)

    asyncio.run(race())


def test_competing_moves_at_one_position_one_wins(replicas: Replicas) -> None:
    async def race() -> None:
        async with both(replicas) as (first, second, store):
            customer = await first.enrolled()
            for _ in range(ROUNDS):
                _, thread, accept = await countered(first, customer)
                withdraw = customer.party.move(thread, negotiation_pb2.Withdraw())
                answers = await asyncio.gather(negotiate(first, accept), negotiate(second, withdraw))
                won = stored_answer_or_refusal(list(answers), "SEQUENCE_MISMATCH", "THREAD_CLOSED")
                assert len(won) == 1
                stored = await store.get_thread(thread_id_of(thread[0]))
                assert stored is not None
                assert len(stored.messages) == 3
                winner = stored.messages[2].envelope
                assert won[0].outcome == (AGREED if winner == accept.SerializeToString() else WITHDRAWN)  # type: ignore[attr-defined]
            await logged_events(store, customer.account_id)

    asyncio.run(race())


def test_one_payment_intent_sent_to_both_replicas_is_paid_once(replicas: Replicas) -> None:
    async def race() -> None:
        async with both(replicas) as (first, second, store):
            customer = await first.enrolled()
            for round_number in range(ROUNDS):
                bill = await first.issue_bill(customer)
                thread = await agreed_thread(first, customer, bill)
                intent_id = f"replica-race-{round_number}"
                intent = customer.party.intent(
                    customer.account_id,
                    bill.bill_id,
                    intent_id,
                    money(AMOUNT_DUE + DEFERRAL_FEE),
                    agreement_digest=digest(thread[1]),
                )
                answers = await asyncio.gather(pay(first, intent), pay(second, intent))
                instructed = stored_answer_or_refusal(list(answers), "IDEMPOTENCY_CONFLICT", "REPLAYED_MESSAGE")
                stored = await store.get_payment_intent(customer.account_id, intent_id)
                assert stored is not None
                for answer in instructed:  # one set of instructions, whoever answered
                    assert answer.instructions.SerializeToString() == stored.instructions  # type: ignore[attr-defined]
                # Each replica's simulated rail settles what it instructed; the store keeps one settlement
                # (a replica may count the stored one again when its rail's transfer id happens to match).
                settled = await asyncio.gather(first.conn.settle_payments(), second.conn.settle_payments())
                assert sum(answer.settled_count for answer in settled) >= 1
                settlement = await store.get_settlement(customer.account_id, intent_id)
                assert settlement is not None
                for replica in (first, second):  # one receipt, whichever replica is asked
                    query = customer.party.query(customer.account_id, intent_id=intent_id)
                    fetched = await get_receipt(replica, query)
                    assert fetched.receipt.SerializeToString() == settlement.receipt
                paid = await store.get_bill(bill.bill_id)
                assert paid is not None
                assert paid.status is BillStatus.PAID
            events = await logged_events(store, customer.account_id)
            thanks = Counter(e.bill_id for e in events if e.kind == event_pb2.EVENT_KIND_PAYMENT_RECEIVED)
            assert len(thanks) == ROUNDS
            assert set(thanks.values()) == {1}

    asyncio.run(race())


def test_an_event_one_replica_appends_reaches_a_stream_held_by_the_other(replicas: Replicas) -> None:
    async def watch() -> None:
        async with both(replicas) as (first, second, _):
            customer = await first.enrolled()
            query = customer.party.query(customer.account_id, start_sequence=0)
            async with first.conn.watch(query) as stream:
                await first.issue_bill(customer)
                caught_up = await stream.next(timeout=STREAM_WAIT)  # the stream now waits for the next event
                bill = await second.issue_bill(customer)  # appended by the other process
                received = await stream.next(timeout=STREAM_WAIT)
            assert isinstance(caught_up, envelope_pb2.Envelope), caught_up
            assert isinstance(received, envelope_pb2.Envelope), received
            event = first.verify(received, (event_pb2.Event,), customer, live=False, what="the event").message
            assert (event.kind, event.bill_id) == (event_pb2.EVENT_KIND_BILL_ISSUED, bill.bill_id)  # type: ignore[attr-defined]
            assert event.header.previous_digest == digest(caught_up)  # type: ignore[attr-defined]

    asyncio.run(watch())


def test_both_schedulers_ticking_at_once_send_each_reminder_once(replicas: Replicas) -> None:
    command = [sys.executable, "-m", "agent.cli", "biller", "codes", "--json"]
    command += ["--store", replicas.dsn, "--state-dir", str(replicas.state_dir)]
    codes = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
    )
    code = next(a["code"] for a in json.loads(codes.stdout)["accounts"] if a["account_id"] == CONFIGURED_ACCOUNT)

    async def race() -> None:
        async with both(replicas) as (first, second, store):
            party = first.new_party()
            enrolment = party.enrolment(CONFIGURED_ACCOUNT, code)
            answer = await first.conn.call("Enrol", biller_service_pb2.EnrolRequest(request=enrolment))
            assert not isinstance(answer, Refusal), answer.describe()
            # Day by day through the month's bill, its due date and the escalation after it: every
            # advance runs both replicas' upkeep (billing, scheduler) at the same moment.
            for _ in range(40):
                await asyncio.gather(first.advance_clock(86_400), second.advance_clock(86_400))
            events = await logged_events(store, CONFIGURED_ACCOUNT)
        # A reminder's stage: level 1 comes twice, before the due date and the day after it.
        reminders = Counter(
            (e.bill_id, e.date, e.reminder_level, e.header.create_time.ToDatetime().date().isoformat() < e.date)
            for e in events
            if e.kind == event_pb2.EVENT_KIND_REMINDER
        )
        assert len(reminders) >= 4  # before the due date, then courteous, firm and final, for one bill at least
        assert set(reminders.values()) == {1}, reminders
        issued = Counter(e.bill_id for e in events if e.kind == event_pb2.EVENT_KIND_BILL_ISSUED)
        assert issued
        assert set(issued.values()) == {1}

    asyncio.run(race())


def test_the_biller_conformance_suite_passes_on_a_third_replica(replicas: Replicas, tmp_path: Path) -> None:
    # A replica of its own: the suite moves its biller's clock, which the other tests share.
    # Every AdvanceClock runs the biller's upkeep over every account that still owes a bill, and the
    # suite's own earlier cases have made dozens: LIM-15/chain-full advances the clock 25 times and takes
    # 8.3 s here on PostgreSQL (1.9 s when run alone; 28.9 s before the upkeep skipped paid-up accounts),
    # so cases get 90 s, a margin for a loaded CI machine, and the run 300.
    with _replica(replicas.dsn, replicas.state_dir, tmp_path / "replica-c.log") as third:
        suite_command = ["conformance", "biller", "--target", third, "--insecure", "--timeout", "90"]
        suite = subprocess.run(
            [sys.executable, "-m", "agent.cli", *suite_command],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert suite.returncode == 0, suite.stdout[-3000:]
    assert " 0 FAIL" in suite.stdout
