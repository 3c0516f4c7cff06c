"""The web kit (agent/web): a small face built on it, checked over HTTP and in headless Chromium.

Opening token → cookie → clean URL; 403 without it; CSRF and origin checks on posts; security headers; the
loopback rule; server-sent events (live text and sections, the cap on streams, heartbeats, clean shutdown);
SVG charts; and that the page loads nothing from anywhere but its own server.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import jinja2
import pytest
from aiohttp import ClientError, ClientResponse, ClientSession, ClientTimeout, CookieJar, web
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from agent.tools.certs import CA_FILE, SERVER_CHAIN_FILE, SERVER_KEY_FILE, client_files, write_dev_certs
from agent.web import (
    CSRF_FIELD,
    CSRF_HEADER,
    RELOAD_EVENT,
    SECURITY_HEADERS,
    Bar,
    EventHub,
    Marker,
    RunningSite,
    ServerSentEvent,
    StepState,
    TimelineStep,
    WebConfig,
    bar_chart,
    create_web_app,
    line_chart,
    render,
    start_site,
    stream_events,
    timeline,
)
from agent.web.site import SHUTDOWN_SECONDS
from tests.helpers import browser as browser_helpers
from tests.helpers.browser import chromium, save_screenshot, serving

SVG = "{http://www.w3.org/2000/svg}"
PAGE = """{% extends "base.html" %}
{% block content %}
<h1>Household space</h1>
<p>Status: <strong id="status" data-live-text="status">waiting</strong></p>
<section id="notes" class="card" data-live-section="notes">
  <h2>Notes</h2>
  <ul>{% for note in notes %}<li>{{ note }}</li>{% else %}<li class="muted">No notes yet.</li>{% endfor %}</ul>
</section>
<form method="post" action="/notes">
  {{ csrf_field() }}
  <label for="text">New note</label>
  <input id="text" name="text" autocomplete="off">
  <button type="submit">Add note</button>
</form>
<h2>Projected balance</h2>
{{ balance }}
<h2>Spending by month</h2>
{{ spending }}
<h2>Electricity bill, March</h2>
{{ progress }}
{% endblock %}
"""


def pounds(minor: int) -> str:
    sign = "−" if minor < 0 else ""
    return f"{sign}£{abs(minor) // 100:,}.{abs(minor) % 100:02d}"


BALANCE = [
    (date(2026, 3, 1), 48_000),
    (date(2026, 3, 5), 31_250),
    (date(2026, 3, 12), 9_900),
    (date(2026, 3, 25), 152_000),
]
MARKERS = [
    Marker(date(2026, 3, 5), "Water due", "due"),
    Marker(date(2026, 3, 12), "Phone due", "due"),
    Marker(date(2026, 3, 25), "Pay day", "payday"),
]


def charts() -> dict[str, Any]:
    return {
        "balance": line_chart(
            BALANCE,
            title="Projected balance in March",
            format_value=pounds,
            threshold=20_000,
            threshold_label="Buffer £200.00",
            markers=MARKERS,
        ),
        "spending": bar_chart(
            [Bar("Jan", 61_200), Bar("Feb", 58_040), Bar("Mar", 70_015)], title="Spending", format_value=pounds
        ),
        "progress": timeline(
            [
                TimelineStep("Bill issued", StepState.DONE, "1 Mar"),
                TimelineStep("Plan agreed", StepState.DONE, "3 Mar"),
                TimelineStep("First instalment paid", StepState.CURRENT, "due 12 Mar"),
                TimelineStep("Second instalment", StepState.PENDING, "due 12 Apr"),
            ],
            title="Electricity bill, March",
        ),
    }


@dataclass
class Household:
    """The test face's state: notes posted through the form, and the hub its pages listen to."""

    notes: list[str] = field(default_factory=list)
    hub: EventHub = field(default_factory=EventHub)


