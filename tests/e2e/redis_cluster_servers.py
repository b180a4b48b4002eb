"""A throwaway Redis Cluster: three masters and three replicas, started for one test (or a
session), always removed.

Each node is a ``redis-server --cluster-enabled yes`` child process on a free port, with a
free cluster bus port (``--cluster-port``: the default, port + 10000, may not exist) and
its own data folder; ``redis-cli --cluster create ... --cluster-replicas 1`` joins them,
and the set is ready once every node says ``cluster_state:ok``. A short
``cluster-node-timeout`` makes a replica take over a killed master within seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncGenerator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import redis.asyncio as redis
from anyio.from_thread import start_blocking_portal

from tests.conftest import eventually
from tests.e2e.servers import CLEANUP_SECONDS, RedisServer, free_ports

CLUSTER_READY_SECONDS = 60.0
NODE_TIMEOUT_MS = 2000
"""How long a master may be unreachable before its replica takes over (milliseconds)."""


class ClusterNode(RedisServer):
    """One node of a ``RedisClusterSet``."""

    def __init__(self, directory: Path, port: int, bus_port: int) -> None:
        super().__init__(directory, port, appendonly=False)
        self.bus_port = bus_port

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-port", str(self.bus_port),
            # A replica syncs at once rather than after the default 5 s wait for others.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip

    async def info(self, section: str) -> dict[str, str]:
        """``INFO section`` of this node, as text fields."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        try:
            raw = cast(
                dict[str, object],
                await client.execute_command("INFO", section),  # pyright: ignore[reportUnknownMemberType]
            )
        finally:
            await client.aclose()
        return {key: str(value) for key, value in raw.items()}

    async def cluster_info(self) -> dict[str, str]:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        try:
            raw = await client.execute_command("CLUSTER", "INFO")  # pyright: ignore[reportUnknownMemberType]
        finally:
            await client.aclose()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class RedisClusterSet:
    """Six cluster nodes (three masters, one replica each) on free ports."""

    def __init__(self, directory: Path, *, nodes: int = 6) -> None:
        ports = free_ports(2 * nodes)
        self.directory = directory
        self.nodes = [
            ClusterNode(directory / f"node-{port}", port, bus)
            for port, bus in zip(ports[:nodes], ports[nodes:], strict=True)
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    @property
    def plain_url(self) -> str:
        """A plain ``redis://`` URL of the first node (taskq detects the cluster)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    async def start(self) -> None:
        """Start every node, create the cluster and wait until every node says it is ok."""
        async with anyio.create_task_group() as group:
            for node in self.nodes:
                group.start_soon(node.start)
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = [
            shutil.which("redis-cli") or "redis-cli",
            "--cluster", "create", *addresses,
            "--cluster-replicas", "1",
            "--cluster-yes",
        ]  # fmt: skip
        result = await anyio.run_process(create, check=False, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{result.stdout.decode()}"
                f"{result.stderr.decode()}"
            )
        await self.wait_until_ok()

    async def wait_until_ok(self, *, within: float = CLUSTER_READY_SECONDS) -> None:
        """Wait until every running node reports ``cluster_state:ok`` and agrees on all
        masters (each with its slots), and every replica has synced with its master (a
        replica that never has does not take over: its data counts as too old)."""
        await eventually(self._all_ok, within=within, every=0.1)

    async def _all_ok(self) -> bool:
        for node in self.nodes:
            if not node.running:
                continue
            try:
                info = await node.cluster_info()
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            try:
                replication = await node.info("replication")
            except redis.RedisError:
                return False
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    async def owner_of(self, key: str) -> ClusterNode:
        """The master serving ``key``'s slot, as a running node sees it."""
        live = next(node for node in self.nodes if node.running)
        client = redis.Redis(host="127.0.0.1", port=live.port, socket_timeout=2)
        try:
            slot = await client.execute_command("CLUSTER", "KEYSLOT", key)  # pyright: ignore[reportUnknownMemberType]
            shards = cast(
                list[Any],
                await client.execute_command("CLUSTER", "SLOTS"),  # pyright: ignore[reportUnknownMemberType]
            )
        finally:
            await client.aclose()
        for first, last, master, *_ in shards:
            if first <= slot <= last:
                return self.node(int(master[1]))
        raise RuntimeError(f"no master serves slot {slot}")

    async def close(self) -> None:
        """Kill every node and delete their data (shielded, bounded)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
            async with anyio.create_task_group() as group:
                for node in self.nodes:
                    group.start_soon(node.close)
        shutil.rmtree(self.directory, ignore_errors=True)


@asynccontextmanager
async def throwaway_redis_cluster(tmp_path: Path) -> AsyncGenerator[RedisClusterSet]:
    """A Redis Cluster of its own (three masters, three replicas), removed on exit
    whatever happens."""
    cluster = RedisClusterSet(tmp_path / "redis-cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()


@contextmanager
def cluster_for_session() -> Iterator[RedisClusterSet]:
    """A throwaway Redis Cluster for synchronous (session-scoped) fixtures: started on
    a thread's event loop, removed on exit."""
    base = Path(tempfile.mkdtemp(prefix="taskq-test-cluster-"))
    try:
        with (
            start_blocking_portal() as portal,
            portal.wrap_async_context_manager(throwaway_redis_cluster(base)) as cluster,
        ):
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)
