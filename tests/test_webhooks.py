"""Outbound webhooks (reference_biller/webhooks.py): a real local receiver that goes down and comes back."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from aiohttp import web

from agent.cli import main
from agent.clock import ManualClock
from agent.protocol.terms import Money
from agent.stores.base import WebhookCursor
from agent.stores.biller_postgres import PostgresBillerStore
from agent.stores.biller_sqlite import SqliteBillerStore
from agent.stores.sqlite_base import ts
from parley.v1 import envelope_pb2, event_pb2
from reference_biller.config import SAMPLE, Webhook, load_config
from reference_biller.service import Biller, open_biller, serving_biller
from reference_biller.webhooks import (
    BACKOFF_CAP,
    BACKOFF_FIRST,
    EVENT_TYPES,
    GIVE_UP_AFTER,
    MAX_ATTEMPTS,
    SIGNATURE_HEADER,
    Endpoint,
    WebhookDispatcher,
    backoff,
    sign,
    verify_signature,
)
from tests.helpers.peer import Consumer

OLD_SECRET = b"old-secret-of-at-least-16-bytes"
NEW_SECRET = b"new-secret-of-at-least-16-bytes"
START = datetime(2026, 12, 1, 9, tzinfo=UTC)
T = TypeVar("T")


@dataclass
class Receiver:
    """A billing system's webhook endpoint on 127.0.0.1: records what it accepted, checked with OLD_SECRET."""

    status: int = 200
    accepted: list[dict[str, object]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    signatures: list[str] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.signatures.append(request.headers[SIGNATURE_HEADER])
        if not verify_signature(request.headers[SIGNATURE_HEADER], body, OLD_SECRET, datetime.now(UTC)):
            return web.Response(status=401)
        if self.status == 200:
            self.accepted.append(json.loads(body))
            self.keys.append(request.headers["Idempotency-Key"])
        return web.Response(status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.port or site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    running = Receiver()
    await running.start()
    try:
        yield running
    finally:
        if running.runner is not None:
            await running.runner.cleanup()


async def biller_with_outcomes(tmp_path: Path, clock: ManualClock) -> Biller:
    """A biller whose account "w-1" has a bill paid (PAYMENT_RECEIVED) and, emitted as a scheduler would, an
    arrangement broken and renegotiation offered."""
    biller = await open_biller(load_config(SAMPLE), tmp_path / "state", clock)
    agent = biller.agent
    await agent.create_account("w-1", "A. Holder")
    consumer = Consumer("consumer:w-1", ManualClock(clock.now()))
    await agent.enrol(consumer.enrolment("w-1", await agent.issue_enrolment_code("w-1")))
    amount = Money.parse("42.50", "EUR")
    await agent.issue_bill("w-1", amount, clock.now().date() + timedelta(days=30), "Water", bill_id="INV-1")
    await agent.create_payment_intent(consumer.intent("w-1", "INV-1", "pay-1", amount))
    await agent.record_settlement("w-1", "pay-1", amount, "BANK-1")
    await agent.emit_event("w-1", event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id="INV-1", message="missed")
    await agent.emit_event("w-1", event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, bill_id="INV-1")
    return biller


def test_a_receiver_that_goes_down_gets_every_outcome_once_it_is_back(tmp_path: Path) -> None:
    asyncio.run(_goes_down_and_comes_back(tmp_path))


async def _goes_down_and_comes_back(tmp_path: Path) -> None:
    async with receiving() as receiver:
        await _deliveries(tmp_path, receiver)


async def _deliveries(tmp_path: Path, receiver: Receiver) -> None:
    clock = ManualClock(START)
    biller = await biller_with_outcomes(tmp_path, clock)
    endpoint = Endpoint(
        receiver.url,
        (NEW_SECRET, OLD_SECRET),
        frozenset({"payment_received", "arrangement_broken", "renegotiation_offered"}),
    )
    try:
        await receiver.stop()  # down: connection refused
        dispatcher = WebhookDispatcher(biller.store, biller.agent.party_id, [endpoint], clock)
        assert await dispatcher.deliver_due() == 0
        [cursor] = (await biller.store.webhook_cursors(receiver.url)).values()
        assert cursor.attempts == 1
        assert cursor.next_attempt_at == START + BACKOFF_FIRST
        assert "ClientConnectorError" in cursor.last_error
        await dispatcher.close()

        await receiver.start()  # back, on the same port; and the biller restarted: a new dispatcher
        dispatcher = WebhookDispatcher(biller.store, biller.agent.party_id, [endpoint], clock)
        assert await dispatcher.deliver_due() == 0  # the backoff is not over
        receiver.status = 503  # up but failing: a second attempt, a longer wait
        clock.advance(BACKOFF_FIRST)
        assert await dispatcher.deliver_due() == 0
        [cursor] = (await biller.store.webhook_cursors(receiver.url)).values()
        assert (cursor.attempts, cursor.last_error) == (2, "HTTP 503")
        assert cursor.next_attempt_at == clock.now() + 2 * BACKOFF_FIRST

        receiver.status = 200
        clock.advance(2 * BACKOFF_FIRST)
        assert await dispatcher.deliver_due() == 3
        assert [body["type"] for body in receiver.accepted] == [
            "payment_received",
            "arrangement_broken",
            "renegotiation_offered",
        ]
        paid = receiver.accepted[0]
        assert paid["amount"] == {"currency": "EUR", "minor": 4250, "text": "EUR 42.50"}
        assert (paid["account_id"], paid["bill_id"], paid["biller"]) == ("w-1", "INV-1", "biller:energy.example")
        assert receiver.keys == [body["id"] for body in receiver.accepted]  # the idempotency key is the event's
        assert all(header.count("v1=") == 2 for header in receiver.signatures)  # both secrets: a rotation
        assert await dispatcher.deliver_due() == 0  # nothing twice
        [cursor] = (await biller.store.webhook_cursors(receiver.url)).values()
        assert cursor == WebhookCursor("w-1", "consumer:w-1", await biller.store.event_count("w-1"))
        await dispatcher.close()
    finally:
        await biller.close()


def test_an_event_is_abandoned_after_three_days_of_attempts(tmp_path: Path) -> None:
    asyncio.run(_abandoned(tmp_path))


async def _abandoned(tmp_path: Path) -> None:
    async with receiving() as receiver:
        await _abandon(tmp_path, receiver)


async def _abandon(tmp_path: Path, receiver: Receiver) -> None:
    clock = ManualClock(START)
    biller = await biller_with_outcomes(tmp_path, clock)
    endpoint = Endpoint(receiver.url, (OLD_SECRET,), frozenset({"arrangement_broken"}))
    receiver.status = 500
    try:
        events = await biller.store.events("w-1", 0, 100)
        kinds = [event_pb2.Event.FromString(envelope_pb2.Envelope.FromString(e.envelope).payload).kind for e in events]
        sequence = kinds.index(event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN)  # its first attempt was nearly 3 days ago
        failing = WebhookCursor("w-1", "consumer:w-1", sequence, MAX_ATTEMPTS - 1, START)
        await biller.store.save_webhook_cursor(receiver.url, failing)
        dispatcher = WebhookDispatcher(biller.store, biller.agent.party_id, [endpoint], clock)
        assert await dispatcher.deliver_due() == 0
        [cursor] = (await biller.store.webhook_cursors(receiver.url)).values()
        assert cursor.next_sequence == sequence + 1  # moved past it
        assert cursor.last_error == "abandoned: HTTP 500"
        assert await dispatcher.deliver_due() == 0  # and on, past the kinds this endpoint does not report
        [cursor] = (await biller.store.webhook_cursors(receiver.url)).values()
        assert cursor == WebhookCursor("w-1", "consumer:w-1", len(events))
        await dispatcher.close()
    finally:
        await biller.close()


def test_replicas_take_turns_and_a_failure_ends_the_pass(tmp_path: Path) -> None:
    async def run() -> None:
        async with receiving() as receiver:
            clock = ManualClock(START)
            biller = await biller_with_outcomes(tmp_path, clock)
            try:
                agent = biller.agent
                await agent.create_account("w-2", "Another")
                other = Consumer("consumer:w-2", ManualClock(clock.now()))
                await agent.enrol(other.enrolment("w-2", await agent.issue_enrolment_code("w-2")))
                await biller.agent.emit_event("w-2", event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id="X")
                endpoint = Endpoint(receiver.url, (OLD_SECRET,), frozenset({"arrangement_broken"}))
                dispatcher = WebhookDispatcher(biller.store, biller.agent.party_id, [endpoint], clock)
                lease = f"webhooks:{receiver.url}"
                assert await biller.store.claim_lease(lease, "another-replica", START, START + timedelta(minutes=1))
                assert await dispatcher.deliver_due() == 0  # another replica is delivering to this endpoint
                assert receiver.signatures == []
                await biller.store.release_lease(lease, "another-replica")
                receiver.status = 500
                assert await dispatcher.deliver_due() == 0
                assert len(receiver.signatures) == 1  # w-1 failed: w-2 waits for the next pass
                receiver.status = 200
                assert await dispatcher.deliver_due() == 1  # w-2 (w-1 waits out its backoff)
                clock.advance(BACKOFF_FIRST)
                assert await dispatcher.deliver_due() == 1  # w-1
                assert [body["account_id"] for body in receiver.accepted] == ["w-2", "w-1"]
                await dispatcher.close()
            finally:
                await biller.close()

    asyncio.run(run())


def test_backoff_doubles_to_a_cap_and_gives_up_after_three_days() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST]
    assert backoff(40) == backoff(400) == BACKOFF_CAP
    total = sum((backoff(n) for n in range(1, MAX_ATTEMPTS)), timedelta(0))
    assert total < GIVE_UP_AFTER <= total + backoff(MAX_ATTEMPTS)


def test_the_signature_is_stripe_style_and_checked() -> None:
    now = datetime.now(UTC)
    header = sign([NEW_SECRET, OLD_SECRET], int(now.timestamp()), b'{"a":1}')
    assert header.startswith(f"t={int(now.timestamp())},v1=")
    assert header.count("v1=") == 2
    assert verify_signature(header, b'{"a":1}', OLD_SECRET, now)
    assert not verify_signature(header, b'{"a":2}', OLD_SECRET, now)  # another body
    assert not verify_signature(header, b'{"a":1}', b"another-secret-of-16-bytes", now)
    assert not verify_signature(header, b'{"a":1}', OLD_SECRET, now + timedelta(minutes=10))  # a replay


def test_check_config_validates_webhooks_and_simulation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_bytes(OLD_SECRET)
    base = SAMPLE.read_text()

    def check(extra: str) -> tuple[int, str]:
        path = tmp_path / "biller.toml"
        path.write_text(base + extra)
        code = main(["biller", "check-config", str(path)])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    good = f'\n[[webhooks]]\nurl = "https://billing.example/hook"\nsecret_files = ["{secret}"]\n'
    code, said = check(good)
    assert code == 0, said
    assert "1 webhook(s)" in said
    assert "sample bills" in said
    assert check(good.replace("https://", "ftp://"))[1].count("webhooks[0].url") == 1
    assert "webhooks[0].secret_files: cannot read" in check(good.replace(str(secret), str(tmp_path / "nope")))[1]
    assert "webhooks[0].events" in check(good + 'events = ["bill_paid"]\n')[1]
    assert "listed twice" in check(good + good.replace("[[webhooks]]", "\n[[webhooks]]"))[1]
    short = tmp_path / "short.secret"
    short.write_text("short")
    assert "shorter than 16" in check(good.replace(str(secret), str(short)))[1]
    bad_interval = base.replace("upkeep_interval_seconds = 5", "upkeep_interval_seconds = 0")
    (tmp_path / "b.toml").write_text(bad_interval)
    assert main(["biller", "check-config", str(tmp_path / "b.toml")]) == 1
    assert "simulation.upkeep_interval_seconds" in capsys.readouterr().out


def test_a_webhook_config_reads_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_bytes(NEW_SECRET + b"\n")
    endpoint = Endpoint.load(Webhook("http://127.0.0.1:1/h", (str(secret),)))
    assert endpoint.secrets == (NEW_SECRET,)
    assert endpoint.types == {"agreement_reached", "arrangement_broken", "payment_received", "renegotiation_offered"}


@pytest.mark.slow
def test_serve_delivers_webhooks_from_a_task_of_its_own(tmp_path: Path) -> None:
    """`serving_biller(webhooks=...)`: an outcome recorded by the agent reaches the receiver without anyone
    waiting for it, and a receiver that is down delays nothing."""

    async def run() -> None:
        async with receiving() as receiver:
            endpoint = Endpoint(receiver.url, (OLD_SECRET,), frozenset({"payment_received"}))
            await receiver.stop()  # down while the outcome is recorded
            async with serving_biller(
                load_config(SAMPLE),
                listen="127.0.0.1:0",
                state_dir=tmp_path / "state",
                clock=ManualClock(datetime.now(UTC)),
                insecure=True,
                webhooks=[endpoint],
            ) as running:
                clock = running.biller.clock
                assert isinstance(clock, ManualClock)
                agent = running.biller.agent
                await agent.create_account("w-1", "A. Holder")
                consumer = Consumer("consumer:w-1", ManualClock(clock.now()))
                await agent.enrol(consumer.enrolment("w-1", await agent.issue_enrolment_code("w-1")))
                amount = Money.parse("9.99", "EUR")
                await agent.issue_bill("w-1", amount, clock.now().date() + timedelta(days=9), "Water", bill_id="B")
                await agent.create_payment_intent(consumer.intent("w-1", "B", "pay-1", amount))
                await asyncio.wait_for(agent.record_settlement("w-1", "pay-1", amount, "BANK-1"), timeout=2)
                await asyncio.sleep(0.5)
                await receiver.start()
                clock.advance(BACKOFF_FIRST)
                for _ in range(100):
                    if receiver.accepted:
                        break
                    await asyncio.sleep(0.1)
                assert [body["type"] for body in receiver.accepted] == ["payment_received"]

    asyncio.run(run())


def test_serve_refuses_a_webhook_secret_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "biller.toml"
    missing = tmp_path / "missing.secret"
    config.write_text(
        SAMPLE.read_text() + f'\n[[webhooks]]\nurl = "http://127.0.0.1:9/h"\nsecret_files = ["{missing}"]\n'
    )
    serve = ["biller", "serve", "--config", str(config), "--state-dir", str(tmp_path / "state")]
    assert main([*serve, "--listen", "127.0.0.1:0", "--insecure"]) == 2
    captured = capsys.readouterr()
    assert "webhooks[0].secret_files: cannot read" in captured.out + captured.err
    assert not (tmp_path / "state").exists()  # refused before anything was created


def kind_of(body: dict[str, object]) -> tuple[object, ...]:
    """What a test compares of one delivered webhook: (holder, sequence, type)."""
    return body.get("holder"), body["sequence"], body["type"]


def test_a_re_enrolment_delivers_every_holders_log_exactly_once(tmp_path: Path) -> None:
    """ENR-12: a log per binding, so a cursor per binding. Alice's log delivered to position 3, the account
    re-bound to bob: bob's outcomes from 1 are delivered, and so is the payment_received appended to alice's
    log after the switch (her payment, settled later) — each exactly once."""

    async def run() -> None:
        async with receiving() as receiver:
            clock = ManualClock(START)
            biller = await open_biller(load_config(SAMPLE), tmp_path / "state", clock)
            agent = biller.agent
            endpoint = Endpoint(receiver.url, (OLD_SECRET,), frozenset(EVENT_TYPES.values()))
            dispatcher = WebhookDispatcher(biller.store, agent.party_id, [endpoint], clock)
            try:
                await agent.create_account("w-1", "A. Holder")
                alice = Consumer("consumer:alice", ManualClock(clock.now()))
                await agent.enrol(alice.enrolment("w-1", await agent.issue_enrolment_code("w-1")))
                amount = Money.parse("42.50", "EUR")
                await agent.issue_bill("w-1", amount, clock.now().date() + timedelta(days=30), "Water", bill_id="INV-1")
                await agent.create_payment_intent(alice.intent("w-1", "INV-1", "pay-1", amount))  # settled later
                await agent.emit_event("w-1", event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id="INV-1")
                await agent.emit_event("w-1", event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, bill_id="INV-1")
                assert await dispatcher.deliver_due() == 2  # alice's 1 and 2: her log is delivered to 3
                alice_id, bob_id = alice.party.party_id, "consumer:bob"
                assert [kind_of(body)[1:] for body in receiver.accepted] == [
                    (1, "arrangement_broken"),
                    (2, "renegotiation_offered"),
                ]

                bob = Consumer(bob_id, ManualClock(clock.now()))
                await agent.enrol(bob.enrolment("w-1", await agent.issue_enrolment_code("w-1")))  # bob's 0: INV-1
                await agent.emit_event("w-1", event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id="INV-1")
                await agent.emit_event("w-1", event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, bill_id="INV-1")
                assert await biller.store.event_count("w-1", bob_id) == 3
                assert await dispatcher.deliver_due() == 2  # bob's 1 and 2, below alice's position

                await agent.record_settlement("w-1", "pay-1", amount, "BANK-1")  # alice's 3: her payment
                assert await biller.store.event_count("w-1", alice_id) == 4
                assert await dispatcher.deliver_due() == 1
                await agent.emit_event("w-1", event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id="INV-1")  # bob's 3
                assert await dispatcher.deliver_due() == 1
                assert await dispatcher.deliver_due() == 0  # nothing twice

                assert [kind_of(body) for body in receiver.accepted] == [
                    (alice_id, 1, "arrangement_broken"),
                    (alice_id, 2, "renegotiation_offered"),
                    (bob_id, 1, "arrangement_broken"),
                    (bob_id, 2, "renegotiation_offered"),
                    (alice_id, 3, "payment_received"),
                    (bob_id, 3, "arrangement_broken"),
                ]
                assert len({body["id"] for body in receiver.accepted}) == len(receiver.accepted)
                paid = receiver.accepted[4]
                assert (paid["account_id"], paid["bill_id"]) == ("w-1", "INV-1")
                for body in receiver.accepted:  # the holder is the signed event's recipient
                    envelope = envelope_pb2.Envelope.FromString(base64.b64decode(str(body["envelope"])))
                    assert event_pb2.Event.FromString(envelope.payload).header.recipient == body["holder"]
                cursors = await biller.store.webhook_cursors(receiver.url)
                assert cursors == {
                    ("w-1", alice_id): WebhookCursor("w-1", alice_id, 4),
                    ("w-1", bob_id): WebhookCursor("w-1", bob_id, 4),
                }
            finally:
                await dispatcher.close()
                await biller.close()

    asyncio.run(run())


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "biller.sqlite")
    return str(request.getfixturevalue("postgres_dsn"))


