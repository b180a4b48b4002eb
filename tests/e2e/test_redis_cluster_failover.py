"""taskq on a Redis Cluster whose master of the store's slot is SIGKILLed under load.

A throwaway cluster (three masters, three replicas, ``cluster-node-timeout`` 2 s), taskq
on ``redis+cluster://``: tasks are submitted before and while the master serving the
prefix's hash slot is killed; its replica takes over. The failover is ridden out like a
Redis outage: requests answer 503 (never 500) meanwhile, and every acknowledged task
then completes, exactly once unless it was in flight at the kill. Checked task by task
straight from the cluster, with the helpers of ``test_restarts``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import cast

import anyio
import httpx
import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from app.adapters.redis_cluster import cluster_prefix
from tests.e2e.harness import running, service_env
from tests.e2e.redis_cluster_servers import RedisClusterSet, throwaway_redis_cluster
from tests.e2e.test_restarts import (
    BATCH,
    LEASE_SECONDS,
    SETTLE_SECONDS,
    TERMINAL,
    Report,
    TaskStates,
    acknowledged,
    alive,
    batch,
    check_every_task,
    health,
    submit,
    summarize,
    within,
)

pytestmark = pytest.mark.e2e

PROMOTION_SECONDS = 30.0  # a replica serves the slot within this after the kill
RECOVERY_SECONDS = 30.0  # /health is 200 again within this after the kill


class ClusterTaskStates(TaskStates):
    """``TaskStates`` read from the cluster's running nodes (every key of the store is in
    one slot: MGET works)."""

    def __init__(self, cluster: RedisClusterSet, prefix: str) -> None:
        super().__init__(cluster.plain_url, prefix)
        self.cluster = cluster

    def _client(self) -> redis.Redis:
        nodes = [ClusterNode("127.0.0.1", node.port) for node in self.cluster.nodes if node.running]
        client = RedisCluster(startup_nodes=nodes, decode_responses=True, socket_timeout=5)
        return cast(redis.Redis, client)

    async def all_terminal(self, task_ids: set[str]) -> bool:
        try:
            return await super().all_terminal(task_ids)
        except RedisClusterException:  # no node reachable: not yet
            return False


async def test_the_master_of_the_store_slot_killed_under_load_loses_no_acknowledged_task(
    prefix: str, tmp_path: Path
) -> None:
    report = Report("Redis Cluster: the master of the store's slot SIGKILLed under load")
    ran = tmp_path / "ran"
    async with throwaway_redis_cluster(tmp_path) as cluster:
        tagged = cluster_prefix(prefix)
        states = ClusterTaskStates(cluster, tagged)
        env = service_env(prefix, REDIS_URL=cluster.url, TASKQ_LEASE_SECONDS=str(LEASE_SECONDS))
        async with (
            running(["serve"], env, name="all-roles") as service,
            running(["serve", "--roles", "consumer"], env, name="consumer") as consumer,
        ):
            processes = [service, consumer]
            assert service.api_url is not None
            async with httpx.AsyncClient(base_url=service.api_url) as http:
                before = await submit(http, batch("before"), ran)
                report.note(f"before the kill: {summarize(before)}")
                report.expect(len(acknowledged(before)) == BATCH, "refused before the kill")
                at_kill = await states.statuses(acknowledged(before))
                in_flight = {t for t, s in at_kill.items() if s not in TERMINAL}
                report.note(
                    f"at the kill: {Counter(at_kill.values())}; "
                    f"{len(in_flight)} not finished (these alone may run twice)"
                )

                master = await cluster.owner_of(f"{tagged}tasks")
                during: dict[str, str] = {}

                async def submit_during() -> None:
                    during.update(await submit(http, batch("during"), ran))

                timeline: list[tuple[float, float, Counter[int]]] = []
                async with anyio.create_task_group() as tg:
                    tg.start_soon(submit_during)
                    await anyio.sleep(0.2)  # some of the batch acknowledged, the rest to come
                    await master.kill()
                    killed_at = anyio.current_time()
                    timeline.append(await ride_out(cluster, http, master.port, tagged, killed_at))
                [(promoted_after, healthy_after, statuses_seen)] = timeline
                report.note(
                    f"killed master 127.0.0.1:{master.port}; a replica served the slot "
                    f"{promoted_after:.1f} s later, /health 200 again after "
                    f"{healthy_after:.1f} s; /health answers meanwhile: {dict(statuses_seen)}"
                )
                report.note(f"submitted around the kill: {summarize(during)}")
                report.expect(promoted_after < PROMOTION_SECONDS, "no replica took the slot over")
                report.expect(healthy_after < RECOVERY_SECONDS, "/health never 200 again")
                report.expect(500 not in statuses_seen, f"/health answered 500: {statuses_seen}")
                report.expect(
                    not any(": 500 " in result for result in during.values()),
                    f"requests answered 500 during the failover: {summarize(during)}",
                )
                # A create acknowledged but whose execute was refused stays created.
                half_done = {t for t, r in during.items() if r.startswith("POST /tasks/")}
                report.note(f"created but not executed during the failover: {len(half_done)}")
                alive(processes, report, "during the failover")

                after = await submit(http, batch("after"), ran)
                report.note(f"after the failover: {summarize(after)}")
                report.expect(len(acknowledged(after)) == BATCH, "refused after the failover")
                submitted = {
                    "before": acknowledged(before),
                    "during": acknowledged(during),
                    "after": acknowledged(after),
                }
                every = set().union(*submitted.values())
                settled = await within(lambda: states.all_terminal(every), SETTLE_SECONDS)
                report.expect(
                    settled, f"not every task terminal {SETTLE_SECONDS:g} s after the last"
                )
                try:
                    await check_every_task(
                        report, states, ran, submitted=submitted, may_repeat=in_flight
                    )
                except (redis.RedisError, RedisClusterException) as exc:
                    report.expect(False, f"the cluster could not be read: {exc!r}")
                alive(processes, report, "by the end")
    report.finish()


async def ride_out(
    cluster: RedisClusterSet, http: httpx.AsyncClient, killed: int, tagged: str, since: float
) -> tuple[float, float, Counter[int]]:
    """Wait until another node serves the store's slot and ``/health`` is 200 again;
    seconds from ``since`` to each, and the ``/health`` status codes seen meanwhile."""
    promoted_after: float | None = None
    healthy_after: float | None = None
    seen: Counter[int] = Counter()

    async def both() -> bool:
        nonlocal promoted_after, healthy_after
        now = anyio.current_time() - since
        if promoted_after is None:
            try:
                owner = await cluster.owner_of(f"{tagged}tasks")
            except (redis.RedisError, RuntimeError):
                owner = None
            if owner is not None and owner.port != killed:
                promoted_after = now
        status, _ = await health(http)
        seen[status] += 1
        if healthy_after is None and status == 200 and promoted_after is not None:
            healthy_after = anyio.current_time() - since
        return promoted_after is not None and healthy_after is not None

    await within(both, max(PROMOTION_SECONDS, RECOVERY_SECONDS))
    return (
        promoted_after if promoted_after is not None else float("inf"),
        healthy_after if healthy_after is not None else float("inf"),
        seen,
    )