def make_face(household: Household, **config: Any) -> web.Application:
    app = create_web_app(
        WebConfig(title="Parley test face", templates=jinja2.DictLoader({"page.html": PAGE}), **config)
    )

    async def page(request: web.Request) -> web.Response:
        return render(request, "page.html", live_url="/events", notes=household.notes, **charts())

    async def add_note(request: web.Request) -> web.Response:
        text = (await request.post()).get("text")
        if isinstance(text, str) and text:
            household.notes.append(text)
            household.hub.publish(ServerSentEvent("notes"))
        return web.Response(status=303, headers={"Location": "/"})

    async def events(request: web.Request) -> web.StreamResponse:
        return await stream_events(request, household.hub.subscribe())

    app.router.add_get("/", page)
    app.router.add_post("/notes", add_note)
    app.router.add_get("/events", events)
    return app


async def sign_in(client: ClientSession, site: RunningSite) -> None:
    """Open the site's link once, as a browser would, so `client` holds the session cookie."""
    async with client.get(site.opening_url, allow_redirects=False) as response:
        assert response.status == 303


@asynccontextmanager
async def signed_in(site: RunningSite) -> AsyncIterator[ClientSession]:
    async with ClientSession(cookie_jar=CookieJar(unsafe=True), timeout=ClientTimeout(total=30)) as client:
        await sign_in(client, site)
        yield client


async def csrf_token_of(client: ClientSession, site: RunningSite) -> str:
    async with client.get(site.url) as response:
        found = re.search(rf'name="{CSRF_FIELD}" value="([0-9a-f]+)"', await response.text())
    assert found is not None
    return found.group(1)


# --- the listen rule -------------------------------------------------------------------------------------------


def test_a_face_off_loopback_needs_tls_and_client_certificates(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"TLS \(--tls-cert and --tls-key\).*; missing --tls-cert, --tls-key, --client-ca$"
    ):
        WebConfig(title="t", host="0.0.0.0")
    cert, key, ca = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    with pytest.raises(ValueError, match=r"missing --client-ca$"):
        WebConfig(title="t", host="192.0.2.10", tls_cert=cert, tls_key=key)
    assert WebConfig(title="t", host="192.0.2.10", tls_cert=cert, tls_key=key, client_ca=ca).tls
    for loopback in ("127.0.0.1", "localhost", "::1", "127.8.9.10"):
        assert not WebConfig(title="t", host=loopback).tls

    async def bind_everywhere() -> None:
        async with start_site(make_face(Household()), "0.0.0.0"):
            pytest.fail("bound a non-loopback address without TLS")

    with pytest.raises(ValueError, match=re.escape("'0.0.0.0', which is not a loopback address")):
        asyncio.run(bind_everywhere())


def test_with_tls_and_a_client_ca_only_browsers_holding_a_certificate_get_in(tmp_path: Path) -> None:
    write_dev_certs(tmp_path, clients=["operator"])
    chain, key = (tmp_path / name for name in client_files("operator"))
    config = {
        "tls_cert": tmp_path / SERVER_CHAIN_FILE,
        "tls_key": tmp_path / SERVER_KEY_FILE,
        "client_ca": tmp_path / CA_FILE,
    }

    async def main() -> None:
        async with start_site(make_face(Household(), **config)) as site:
            assert site.url.startswith("https://127.0.0.1:")
            anonymous = ssl.create_default_context(cafile=tmp_path / CA_FILE)
            with pytest.raises(ClientError):  # the TLS handshake fails: no client certificate
                async with ClientSession() as client, client.get(site.opening_url, ssl=anonymous) as response:
                    await response.read()
            operator = ssl.create_default_context(cafile=tmp_path / CA_FILE)
            operator.load_cert_chain(chain, key)
            async with (
                ClientSession() as client,
                client.get(site.opening_url, ssl=operator, allow_redirects=False) as response,
            ):
                assert response.status == 303
                assert re.search(r"; Secure", response.headers["Set-Cookie"], re.IGNORECASE)
                assert response.headers["Strict-Transport-Security"] == "max-age=31536000"

    asyncio.run(main())


