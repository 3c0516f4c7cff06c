"""The household's private space in a browser (reference_consumer/web): headless Chromium against a live biller.

The reference biller serves gRPC on 127.0.0.1 on the test's loop; the bot's passes run through `Household` on a
ManualClock that moves both sides (the test drives them, as `serve`'s loop would); the pages are served on their
own thread (`tests/helpers/browser.serving`) from the same state directory, and `StateDirSource.changed` is the
hook `parley consumer serve` gives `run_household` after every pass. Screenshots of each page go to
test-artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, CookieJar, web
from selenium.webdriver.common.by import By

from agent.clock import ManualClock, SystemClock
from agent.consumer import PaymentOrder
from agent.protocol.enrolment import normalize_enrolment_code
from agent.protocol.terms import Money
from agent.stores.base import ApprovalState, IntentState
from agent.web import CSRF_FIELD
from reference_consumer.profile import load_profile, parse_profile
from reference_consumer.runner import KEY_FILE, Approval, JsonLinesBank
from reference_consumer.web import StateDirSource, bill_key, cash_flow_chart, create_space_app, space_config, tracker
from reference_consumer.web.views import superseded
from reference_consumer.words import payment_words
from tests.helpers.browser import chromium, save_screenshot, serving
from tests.test_consumer_run import (
    ACCOUNT,
    BILLER,
    SHORT,
    START,
    cli,
    code_for,
    orders,
    reference_biller,
    write_profile,
)
from tests.test_household_space import approvals_in, bill_600, one_pass
from tests.test_web_kit import console_messages, wait_for


def _text(browser: Any) -> str:
    return str(browser.find_element(By.TAG_NAME, "body").text)


async def _blocking(function: Callable[[], Any]) -> Any:
    """Selenium blocks: run it off the loop that serves the biller."""
    return await asyncio.to_thread(function)


def test_a_household_follows_its_bill_approves_in_the_browser_and_sees_the_agreement_and_payment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    state, profile_path = tmp_path / "state", tmp_path / "household.toml"
    pages: list[str] = []  # every page's source, to check for leaks at the end
    codes: list[str] = []

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            code = await code_for(running)
            codes.extend({code, normalize_enrolment_code(code), normalize_enrolment_code(code).replace("-", "")})
            target = f"127.0.0.1:{running.port}"
            fingerprint = running.biller.fingerprint.hex()
            write_profile(profile_path, target=target, fingerprint=fingerprint, code=code, household=SHORT)
            await one_pass(profile_path, state, clock)  # a deferral with a fee outside the mandate: asked
            [(request_id, _)] = await approvals_in(state)
            profile = load_profile(profile_path)
            sources: list[StateDirSource] = []

            def make_app() -> web.Application:
                sources.append(StateDirSource(profile, state, clock=clock))
                return create_space_app({"": sources[0]}, space_config())

            with serving(make_app) as served, chromium() as browser:
                source, url = sources[0], served.site.url

                def keep() -> None:
                    pages.append(browser.page_source)

                # The token is required: without it, a 403 saying how to open the space.
                def without_token() -> None:
                    browser.get(url)
                    assert browser.find_element(By.TAG_NAME, "h1").text == "Open this page with its link"
                    console_messages(browser)  # the console notes that 403: it was the point

                await _blocking(without_token)

                # Bills, with their provenance.
                def bills() -> None:
                    browser.get(served.site.opening_url)
                    assert browser.current_url == url  # the token left the address bar
                    text = _text(browser)
                    assert "Winter energy" in text
                    assert "EUR 600.00" in text
                    assert "energy.example" in text
                    assert "waiting for your approval" in text
                    assert "1 request waits for your answer" in text
                    verified = browser.find_element(By.CSS_SELECTOR, ".bill .verified")
                    assert fingerprint in str(verified.get_attribute("title"))  # the full one on hover
                    assert fingerprint[:4] in verified.text
                    keep()
                    save_screenshot(browser, "household-bills")

                await _blocking(bills)

                # A post from another site is refused (and changes nothing), in the browser and over HTTP.
                jar = CookieJar(unsafe=True)  # one signed-in HTTP client, its CSRF token read while the form was shown
                csrf = await _refused_cross_site(served, browser, request_id, jar)
                assert await approvals_in(state) == [(request_id, ApprovalState.PENDING)]

                # The bill's tracker, then the approval with exactly what will be sent.
                def tracker_then_approve() -> None:
                    browser.get(url)
                    browser.find_element(By.PARTIAL_LINK_TEXT, "Follow this bill").click()
                    steps = browser.find_elements(By.CSS_SELECTOR, "svg.chart-timeline text.step-label")
                    assert [step.text for step in steps][:3] == ["Bill issued", "Options weighed", "Negotiated"]
                    keep()
                    save_screenshot(browser, "household-bill-waiting")
                    browser.find_element(By.PARTIAL_LINK_TEXT, "Approvals").click()
                    card = browser.find_element(By.ID, f"request-{request_id}")
                    assert "pay later: EUR 605.00 on 2026-03-29 (fee EUR 5.00)" in card.text
                    assert "fee EUR 5.00 exceeds" in card.text
                    assert re.search(r"\b[0-9a-f]{64}\b", card.find_element(By.CSS_SELECTOR, "code.digest").text)
                    keep()
                    save_screenshot(browser, "household-approvals")
                    card.find_element(By.CSS_SELECTOR, "button.approve").click()
                    wait_for(browser, lambda b: "Approved. The bot sends exactly these terms" in _text(b))
                    assert "Nothing waits for you" in _text(browser)

                await _blocking(tracker_then_approve)
                assert await approvals_in(state) == [(request_id, ApprovalState.APPROVED)]

                # The tracker follows the bot live: the pass sends the approved terms, the page updates in place.
                def open_tracker() -> None:
                    browser.get(url)
                    browser.find_element(By.PARTIAL_LINK_TEXT, "Follow this bill").click()
                    browser.execute_script("window.stillTheSamePage = true")
                    wait_for(browser, lambda _: served.run(lambda: source.hub.subscribers) == 1)

                await _blocking(open_tracker)
                await one_pass(profile_path, state, clock, Approval.ASK)
                served.run(source.changed)

                def agreed_live() -> None:
                    wait_for(browser, lambda b: "The agreement file verifies" in _text(b))
                    assert browser.execute_script("return window.stillTheSamePage") is True
                    labels = browser.find_elements(By.CSS_SELECTOR, "svg.chart-timeline text.step-label.current")
                    assert [label.text for label in labels] == ["Payment instructions"]
                    moves = [move.text for move in browser.find_elements(By.CSS_SELECTOR, "ol.moves li")]
                    assert moves == [
                        "Your bot proposed pay later: EUR 605.00 on 2026-03-29 (fee EUR 5.00)",
                        "energy.example accepted",
                    ]
                    keep()
                    save_screenshot(browser, "household-bill-agreed")
                    browser.find_element(By.PARTIAL_LINK_TEXT, "Agreements").click()
                    assert "verifies" in browser.find_element(By.CSS_SELECTOR, ".agreement").text
                    keep()
                    save_screenshot(browser, "household-agreements")
                    browser.find_element(By.PARTIAL_LINK_TEXT, "Cash flow").click()
                    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart-line")
                    assert chart.find_elements(By.CSS_SELECTOR, "line.threshold")
                    markers = [e.text for e in chart.find_elements(By.CSS_SELECTOR, "text.marker-label")]
                    assert "Pay day" in markers
                    assert "energy.example" in markers
                    keep()
                    save_screenshot(browser, "household-cash-flow")

                await _blocking(agreed_live)
                pages.append(await _download_verifies(served, request_id, jar, csrf))

                # Pay day for the deferral: the next pass pays; the payments page shows it.
                clock.set(datetime(2026, 3, 29, 9, 0, tzinfo=UTC))
                await one_pass(profile_path, state, clock, Approval.ASK)
                [order] = orders(state)  # the household's bank pays; the biller's rail settles and signs a receipt
                running.biller.rail.pay(order["payment_reference"], Money.parse(order["amount"], "EUR"), clock.now())
                assert len(await running.biller.rail.settle_all(running.biller.agent, clock.now())) == 1
                await one_pass(profile_path, state, clock, Approval.ASK)  # the receipt and the biller's thanks
                served.run(source.changed)

                def paid() -> None:
                    browser.get(url + "payments")
                    card = browser.find_element(By.CSS_SELECTOR, ".payment")
                    assert "EUR 605.00" in card.text
                    assert "paid" in card.text
                    assert "EUR 605.00 received, signed by energy.example" in card.text
                    keep()
                    save_screenshot(browser, "household-payments")
                    browser.get(url)
                    assert "paid" in browser.find_element(By.CSS_SELECTOR, ".bill .state").text
                    browser.find_element(By.PARTIAL_LINK_TEXT, "Follow this bill").click()
                    steps = browser.find_elements(By.CSS_SELECTOR, "svg.chart-timeline circle.step.done")
                    assert len(steps) == 8  # issued … thanks: followed to the end
                    keep()
                    save_screenshot(browser, "household-bill-paid")
                    origin = url.rstrip("/")
                    names = browser.execute_script("return performance.getEntries().map(entry => entry.name)")
                    assert all(name.startswith(origin + "/") for name in names if "://" in name), names
                    problems = [entry for entry in console_messages(browser) if entry["level"] == "SEVERE"]
                    assert not problems, problems  # a CSP violation would show here

                await _blocking(paid)

    asyncio.run(main())

    # Nothing secret on any page: not the enrolment code, not the private key.
    key_line = (state / KEY_FILE).read_text().strip().splitlines()[1]
    for page in pages:
        assert key_line not in page
        assert not any(code in page for code in codes)


async def _refused_cross_site(served: Any, browser: Any, request_id: str, jar: CookieJar) -> str:
    """Another site's form, clicked in the signed-in browser, and a forged post over HTTP: both refused.
    Returns the CSRF token of the HTTP client's session (signed in with `jar`)."""
    action = f"{served.site.url}approvals/{request_id}"

    async def evil_page(request: web.Request) -> web.Response:
        return web.Response(
            content_type="text/html",
            text=f'<form method="post" action="{action}"><input name="answer" value="approve">'
            f'<input name="{CSRF_FIELD}" value="guess"><button>Claim your refund</button></form>',
        )

    async def start_evil_site() -> web.AppRunner:
        evil = web.Application()
        evil.router.add_get("/", evil_page)
        runner = web.AppRunner(evil)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    evil_runner = served.call(start_evil_site())
    try:

        def click_the_bait() -> None:
            browser.get(f"http://localhost:{evil_runner.addresses[0][1]}/")
            browser.find_element(By.TAG_NAME, "button").click()
            wait_for(browser, lambda b: b.current_url.startswith(served.site.url))
            assert wait_for(browser, lambda b: b.find_element(By.TAG_NAME, "h1").text) in {
                "Open this page with its link",  # SameSite=Strict: the cookie did not go along
                "This form could not be sent",
            }
            console_messages(browser)

        await _blocking(click_the_bait)
    finally:
        served.call(evil_runner.cleanup())

    async with ClientSession(cookie_jar=jar, timeout=ClientTimeout(total=30)) as client:
        async with client.get(served.site.opening_url) as response:
            page = await response.text()
        found = re.search(rf'name="{CSRF_FIELD}" value="([0-9a-f]+)"', await _page(client, served, "approvals"))
        assert found is not None, page
        form = {"answer": "approve", CSRF_FIELD: found.group(1)}
        cross_site = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        async with client.post(action, data=form, headers=cross_site, allow_redirects=False) as response:
            assert response.status == 403
        async with client.post(action, data={"answer": "approve"}, allow_redirects=False) as response:
            assert response.status == 403  # same origin, but without the session's CSRF token
    return found.group(1)


