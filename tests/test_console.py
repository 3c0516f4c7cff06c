"""The operator console (`parley biller console`) over a store filled by a real run, in headless Chromium.

`parley demo` runs once in this process (two reference billers, six households, three simulated months over
gRPC), its state directory kept instead of thrown away; the console then serves the energy biller's store
and Chromium opens it: the token is required, the outcome page shows its figures and charts, a thread's
timeline shows its moves, the drill-down pages list what the demo did, a cross-site post is refused, no
secret is on any page and nothing is requested from anywhere but the console itself. Screenshots go to
test-artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, CookieJar
from aiohttp.test_utils import make_mocked_request
from rich.console import Console
from selenium.webdriver.common.by import By

from agent.cli import main as parley_main
from agent.clock import ManualClock
from agent.stores import ThreadOutcome, open_biller_store
from agent.tools import demo
from reference_biller.console import ConsoleSettings, console_web_config, create_console_app, read_snapshot
from reference_biller.console import app as console_app
from reference_biller.console.records import Snapshot
from reference_biller.service import STORE_FILE
from reference_consumer.households import END
from tests.helpers.browser import ServedApp, chromium, save_screenshot, serving

ENERGY_STATE = "biller-energy.example"  # the demo's state directory of the energy biller (party id, ':' → '-')
TELECOM_STATE = "biller-telco.example"  # the telecom operator's, where a household counters the biller's offer
CONSOLE_NOW = datetime(2026, 7, 31, 12, tzinfo=UTC)  # after the demo: every 30-day cure window has closed
assert CONSOLE_NOW.date() > END


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directories `parley demo` leaves behind, kept: its temporary directory is swapped for ours."""
    state = tmp_path_factory.mktemp("demo-state")
    kept = types.SimpleNamespace(TemporaryDirectory=lambda prefix: contextlib.nullcontext(str(state)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "tempfile", kept)
        assert demo.run(state / "bundles", Console(file=io.StringIO(), width=200)) == 0
    return state


@pytest.fixture(scope="module")
def store_path(demo_state: Path) -> Path:
    return demo_state / ENERGY_STATE / STORE_FILE


@pytest.fixture(scope="module")
def snapshot(store_path: Path) -> Snapshot:
    async def read() -> Snapshot:
        store = await open_biller_store(store_path)
        try:
            return await read_snapshot(store)
        finally:
            await store.close()

    return asyncio.run(read())


@contextlib.contextmanager
def console_served(store_path: Path, biller_name: str = "Northwind Energy") -> Iterator[ServedApp]:
    settings = ConsoleSettings(str(store_path), ManualClock(CONSOLE_NOW))
    with serving(lambda: create_console_app(settings, console_web_config(f"{biller_name} · console"))) as served:
        yield served


def console_messages(browser: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = browser.get_log("browser")
    return messages


def page_text(browser: Any) -> str:
    text: str = browser.find_element(By.TAG_NAME, "body").text
    return text


def test_the_snapshot_holds_what_the_demo_did(snapshot: Snapshot) -> None:
    assert snapshot.accounts
    assert snapshot.bills
    assert snapshot.threads
    assert snapshot.arrangements
    assert any(payment.settled_at is not None for payment in snapshot.payments)
    assert {event.kind_name for event in snapshot.events} >= {"BILL_ISSUED", "ARRANGEMENT_ACTIVE", "PAYMENT_RECEIVED"}


def test_the_console_in_chromium(store_path: Path, snapshot: Snapshot) -> None:
    secrets = _secrets_of(store_path)
    with console_served(store_path) as served, chromium() as browser:
        site = served.site
        browser.get(site.url)
        assert browser.find_element(By.TAG_NAME, "h1").text == "Open this page with its link"
        console_messages(browser)  # drop the note of that 403

        browser.get(site.opening_url)
        assert browser.current_url == site.url
        assert browser.find_element(By.TAG_NAME, "h1").text == "How collections are going"
        figures = browser.find_elements(By.CSS_SELECTOR, "section.figure")
        assert [figure.get_attribute("id") for figure in figures] == [
            "self-service",
            "kept",
            "cure",
            "days-to-pay",
            "reminders",
            "hardship",
        ]
        for figure in figures:
            headline = figure.find_element(By.CSS_SELECTOR, ".headline").text
            assert headline != "–", f"{figure.get_attribute('id')} has no figure on a store the demo filled"
        assert len(browser.find_elements(By.CSS_SELECTOR, "section.figure svg.chart")) >= 5
        save_screenshot(browser, "console-outcomes")
        pages = {"outcomes": browser.page_source}

        for name, path in [
            ("accounts", "accounts"),
            ("bills", "bills"),
            ("threads", "threads"),
            ("arrangements", "arrangements"),
            ("payments", "payments"),
            ("events", "events"),
        ]:
            browser.get(site.url + path)
            assert "Open this page" not in page_text(browser)
            pages[name] = browser.page_source
            save_screenshot(browser, f"console-{name}")

        # A thread that ended in agreement, move by move.
        agreed = max(
            (thread for thread in snapshot.threads if thread.outcome is ThreadOutcome.AGREED),
            key=lambda thread: thread.moves,
        )
        browser.get(site.url + "threads/" + agreed.thread_id.hex())
        steps = browser.find_elements(By.CSS_SELECTOR, "svg.chart-timeline text.step-label")
        labels = [step.text for step in steps]
        assert len(labels) == agreed.moves + 1, labels
        assert labels[0].startswith("Customer opens:")
        assert labels[-1].startswith("Agreed")
        assert any("accepts" in label for label in labels)
        pages["thread"] = browser.page_source
        save_screenshot(browser, "console-thread")

        account = snapshot.accounts[0].account_id
        browser.get(site.url + "accounts/" + account)
        assert browser.find_element(By.TAG_NAME, "h1").text == f"Account {account}"
        pages["account"] = browser.page_source
        save_screenshot(browser, "console-account")

        origin = site.url.rstrip("/")
        names = browser.execute_script("return performance.getEntries().map(entry => entry.name)")
        assert all(name.startswith(origin + "/") for name in names if "://" in name), names
        problems = [entry for entry in console_messages(browser) if entry["level"] == "SEVERE"]
        assert not problems, problems

    for name, source in pages.items():
        assert "<form" not in source, name  # read-only: nothing to post
        for secret in secrets:
            assert secret not in source, f"a secret is on the {name} page"


def _secrets_of(store_path: Path) -> list[str]:
    """What must never reach a page: enrolment code hashes and salts, the codes' HMAC secret, disclosures, the
    biller's key file."""
    import sqlite3  # noqa: PLC0415 -- only this check reads the file directly

    with contextlib.closing(sqlite3.connect(store_path)) as db:
        rows = db.execute("SELECT code_hash, salt FROM enrolment_codes").fetchall()
        disclosures = db.execute("SELECT content FROM disclosures").fetchall()
    found = [value.hex() for row in rows for value in row if value]  # HMAC codes have no salt (ENR-8)
    found += [content.hex() for (content,) in disclosures if content]
    secret_file = store_path.parent / "enrolment.secret"
    if secret_file.exists():
        found.append(secret_file.read_bytes().hex())
    key_file = store_path.parent / "biller.key"
    if key_file.exists():
        found += re.findall(r"[A-Za-z0-9+/=]{40,}", key_file.read_text(errors="ignore"))
    return found


def test_a_counter_offer_reads_move_by_move(demo_state: Path) -> None:
    store_path = demo_state / TELECOM_STATE / STORE_FILE
    with console_served(store_path, "Telecom") as served, chromium() as browser:
        browser.get(served.site.opening_url)
        browser.find_element(By.LINK_TEXT, "Negotiations").click()
        save_screenshot(browser, "console-threads-telecom")
        rows = browser.find_elements(By.CSS_SELECTOR, "table.list tbody tr")
        countered = next(row for row in rows if row.find_elements(By.TAG_NAME, "td")[3].text == "3")
        countered.find_element(By.TAG_NAME, "a").click()
        labels = [step.text for step in browser.find_elements(By.CSS_SELECTOR, "svg.chart-timeline text.step-label")]
        assert [label.split(":")[0] for label in labels] == [
            "Customer opens",
            "Biller counters",
            "Customer accepts",
            "Agreed",
        ], labels
        assert "instalments of EUR" in labels[1]
        save_screenshot(browser, "console-thread-counter-offer")


def test_a_cross_site_post_and_a_tokenless_request_are_refused(store_path: Path) -> None:
    with console_served(store_path) as served:
        site = served.site

        async def probe() -> tuple[int, int, int]:
            async with ClientSession(timeout=ClientTimeout(total=30)) as stranger, stranger.get(site.url) as refused:
                tokenless = refused.status
            async with ClientSession(cookie_jar=CookieJar(unsafe=True), timeout=ClientTimeout(total=30)) as client:
                async with client.get(site.opening_url, allow_redirects=False) as opened:
                    assert opened.status == 303
                headers = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
                async with client.post(site.url, data={"x": "1"}, headers=headers) as posted:
                    cross_site = posted.status
                async with client.get(site.url) as page:
                    signed_in = page.status
            return tokenless, cross_site, signed_in

        assert served.call(probe()) == (403, 403, 200)


def test_the_command_refuses_an_address_off_loopback_without_tls(
    store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["biller", "console", "--state-dir", str(store_path.parent), "--listen", "0.0.0.0:0"]
    assert parley_main(argv) == 2
    said = capsys.readouterr()
    assert "--tls-cert" in said.out + said.err


@pytest.mark.parametrize(
    ("query", "number", "shown"),
    [("", 1, list(range(25))), ("?page=3", 3, list(range(50, 60))), ("?page=99", 3, list(range(50, 60))),
     ("?page=x", 1, list(range(25))), ("?page=-4", 1, list(range(25)))],
)  # fmt: skip
def test_lists_are_bounded_pages(query: str, number: int, shown: list[int]) -> None:
    page = console_app._page(make_mocked_request("GET", "/bills" + query), list(range(60)))
    assert (page.number, list(page.items), page.count, page.total) == (number, shown, 3, 60)
    assert page.previous == (number - 1 if number > 1 else None)
    assert page.next == (number + 1 if number < 3 else None)


def test_an_empty_store_reads_in_words_and_unknown_records_are_404(tmp_path: Path) -> None:
    store_path = tmp_path / STORE_FILE

    async def create() -> None:
        await (await open_biller_store(store_path)).close()

    asyncio.run(create())
    with console_served(store_path) as served:
        site = served.site

        async def visit() -> dict[str, tuple[int, str]]:
            seen = {}
            async with ClientSession(cookie_jar=CookieJar(unsafe=True), timeout=ClientTimeout(total=30)) as client:
                async with client.get(site.opening_url, allow_redirects=False) as opened:
                    assert opened.status == 303
                for path in ["", "accounts", "bills", "threads", "arrangements", "payments", "events"]:
                    async with client.get(site.url + path) as page:
                        seen[path] = (page.status, await page.text())
                for path in ["accounts/nobody", "threads/00ff", "threads/not-hex"]:
                    async with client.get(site.url + path) as page:
                        seen[path] = (page.status, await page.text())
            return seen

        seen = served.call(visit())
    assert {path: status for path, (status, _) in seen.items() if status != 200} == {
        "accounts/nobody": 404,
        "threads/00ff": 404,
        "threads/not-hex": 404,
    }
    outcomes_page = seen[""][1]
    assert "No bill has been paid in full in this period yet." in outcomes_page
    assert "No arrangement has ended yet" in outcomes_page
    assert "<svg" not in outcomes_page  # no chart over nothing
    assert "No accounts yet." in seen["accounts"][1]


COPIED_TABLES = ("accounts", "parties", "bindings", "bills", "threads", "messages", "payment_intents", "settlements")
BOOLEAN_COLUMNS = frozenset({"enrolment_locked", "hardship_disclosed"})


def test_the_snapshot_reads_the_same_from_postgresql(store_path: Path, snapshot: Snapshot, postgres_dsn: str) -> None:
    """The demo's records copied row for row into a PostgreSQL store read back as the same snapshot."""
    import sqlite3  # noqa: PLC0415 -- the copy reads the demo's file directly

    import psycopg  # noqa: PLC0415 -- the postgres extra, installed with dev

    async def migrate() -> None:
        await (await open_biller_store(postgres_dsn)).close()

    asyncio.run(migrate())
    with contextlib.closing(sqlite3.connect(store_path)) as source, psycopg.connect(postgres_dsn) as target:
        for table in (*COPIED_TABLES, "bill_presentations", "binding_events"):
            cursor = source.execute(f"SELECT * FROM {table}")
            columns = [column[0] for column in cursor.description if column[0] != "rowid"]
            for row in cursor:
                values = [
                    bool(value) if name in BOOLEAN_COLUMNS else value
                    for name, value in zip([c[0] for c in cursor.description], row, strict=True)
                    if name != "rowid"
                ]
                target.execute(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
                    values,
                )

    async def read() -> Snapshot:
        store = await open_biller_store(postgres_dsn)
        try:
            return await read_snapshot(store)
        finally:
            await store.close()

    assert asyncio.run(read()) == snapshot


def test_the_command_prints_its_link_serves_and_stops_on_sigterm(store_path: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "agent.cli", "biller", "console", "--state-dir", str(store_path.parent)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[1].startswith("console     http://127.0.0.1:"), lines
        opening = lines[2].removeprefix("open").strip()
        assert "?token=" in opening

        async def open_it() -> tuple[int, int, str]:
            async with ClientSession(cookie_jar=CookieJar(unsafe=True), timeout=ClientTimeout(total=30)) as client:
                async with client.get(opening.split("?")[0]) as refused:
                    tokenless = refused.status
                async with client.get(opening) as page:
                    return tokenless, page.status, await page.text()

        tokenless, status, text = asyncio.run(open_it())
        assert (tokenless, status) == (403, 200)
        assert "How collections are going" in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = subprocess.run([*command[:-1], str(empty)], capture_output=True, text=True, check=False, timeout=60)
    assert refused.returncode == 2
    assert "no biller store" in refused.stdout + refused.stderr
