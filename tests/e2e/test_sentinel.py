"""Redis through Sentinel, really failing over: a throwaway primary with its replicas and
three Sentinels (``tests/e2e/sentinels.py``), the primary demoted or SIGKILLed while taskq
writes to it.

What a failover costs is printed (``pytest -s``): how long writes are refused (the 503
window for the API), how long until the next task completes, and what was lost.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as redis

from app.adapters import open_store
from app.ports import StoreUnavailable, TaskStore
from tests.conftest import eventually
from tests.contract.stores import create
from tests.e2e.harness import running, service_env
from tests.e2e.sentinels import SERVICE, SentinelSet, throwaway_sentinels
from tests.e2e.servers import RedisServer, free_ports

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def collect_dropped_sockets() -> Iterator[None]:
    """Collect garbage as each test here ends: a socket to a throwaway server that a
    connection dropped without closing it (as lookups at once used to drop a Sentinel's
    client, see ``app.adapters.redis_sentinel.Sentinels``) then fails the test that
    dropped it, as an unraisable ResourceWarning, rather than a later module's test."""
    yield
    gc.collect()


FAILOVER_SECONDS = 30.0
"""Down-after (1 s) plus the election and the promotion, on a loaded shared machine."""
WRITERS = 4
POSTERS = 4
POST_PAUSE = 0.02


async def test_no_sentinel_answering_is_an_outage_naming_each_sentinel() -> None:
    ports = free_ports(2)
    url = f"redis+sentinel://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/taskq"
    async with open_store(url, prefix="never-written:") as store:
        with pytest.raises(StoreUnavailable) as unavailable:
            await store.ping()
    message = str(unavailable.value)
    assert message.startswith("Redis: No master found for 'taskq'")
    assert f"127.0.0.1:{ports[0]} - " in message and f"127.0.0.1:{ports[1]} - " in message
    assert "redis.asyncio" not in message, "not the clients' whole repr"


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


@dataclass
class Posts:
    """What ``POST /tasks`` answered, and when (monotonic time): the ids acknowledged,
    when each was sent and answered, and when 503s were answered."""

    acknowledged: list[str] = field(default_factory=list[str])
    sent_at: list[float] = field(default_factory=list[float])
    acknowledged_at: list[float] = field(default_factory=list[float])
    unavailable_at: list[float] = field(default_factory=list[float])
    slowest: float = 0.0

    def after(self, kill: Kill, runs: list[tuple[str, float]]) -> str:
        """What the kill cost, as users saw it: the 503 window, the slowest answer, the
        first acknowledged creation and the first run of a task created after it."""
        unavailable = [at - kill.at for at in self.unavailable_at if at >= kill.at]
        window = f"{unavailable[0]:.2f}-{unavailable[-1]:.2f} s" if unavailable else "none"
        created = [  # sent after the kill
            (task_id, answered)
            for task_id, sent, answered in zip(
                self.acknowledged, self.sent_at, self.acknowledged_at, strict=True
            )
            if sent > kill.at
        ]
        first_201 = min(answered for _, answered in created) - kill.at
        ids = {task_id for task_id, _ in created}
        first_run = min(at for task_id, at in runs if task_id in ids) - kill.at_wall
        return (
            f"failover {kill.failover:.2f} s, a replica follows the new primary after "
            f"{kill.replica_back:.2f} s; {len(unavailable)} POSTs answered 503, {window} after "
            f"the kill; slowest POST {self.slowest:.2f} s; first 201 to a POST sent after the kill "
            f"{first_201:.2f} s after it; "
            f"first task created after the kill ran {first_run:.2f} s after it"
        )