async def _page(client: ClientSession, served: Any, path: str) -> str:
    async with client.get(served.site.url + path) as response:
        assert response.status == 200
        return await response.text()


async def _download_verifies(served: Any, answered: str, jar: CookieJar, csrf: str) -> str:
    """The agreement's download is the parley-bundle/1 file; a request already answered cannot be answered
    again; returns status.json (checked for leaks with the pages)."""
    async with ClientSession(cookie_jar=jar, timeout=ClientTimeout(total=30)) as client:
        text = await _page(client, served, "status.json")
        document = json.loads(text)
        [agreement] = document["agreements"]
        async with client.get(f"{served.site.url}agreements/{agreement['thread_id']}") as response:
            assert response.status == 200
            assert "attachment" in response.headers["Content-Disposition"]
            bundle = json.loads(await response.read())
        assert bundle["format"] == "parley-bundle/1"
        async with client.get(f"{served.site.url}agreements/{'00' * 16}") as response:
            assert response.status == 404
        form = {"answer": "decline", CSRF_FIELD: csrf}
        own = {"Origin": served.site.url.rstrip("/"), "Sec-Fetch-Site": "same-origin"}
        async with client.post(f"{served.site.url}approvals/{answered}", data=form, headers=own) as response:
            assert response.status == 409
            assert "cannot be answered any more" in await response.text()
    return text


