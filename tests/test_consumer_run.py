"""`parley consumer run`: the reference consumer against the reference biller.

Real gRPC on 127.0.0.1 (a free port; plaintext on loopback, or TLS with the
development CA of agent/tools/certs.py), real SQLite files under tmp_path; the biller
is served in this process and always shut down. The CLI runs in a worker thread
(`agent.cli.main`, which starts its own event loop) while the biller serves on
the test's loop; the approval scenario drives `Household` directly so that one
ManualClock moves both sides through the month.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agent.biller import BillerAgent
from agent.cli import main as parley_main
from agent.clock import Clock, ManualClock, SystemClock
from agent.conformance.peers import free_port
from agent.consumer import PaymentNotSent, PaymentOrder, PaymentSender
from agent.identity import IdentityDir
from agent.protocol.keys import SigningKey
from agent.protocol.terms import Money, TermsKind
from agent.stores.base import IntentState, ThreadOutcome
from agent.stores.consumer_sqlite import SqliteConsumerStore
from agent.tools.certs import issue_client_cert, issue_server_cert, make_dev_ca
from agent.transport.client import RetryPolicy
from parley.v1 import event_pb2
from reference_biller import sample, scheduler
from reference_biller.config import load_config
from reference_biller.service import RunningBiller, serving_biller
from reference_consumer.profile import (
    BillerConnection,
    ClientCertificateFiles,
    ProfileError,
    load_profile,
    parse_profile,
)
from reference_consumer.runner import (
    BANK_FILE,
    DECLINED_EARLIER,
    DECLINED_NOW,
    EXIT_APPROVALS_PENDING,
    KEY_FILE,
    STORE_FILE,
    Approval,
    Household,
    JsonLinesBank,
    PassReport,
    RunOptions,
    render,
    run_household,
)

CONFIG = load_config()
BILLER = CONFIG.party_id
ACCOUNT = "acct-1001"
PARTY = "consumer:household-7"
START = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)

# A household with money to spare: it takes the early-payment discount and pays today.
COMFORTABLE = """
[household]
party_id = "consumer:household-7"
currency = "EUR"
balance = "5000.00"
buffer = "100.00"

[income]
amount = "3000.00"
pay_day = 25

[mandate]
max_fee = "10.00"
max_instalments = 6
max_total_over_bill = "15.00"
"""

# Short until pay day (the 28th), rent on the 1st, and a mandate that allows no fee and no plan:
# a bill of 600.00 due on the 26th is affordable only deferred past pay day, with the biller's fee.
SHORT = """
[household]
party_id = "consumer:household-7"
currency = "EUR"
balance = "300.00"
buffer = "100.00"

[income]
amount = "2000.00"
pay_day = 28

[[expenses]]
name = "rent"
amount = "950.00"
day = 1