def execute(location: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    """One statement (qmark parameters) on the store's database, outside the store, committed."""
    if location.startswith("postgresql://"):
        with psycopg.connect(location) as db:
            cursor = db.execute(sql.replace("?", "%s"), args)
            return cursor.fetchall() if cursor.description else []
    with sqlite3.connect(location) as db:
        return db.execute(sql, args).fetchall()


def test_an_account_cursor_moves_to_its_log_on_upgrade(
    store_location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 6 on both back ends: a per-account cursor written by migration 5's code moves to the log it
    followed, retry state and all, so that nothing is sent again or skipped; an account re-bound under
    migration 5 (two logs, which of their events were sent unknown) has each log delivered from its
    beginning rather than losing any event."""

    async def run() -> None:
        async with receiving() as receiver:
            clock = ManualClock(START)
            for store in (SqliteBillerStore, PostgresBillerStore):  # the schema of migration 5's code, with
                # migration 7's table of log lengths that this code's appends write (dropped below: a store at
                # migration 5 has none, and migration 7 fills it from the logs)
                old = store.MIGRATIONS
                monkeypatch.setattr(store, "MIGRATIONS", (*old[:4], (*old[4], *old[6])))
            biller = await open_biller(load_config(SAMPLE), tmp_path / "state", clock, store_location=store_location)
            agent = biller.agent
            try:
                for account_id, holder in (("w-1", "consumer:alice"), ("w-2", "consumer:carol")):
                    await agent.create_account(account_id, "A. Holder")
                    consumer = Consumer(holder, ManualClock(clock.now()))
                    await agent.enrol(consumer.enrolment(account_id, await agent.issue_enrolment_code(account_id)))
                    amount = Money.parse("42.50", "EUR")
                    due = clock.now().date() + timedelta(days=30)
                    await agent.issue_bill(account_id, amount, due, "Water", bill_id=f"INV-{account_id}")
                    await agent.emit_event(account_id, event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id="X")
                for kind in (event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN):
                    await agent.emit_event("w-1", kind, bill_id="X")  # alice's 2 and 3
                dave = Consumer("consumer:dave", ManualClock(clock.now()))
                await agent.enrol(dave.enrolment("w-2", await agent.issue_enrolment_code("w-2")))  # dave's 0
                await agent.emit_event("w-2", event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, bill_id="X")  # dave's 1
                await agent.create_account("w-3", "No events")
                await agent.create_account("w-4", "No bills")  # re-bound, but the new holder's log is empty
                for holder in ("consumer:erin", "consumer:frank"):
                    consumer = Consumer(holder, ManualClock(clock.now()))
                    await agent.enrol(consumer.enrolment("w-4", await agent.issue_enrolment_code("w-4")))
                    if holder == "consumer:erin":
                        await agent.emit_event("w-4", event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id="X")
            finally:
                await biller.close()
            # Cursors as migration 5's dispatcher kept them, per (endpoint, account): alice's log delivered to
            # 2, its event 2 failed once; w-2's at 2, carried over from carol's log into dave's by the
            # re-binding (dave's 1 never sent); erin's event 0 sent before frank took w-4 over.
            insert = """INSERT INTO webhook_cursors (endpoint, account_id, next_sequence, attempts, next_attempt_at,
                                                     last_error) VALUES (?, ?, ?, ?, ?, ?)"""
            execute(store_location, insert, receiver.url, "w-1", 2, 1, ts(START), "HTTP 503")
            execute(store_location, insert, receiver.url, "w-2", 2, 0, None, "")
            execute(store_location, insert, receiver.url, "w-3", 0, 0, None, "")
            execute(store_location, insert, receiver.url, "w-4", 1, 0, None, "")
            execute(store_location, insert, "http://127.0.0.1:9/other", "w-1", 4, 0, None, "")
            execute(store_location, "DROP TABLE event_log_lengths")

            monkeypatch.undo()
            biller = await open_biller(load_config(SAMPLE), tmp_path / "state", clock, store_location=store_location)
            endpoint = Endpoint(receiver.url, (OLD_SECRET,), frozenset(EVENT_TYPES.values()))
            dispatcher = WebhookDispatcher(biller.store, biller.agent.party_id, [endpoint], clock)
            try:
                versions = execute(store_location, "SELECT MAX(version) FROM schema_version")
                assert versions == [(len(SqliteBillerStore.MIGRATIONS),)]  # 6, then 7's table of log lengths
                assert await biller.store.webhook_cursors(receiver.url) == {
                    ("w-1", "consumer:alice"): WebhookCursor("w-1", "consumer:alice", 2, 1, START, "HTTP 503"),
                    ("w-4", "consumer:erin"): WebhookCursor("w-4", "consumer:erin", 1),  # the one log it followed
                }
                assert await biller.store.webhook_cursors("http://127.0.0.1:9/other") == {
                    ("w-1", "consumer:alice"): WebhookCursor("w-1", "consumer:alice", 4),
                }
                assert await dispatcher.deliver_due() == 4
                await biller.agent.emit_event("w-4", event_pb2.EVENT_KIND_RENEGOTIATION_OFFERED, bill_id="X")
                assert await dispatcher.deliver_due() == 1  # frank's 0, erin's 0 not sent again
                assert await dispatcher.deliver_due() == 0
                assert [kind_of(body) for body in receiver.accepted] == [
                    ("consumer:alice", 2, "renegotiation_offered"),  # from its cursor: 1 is not sent again
                    ("consumer:alice", 3, "arrangement_broken"),
                    ("consumer:carol", 1, "arrangement_broken"),  # w-2's logs from their beginning
                    ("consumer:dave", 1, "renegotiation_offered"),
                    ("consumer:frank", 0, "renegotiation_offered"),
                ]
                assert set(await biller.store.webhook_cursors(receiver.url)) == {
                    ("w-1", "consumer:alice"),
                    ("w-2", "consumer:carol"),
                    ("w-2", "consumer:dave"),
                    ("w-4", "consumer:erin"),
                    ("w-4", "consumer:frank"),
                }
            finally:
                await dispatcher.close()
                await biller.close()

    asyncio.run(run())


@dataclass
class Cost:
    """What the store's SQLite connections did meanwhile: the statements run and the VM instructions stepped
    (counted by SQLite's progress handler: work done, rows visited, not time)."""

    statements: list[str] = field(default_factory=list)
    steps: int = 0

    def step(self) -> int:
        self.steps += 1
        return 0  # go on


async def cost_of(store: object, work: Callable[[], Awaitable[T]]) -> tuple[T, Cost]:
    """Run `work` with every statement of a SQLite biller store's two connections counted."""
    assert isinstance(store, SqliteBillerStore)
    cost = Cost()

    def hook(db: sqlite3.Connection, on: bool) -> None:
        db.set_trace_callback(cost.statements.append if on else None)
        db.set_progress_handler(cost.step if on else None, 1)

    reader = store._reader_connection()
    await store._call(lambda: hook(store._connection(), True))  # the writer is the worker thread's
    hook(reader, True)
    try:
        return await work(), cost
    finally:
        hook(reader, False)
        await store._call(lambda: hook(store._connection(), False))


def test_a_dispatcher_pass_costs_the_same_however_long_the_logs(tmp_path: Path) -> None:
    """The dispatcher runs a pass every 2 s: with nothing due, a pass lists the logs (one row each, from the
    table of log lengths) and this endpoint's cursors, and reads no event. Ten times more events in the same
    logs: the same statements, and the same work in SQLite's VM (listing the logs by grouping binding_events
    visited every event: 23 events' pass took fewer steps than 263 events')."""

    async def run() -> None:
        async with receiving() as receiver:
            clock = ManualClock(START)
            biller = await open_biller(load_config(SAMPLE), tmp_path / "state", clock)
            agent = biller.agent
            endpoint = Endpoint(receiver.url, (OLD_SECRET,), frozenset(EVENT_TYPES.values()))
            dispatcher = WebhookDispatcher(biller.store, agent.party_id, [endpoint], clock)

            async def remind(account_id: str, count: int) -> None:  # not reported by webhooks: no POST each
                emitted = (
                    agent.emit_event(account_id, event_pb2.EVENT_KIND_REMINDER, reminder_level=1) for _ in range(count)
                )
                await asyncio.gather(*emitted)  # appended in a few group commits

            async def idle_pass() -> Cost:
                delivered, cost = await cost_of(biller.store, dispatcher.deliver_due)
                assert delivered == 0
                return cost

            try:
                for account_id, holders in (("w-1", ("consumer:alice", "consumer:bob")), ("w-2", ("consumer:carol",))):
                    await agent.create_account(account_id, "A. Holder")
                    for holder in holders:
                        consumer = Consumer(holder, ManualClock(clock.now()))
                        await agent.enrol(consumer.enrolment(account_id, await agent.issue_enrolment_code(account_id)))
                        await agent.emit_event(account_id, event_pb2.EVENT_KIND_ARRANGEMENT_BROKEN, bill_id="X")
                        await remind(account_id, 10)
                assert len(await biller.store.event_logs()) == 3  # alice's, bob's and carol's
                assert await dispatcher.deliver_due() == 3
                short = await idle_pass()
                assert sum([log.length for log in await biller.store.event_logs()]) == 33

                await remind("w-1", 120)  # bob's log
                await remind("w-2", 120)
                assert await dispatcher.deliver_due() == 0  # past them all, nothing to POST
                assert sum([log.length for log in await biller.store.event_logs()]) == 273
                long = await idle_pass()

                assert len(long.statements) == len(short.statements)
                assert not [sql for sql in long.statements if "binding_events" in sql]
                assert long.steps == short.steps, (short.steps, long.steps)
            finally:
                await dispatcher.close()
                await biller.close()

    asyncio.run(run())