PROFILE = {
    "household": {"party_id": "consumer:h", "currency": "EUR", "balance": "300.00", "buffer": "100.00"},
    "income": {"amount": "2000.00", "pay_day": 28},
    "expenses": [{"name": "rent", "amount": "250.00", "day": 1}],
    "mandate": {"max_fee": "0", "max_instalments": 3, "max_total_over_bill": "0"},
    "billers": {BILLER: {"priority": 1}},
}


def test_the_cash_flow_chart_projects_the_balance_exactly_with_every_due_date() -> None:
    profile = parse_profile(PROFILE)
    upcoming = {
        "biller": BILLER,
        "biller_name": "energy.example",
        "bill_id": "winter",
        "instalment": 1,
        "of": 1,
        "due_date": "2026-03-29",
        "amount": {"minor": 60500, "currency": "EUR", "text": "EUR 605.00"},
        "overdue": False,
    }
    chart = str(cash_flow_chart(profile, {"upcoming": [upcoming]}, date(2026, 3, 5)))
    # 300.00 on the 5th; +2000.00 on pay day the 28th; -605.00 on the 29th; -250.00 rent on 1 April.
    for said in ("EUR 300.00", "28 Mar: EUR 2300.00", "29 Mar: EUR 1695.00", "1 Apr: EUR 1445.00"):
        assert said in chart, said
    assert "Buffer EUR 100.00" in chart
    assert "energy.example" in chart
    assert "Pay day" in chart