[mandate]
max_fee = "0.00"
max_instalments = 0
max_total_over_bill = "0.00"
"""


def eur(text: str) -> Money:
    return Money.parse(text, "EUR")


def write_profile(
    path: Path,
    *,
    target: str,
    fingerprint: str,
    code: str | None,
    transport: str = "insecure = true",
    household: str = COMFORTABLE,
) -> Path:
    lines = [
        household,
        f'[billers."{BILLER}"]',
        "priority = 1",
        f'target = "{target}"',
        f'fingerprint = "{fingerprint}"',
        f'account_id = "{ACCOUNT}"',
        transport,
    ]
    if code is not None:
        lines.append(f'code = "{code}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def orders(state: Path) -> list[dict[str, Any]]:
    path = state / BANK_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


OnEnrol = Callable[[BillerAgent], Awaitable[None]]


@asynccontextmanager
async def reference_biller(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clock: Clock,
    *,
    tls: tuple[bytes, bytes] | None = None,
    tls_client_ca: bytes | None = None,
    on_enrol: OnEnrol | None = None,
    port: int = 0,
) -> AsyncIterator[RunningBiller]:
    """The reference biller on a free loopback port; `on_enrol` runs after each enrolment.

    The reference biller bills an enrolled account on its next upkeep; tests cannot wait for
    that, so by default it issues this month's sample bill as soon as the account enrols.
    """
    async with serving_biller(
        CONFIG,
        listen=f"127.0.0.1:{port}",
        state_dir=tmp_path / "biller",
        clock=clock,
        tls=tls,
        tls_client_ca=tls_client_ca,
        insecure=tls is None,
        interval=timedelta(hours=1),  # upkeep runs once at start; the tests do the rest
    ) as running:
        agent, store = running.biller.agent, running.biller.store

        async def monthly_bill(agent: BillerAgent) -> None:
            await sample.bill_enrolled_accounts(agent, store, CONFIG, clock.now().date())

        hook = on_enrol or monthly_bill
        enrol = agent.enrol

        async def enrol_then_bill(envelope: Any) -> Any:
            response = await enrol(envelope)
            await hook(agent)
            return response

        monkeypatch.setattr(agent, "enrol", enrol_then_bill)
        yield running


async def code_for(running: RunningBiller) -> str:
    return (await sample.issue_codes(running.biller.agent, CONFIG, [ACCOUNT]))[ACCOUNT]


async def cli(*argv: str) -> int:
    """`parley ...` in a worker thread: the CLI runs its own event loop while the biller serves on ours."""
    return await asyncio.to_thread(parley_main, list(argv))


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "240")  # Rich sizes its tables to this: no cell is wrapped in the tests


# --- The CLI against a live biller ---------------------------------------------------------------------


def test_first_run_enrols_agrees_and_pays_and_later_runs_neither_enrol_nor_pay_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = make_dev_ca()
    server = issue_server_cert(ca, hostnames=["localhost"], ips=["127.0.0.1"])
    (tmp_path / "biller-ca.pem").write_bytes(ca.cert_pem)
    state = tmp_path / "state"
    clock = SystemClock()

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, tls=(server.chain_pem, server.key_pem)) as running:
            biller = running.biller.agent
            profile = write_profile(
                tmp_path / "household.toml",
                target=f"127.0.0.1:{running.port}",
                fingerprint=running.biller.fingerprint.hex(),
                code=await code_for(running),
                transport='ca_file = "biller-ca.pem"',  # relative to the profile; TLS verified against it
            )
            run = ("consumer", "run", "--config", str(profile), "--state-dir", str(state), "--once")

            # First run: enrols with the code, finds this month's bill, agrees early payment, pays it.
            assert await cli(*run) == 0
            first = capsys.readouterr().out
            assert "enrolled now" in first
            account = await biller.account(ACCOUNT)
            assert account is not None
            assert account.consumer_party_id == PARTY  # the code was used for this household
            [order] = orders(state)
            today = clock.now().date()
            bill_id = sample.bill_id_for(ACCOUNT, today)
            bill = await running.biller.store.get_bill(bill_id)
            assert bill is not None
            assert order["bill_id"] == bill_id
            assert order["biller_party_id"] == BILLER
            assert order["payee_account"] == CONFIG.payments.payee_account
            amount = eur(order["amount"])
            assert amount == sample.sample_amount(CONFIG, ACCOUNT, f"{today:%Y-%m}") - eur("3.00")  # the discount
            assert "agreed" in first
            assert "paid now" in first
            assert "bill issued" in first
            assert "arrangement active" in first
            assert (state / KEY_FILE).stat().st_mode & 0o777 == 0o600
            assert (state / BANK_FILE).stat().st_mode & 0o777 == 0o600
            key = SigningKey.load(state / KEY_FILE)

            # The household's bank pays as ordered; the biller's rail settles it and signs a receipt.
            rail = running.biller.rail
            rail.pay(order["payment_reference"], amount, clock.now())
            assert len(await rail.settle_all(biller, clock.now())) == 1
            # And the biller issues another bill.
            await biller.issue_bill(ACCOUNT, eur("80.00"), today + timedelta(days=30), "Meter service", bill_id="extra")

            # Second run: same identity, no enrolment, the first bill not paid again, the new one paid,
            # the receipt and the new events picked up.
            assert await cli(*run) == 0
            second = capsys.readouterr().out
            assert "enrolled now" not in second
            assert "enrolled" in second
            assert SigningKey.load(state / KEY_FILE).keyid == key.keyid
            assert [o["bill_id"] for o in orders(state)] == [bill_id, "extra"]
            assert orders(state)[0] == order
            assert orders(state)[1]["amount"] == "77.00"
            assert "payment received, thank you" in second
            assert "verified" in second  # the receipt
            assert "arrangement active" in second  # on the new bill

            # Third run: nothing new to pay, no event seen twice.
            assert await cli(*run) == 0
            third = capsys.readouterr().out
            assert len(orders(state)) == 2
            assert "paid now" not in third
            assert "bill issued" not in third

        store = await SqliteConsumerStore.open(state / STORE_FILE)
        try:
            threads = await store.threads(BILLER)
            assert [t.outcome for t in threads] == [ThreadOutcome.AGREED, ThreadOutcome.AGREED]
            intents = await store.intents(BILLER)
            assert [i.state for i in intents] == [IntentState.PAID, IntentState.PAID]
            kinds = [e.kind for e in await store.stored_events(BILLER, ACCOUNT, 0, 100)]
            assert kinds.count(event_pb2.EVENT_KIND_PAYMENT_RECEIVED) == 1
            assert kinds.count(event_pb2.EVENT_KIND_BILL_ISSUED) == 2
        finally:
            await store.close()

    asyncio.run(main())


def test_after_the_biller_rotates_its_key_the_household_verifies_and_pays_what_the_new_key_signs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """KEY-17 end to end: the reference biller's key is rotated while it is stopped (`parley biller rotate-key`);
    the household's next run meets answers signed by a key its stored chain does not list, fetches the new
    version (same pinned fingerprint), verifies them, and pays the new bill; nothing is paid twice."""
    state, clock = tmp_path / "state", SystemClock()

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock) as running:
            profile = write_profile(
                tmp_path / "household.toml",
                target=f"127.0.0.1:{running.port}",
                fingerprint=running.biller.fingerprint.hex(),
                code=await code_for(running),
            )
            port, old_keyid = running.port, running.biller.key.keyid
            assert await cli("consumer", "run", "--config", str(profile), "--state-dir", str(state), "--once") == 0
            assert "paid now" in capsys.readouterr().out
        biller_state = str(tmp_path / "biller")
        assert await cli("biller", "rotate-key", "--state-dir", biller_state) == 0
        capsys.readouterr()
        async with reference_biller(tmp_path, monkeypatch, clock, port=port) as running:  # the enrolled address
            assert running.biller.key.keyid != old_keyid
            today = clock.now().date()
            await running.biller.agent.issue_bill(
                ACCOUNT, eur("80.00"), today + timedelta(days=30), "Meter service", bill_id="after-rotation"
            )
            assert await cli("consumer", "run", "--config", str(profile), "--state-dir", str(state), "--once") == 0
            second = capsys.readouterr().out
            assert "paid now" in second
            assert [o["bill_id"] for o in orders(state)][1:] == ["after-rotation"]

    asyncio.run(main())


def test_the_household_client_certificate_reaches_a_mutual_tls_biller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TRN-9: with `household.client_certificate`/`client_key` the run enrols and pays; without, the biller's
    handshake refuses it before any call, and nothing is spent or paid."""
    ca = make_dev_ca()
    server = issue_server_cert(ca, hostnames=["localhost"], ips=["127.0.0.1"])
    client = issue_client_cert(ca, "household-7")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "client.pem").write_bytes(client.chain_pem)
    (tmp_path / "client-key.pem").write_bytes(client.key_pem)
    (tmp_path / "client-key.pem").chmod(0o600)
    with_certificate = COMFORTABLE.replace(
        "[household]\n", '[household]\nclient_certificate = "client.pem"\nclient_key = "client-key.pem"\n'
    )

    async def main() -> None:
        tls = (server.chain_pem, server.key_pem)
        async with reference_biller(
            tmp_path, monkeypatch, SystemClock(), tls=tls, tls_client_ca=ca.cert_pem
        ) as running:
            code = await code_for(running)

            def profile(household: str) -> Path:
                return write_profile(
                    tmp_path / "household.toml",
                    target=f"127.0.0.1:{running.port}",
                    fingerprint=running.biller.fingerprint.hex(),
                    code=code,
                    transport='ca_file = "ca.pem"',
                    household=household,
                )

            run = ("consumer", "run", "--state-dir", str(tmp_path / "state"), "--once", "--config")
            assert await cli(*run, str(profile(COMFORTABLE))) != 0  # no certificate: refused at the handshake
            capsys.readouterr()
            account = await running.biller.agent.account(ACCOUNT)
            assert account is not None
            assert account.consumer_party_id is None  # the code was not spent
            assert orders(tmp_path / "state") == []

            assert await cli(*run, str(profile(with_certificate))) == 0
            assert "enrolled now" in capsys.readouterr().out
            account = await running.biller.agent.account(ACCOUNT)
            assert account is not None
            assert account.consumer_party_id == PARTY
            assert len(orders(tmp_path / "state")) == 1

    asyncio.run(main())


