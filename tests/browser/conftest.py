"""Fixtures of the browser tests: the real server (`uvicorn app:app` on a free loopback port, stores in a temporary
folder, an API key configured) and the system Chromium driven by Playwright, with every request that does not go to
the server aborted and recorded.

The tests never download a browser: they use /usr/bin/chromium (`.ci/run` installs it with apt) and skip, saying
why, where it is missing, unless BONEAGE_TEST_REQUIRE_BROWSER is set (as `.ci/run` sets it): then they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Playwright, Route, sync_playwright

from bench.harness import HOST, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
# Set (by .ci/run, which installs Chromium or fails): a missing Chromium fails the browser tests, not skips them.
REQUIRE_BROWSER_ENV = "BONEAGE_TEST_REQUIRE_BROWSER"
API_KEY = "browser-test-key"
TIMEOUT_MS = 60_000  # a prediction on a slow CPU takes seconds; an element that never comes fails after this


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service with an API key configured, so the tests see what a protected deployment serves."""
    srv = Server(tmp_path_factory.mktemp("browser-server"), name="browser-test server",
                 extra_env={"BONEAGE_API_KEYS": API_KEY})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.is_file():
        reason = (f"{CHROMIUM} is missing: install it (apt-get install chromium, as .ci/run does) to run the "
                  "browser tests; they never download a browser")
        if os.environ.get(REQUIRE_BROWSER_ENV):
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


@pytest.fixture
def outside_requests() -> list[str]:
    """URLs the page tried to fetch from anywhere but the server (all were aborted); a test expects none."""
    return []


@pytest.fixture
def page(browser: Browser, server: Server, outside_requests: list[str]) -> Iterator[Page]:
    """A fresh page (own storage) whose requests reach only the server on 127.0.0.1."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")

    def only_loopback(route: Route) -> None:
        if urlsplit(route.request.url).hostname == HOST:
            route.continue_()
        else:
            outside_requests.append(route.request.url)
            route.abort("blockedbyclient")

    context.route("**/*", only_loopback)
    context.set_default_timeout(TIMEOUT_MS)
    new_page = context.new_page()
    yield new_page
    context.close()