def bill_row(**facts: str) -> dict[str, Any]:
    """A bill of 10 euros from energy.example as the household's status document lists it, with `facts` (its state)."""
    return {
        "biller": BILLER,
        "biller_name": "energy.example",
        "bill_id": "b1",
        "account_id": ACCOUNT,
        "amount": {"minor": 1000, "currency": "EUR", "text": "EUR 10.00"},
        "issue_date": "2026-03-01",
        "due_date": "2026-03-20",
        "description": "March",
        **facts,
    }


def payment_row(**facts: str | None) -> dict[str, Any]:
    """The one payment of `bill_row`'s bill, whole, as the status document lists it, with `facts` (its state)."""
    return {
        "biller": BILLER,
        "biller_name": "energy.example",
        "bill_id": "b1",
        "instalment": 1,
        "of": 1,
        "amount": bill_row()["amount"],
        "receipt": None,
        **facts,
    }


def test_a_tracker_needs_a_known_bill_and_marks_every_step_up_to_the_last_reached() -> None:
    bill = bill_row(state="paid", state_text="paid")
    payment = payment_row(state="paid", state_text="paid", bank_reference="R1", payee="Energy Ltd")
    document = {"bills": [bill], "payments": [payment]}
    assert tracker(document, "nope") is None
    found = tracker(document, bill_key(BILLER, "b1"))
    assert found is not None
    drawn = str(found.steps)
    assert drawn.count('class="step done"') == 6  # issued … paid: a bill paid at once passed every step
    assert 'class="step current"' in drawn
    assert "Receipt" in drawn

    # A plan with 1 of 3 instalments paid stands at "Paid", however many receipts and thanks came so far.
    plan = {**bill, "state": "agreed", "state_text": "agreed: ...; 1 of 3 paid"}
    receipt = {"amount_received": bill["amount"], "received_at": "2026-03-20T09:00:00+00:00", "disputed": False}
    thanks = {"biller": BILLER, "bill_id": "b1", "kind": "payment_received", "message": "Thank you", "text": "thanks"}
    terms = {"text": "3 monthly instalments", "schedule": []}
    document = {
        "bills": [plan],
        "payments": [{**payment, "of": 3, "receipt": receipt}],
        "agreements": [{"biller": BILLER, "bill_id": "b1", "thread_id": "t1", "terms": terms}],
        "events": [{**thanks, "biller_name": "energy.example", "amount": None, "date": None}],
    }
    found = tracker(document, bill_key(BILLER, "b1"))
    assert found is not None
    drawn = str(found.steps)
    assert drawn.count('class="step done"') == 5
    assert re.search(r'class="step-label current"[^>]*>Paid<', drawn)
    assert "1 of 3 instalments paid" in drawn