def test_an_unusable_client_certificate_is_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = issue_client_cert(make_dev_ca(), "household-7")
    (tmp_path / "client.pem").write_bytes(client.chain_pem)
    (tmp_path / "client-key.pem").write_bytes(client.key_pem)

    def run(household: str) -> str:
        profile = write_profile(
            tmp_path / "household.toml", target="127.0.0.1:1", fingerprint="ab" * 32, code=None, household=household
        )
        status = parley_main(
            ["consumer", "run", "--config", str(profile), "--state-dir", str(tmp_path / "s"), "--once"]
        )
        assert status == 2
        return capsys.readouterr().out

    def household(lines: str) -> str:
        return COMFORTABLE.replace("[household]\n", f"[household]\n{lines}\n")

    (tmp_path / "client-key.pem").chmod(0o644)
    out = run(household('client_certificate = "client.pem"\nclient_key = "client-key.pem"'))
    assert "household.client_key: " in out
    assert "readable by group or others" in out
    (tmp_path / "client-key.pem").chmod(0o600)
    assert "household.client_key: missing" in run(household('client_certificate = "client.pem"'))
    assert "household.client_certificate: cannot read" in run(
        household('client_certificate = "nowhere.pem"\nclient_key = "client-key.pem"')
    )
    assert "holds no PEM certificate" in run(
        household('client_certificate = "client-key.pem"\nclient_key = "client-key.pem"')
    )
    (tmp_path / "client.pem").chmod(0o600)  # a certificate given as the key: private, but no key in it
    assert "holds no PEM private key" in run(household('client_certificate = "client.pem"\nclient_key = "client.pem"'))
    assert not (tmp_path / "s").exists()  # refused before anything was created


