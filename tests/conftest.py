"""Shared fixtures: real-server URLs and per-test isolation.

Tests that need Redis or RabbitMQ use the real servers (``TASKQ_TEST_REDIS_URL`` /
``TASKQ_TEST_AMQP_URL``, defaulting to the local ones) under a key prefix and queue
names unique to the test, and remove what they created.
"""

from __future__ import annotations

import os
import uuid

import pytest

REDIS_URL = os.environ.get("TASKQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("TASKQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def prefix() -> str:
    """A key prefix / AMQP name prefix no other test uses."""
    return f"taskq-test-{uuid.uuid4().hex[:12]}:"