def test_a_payment_whose_instructions_lapsed_says_so_and_does_not_count_as_instructions_or_paid() -> None:
    """PAY-17 on the household's page: instructions that lapsed unpaid read as such, with the new payment started
    in their place; they are no payee to pay, and the bill's tracker counts them as neither instructions nor paid."""
    bill = bill_row(state="new", state_text="paying as billed: lapsed")
    lapsed = payment_row(  # a lapsed intent has no order to pay (agent.consumer.payments.payment_view)
        state=IntentState.LAPSED.value, state_text=payment_words(IntentState.LAPSED), bank_reference="", payee=None
    )
    found = tracker({"bills": [bill], "payments": [lapsed]}, bill_key(BILLER, "b1"))
    assert found is not None
    (line,) = [line for line in found.happenings if line.text.startswith("Payment 1 of 1")]
    assert "lapsed unpaid" in line.detail
    assert "a new payment was started" in line.detail
    drawn = str(found.steps)
    for step in ("Payment instructions", "Paid"):  # neither reached
        assert re.search(rf'class="step-label (current|pending)"[^>]*>{step}<', drawn), step


def test_several_households_share_one_site_with_an_index_and_pages_without_a_bot_open_no_stream(
    tmp_path: Path,
) -> None:
    profile = parse_profile(PROFILE)
    sources = {
        key: StateDirSource(profile, tmp_path / key, clock=ManualClock(START), name=f"Household {key}")
        for key in ("one", "two")
    }

    async def look(served: Any) -> None:
        async with ClientSession(cookie_jar=CookieJar(unsafe=True), timeout=ClientTimeout(total=30)) as client:
            async with client.get(served.site.url) as response:
                assert response.status == 403  # the token is required here too
            async with client.get(served.site.opening_url) as response:
                index = await response.text()
            assert 'href="/h/one/"' in index
            assert 'href="/h/two/"' in index
            bills = await _page(client, served, "h/two/")
            assert "Nothing yet" in bills
            assert "Household two" in bills
            assert "data-live=" not in bills  # no bot moves these households: no event stream
            assert "No such bill" in await _page(client, served, f"h/one/bill/{bill_key(BILLER, 'nope')}")
            assert "svg" in await _page(client, served, "h/one/cash-flow")

    with serving(lambda: create_space_app(sources, space_config("Demo"), live=False)) as served:
        asyncio.run(look(served))