def test_a_wrong_fingerprint_stops_at_pin_mismatch_and_pays_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, SystemClock()) as running:
            profile = write_profile(
                tmp_path / "household.toml",
                target=f"127.0.0.1:{running.port}",
                fingerprint="ab" * 32,  # not this biller's identity
                code=await code_for(running),
            )
            assert await cli("consumer", "run", "--config", str(profile), "--state-dir", str(state), "--once") == 1
            out = capsys.readouterr().out
            assert "PIN_MISMATCH" in out
            assert "not enrolled" in out
            account = await running.biller.agent.account(ACCOUNT)
            assert account is not None
            assert account.consumer_party_id is None  # the code was not spent on an unverified biller
        assert orders(state) == []
        store = await SqliteConsumerStore.open(state / STORE_FILE)
        try:
            assert await store.links() == []
            assert await store.intents() == []
        finally:
            await store.close()

    asyncio.run(main())


def test_an_unreachable_biller_is_exit_2_once_and_a_loop_keeps_going_until_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile_path = write_profile(
        tmp_path / "household.toml", target=f"127.0.0.1:{free_port()}", fingerprint="cd" * 32, code="7KQ2-M9XD-4RTB"
    )
    run = ["consumer", "run", "--config", str(profile_path), "--state-dir", str(tmp_path / "state")]
    assert parley_main([*run, "--once"]) == 2
    assert "cannot be reached" in capsys.readouterr().out

    reports: list[PassReport] = []

    async def loop() -> int:
        stop = asyncio.Event()

        def seen(report: PassReport) -> None:
            reports.append(report)
            if len(reports) == 2:
                stop.set()

        options = RunOptions(tmp_path / "state", interval=0.01, retry=RetryPolicy(attempts=1, call_timeout=2))
        out = Console(file=io.StringIO())
        return await run_household(load_profile(profile_path), options, out, stop=stop, on_report=seen)

    assert asyncio.run(loop()) == 0
    assert len(reports) == 2
    assert all(report.exit_code == 2 for report in reports)


