"""Headless Chromium for the web tests, and a web app served on a thread for it to open.

    from tests.helpers.browser import chromium, save_screenshot, serving

    def test_page(tmp_path):
        with serving(make_app) as served, chromium() as browser:
            browser.get(served.site.opening_url)
            save_screenshot(browser, "my-page")

Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); nothing is downloaded: the
driver's path is given, so selenium-manager never runs. Without Chromium the test is skipped, except under
CI=true, where it fails: CI installs Chromium (.ci/run), so a skip there would hide a broken test.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from agent.web import RunningSite, start_site

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "ServedApp",
    "chromium",
    "require_chromium",
    "save_screenshot",
    "screenshot_directory",
    "serving",
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",  # tests may run as root in a container, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no update checks, no safe-browsing lists: nothing leaves the machine
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1400",
)
SCREENSHOTS_DEFAULT = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
SERVER_START_SECONDS = 30.0

T = TypeVar("T")


def require_chromium() -> None:
    """Skip the test when Chromium or its driver is missing, but fail under CI, which installs them."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    reason = f"no headless Chromium ({', '.join(missing)} missing): apt-get install chromium chromium-driver"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run installs it, so it must be there)")
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """A headless Chromium with its own throwaway profile, quit at the end. Console messages are kept, for
    `browser.get_log("browser")` (a CSP violation shows there)."""
    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = tempfile.mkdtemp(prefix="parley-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    browser = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        browser.set_page_load_timeout(30)
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot_directory() -> Path:
    """$PARLEY_SCREENSHOTS, else test-artifacts/screenshots/ at the top of the work tree (gitignored)."""
    directory = Path(os.environ.get("PARLEY_SCREENSHOTS") or SCREENSHOTS_DEFAULT)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def save_screenshot(browser: webdriver.Chrome, name: str) -> Path:
    """The whole page as `<name>.png` among the test artefacts; returns its path."""
    path = screenshot_directory() / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".png")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    if isinstance(height, int) and height > 0:
        browser.set_window_size(1100, min(height + 100, 4000))
    assert browser.save_screenshot(str(path)), f"Chromium did not write {path}"
    return path


@dataclass(frozen=True)
class ServedApp:
    """An app served on its own event loop in a thread; `call` runs a coroutine there and waits for it."""

    site: RunningSite
    loop: asyncio.AbstractEventLoop

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run(self, function: Callable[[], T], timeout: float = 30.0) -> T:
        """`function()` on the server's loop (e.g. an EventHub's publish), waited for."""

        async def call_it() -> T:
            return function()

        return self.call(call_it(), timeout)


@contextmanager
def serving(make_app: Callable[[], web.Application], host: str | None = None) -> Iterator[ServedApp]:
    """`make_app()` (called on the server's loop) served on a free port of 127.0.0.1 until the block ends."""
    started: Future[ServedApp] = Future()
    stop: asyncio.Event | None = None

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            async with start_site(make_app(), host) as site:
                started.set_result(ServedApp(site, asyncio.get_running_loop()))
                await stop.wait()
        except BaseException as error:
            if not started.done():
                started.set_exception(error)
            raise

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="web-test-server", daemon=True)
    thread.start()
    served = started.result(SERVER_START_SECONDS)
    try:
        yield served
    finally:
        assert stop is not None
        served.loop.call_soon_threadsafe(stop.set)
        thread.join(SERVER_START_SECONDS)
        assert not thread.is_alive(), "the web test server did not stop"