async def post_until(
    http: httpx.AsyncClient, posts: Posts, done: anyio.Event, name: str, ran: Path
) -> None:
    """Create tasks due at once until ``done``: each appends its id and the time it ran to
    ``ran``. A 503 is retried with a new task; any other answer but 201 fails the test."""
    for number in range(1_000_000):
        if done.is_set():
            return
        task_id = f"{name}-{number:05}"
        body = {
            "id": task_id,
            "name": task_id,
            "command": f'echo "{task_id} $(date +%s.%N)" >> {ran}',
            "scheduled_at": datetime.now(UTC).isoformat(),
        }
        began = anyio.current_time()
        response = await http.post("/tasks", json=body)
        posts.slowest = max(posts.slowest, anyio.current_time() - began)
        if response.status_code == 503:
            posts.unavailable_at.append(anyio.current_time())
            await anyio.sleep(0.1)
            continue
        assert response.status_code == 201, response.text
        posts.acknowledged.append(task_id)
        posts.sent_at.append(began)
        posts.acknowledged_at.append(anyio.current_time())
        await anyio.sleep(POST_PAUSE)


def executions(ran: Path) -> list[tuple[str, float]]:
    """Each run of a task, as its command recorded it: (task id, wall-clock time)."""
    if not ran.exists():
        return []
    runs = (line.split() for line in ran.read_text().splitlines())
    return [(task_id, float(at)) for task_id, at in runs]


@dataclass
class Kill:
    """When the primary was killed (monotonic and wall-clock), and how long until the
    Sentinels named a new one and until a replica followed it."""

    at: float = 0.0
    at_wall: float = 0.0
    failover: float = 0.0
    replica_back: float = 0.0


async def kill_primary(sentinels: SentinelSet) -> Kill:
    old = await sentinels.primary()
    await old.kill()
    kill = Kill(at=anyio.current_time(), at_wall=time.time())
    new = await sentinels.wait_for_failover(old, within=FAILOVER_SECONDS)
    kill.failover = anyio.current_time() - kill.at

    async def followed() -> bool:
        return await sentinels.replicas_online(new) >= 1

    await eventually(followed, within=FAILOVER_SECONDS, every=0.05)
    kill.replica_back = anyio.current_time() - kill.at
    return kill


async def test_every_acknowledged_task_runs_once_across_a_killed_primary(
    tmp_path: Path, prefix: str, servers: redis.Redis
) -> None:
    """taskq (api and scheduler in one process, a consumer in another) through Sentinel
    with ``min_replicas=1``, tasks created one after another by four clients; the
    primary is SIGKILLed. Every task whose creation was answered 201 runs exactly once."""
    ran = tmp_path / "ran"
    posts, done, kill = Posts(), anyio.Event(), Kill()
    async with throwaway_sentinels(tmp_path, replicas=2) as sentinels:
        env = service_env(prefix, REDIS_URL=sentinels.url(query="min_replicas=1"))
        async with (
            running(["serve", "--roles", "api,scheduler"], env, name="api") as api,
            running(["serve", "--roles", "consumer"], env, name="consumer"),
            httpx.AsyncClient(base_url=api.api_url or "", timeout=60) as http,
            anyio.create_task_group() as tg,
        ):
            for poster in range(POSTERS):
                tg.start_soon(post_until, http, posts, done, f"p{poster}", ran)
            await eventually(lambda: len(executions(ran)) >= 200, within=60)
            kill = await kill_primary(sentinels)
            posted = len(posts.acknowledged)
            await eventually(lambda: len(posts.acknowledged) > posted + 200, within=60)
            done.set()

            async def all_ran() -> bool:
                return {task_id for task_id, _ in executions(ran)} >= set(posts.acknowledged)

            await eventually(all_ran, within=120, every=0.2)
            await anyio.sleep(2)  # a duplicate, if any, has time to show
    runs = executions(ran)
    counts = Counter(task_id for task_id, _ in runs)
    twice = sorted(task_id for task_id, count in counts.items() if count > 1)
    print(f"taskq through Sentinel (2 replicas, min_replicas=1), primary SIGKILLed under load: "
          f"{posts.after(kill, runs)}; {len(posts.acknowledged)} tasks acknowledged, "
          f"{len(runs)} runs, {len(twice)} run twice")  # fmt: skip
    assert twice == []
    assert set(counts) >= set(posts.acknowledged)