def test_sigterm_stops_a_running_loop_cleanly(tmp_path: Path) -> None:
    profile = write_profile(
        tmp_path / "household.toml", target=f"127.0.0.1:{free_port()}", fingerprint="cd" * 32, code="7KQ2-M9XD-4RTB"
    )
    command = [sys.executable, "-m", "agent.cli", "consumer", "run", "--config", str(profile), "--interval", "0.2"]
    process = subprocess.Popen(
        [*command, "--state-dir", str(tmp_path / "state")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(60, process.kill)  # a pass that never reports fails the test instead of hanging it
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "cannot be reached" in line:  # the first pass is done
                break
        else:
            pytest.fail("the first pass never reported the unreachable biller")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
        assert process.returncode == 0, output
        assert "stopped" in output
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()


# --- Approval outside the mandate, instalments on their dates ---------------------------------------------


def test_moves_outside_the_mandate_wait_for_approval_and_payments_wait_for_their_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = ManualClock(START)
    state = tmp_path / "state"
    profile = tmp_path / "household.toml"
    due = date(2026, 3, 26)

    async def bill_600(agent: BillerAgent) -> None:
        await agent.issue_bill(ACCOUNT, eur("600.00"), due, "Winter energy", bill_id="winter")

    async def one_pass(approval: Approval) -> PassReport:
        household = await Household.open(load_profile(profile), state, clock=clock, approval=approval)
        try:
            report = await household.run_pass()
        finally:
            await household.close()
        render(report, Console())
        return report

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            write_profile(
                profile,
                target=f"127.0.0.1:{running.port}",
                fingerprint=running.biller.fingerprint.hex(),
                code=await code_for(running),
                household=SHORT,
            )
            # By default the request is printed and left pending: nothing is sent to the biller.
            report = await one_pass(Approval.ASK)
            assert report.exit_code == EXIT_APPROVALS_PENDING
            [record] = report.approvals
            assert (record.answer, record.request.action) == ("pending", "open")
            assert record.request.terms.kind is TermsKind.DEFERRAL
            assert [str(i.amount) for i in record.request.terms.schedule] == ["EUR 605.00"]
            assert any("fee EUR 5.00 exceeds" in v for v in record.request.violations)
            assert [line.outcome for line in report.negotiations] == ["awaiting your approval"]
            out = capsys.readouterr().out
            assert "--approve-all" in out
            assert "awaiting your approval" in out
            assert await running.biller.store.open_thread_bills(ACCOUNT, clock.now()) == []

            report = await one_pass(Approval.DENY)
            assert [(r.answer, r.request.action) for r in report.approvals] == [("declined", "open")]
            assert [line.outcome for line in report.negotiations] == ["not opened"]
            assert [line.status for line in report.bills] == ["new: you declined the opening"]
            assert await running.biller.store.open_thread_bills(ACCOUNT, clock.now()) == []

            # Approved: the deferral inside the biller's options is agreed; it is due on the 29th, not today.
            report = await one_pass(Approval.APPROVE)
            assert [line.outcome for line in report.negotiations] == ["agreed"]
            assert [(p.status, p.due) for p in report.payments] == [("scheduled", date(2026, 3, 29))]
            assert orders(state) == []

            clock.set(datetime(2026, 3, 29, 9, 0, tzinfo=UTC))
            report = await one_pass(Approval.ASK)
            assert report.approvals == []
            assert [p.status for p in report.payments] == ["paid now"]
            [order] = orders(state)
            assert (order["bill_id"], order["amount"]) == ("winter", "605.00")

            report = await one_pass(Approval.ASK)
            assert report.payments == []
            assert len(orders(state)) == 1

    asyncio.run(main())


def test_a_broken_arrangement_is_not_paid_and_is_negotiated_again_once_the_biller_offers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    state = tmp_path / "state"
    profile = tmp_path / "household.toml"

    async def bill_600(agent: BillerAgent) -> None:
        await agent.issue_bill(ACCOUNT, eur("600.00"), date(2026, 3, 26), "Winter energy", bill_id="winter")

    async def one_pass() -> PassReport:
        household = await Household.open(load_profile(profile), state, clock=clock, approval=Approval.APPROVE)
        try:
            return await household.run_pass()
        finally:
            await household.close()

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            biller = running.biller
            write_profile(
                profile,
                target=f"127.0.0.1:{running.port}",
                fingerprint=biller.fingerprint.hex(),
                code=await code_for(running),
                household=SHORT,
            )
            report = await one_pass()
            assert [line.outcome for line in report.negotiations] == ["agreed"]
            # The household misses its date; past the grace days the biller ends the arrangement.
            clock.set(datetime(2026, 4, 3, 9, 0, tzinfo=UTC))
            await scheduler.tick(biller.agent, CONFIG, clock.now(), store=biller.store, accounts=[ACCOUNT])
            report = await one_pass()
            kinds = [event_pb2.EventKind.Name(e.kind).removeprefix("EVENT_KIND_") for e in report.events]
            assert kinds[:3] == ["INSTALMENT_MISSED", "ARRANGEMENT_BROKEN", "RENEGOTIATION_OFFERED"]
            # Negotiated again (approved: a plan, outside this mandate), and the ended deferral is not paid.
            assert [(line.bill_id, line.outcome) for line in report.negotiations] == [("winter", "agreed")]
            assert [(p.instalment, p.status) for p in report.payments] == [
                (1, "scheduled"),
                (2, "scheduled"),
                (3, "scheduled"),
            ]
            assert [line.status for line in report.bills] == ["agreed, 0/3 paid"]
            assert orders(state) == []

        store = await SqliteConsumerStore.open(state / STORE_FILE)
        try:
            threads = await store.threads(BILLER, "winter")
            assert len(threads) == 2
            assert threads[0].outcome is ThreadOutcome.AGREED
        finally:
            await store.close()

    asyncio.run(main())


# --- Invalid profiles and state -------------------------------------------------------------------------------


def _profile_document() -> dict[str, Any]:
    return {
        "household": {"party_id": PARTY, "currency": "EUR", "balance": "10.00", "buffer": "0.00"},
        "income": {"amount": "100.00", "pay_day": 1},
        "mandate": {"max_fee": "0.00", "max_instalments": 0, "max_total_over_bill": "0.00"},
        "billers": {
            BILLER: {
                "priority": 1,
                "target": "127.0.0.1:7443",
                "fingerprint": "ab" * 32,
                "account_id": ACCOUNT,
                "code": "7KQ2-M9XD-4RTB",
                "insecure": True,
            }
        },
    }


def test_connection_keys_are_read() -> None:
    document = _profile_document()
    profile = parse_profile(document)
    assert profile.billers[0].connection == BillerConnection(
        "127.0.0.1:7443", bytes.fromhex("ab" * 32), ACCOUNT, "7KQ2-M9XD-4RTB", insecure=True
    )
    del document["billers"][BILLER]["insecure"]
    document["billers"][BILLER].update(ca_file="ca.pem", server_name="billing.energy.example")
    document["billers"]["biller:telco.example"] = {"priority": 2}
    assert profile.client_certificate is None
    document["household"].update(client_certificate="tls/household.pem", client_key="/keys/household-key.pem")
    profile = parse_profile(document, base_dir=Path("/etc/parley"))
    assert profile.client_certificate == ClientCertificateFiles(
        Path("/etc/parley/tls/household.pem"), Path("/keys/household-key.pem")
    )
    connection = profile.billers[0].connection
    assert connection is not None
    assert connection.ca_file == Path("/etc/parley/ca.pem")
    assert connection.server_name == "billing.energy.example"
    assert profile.billers[1].connection is None
    assert [b.biller_id for b in profile.connected()] == [BILLER]
    sample_profile = load_profile(Path(__file__).parents[1] / "reference_consumer" / "sample.toml")
    assert [b.biller_id for b in sample_profile.connected()] == [BILLER]


KEY = f'billers."{BILLER}"'


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fingerprint", "abc", f'{KEY}.fingerprint: "abc" is not an identity fingerprint (64 hex characters)'),
        ("fingerprint", "zz" * 32, f"{KEY}.fingerprint: "),
        ("target", "energy.example", f'{KEY}.target: "energy.example" is not a target "host:port"'),
        ("target", "host:99999", f"{KEY}.target: "),
        ("target", ..., f"{KEY}.target: missing"),
        ("account_id", ..., f"{KEY}.account_id: missing"),
        ("account_id", "", f"{KEY}.account_id: expected an account id"),
        ("code", "SHORT", f'{KEY}.code: "SHORT" is not an enrolment code'),
        ("insecure", "yes", f'{KEY}.insecure: expected true or false, got "yes"'),
        ("ca_file", "ca.pem", f"{KEY}.insecure: choose ca_file (TLS) or insecure = true, not both"),
        ("target", "billing.energy.example:7443", f"{KEY}.insecure: plaintext is allowed only to a loopback"),
        ("tls", True, f"{KEY}.tls: unknown key"),
    ],
)
def test_connection_errors_name_the_key(field: str, value: object, message: str) -> None:
    document = _profile_document()
    if value is ...:
        del document["billers"][BILLER][field]
    else:
        document["billers"][BILLER][field] = value
    with pytest.raises(ProfileError) as info:
        parse_profile(document)
    assert str(info.value).startswith(message)
    assert info.value.key == message.split(": ", maxsplit=1)[0]