# --- token, cookie, CSRF, headers over HTTP --------------------------------------------------------------------


def test_the_token_opens_a_session_once_and_nothing_opens_without_it() -> None:
    async def main() -> None:
        async with (
            start_site(make_face(Household())) as site,
            ClientSession(cookie_jar=CookieJar(unsafe=True)) as client,
        ):
            assert site.url.startswith("http://127.0.0.1:")
            for address in (site.url, site.url + "events", site.url + "no-such-page", site.url + "?token=wrong"):
                async with client.get(address, allow_redirects=False) as response:
                    assert response.status == 403, address
                    assert "Open this page with its link" in await response.text()
            async with client.post(site.opening_url, allow_redirects=False) as response:
                assert response.status == 403  # the token opens a session on a GET only

            async with client.get(site.opening_url + "&tab=bills", allow_redirects=False) as response:
                assert response.status == 303
                assert response.headers["Location"] == "/?tab=bills"  # the token leaves the address, the rest stays
                cookie = response.headers["Set-Cookie"]
                assert re.search(r"; HttpOnly", cookie, re.IGNORECASE)
                assert re.search(r"; SameSite=Strict", cookie, re.IGNORECASE)
                assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never come back
            token = site.opening_url.split("=", 1)[1]
            async with client.get(site.url + "/evil.example/?token=" + token, allow_redirects=False) as response:
                assert response.headers["Location"] == "/evil.example/"  # a path here, not //evil.example/
            async with client.get(site.url) as response:
                assert response.status == 200
                assert "<h1>Household space</h1>" in await response.text()

            (name,) = [morsel.key for morsel in client.cookie_jar]
            async with ClientSession(cookies={name: "forged.0123"}) as forger, forger.get(site.url) as response:
                assert response.status == 403

    asyncio.run(main())


def test_posts_need_the_session_csrf_token_and_the_same_origin() -> None:
    household = Household()

    async def main() -> None:
        async with start_site(make_face(household)) as site, signed_in(site) as client:
            token = await csrf_token_of(client, site)
            origin = site.url.rstrip("/")
            refused = [
                ({"text": "no token"}, {"Origin": origin}),
                ({"text": "wrong token", CSRF_FIELD: "0" * 64}, {"Origin": origin}),
                ({"text": "foreign origin", CSRF_FIELD: token}, {"Origin": "http://evil.example"}),
                ({"text": "null origin", CSRF_FIELD: token}, {"Origin": "null"}),
                ({"text": "cross-site fetch", CSRF_FIELD: token}, {"Sec-Fetch-Site": "cross-site"}),
                ({"text": "same-site fetch", CSRF_FIELD: token}, {"Sec-Fetch-Site": "same-site"}),
                (
                    {"text": "lying fetch", CSRF_FIELD: token},
                    {"Sec-Fetch-Site": "same-origin", "Origin": "http://x.example"},
                ),
            ]
            for form, headers in refused:
                async with client.post(
                    site.url + "notes", data=form, headers=headers, allow_redirects=False
                ) as response:
                    assert response.status == 403, form["text"]
                    assert "This form could not be sent" in await response.text()
            assert household.notes == []

            form = {"text": "from the page", CSRF_FIELD: token}
            headers = {"Origin": origin, "Sec-Fetch-Site": "same-origin"}
            async with client.post(site.url + "notes", data=form, headers=headers, allow_redirects=False) as response:
                assert response.status == 303
            async with client.post(
                site.url + "notes", data={"text": "from a script"}, headers={CSRF_HEADER: token}, allow_redirects=False
            ) as response:
                assert response.status == 303
            # Chromium's own form post: Referrer-Policy: no-referrer makes its Origin "null".
            form = {"text": "from Chromium", CSRF_FIELD: token}
            headers = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
            async with client.post(site.url + "notes", data=form, headers=headers, allow_redirects=False) as response:
                assert response.status == 303
            assert household.notes == ["from the page", "from a script", "from Chromium"]

    asyncio.run(main())


