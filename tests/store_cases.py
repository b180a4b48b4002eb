"""Fixtures for suites that run over every store: import them into a ``conftest.py``.

Each test runs on the memory store under asyncio and trio, and on Redis under uvloop
(the service's loop): the ``adapter_and_backend`` fixture says which, ``anyio_backend``
follows it.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import STORE_CASES, anyio_param


@pytest.fixture(params=STORE_CASES, name="adapter_and_backend")
def adapter_and_backend_fixture(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(name="anyio_backend")
def anyio_backend_fixture(adapter_and_backend: tuple[str, str]) -> str | tuple[str, dict[str, Any]]:
    return anyio_param(adapter_and_backend[1])