def test_an_invalid_profile_or_state_is_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(text: str, state: str = "state") -> tuple[int, str]:
        profile = tmp_path / "household.toml"
        profile.write_text(text)
        status = parley_main(
            ["consumer", "run", "--config", str(profile), "--state-dir", str(tmp_path / state), "--once"]
        )
        return status, capsys.readouterr().out

    good = write_profile(tmp_path / "good.toml", target="127.0.0.1:1", fingerprint="ab" * 32, code=None).read_text()

    status, out = run(good.replace("max_fee =", "max_fees ="))
    assert status == 2
    assert "mandate.max_fees: unknown key (did you mean max_fee?)" in out
    status, out = run(good.replace('fingerprint = "' + "ab" * 32, 'fingerprint = "' + "ab" * 31))
    assert status == 2
    assert f"{KEY}.fingerprint: " in out
    status, out = run(good.replace("insecure = true", 'ca_file = "missing.pem"'))
    assert status == 2
    assert f"{KEY}.ca_file: cannot read" in out
    status, out = run(good + "\n[unused]\nx = 1\n")
    assert status == 2
    assert "unused: unknown key" in out
    assert not (tmp_path / "state").exists()  # refused before anything was created

    # A first run needs the enrolment code: said before anything is sent.
    status, out = run(good)
    assert status == 2
    assert f"{KEY}.code: missing" in out
    # The state directory holds this party's identity; another profile cannot use it.
    status, out = run(good.replace(PARTY, "consumer:somebody-else"))
    assert status == 2
    assert "household.party_id" in out
    assert "consumer:household-7" in out

    os.chmod(tmp_path / "state" / KEY_FILE, 0o644)
    status, out = run(good)
    assert status == 2
    assert "chmod 600" in out
    assert orders(tmp_path / "state") == []