def test_every_response_carries_the_security_headers_and_pages_are_not_cached() -> None:
    async def main() -> None:
        async with start_site(make_face(Household())) as site, signed_in(site) as client:
            async with client.get(site.url) as page, client.get(site.url + "static/parley.css") as css:
                assert page.headers["Cache-Control"] == "no-store"
                assert css.headers["Cache-Control"] == "no-cache"
                assert css.headers["Content-Type"] == "text/css; charset=utf-8"
                etag = css.headers["ETag"]
                for response in (page, css):
                    for name, value in SECURITY_HEADERS.items():
                        assert response.headers[name] == value
                csp = page.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp
                assert "unsafe-inline" not in csp
            async with client.get(site.url + "static/parley.css", headers={"If-None-Match": etag}) as response:
                assert response.status == 304
            async with ClientSession() as stranger, stranger.get(site.url) as refused:
                assert refused.status == 403
                assert refused.headers["X-Frame-Options"] == "DENY"
                assert refused.headers["Cache-Control"] == "no-store"
            for name in ("nothing.css", "..%2Fapp.py", "%2E%2E%2Fsecurity.py", "live.js%00"):
                async with client.get(site.url + "static/" + name) as response:
                    assert response.status == 404, name

    asyncio.run(main())


def test_a_page_reached_under_a_foreign_host_name_gets_nothing() -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 makes the browser send Host: evil.example."""

    async def main() -> None:
        async with start_site(make_face(Household())) as site, ClientSession() as client:
            port = site.url.rsplit(":", 1)[1].rstrip("/")
            async with client.get(site.opening_url, headers={"Host": f"evil.example:{port}"}) as response:
                assert response.status == 421
            async with client.get(site.opening_url, headers={"Host": f"localhost:{port}"}, allow_redirects=False) as ok:
                assert ok.status == 303

    asyncio.run(main())


# --- server-sent events ----------------------------------------------------------------------------------------


async def read_until(stream: ClientResponse, marker: bytes, seconds: float = 10.0) -> bytes:
    """What the stream sent until `marker` shows (or the stream ends)."""
    seen = b""
    deadline = time.monotonic() + seconds
    while marker not in seen:
        chunk = await asyncio.wait_for(stream.content.readany(), max(0.1, deadline - time.monotonic()))
        if not chunk:
            break
        seen += chunk
    return seen


def test_event_streams_are_capped_beat_and_end_when_the_server_stops() -> None:
    household = Household()

    async def main() -> None:
        async with ClientSession(cookie_jar=CookieJar(unsafe=True), timeout=ClientTimeout(total=30)) as client:
            async with start_site(make_face(household, max_streams=2, heartbeat_seconds=0.2)) as site:
                await sign_in(client, site)
                first = await client.get(site.url + "events")
                second = await client.get(site.url + "events")
                for stream in (first, second):
                    assert stream.status == 200
                    assert stream.headers["Content-Type"] == "text/event-stream"
                    assert b"retry: 3000" in await read_until(stream, b"retry:")
                async with client.get(site.url + "events") as third:
                    assert third.status == 503
                    assert third.headers["Retry-After"] == "5"
                assert b": heartbeat" in await read_until(first, b": heartbeat")

                household.hub.publish(ServerSentEvent("status", "paid\nthank you", id="7"))
                sent = await read_until(second, b"thank you")
                assert b"event: status\nid: 7\ndata: paid\ndata: thank you\n\n" in sent

                first.close()  # a tab closed: its slot comes free once the server notices
                for _ in range(50):
                    async with client.get(site.url + "events") as again:
                        if again.status == 200:
                            break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("a closed stream's slot never came free")
                stopping = time.monotonic()
            # Leaving start_site stopped the server with `second` still open: the stream ended, and promptly.
            assert time.monotonic() - stopping < SHUTDOWN_SECONDS - 1  # not the wait for stuck handlers
            rest = await read_until(second, b"never sent")
            assert set(rest.split(b"\n\n")) <= {b": heartbeat", b""}  # nothing but heartbeats, then the end
            second.close()
        assert household.hub.subscribers == 0

    asyncio.run(main())


def test_a_stream_ends_when_its_source_does() -> None:
    async def two_events() -> AsyncIterator[ServerSentEvent]:
        yield ServerSentEvent("status", "one")
        yield ServerSentEvent("status", "two")

    async def main() -> None:
        app = make_face(Household())

        async def finite(request: web.Request) -> web.StreamResponse:
            return await stream_events(request, two_events())

        app.router.add_get("/finite", finite)
        async with start_site(app) as site, signed_in(site) as client, client.get(site.url + "finite") as stream:
            sent = await asyncio.wait_for(stream.read(), 10)  # the whole body: the server ended the stream
            assert sent == b"retry: 3000\n\nevent: status\ndata: one\n\nevent: status\ndata: two\n\n"

    asyncio.run(main())


def test_a_page_too_slow_for_its_events_is_told_to_reload() -> None:
    async def main() -> None:
        hub = EventHub(backlog=2)
        subscription = hub.subscribe()
        for number in range(3):
            hub.publish(ServerSentEvent("status", str(number)))
        assert await anext(subscription) == ServerSentEvent(RELOAD_EVENT)
        hub.publish(ServerSentEvent("status", "after"))
        assert (await anext(subscription)).data == "after"
        await subscription.aclose()
        assert hub.subscribers == 0

    asyncio.run(main())


def test_event_names_and_ids_cannot_break_the_stream() -> None:
    for name in ("", "two words", "x\nevent: forged", "1starts-with-digit"):
        with pytest.raises(ValueError, match="event name"):
            ServerSentEvent(name)
    with pytest.raises(ValueError, match="line break"):
        ServerSentEvent("status", id="1\n2")
    assert ServerSentEvent("status", "a\r\nb\rc").encode() == b"event: status\ndata: a\ndata: b\ndata: c\n\n"


# --- charts ----------------------------------------------------------------------------------------------------


def parse_svg(markup: str) -> ElementTree.Element:
    root = ElementTree.fromstring(markup)  # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg"
    return root


def test_the_line_chart_draws_the_balance_threshold_and_markers_exactly() -> None:
    svg = parse_svg(charts()["balance"])
    assert svg.findtext(f"{SVG}title") == "Projected balance in March"
    description = svg.findtext(f"{SVG}desc") or ""
    assert "lowest £99.00 on 12 Mar" in description
    assert "Below Buffer £200.00 on 12 Mar." in description
    (series,) = svg.iter(f"{SVG}path")
    assert series.get("d", "").startswith("M")
    assert series.get("d", "").count("V") == 3
    points = list(svg.iter(f"{SVG}circle"))
    assert len(points) == len(BALANCE)
    assert [point.get("class") for point in points] == ["point", "point", "point below", "point"]
    (threshold,) = (line for line in svg.iter(f"{SVG}line") if line.get("class") == "threshold")
    labels = [text.text for text in svg.iter(f"{SVG}text")]
    assert {"Buffer £200.00", "Water due", "Phone due", "Pay day", "£0.00"} <= set(labels)
    markers = [line for line in svg.iter(f"{SVG}line") if (line.get("class") or "").startswith("marker")]
    assert [line.get("class") for line in markers] == ["marker marker-due", "marker marker-due", "marker marker-payday"]
    y_of_200 = int(threshold.get("y1", "0"))
    y_of_99 = int(points[2].get("cy", "0"))
    assert y_of_99 > y_of_200  # lower on the chart: SVG's y grows downwards


def test_charts_escape_their_text_and_take_only_exact_integers() -> None:
    hostile = '<script>alert("x")</script> & co'
    for markup in (
        line_chart(
            [(date(2026, 1, 1), 1)], title=hostile, format_value=str, markers=[Marker(date(2026, 1, 2), hostile)]
        ),
        bar_chart([Bar(hostile, -5), Bar("b", 7)], title=hostile, format_value=str),
        timeline([TimelineStep(hostile, StepState.CURRENT, hostile)], title=hostile),
    ):
        assert "<script>" not in markup
        assert hostile in "".join(parse_svg(markup).itertext())
    with pytest.raises(TypeError, match="exact integers"):
        line_chart([(date(2026, 1, 1), 1.5)], title="t", format_value=str)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="exact integers"):
        bar_chart([Bar("a", True)], title="t", format_value=str)
    with pytest.raises(ValueError, match="increasing date order"):
        line_chart([(date(2026, 1, 2), 1), (date(2026, 1, 1), 2)], title="t", format_value=str)
    with pytest.raises(ValueError, match="at most one current"):
        timeline([TimelineStep("a", StepState.PENDING), TimelineStep("b", StepState.DONE)], title="t")


def test_the_bar_chart_hangs_negative_bars_below_zero_and_the_timeline_shows_states() -> None:
    bars = parse_svg(bar_chart([Bar("In", 12_000), Bar("Out", -4_500)], title="Cash", format_value=pounds))
    income, spending = bars.iter(f"{SVG}rect")
    (baseline,) = (line for line in bars.iter(f"{SVG}line") if line.get("class") == "baseline")
    zero = int(baseline.get("y1", "0"))
    assert int(income.get("y", "0")) + int(income.get("height", "0")) == zero
    assert int(spending.get("y", "0")) == zero
    assert spending.get("class") == "bar negative"
    assert bars.findtext(f"{SVG}desc") == "In: £120.00; Out: −£45.00."

    steps = parse_svg(charts()["progress"])
    assert [circle.get("class") for circle in steps.iter(f"{SVG}circle")] == [
        "step done",
        "step done",
        "step current",
        "step pending",
    ]
    assert "Step 3 of 4: First instalment paid (current)." in (steps.findtext(f"{SVG}desc") or "")


# --- in Chromium -----------------------------------------------------------------------------------------------


def console_messages(browser: Any) -> list[dict[str, Any]]:
    """The console's messages since the last call (chromedriver's log; selenium leaves get_log untyped)."""
    messages: list[dict[str, Any]] = browser.get_log("browser")
    return messages


# What chromedriver says when the whole document was replaced (a form's POST landing back on the page) between
# finding an element and reading it. Selenium maps it to no class of its own, so it is known by its words.
DOCUMENT_REPLACED = "does not belong to the document"


def wait_for(browser: Any, condition: Any, seconds: float = 15.0) -> Any:
    """Poll `condition` until it holds. An element swapped out under it (a live section re-read, or the page itself
    reloaded) means only "not yet": look again. Any other error is the test's to see."""

    def settled(driver: Any) -> Any:
        try:
            return condition(driver)
        except StaleElementReferenceException:
            return False
        except WebDriverException as error:
            if DOCUMENT_REPLACED in str(error.msg):
                return False
            raise

    return WebDriverWait(browser, seconds).until(settled)


