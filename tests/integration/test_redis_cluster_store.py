"""The store on a real Redis Cluster (three masters, three replicas, started by the test):
opened by ``redis+cluster://`` or by a plain ``redis://`` URL of one node, it keeps every
key in the hash slot of its tagged prefix; a plain Redis is not taken for a cluster."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from redis.asyncio.cluster import RedisCluster

from app.adapters import open_store
from app.adapters.redis_cluster import cluster_prefix, serves_cluster
from app.ports import OutputChunk
from tests.conftest import REDIS_URL
from tests.contract.stores import finishing, kept, running_run
from tests.e2e.redis_cluster_servers import RedisClusterSet, throwaway_redis_cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[RedisClusterSet]:
    async with throwaway_redis_cluster(tmp_path) as started:
        yield started


async def keys_of(cluster: RedisClusterSet) -> dict[str, int]:
    """Every key in the cluster, with its hash slot."""
    client = RedisCluster.from_url(cluster.plain_url)
    try:
        keys = [key.decode() async for key in client.scan_iter(count=1000)]
        return {key: client.keyslot(key) for key in keys}
    finally:
        await client.aclose()


@pytest.mark.parametrize("url_kind", ["cluster", "plain"])
async def test_every_key_of_a_prefix_lies_in_one_slot(
    cluster: RedisClusterSet, prefix: str, url_kind: str
) -> None:
    url = cluster.url if url_kind == "cluster" else cluster.plain_url
    async with open_store(url, prefix=prefix, run_history=2) as store:
        await store.ping()
        for name in ("a", "b", "c"):
            task, run = await running_run(store, name)
            await store.append_output(run.run_id, OutputChunk(0, b"out\n"), keep=100)
            assert (await kept(store, run.run_id)).chunks
            await store.commit(finishing(task, run))
        async with store.cancel_notices() as notices:
            await store.announce_cancel("run-1")
            assert await anext(notices) == "run-1"
        listed = await store.list_tasks(status=None, limit=10, after=None)
        assert [task.id for task in listed.tasks] == [
            "a",
            "b",
            "c",
        ]
    slots = await keys_of(cluster)
    tagged = cluster_prefix(prefix)
    assert {f"{tagged}task:a", f"{tagged}tasks", f"{tagged}events"} <= slots.keys()
    assert all(key.startswith(tagged) for key in slots)
    assert len(set(slots.values())) == 1


async def test_a_plain_redis_is_not_taken_for_a_cluster(cluster: RedisClusterSet) -> None:
    assert await serves_cluster(cluster.plain_url)
    assert not await serves_cluster(REDIS_URL)
    assert not await serves_cluster("redis://127.0.0.1:1/0", within=0.5)  # nothing there


async def test_a_follow_quiet_for_longer_than_a_command_timeout_goes_on(
    cluster: RedisClusterSet, prefix: str
) -> None:
    """Waiting reads have a client of their own on a cluster too, whose read timeout
    outlasts an ``XREAD BLOCK`` longer than redis-py's default 5 s."""
    async with (
        open_store(cluster.url, prefix=prefix, run_history=2, follow_keepalive=6.5) as store,
        store.follow("r") as pages,
    ):
        await anext(pages)
        started = time.monotonic()
        with anyio.fail_after(12):
            quiet = await anext(pages)
        assert (list(quiet.chunks), quiet.ended) == ([], False)
        assert time.monotonic() - started >= 6