def test_from_env_a_state_directory_that_is_not_the_household_s_is_refused_naming_the_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --from-env the person set variables, not a profile key or a flag: the refusal names them, and the
    other party's directory is left as it was (the household's key and store were made beside a biller's)."""
    biller_state, household_state = tmp_path / "biller", tmp_path / "household"
    IdentityDir(biller_state, "biller").load(BILLER, START)
    IdentityDir(household_state, "consumer").load(PARTY, START)
    environment = {
        "PARLEY_TARGET": "127.0.0.1:1",
        "PARLEY_BILLER_PARTY_ID": BILLER,
        "PARLEY_FINGERPRINT": "ab" * 32,
        "PARLEY_ACCOUNT_ID": ACCOUNT,
        "PARLEY_ENROLMENT_CODE": "7KQ2-M9XD-4RTB",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PARLEY_CONSUMER_PARTY_ID", raising=False)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}

    monkeypatch.setenv("PARLEY_STATE_DIR", str(biller_state))
    assert parley_main(["consumer", "run", "--from-env", "--once"]) == 2
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"unusable state: {biller_state} holds a biller's state: use another PARLEY_STATE_DIR"]

    monkeypatch.setenv("PARLEY_STATE_DIR", str(household_state))  # another household's: its party id is PARTY
    assert parley_main(["consumer", "run", "--from-env", "--once"]) == 2
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1, said
    assert said[0].startswith("invalid profile PARLEY_CONSUMER_PARTY_ID: 'consumer:conformance-household', but")
    assert said[0].endswith(f"holds the identity of {PARTY!r}: use another PARLEY_STATE_DIR")
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_a_profile_with_no_biller_to_reach_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "household.toml"
    profile.write_text(COMFORTABLE + f'\n[billers."{BILLER}"]\npriority = 1\n')
    assert parley_main(["consumer", "run", "--config", str(profile), "--state-dir", str(tmp_path / "s"), "--once"]) == 2
    assert "billers: no biller says how to reach it" in capsys.readouterr().out


def test_usage_errors_are_exit_2(tmp_path: Path) -> None:
    assert parley_main(["consumer", "run", "--once"]) == 2  # --config is required
    assert parley_main(["consumer", "run", "--config", "x.toml", "--approve-all", "--deny-all"]) == 2
    assert parley_main(["consumer", "run", "--config", str(tmp_path / "missing.toml"), "--once"]) == 2


# --- The seams `parley demo` drives the household through -------------------------------------------------

# Short until pay day on the 15th: the bill cannot be paid early, but it can on its due date, in full.
PAYS_AS_BILLED = """
[household]
party_id = "consumer:household-7"
currency = "EUR"
balance = "200.00"
buffer = "100.00"
pay_as_billed = true

[income]
amount = "2000.00"
pay_day = 15

[mandate]
max_fee = "10.00"
max_instalments = 6
max_total_over_bill = "15.00"
"""


class DecliningBank:
    """A bank that declines the first order and takes the others (a `PaymentSender`)."""

    def __init__(self) -> None:
        self.orders: list[PaymentOrder] = []
        self.declined = 0

    async def send(self, order: PaymentOrder) -> str:
        if not self.declined:
            self.declined += 1
            raise PaymentNotSent("the bank declined the transfer")
        self.orders.append(order)
        return f"bank-{len(self.orders)}"


def test_the_bank_stand_in_declines_an_order_it_cannot_write_down(tmp_path: Path) -> None:
    """An order book that cannot be opened is a bank that cannot be reached: nothing was ordered, so the order is
    declined (PaymentNotSent: the intent may be paid later, while its instructions allow), not left in doubt."""
    order = PaymentOrder(
        biller_party_id="biller:example",
        account_id="acct-1",
        bill_id="bill-1",
        intent_id="pi-1",
        amount=eur("120.00"),
        rail="SEPA",
        payee_name="Example Energy",
        payee_account="DE00 0000",
        payment_reference="CF-1",
        pay_by_time=START + timedelta(days=1),
    )
    unreachable = JsonLinesBank(tmp_path / "no-such-directory" / BANK_FILE, ManualClock(START))
    with pytest.raises(PaymentNotSent, match="cannot be opened"):
        asyncio.run(unreachable.send(order))
    bank = JsonLinesBank(tmp_path / BANK_FILE, ManualClock(START))
    assert asyncio.run(bank.send(order)).startswith("simbank-")
    assert [line["payment_reference"] for line in bank.orders()] == ["CF-1"]


@asynccontextmanager
async def spring_bill_paid_as_billed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: ManualClock, bank: PaymentSender | None = None
) -> AsyncIterator[Household]:
    """A reference biller that bills EUR 150.00 due 2026-03-26 ("spring") on enrolment, and an open household
    that pays its bills as billed (through `bank`, else the stand-in bank in its state directory)."""
    profile = tmp_path / "household.toml"

    async def bill_150(agent: BillerAgent) -> None:
        await agent.issue_bill(ACCOUNT, eur("150.00"), date(2026, 3, 26), "Spring energy", bill_id="spring")

    async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_150) as running:
        write_profile(
            profile,
            target=f"127.0.0.1:{running.port}",
            fingerprint=running.biller.fingerprint.hex(),
            code=await code_for(running),
            household=PAYS_AS_BILLED,
        )
        household = await Household.open(load_profile(profile), tmp_path / "state", clock=clock, bank=bank)
        try:
            yield household
        finally:
            await household.close()