def test_waiting_looks_again_when_the_document_is_replaced_under_it_and_reports_anything_else() -> None:
    # Seen in CI: the notes form posted, and the page it landed on replaced the document between chromedriver's
    # finding #notes and reading its text.
    replaced = WebDriverException(
        'unknown error: unhandled inspector error: {"code":-32000,"message":"Node with given id does not belong to '
        'the document"}'
    )
    answers: list[Any] = [StaleElementReferenceException("swapped"), replaced, "the notes"]

    def condition(_: Any) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for(object(), condition, seconds=5) == "the notes"
    with pytest.raises(WebDriverException, match="chrome not reachable"):
        wait_for(object(), lambda _: (_ for _ in ()).throw(WebDriverException("chrome not reachable")), seconds=5)


def test_the_face_in_chromium_token_cookie_form_live_updates_charts_and_no_outside_requests() -> None:
    household = Household()
    with serving(lambda: make_face(household)) as served, chromium() as browser:
        url = served.site.url
        browser.get(url)
        assert browser.find_element(By.TAG_NAME, "h1").text == "Open this page with its link"
        save_screenshot(browser, "web-kit-403")
        console_messages(browser)  # drops the console's note of that 403, which was the point

        browser.get(served.site.opening_url)
        assert browser.current_url == url  # the token is gone from the address bar
        (cookie,) = browser.get_cookies()
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie") == ""  # no script can read it
        assert browser.find_element(By.TAG_NAME, "h1").text == "Household space"
        browser.execute_script("window.stillTheSamePage = true")

        line = browser.find_element(By.CSS_SELECTOR, "svg.chart-line")
        assert len(line.find_elements(By.CSS_SELECTOR, "circle.point")) == len(BALANCE)
        assert line.find_element(By.CSS_SELECTOR, "line.threshold").rect["width"] > line.rect["width"] / 2
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart-bar rect.bar")) == 3
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart-timeline circle.step")) == 4

        # Live: the page opened its event stream; an event changes its text without a reload.
        wait_for(browser, lambda _: served.run(lambda: household.hub.subscribers) == 1)
        served.run(lambda: household.hub.publish(ServerSentEvent("status", "Payment received — thank you")))
        wait_for(browser, lambda b: b.find_element(By.ID, "status").text == "Payment received — thank you")
        # ...and a section is re-read from the server and swapped in place.
        served.run(lambda: household.notes.append("Added elsewhere"))
        served.run(lambda: household.hub.publish(ServerSentEvent("notes")))
        wait_for(browser, lambda b: "Added elsewhere" in b.find_element(By.ID, "notes").text)
        assert browser.execute_script("return window.stillTheSamePage") is True

        # The form posts with its CSRF token and lands back on the page.
        browser.find_element(By.ID, "text").send_keys("Call the water company")
        browser.find_element(By.CSS_SELECTOR, "form button").click()
        wait_for(browser, lambda b: "Call the water company" in b.find_element(By.ID, "notes").text)
        assert household.notes == ["Added elsewhere", "Call the water company"]

        origin = url.rstrip("/")
        names = browser.execute_script("return performance.getEntries().map(entry => entry.name)")
        resources = [name for name in names if "://" in name]
        assert resources, names
        assert all(name.startswith(origin + "/") for name in resources), resources
        problems = [entry for entry in console_messages(browser) if entry["level"] == "SEVERE"]
        assert not problems, problems  # a CSP violation (inline style, inline script) would show here
        save_screenshot(browser, "web-kit-page")


