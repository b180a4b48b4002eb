"""Browser tests of the dashboard: Debian's chromium driven by Playwright's async API.

One browser per module and one ``taskq dev`` service shared by a module's tests that need
no settings of their own (each test uses task ids of its own); a fresh page (its own
browser context: its own session storage) per test. Every wait is Playwright's, bounded
by ``EXPECT_TIMEOUT_MS``.

Module scope, not session: while an async fixture lives, AnyIO's pytest plugin runs every
async test on that fixture's event loop, whatever backend the test asks for. Held for
the session, the browser would put every test collected after these (a trio or uvloop
one, in another order or another worker) on asyncio.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncGenerator

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.e2e.conftest import servers  # noqa: F401 (the real-stack test cleans up with it)
from tests.e2e.harness import running, service_env

CHROMIUM = os.environ.get("TASKQ_TEST_CHROMIUM", "/usr/bin/chromium")
"""Playwright cannot download its own browsers here: the tests drive the system's."""
EXPECT_TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """One event loop for the module, so that the browser outlives a test. Playwright's
    driver needs asyncio."""
    return "asyncio"


@pytest.fixture(scope="module")
async def browser() -> AsyncGenerator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium, "
            "or TASKQ_TEST_CHROMIUM=/path/to/chromium)"
        )
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    async with async_playwright() as playwright:
        # The CI runs as root, where Chromium's sandbox cannot start.
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, chromium_sandbox=False)
        yield browser
        await browser.close()


@pytest.fixture(scope="module")
async def dev_url() -> AsyncGenerator[str]:
    """The API of a ``taskq dev`` shared by the module (in memory: nothing to clean up)."""
    env = service_env(f"taskq-ui-{uuid.uuid4().hex[:8]}:")
    async with running(["dev", "--port", "0"], env, name="taskq dev") as service:
        assert service.api_url is not None
        yield service.api_url


@pytest.fixture
async def page(browser: Browser) -> AsyncGenerator[Page]:
    """A page of its own; the test fails if a script on it threw and nothing caught it."""
    context = await browser.new_context()
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
async def api(dev_url: str) -> AsyncGenerator[httpx.AsyncClient]:
    """A client of the shared service, for what a test sets up or checks behind the page."""
    async with httpx.AsyncClient(base_url=dev_url) as client:
        yield client
