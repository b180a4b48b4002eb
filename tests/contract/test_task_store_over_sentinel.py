"""The ``TaskStore`` contract suite once more, on Redis reached through Sentinel with
acknowledged writes (``min_replicas=1``: every commit pipelined with its ``WAIT``).

The cases are those of ``test_task_store_contract``; only the store differs: a throwaway
primary, replica and three Sentinels started once for this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal

from app.adapters import open_store
from app.ports import Store
from tests.contract import test_task_store_contract as suite
from tests.contract.stores import RUN_HISTORY, StoreOpener
from tests.e2e.sentinels import throwaway_sentinels

globals().update({name: case for name, case in vars(suite).items() if name.startswith("test_")})


@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base: Path = tmp_path_factory.mktemp("sentinel-contract")
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(throwaway_sentinels(base)) as sentinels,
    ):
        yield sentinels.url(query="min_replicas=1")


@pytest.fixture
def adapter_and_backend() -> tuple[str, str]:
    return ("redis", "uvloop")


@pytest.fixture
async def open_configured(sentinel_url: str, prefix: str) -> AsyncIterator[StoreOpener]:
    def opener(**options: float) -> AbstractAsyncContextManager[Store]:
        return open_store(sentinel_url, prefix=prefix, run_history=RUN_HISTORY, **options)  # type: ignore[arg-type]

    yield opener