def test_a_post_from_another_site_is_refused_in_chromium() -> None:
    household = Household()
    with serving(lambda: make_face(household)) as served, chromium() as browser:
        target = served.site.url + "notes"

        async def evil_page(request: web.Request) -> web.Response:
            return web.Response(
                content_type="text/html",
                text=f'<form method="post" action="{target}"><input name="text" value="pwned">'
                f'<input name="{CSRF_FIELD}" value="guess"><button>Win a prize</button></form>',
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
            browser.get(served.site.opening_url)  # the victim is signed in
            evil_port = evil_runner.addresses[0][1]
            browser.get(f"http://localhost:{evil_port}/")  # another site: localhost is not 127.0.0.1
            browser.find_element(By.TAG_NAME, "button").click()
            wait_for(browser, lambda b: b.current_url.startswith(served.site.url))
            assert wait_for(browser, lambda b: b.find_element(By.TAG_NAME, "h1").text) in {
                "Open this page with its link",  # SameSite=Strict: the cookie did not even go along
                "This form could not be sent",
            }
            assert household.notes == []
        finally:
            served.call(evil_runner.cleanup())


def test_without_chromium_browser_tests_skip_here_but_fail_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(browser_helpers, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true: \.ci/run installs it"):
        browser_helpers.require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        browser_helpers.require_chromium()