def test_serve_refuses_an_address_off_loopback_without_tls_and_client_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main as parley_main  # noqa: PLC0415 - the command line, as a person types it

    profile = tmp_path / "household.toml"
    write_profile(profile, target="127.0.0.1:1", fingerprint="00" * 32, code=None, household=SHORT)
    argv = ["consumer", "serve", "--profile", str(profile), "--state-dir", str(tmp_path / "state")]
    assert parley_main([*argv, "--listen", "0.0.0.0:8080"]) == 2
    assert "--client-ca" in capsys.readouterr().out
    assert not (tmp_path / "state").exists()  # refused before the bot ran


def test_serve_runs_the_bot_and_serves_its_pages_until_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`parley consumer serve` as a process: it prints the link, the bot's first pass fills the pages, Ctrl-C
    (SIGINT) stops both cleanly."""
    profile, state = tmp_path / "household.toml", tmp_path / "state"

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, SystemClock()) as running:  # the process's clock
            code = await code_for(running)
            fingerprint = running.biller.fingerprint.hex()
            write_profile(profile, target=f"127.0.0.1:{running.port}", fingerprint=fingerprint, code=code)
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "agent.cli", "consumer", "serve", "--profile", str(profile)),
                *("--state-dir", str(state), "--listen", "127.0.0.1:0", "--interval", "600"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert process.stdout is not None
            try:
                printed = ""
                while (found := re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", printed)) is None:
                    line = await asyncio.wait_for(process.stdout.readline(), 30)
                    assert line, printed
                    printed += line.decode()
                async with ClientSession(cookie_jar=CookieJar(unsafe=True), timeout=ClientTimeout(total=30)) as client:
                    async with client.get(found.group(0)) as response:
                        assert response.status == 200
                    for _ in range(150):  # the first pass enrols and fetches the bill
                        async with client.get(found.group(0).partition("?")[0]) as response:
                            page = await response.text()
                        if "Follow this bill" in page:
                            break
                        await asyncio.sleep(0.2)
                    assert "energy.example" in page
                    assert "Follow this bill" in page
                    assert code not in page
            finally:
                process.send_signal(signal.SIGINT)
                status = await asyncio.wait_for(process.wait(), 30)
            assert status == 0

    asyncio.run(main())


def test_an_agreement_replaced_by_a_later_one_on_the_same_bill_is_no_longer_standing() -> None:
    def agreement(bill_id: str, thread_id: str) -> dict[str, str]:
        return {"biller": BILLER, "bill_id": bill_id, "thread_id": thread_id}

    document = {"agreements": [agreement("b1", "t1"), agreement("b2", "t2"), agreement("b1", "t3")]}
    assert superseded(document) == {"t1"}


def test_the_demo_serves_its_six_households_spaces_until_stopped(tmp_path: Path) -> None:
    """`parley demo --serve`: after the simulation one link opens an index of the six households, each page
    reads that household's own state directory, and SIGTERM stops the pages cleanly."""
    import subprocess  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415
    from http.cookiejar import CookieJar as HttpCookies  # noqa: PLC0415

    command = [sys.executable, "-m", "agent.cli", "demo", "--out", str(tmp_path / "bundles"), "--serve", "127.0.0.1:0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        assert process.stdout is not None
        link = None
        for line in process.stdout:
            found = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", line)
            if found:
                link = found.group(1)
                break
        assert link is not None, "the demo printed no link to the households' spaces"
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(HttpCookies()))
        index = opener.open(link, timeout=30).read().decode()
        names = re.findall(r"Household (One|Two|Three|Four|Five|Six)", index)
        assert sorted(set(names)) == sorted(["One", "Two", "Three", "Four", "Five", "Six"])
        page = re.search(r'href="(/[^"]+)"[^>]*>\s*Household One', index)
        assert page is not None, index
        household = opener.open(link.split("/?")[0] + page.group(1), timeout=30).read().decode()
        assert "energy.example" in household
        assert "token=" not in household  # the secret stays out of every page
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_payment_in_doubt_is_explained_and_the_household_says_what_the_bank_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bank's order book fails mid-write: the payment is in doubt and the bot never hands it over again
    (PAY-7). The run and `status` say what to do; the command line refuses wrong answers in one line; the
    payments page takes "the bank did not pay it"; the next pass pays it once."""
    clock = ManualClock(START)
    state, profile_path = tmp_path / "state", tmp_path / "household.toml"

    async def main() -> None:
        async with reference_biller(tmp_path, monkeypatch, clock, on_enrol=bill_600) as running:
            fingerprint = running.biller.fingerprint.hex()
            write_profile(
                profile_path, target=f"127.0.0.1:{running.port}", fingerprint=fingerprint, code=await code_for(running)
            )

            async def disk_full(self: JsonLinesBank, order: PaymentOrder) -> str:
                raise OSError(28, "No space left on device")

            with monkeypatch.context() as patched:
                patched.setattr(JsonLinesBank, "send", disk_full)
                first = await one_pass(profile_path, state, clock)  # the pass goes on: the payment is in doubt
            [problem] = first.problems
            assert "No space left on device" in problem.detail
            for report in (first, await one_pass(profile_path, state, clock)):  # this pass, then the next
                [line] = report.payments
                assert line.status == "in doubt: check with the bank"
                assert "resolve-payment pi-" in line.next_step
            assert orders(state) == []  # never handed over again

            capsys.readouterr()
            assert (
                await cli("consumer", "status", "--profile", str(profile_path), "--state-dir", str(state), "--json")
                == 0
            )
            [payment] = json.loads(capsys.readouterr().out)["payments"]
            intent_id = payment["intent_id"]
            assert payment["state"] == "sending"
            assert "Ask your bank" in payment["next_step"]
            assert payment["next_command"].startswith(f"parley consumer resolve-payment {intent_id} ")

            for argv, status, said in (
                (("resolve-payment", "pi-nope", "--not-paid"), 1, "no payment 'pi-nope'"),
                (("resolve-payment", intent_id, "--paid"), 1, "needs the bank's reference"),
                (("resolve-payment", intent_id, "--not-paid", "--bank-reference", "X"), 1, "has no bank reference"),
                (("retry-payment", intent_id), 1, "is sending: only a payment whose instructions"),
            ):
                capsys.readouterr()
                assert await cli("consumer", *argv, "--state-dir", str(state)) == status, argv
                out = capsys.readouterr().out
                assert said in out, out
                assert len(out.strip().splitlines()) == 1, out
            capsys.readouterr()
            assert await cli("consumer", "resolve-payment", intent_id, "--state-dir", str(state)) == 2  # say which
            capsys.readouterr()

            profile = load_profile(profile_path)

            def make_app() -> web.Application:
                return create_space_app({"": StateDirSource(profile, state, clock=clock)}, space_config())

            with serving(make_app) as served, chromium() as browser:

                def decide() -> None:
                    browser.get(served.site.opening_url)
                    browser.get(served.site.url + "payments")
                    card = browser.find_element(By.CSS_SELECTOR, ".payment")
                    assert "in doubt: check with the bank" in card.text
                    assert "Ask your bank whether it was paid" in card.text
                    assert f"parley consumer resolve-payment {intent_id}" in card.text
                    save_screenshot(browser, "household-payment-in-doubt")
                    card.find_element(By.CSS_SELECTOR, "button[value='not-paid']").click()
                    wait_for(browser, lambda b: "Recorded as not paid" in _text(b))
                    assert "Ask your bank" not in _text(browser)
                    assert "instructions received, not paid yet" in _text(browser)

                await _blocking(decide)
            capsys.readouterr()
            assert (
                await cli(
                    "consumer",
                    "resolve-payment",
                    intent_id,
                    "--paid",
                    "--bank-reference",
                    "B-1",
                    "--state-dir",
                    str(state),
                )
                == 1
            )
            assert "instructed, not in doubt" in capsys.readouterr().out

            report = await one_pass(profile_path, state, clock)
            assert [line.status for line in report.payments] == ["paid now"]
            assert [order["intent_id"] for order in orders(state)] == [intent_id]

    asyncio.run(main())
