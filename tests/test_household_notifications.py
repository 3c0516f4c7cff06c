"""Notifications the person chose: a signed webhook to a real receiver on 127.0.0.1, and a command.

The receiver is `http.server` in a thread (no extra dependency). It is down at first: the
notification waits in the outbox of the consumer store, survives a restart (the store is closed and
opened again), and is delivered once the receiver is back and the backoff has passed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from agent.clock import ManualClock
from agent.conformance.peers import free_port
from agent.stores.consumer_sqlite import SqliteConsumerStore
from reference_biller import scheduler
from reference_consumer.notify import ID_HEADER, SIGNATURE_HEADER, Notifier, Outbox, verify_signature
from reference_consumer.profile import Notifications, ProfileError, load_profile, parse_profile
from reference_consumer.runner import EXIT_APPROVALS_PENDING, Approval, RunOptions, run_household
from reference_consumer.status import household_status
from tests.test_consumer_run import ACCOUNT, CONFIG, SHORT, code_for, reference_biller, write_profile
from tests.test_household_space import bill_600

START = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
SECRET = b"a shared secret of the household"


@contextmanager
def receiver(port: int, received: list[tuple[dict[str, str], bytes]]) -> Iterator[None]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(({name: self.headers[name] for name in self.headers}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_webhook_down_then_back_gets_each_notification_once_signed(tmp_path: Path) -> None:
    port = free_port()
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_bytes(SECRET + b"\n")
    settings = Notifications(webhook=f"http://127.0.0.1:{port}/parley", secret_file=secret_file)
    clock = ManualClock(START)
    received: list[tuple[dict[str, str], bytes]] = []

    async def main() -> None:
        store = await SqliteConsumerStore.open(tmp_path / "consumer.sqlite")
        try:
            outbox = Outbox(store, settings, clock)
            assert await outbox.add("new_bill:1", "new_bill", {"title": "New bill", "bill_id": "winter"})
            assert not await outbox.add("new_bill:1", "new_bill", {"title": "New bill", "bill_id": "winter"})
            notifier = Notifier(store, settings, clock, base_delay=60)
            assert await notifier.deliver_due() == 0  # the receiver is down
            [waiting] = await store.notifications(undelivered_only=True)
            assert waiting.attempts == 1
            assert waiting.next_attempt_at == START + timedelta(seconds=60)
            assert await notifier.deliver_due() == 0  # not due yet: nothing is tried
        finally:
            await store.close()

        # A restart: the outbox is in the store. The receiver is back, the backoff has passed.
        clock.advance(timedelta(seconds=61))
        with receiver(port, received):
            store = await SqliteConsumerStore.open(tmp_path / "consumer.sqlite")
            try:
                notifier = Notifier(store, settings, clock, base_delay=60)
                assert await notifier.deliver_due() == 1
                assert await notifier.deliver_due() == 0
                assert await store.notifications(undelivered_only=True) == []
            finally:
                await store.close()

    asyncio.run(main())
    [(headers, body)] = received
    assert headers["Content-Type"] == "application/json"
    assert headers[ID_HEADER] == "new_bill:1"
    assert verify_signature(SECRET, headers[SIGNATURE_HEADER], body, now=int(clock.now().timestamp()))
    assert not verify_signature(b"another secret", headers[SIGNATURE_HEADER], body, now=int(clock.now().timestamp()))
    assert not verify_signature(SECRET, headers[SIGNATURE_HEADER], body + b" ", now=int(clock.now().timestamp()))
    document = json.loads(body)
    assert (document["id"], document["kind"], document["bill_id"]) == ("new_bill:1", "new_bill", "winter")


def test_a_command_gets_the_notification_on_its_standard_input(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox.jsonl"
    script = f"import sys; open({str(inbox)!r}, 'a').write(sys.stdin.read() + '\\n')"
    settings = Notifications(command=(sys.executable, "-c", script), kinds=("payment",))
    clock = ManualClock(START)

    async def main() -> None:
        store = await SqliteConsumerStore.open(tmp_path / "consumer.sqlite")
        try:
            outbox = Outbox(store, settings, clock)
            assert not await outbox.add("reminder:1", "reminder", {"title": "not chosen"})
            assert await outbox.add("payment:1", "payment", {"title": "Paid EUR 12.00"})
            assert await Notifier(store, settings, clock).deliver_due() == 1
        finally:
            await store.close()

    asyncio.run(main())
    [line] = inbox.read_text().splitlines()
    assert json.loads(line)["title"] == "Paid EUR 12.00"


def test_the_profile_says_where_notifications_go(tmp_path: Path) -> None:
    def profile(notifications: dict[str, object]) -> Notifications:
        document = {
            "household": {"party_id": "consumer:h", "currency": "EUR", "balance": "10", "buffer": "0"},
            "income": {"amount": "10", "pay_day": 1},
            "mandate": {"max_fee": "0", "max_instalments": 0, "max_total_over_bill": "0"},
            "notifications": notifications,
        }
        return parse_profile(document, base_dir=tmp_path).notifications

    chosen = profile({"webhook": "https://hooks.example/p", "secret_file": "s", "kinds": ["payment"]})
    assert chosen.secret_file == tmp_path / "s"
    assert chosen.kinds == ("payment",)
    assert profile({"command": ["notify-send", "Parley"]}).command == ("notify-send", "Parley")
    cases: list[tuple[dict[str, object], str]] = [
        ({"webhook": "http://hooks.example/p", "secret_file": "s"}, "notifications.webhook"),
        ({"webhook": "https://hooks.example/p"}, "notifications.secret_file"),
        ({"command": "notify-send"}, "notifications.command"),
        ({"kinds": ["everything"]}, "notifications.kinds"),
        ({"colour": "red"}, "notifications.colour"),
    ]
    for bad, key in cases:
        with pytest.raises(ProfileError) as raised:
            profile(bad)
        assert raised.value.key == key


def test_the_bot_tells_the_person_of_a_bill_an_approval_an_agreement_and_a_payment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    state, profile = tmp_path / "state", tmp_path / "household.toml"
    inbox = tmp_path / "inbox.jsonl"
    script = f"import sys; open({str(inbox)!r}, 'a').write(sys.stdin.read() + '\\n')"
    notifications = f"\n[notifications]\ncommand = {json.dumps([sys.executable, '-c', script])}\n"

    def kinds() -> list[str]:
        return [json.loads(line)["kind"] for line in inbox.read_text().splitlines()] if inbox.exists() else []

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            write_profile(
                profile,
                target=f"127.0.0.1:{running.port}",
                fingerprint=running.biller.fingerprint.hex(),
                code=await code_for(running),
                household=SHORT + notifications,
            )

            async def run(approval: Approval) -> int:
                options = RunOptions(state, once=True, approval=approval, event_idle=0.2)
                return await run_household(load_profile(profile), options, Console(width=200), clock=clock)

            assert await run(Approval.ASK) == EXIT_APPROVALS_PENDING
            assert sorted(kinds()) == ["approval_needed", "new_bill"]
            assert await run(Approval.ASK) == EXIT_APPROVALS_PENDING
            assert sorted(kinds()) == ["approval_needed", "new_bill"]  # nothing twice
            assert await run(Approval.APPROVE) == 0
            assert kinds()[2:] == ["agreement"]
            clock.set(datetime(2026, 3, 29, 9, 0, tzinfo=UTC))
            assert await run(Approval.ASK) == 0
            assert kinds()[3:] == ["payment"]

    asyncio.run(main())


def test_a_missed_instalment_is_told_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ManualClock(START)
    state, profile = tmp_path / "state", tmp_path / "household.toml"
    inbox = tmp_path / "inbox.jsonl"
    script = f"import sys; open({str(inbox)!r}, 'a').write(sys.stdin.read() + '\\n')"
    notifications = (
        f'\n[notifications]\ncommand = {json.dumps([sys.executable, "-c", script])}\nkinds = ["missed_instalment"]\n'
    )

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            write_profile(
                profile,
                target=f"127.0.0.1:{running.port}",
                fingerprint=running.biller.fingerprint.hex(),
                code=await code_for(running),
                household=SHORT + notifications,
            )
            options = RunOptions(state, once=True, approval=Approval.APPROVE, event_idle=0.2)
            assert await run_household(load_profile(profile), options, Console(width=200), clock=clock) == 0
            # The household misses its date; past the grace days the biller says so.
            clock.set(datetime(2026, 4, 3, 9, 0, tzinfo=UTC))
            biller = running.biller
            await scheduler.tick(biller.agent, CONFIG, clock.now(), store=biller.store, accounts=[ACCOUNT])
            await run_household(load_profile(profile), options, Console(width=200), clock=clock)
            document = await household_status(load_profile(profile), state, clock=clock)
            events = document["events"]
            assert isinstance(events, list)
            assert "instalment_missed" in [event["kind"] for event in events]

    asyncio.run(main())
    [line] = inbox.read_text().splitlines()
    notice = json.loads(line)
    assert (notice["kind"], notice["bill_id"]) == ("missed_instalment", "winter")
    assert "instalment missed" in notice["title"]
