"""Shared fixtures: real-server URLs and per-test isolation.

Tests that need Redis or RabbitMQ use the real servers (``TASKQ_TEST_REDIS_URL`` /
``TASKQ_TEST_AMQP_URL``, defaulting to the local ones) under a key prefix and queue
names unique to the test, and remove what they created. When nothing answers there, the
session starts throwaway servers of its own (``tests/e2e/servers.py``) and uses them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import redis.asyncio as redis

from app.event_loops import anyio_run_options

if TYPE_CHECKING:
    from tests.e2e.servers import RabbitNode

CONFIGURED_REDIS_URL = os.environ.get("TASKQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CONFIGURED_AMQP_URL = os.environ.get("TASKQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = CONFIGURED_REDIS_URL
AMQP_URL = CONFIGURED_AMQP_URL
RABBITMQ_NODE: RabbitNode | None = None
"""The servers the tests use (and the throwaway RabbitMQ node, if any, for ``rabbitmqctl``):
set by ``pytest_configure``, before test modules are imported. A conftest.py may be
imported before it: read them there when a fixture runs."""

SERVERLESS_TESTS = Path(__file__).parent / "unit"
"""Tests that need neither server: a run of only these starts none."""


def pytest_configure(config: pytest.Config) -> None:
    """Point the tests at throwaway servers when nothing answers at the configured URLs."""
    global REDIS_URL, AMQP_URL, RABBITMQ_NODE
    if config.option.help or config.option.collectonly or not _needs_servers(config):
        return
    # Imported here: it imports this module (for ``eventually``).
    from tests.e2e.servers import session_servers

    servers = session_servers(config, CONFIGURED_REDIS_URL, CONFIGURED_AMQP_URL)
    REDIS_URL, AMQP_URL, RABBITMQ_NODE = servers


def _needs_servers(config: pytest.Config) -> bool:
    start = config.invocation_params.dir
    paths = ((start / arg.partition("::")[0]).resolve() for arg in config.args)
    return not all(path.is_relative_to(SERVERLESS_TESTS) for path in paths)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which throwaway servers the tests use, if any."""
    return [
        f"nothing answered at {configured}: throwaway server at {url}, started for this run"
        for configured, url in ((CONFIGURED_REDIS_URL, REDIS_URL), (CONFIGURED_AMQP_URL, AMQP_URL))
        if url != configured
    ]


# (store adapter, event loop): the memory store on both of taskq dev's backends, Redis on
# the service's loop (its client needs asyncio's API). Suites over a store parametrise a
# fixture with these.
STORE_CASES = [
    pytest.param(("memory", "asyncio"), id="memory-asyncio"),
    pytest.param(("memory", "trio"), id="memory-trio"),
    pytest.param(("redis", "uvloop"), id="redis"),
]


def anyio_param(backend: str) -> str | tuple[str, dict[str, Any]]:
    """What an ``anyio_backend`` fixture returns to run on ``backend`` (an
    ``app.event_loops`` name: uvloop, asyncio or trio)."""
    name, options = anyio_run_options(backend)
    return (name, options) if options else name


@pytest.fixture
def anyio_backend() -> str | tuple[str, dict[str, Any]]:
    """The service's loop: what ``taskq serve`` runs on by default."""
    return anyio_param("uvloop")


@pytest.fixture
def prefix() -> str:
    """A key prefix / AMQP name prefix no other test uses."""
    return f"taskq-test-{uuid.uuid4().hex[:12]}:"


async def delete_keys(prefix: str) -> None:
    """Remove every Redis key under ``prefix`` (a test's clean-up)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0, every: float = 0.01
) -> None:
    """Wait until ``condition()`` holds, failing after ``within`` seconds.

    For state that nothing notifies a test about (a file another process writes, a
    store another task changes): checked every ``every`` seconds, always bounded.
    """
    with anyio.fail_after(within):
        while True:
            result = condition()
            if result if isinstance(result, bool) else await result:
                return
            await anyio.sleep(every)