def test_a_household_that_pays_as_billed_pays_a_plain_bill_on_its_date_without_negotiating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)

    async def main() -> None:
        async with spring_bill_paid_as_billed(tmp_path, monkeypatch, clock) as household:
            report = await household.run_pass()
            assert [p.opening.pays_as_billed for p in report.plan] == [True]
            assert report.negotiations == []
            assert [line.status for line in report.bills] == ["to pay as billed on 2026-03-26"]
            assert [(p.instalment, p.of, p.status) for p in report.payments] == [(1, 1, "scheduled")]
            clock.set(datetime(2026, 3, 26, 9, 0, tzinfo=UTC))
            report = await household.run_pass()
            assert [(p.amount, p.status) for p in report.payments] == [("EUR 150.00", "paid now")]
            assert [line.status for line in report.bills] == ["paid as billed"]
            report = await household.run_pass()  # paid once: neither planned nor paid again
            assert (report.plan, report.payments) == ([], [])
            assert len(orders(tmp_path / "state")) == 1
            assert await household.store.threads(BILLER, "spring") == []

    asyncio.run(main())


class BrokenDiskBank:
    """A bank whose sender fails mid-order with an error of its own (a `PaymentSender`): it may have paid."""

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, order: PaymentOrder) -> str:
        self.calls += 1
        raise OSError(28, "No space left on device")


def test_a_bank_that_fails_mid_order_leaves_the_payment_in_doubt_and_the_pass_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `PaymentSender` raising anything but PaymentNotSent (here the disk filled up while writing the order) may
    have paid: the pass reports the payment in doubt with what to do, says why among its problems, and ends as a
    pass does; no later pass hands the intent to the bank again (PAY-7)."""
    clock = ManualClock(START)
    bank = BrokenDiskBank()

    async def main() -> None:
        async with spring_bill_paid_as_billed(tmp_path, monkeypatch, clock, bank) as household:
            await household.run_pass()
            clock.set(datetime(2026, 3, 26, 9, 0, tzinfo=UTC))
            report = await household.run_pass()
            (line,) = report.payments
            assert (line.amount, line.status) == ("EUR 150.00", "in doubt: check with the bank")
            assert "parley consumer resolve-payment " in line.next_step
            (problem,) = report.problems
            assert "the bank's sender failed: OSError: [Errno 28] No space left on device" in problem.detail
            later = await household.run_pass()
            assert [p.status for p in later.payments] == ["in doubt: check with the bank"]
            assert bank.calls == 1

    asyncio.run(main())


def test_a_declined_instalment_is_reported_not_retried_and_a_followed_pass_reads_the_stored_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    state = tmp_path / "state"
    profile = tmp_path / "household.toml"
    bank = DecliningBank()

    async def bill_600(agent: BillerAgent) -> None:
        await agent.issue_bill(ACCOUNT, eur("600.00"), date(2026, 3, 26), "Winter energy", bill_id="winter")

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            biller = running.biller
            write_profile(
                profile,
                target=f"127.0.0.1:{running.port}",
                fingerprint=biller.fingerprint.hex(),
                code=await code_for(running),
                household=SHORT,
            )
            household = await Household.open(
                load_profile(profile), state, clock=clock, approval=Approval.APPROVE, event_idle=0.1, bank=bank
            )
            try:
                report = await household.run_pass()
                [agreed] = report.negotiations
                assert agreed.outcome == "agreed"
                assert agreed.terms is not None
                due = agreed.terms.schedule[0].due_date
                await household.follow()

                def no_stream(*args: object, **kwargs: object) -> None:
                    raise AssertionError("a followed pass reads the store, it opens no stream")

                monkeypatch.setattr(household.agent, "watch", no_stream)
                clock.set(datetime(due.year, due.month, due.day, 9, 0, tzinfo=UTC))
                await scheduler.tick(biller.agent, CONFIG, clock.now(), store=biller.store, accounts=[ACCOUNT])
                count = await biller.store.event_count(ACCOUNT)
                for _ in range(500):  # the background watch stores what the biller appended
                    if len(await household.agent.stored_events(BILLER, account_id=ACCOUNT)) == count:
                        break
                    await asyncio.sleep(0.01)
                report = await household.run_pass()
                kinds = [event_pb2.EventKind.Name(e.kind).removeprefix("EVENT_KIND_") for e in report.events]
                assert "INSTALMENT_DUE" in kinds  # stored by the background watch, read without a stream
                assert [(p.status, p.note) for p in report.payments] == [
                    (DECLINED_NOW, "the bank declined the transfer")
                ]
                assert report.problems == []
                report = await household.run_pass()  # the bank said no: this run does not try again
                assert [p.status for p in report.payments] == [DECLINED_EARLIER]
                assert bank.orders == []
            finally:
                await household.close()

    asyncio.run(main())
