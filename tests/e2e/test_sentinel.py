"""Redis through Sentinel, really failing over: a throwaway primary with its replicas and
three Sentinels (``tests/e2e/sentinels.py``), the primary demoted or SIGKILLed while taskq
writes to it.

What a failover costs is printed (``pytest -s``): how long writes are refused (the 503
window for the API), how long until the next task completes, and what was lost.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
import redis.asyncio as redis

from app.adapters import open_store
from app.ports import StoreUnavailable, TaskStore
from tests.conftest import eventually
from tests.contract.stores import create
from tests.e2e.sentinels import SERVICE, SentinelSet, throwaway_sentinels
from tests.e2e.servers import RedisServer

pytestmark = pytest.mark.e2e

FAILOVER_SECONDS = 30.0
"""Down-after (1 s) plus the election and the promotion, on a loaded shared machine."""
WRITERS = 4


@dataclass
class Writes:
    """What concurrent writers saw: the ids whose commit was acknowledged and when, and
    how many writes were refused (``StoreUnavailable``)."""

    acknowledged: list[str] = field(default_factory=list[str])
    acknowledged_at: list[float] = field(default_factory=list[float])
    refused: int = 0

    def stall(self) -> float:
        """The longest time no write was acknowledged (waiting or refused)."""
        times = sorted(self.acknowledged_at)
        return max(later - earlier for earlier, later in itertools.pairwise(times))

    def summary(self, lost: list[str]) -> str:
        return (
            f"{len(self.acknowledged)} writes acknowledged, {len(lost)} of them lost, "
            f"{self.refused} refused; no write acknowledged for {self.stall():.2f} s"
        )


async def write_until(store: TaskStore, writes: Writes, done: anyio.Event, name: str) -> None:
    """Create tasks one after another until ``done``; any error but ``StoreUnavailable``
    fails the test (a demoted primary's READONLY must look like an outage)."""
    for number in range(1_000_000):
        if done.is_set():
            return
        task_id = f"{name}-{number:06}"
        try:
            await create(store, task_id)
        except StoreUnavailable:
            writes.refused += 1
            await anyio.sleep(0.02)
            continue
        writes.acknowledged.append(task_id)
        writes.acknowledged_at.append(anyio.current_time())


async def failover_under_writes(
    sentinels: SentinelSet, url: str, prefix: str, *, how: str
) -> tuple[Writes, list[str], float]:
    """Write through ``url`` while the primary is demoted (``SENTINEL FAILOVER``) or
    SIGKILLed; return the writes, the acknowledged ids the new primary lacks, and how
    long the failover took (until the Sentinels name a new primary that says it is one)."""
    writes, done = Writes(), anyio.Event()
    new_primary: RedisServer | None = None
    took = 0.0
    async with open_store(url, prefix=prefix) as store, anyio.create_task_group() as tg:
        for writer in range(WRITERS):
            tg.start_soon(write_until, store, writes, done, f"w{writer}")
        await anyio.sleep(1.0)  # under load
        old = await sentinels.primary()
        began = anyio.current_time()
        if how == "demoted":
            client = redis.Redis(port=sentinels.sentinels[0].port)
            try:
                await client.execute_command("SENTINEL", "FAILOVER", SERVICE)  # pyright: ignore[reportUnknownMemberType]
            finally:
                await client.aclose()
        else:
            await old.kill()
        new_primary = await sentinels.wait_for_failover(old, within=FAILOVER_SECONDS)
        took = anyio.current_time() - began

        new = len(writes.acknowledged)
        # Until writes go on for a while on the new primary.
        await eventually(lambda: len(writes.acknowledged) > new + 100, within=FAILOVER_SECONDS)
        await anyio.sleep(0.5)
        done.set()
    assert new_primary is not None
    return writes, await missing(new_primary, prefix, writes.acknowledged), took


async def missing(server: RedisServer, prefix: str, task_ids: list[str]) -> list[str]:
    """The tasks of ``task_ids`` that ``server`` does not have."""
    client = redis.Redis(port=server.port)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.exists(f"{prefix}task:{task_id}")
            found: list[int] = await pipe.execute()
    finally:
        await client.aclose()
    return [task_id for task_id, exists in zip(task_ids, found, strict=True) if not exists]


@pytest.mark.parametrize(
    ("replicas", "min_replicas"),
    [(1, 0), (1, 1), (2, 1)],
    ids=["no-wait", "wait-for-the-only-replica", "wait-for-1-of-2-replicas"],
)
async def test_a_demoted_primary_is_an_outage_not_an_error(
    tmp_path: Path, prefix: str, replicas: int, min_replicas: int
) -> None:
    """``SENTINEL FAILOVER``: the old primary answers READONLY to the connections it keeps
    until they move (``StoreUnavailable``, never an error). Meanwhile it takes writes that
    are lost when it becomes a replica of the new one: nothing acknowledged is lost only
    when every replica must acknowledge (a replica still following the old primary can
    acknowledge a doomed write)."""
    async with throwaway_sentinels(tmp_path, replicas=replicas) as sentinels:
        url = sentinels.url(query=f"min_replicas={min_replicas}")
        writes, lost, took = await failover_under_writes(sentinels, url, prefix, how="demoted")
    print(
        f"demoted primary, {replicas} replica(s), min_replicas={min_replicas}: "
        f"failover {took:.2f} s; {writes.summary(lost)}"
    )
    if min_replicas == replicas:
        assert lost == []


@pytest.mark.parametrize("min_replicas", [0, 1], ids=["no-wait", "wait-for-1-of-2-replicas"])
async def test_writes_ride_out_a_killed_primary(
    tmp_path: Path, prefix: str, min_replicas: int
) -> None:
    """The Sentinels promote the replica furthest ahead, which has every write another
    replica acknowledged: with ``WAIT`` for one replica nothing acknowledged is lost."""
    async with throwaway_sentinels(tmp_path, replicas=2) as sentinels:
        url = sentinels.url(query=f"min_replicas={min_replicas}")
        writes, lost, took = await failover_under_writes(sentinels, url, prefix, how="killed")
    print(
        f"killed primary, 2 replicas, min_replicas={min_replicas}: "
        f"failover {took:.2f} s; {writes.summary(lost)}"
    )
    if min_replicas:
        assert lost == []
    assert writes.stall() < FAILOVER_SECONDS
