"""Asking the Sentinels where the primary is, many lookups at once (every connection a
failover breaks asks): each Sentinel's client stays listed once, and all are closed.

The Sentinels' answers are scripted here (each client's ``SENTINEL MASTERS``), since what
is tested is the bookkeeping around them; ``tests/e2e/test_sentinel.py`` fails real
Sentinels over."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.adapters.redis_sentinel import Sentinels
from tests.conftest import anyio_param

SERVICE = "taskq"
PRIMARY = ("127.0.0.1", 6390)


@pytest.fixture
def anyio_backend() -> str | tuple[str, dict[str, Any]]:
    """redis-py runs on asyncio only: the service's loop."""
    return anyio_param("uvloop")


def port(client: Any) -> int:
    return int(client.connection_pool.connection_kwargs["port"])


async def test_lookups_at_once_keep_every_sentinel_listed_once_and_close_them_all() -> None:
    sentinels = Sentinels([("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)])
    answer = anyio.Event()
    closed: list[int] = []

    async def unreachable() -> dict[str, Any]:
        raise RedisConnectionError("Connection refused")

    async def names_the_primary() -> dict[str, Any]:
        await answer.wait()
        return {
            SERVICE: {
                "ip": PRIMARY[0],
                "port": PRIMARY[1],
                "is_master": True,
                "is_sdown": False,
                "is_odown": False,
                "num-other-sentinels": 2,
            }
        }

    for client in sentinels.sentinels:
        # Only the third Sentinel answers: both lookups wait on it at index 2, and the
        # first to finish moves it to the front.
        client.sentinel_masters = names_the_primary if port(client) == 3 else unreachable  # type: ignore[method-assign]

        async def aclose(client: Any = client) -> None:
            closed.append(port(client))

        client.aclose = aclose  # type: ignore[method-assign]

    found: list[tuple[str, int]] = []

    async def look_up() -> None:
        found.append(await sentinels.discover_master(SERVICE))

    async with anyio.create_task_group() as tg:
        tg.start_soon(look_up)
        tg.start_soon(look_up)
        await anyio.wait_all_tasks_blocked()
        answer.set()

    assert found == [PRIMARY, PRIMARY]
    listed = [port(client) for client in sentinels.sentinels]
    assert listed[0] == 3  # the one that answered is asked first next time
    assert sorted(listed) == [1, 2, 3]

    await sentinels.aclose()
    assert sorted(closed) == [1, 2, 3]
