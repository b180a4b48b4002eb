"""A throwaway Redis Sentinel set, started for one test, always removed.

``throwaway_sentinels``: a primary ``redis-server`` and its replicas on free ports, plus
three ``redis-server --sentinel`` processes watching them under the service name
``SERVICE`` (each with its own config file, which Sentinel rewrites, in a folder of its
own). A test kills the primary (``SentinelSet.primary()``) and waits for the Sentinels to
promote a replica (``wait_for_failover``). Everything is killed and deleted on exit,
whatever happens (``RedisServer.close``: shielded, bounded).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import redis.asyncio as redis

from tests.conftest import eventually
from tests.e2e.servers import RedisServer, free_ports

SERVICE = "taskq"
DOWN_AFTER_MS = 1000
"""How long a primary stays silent before a Sentinel counts it down (subjectively)."""
FAILOVER_TIMEOUT_MS = 2000
SENTINELS = 3
QUORUM = 2
READY_SECONDS = 30.0
"""Until every Sentinel knows the replicas and the other Sentinels (hello every 2 s)."""


class MemberServer(RedisServer):
    """A ``redis-server`` of the set: the first primary (``primary`` None) or a replica of
    it from its start. A replica's first sync starts at once (not after the default 5 s
    wait for more replicas to share a diskless transfer), on every member as each may
    become the primary."""

    def __init__(self, directory: Path, port: int, *, primary: int | None) -> None:
        super().__init__(directory, port, appendonly=False)
        self.primary = primary

    def command(self) -> list[str]:
        replicating = (
            [] if self.primary is None else ["--replicaof", "127.0.0.1", str(self.primary)]
        )
        return [*super().command(), "--repl-diskless-sync-delay", "0", *replicating]


class SentinelServer(RedisServer):
    """A ``redis-server --sentinel`` watching ``SERVICE`` (first on port ``primary``)."""

    def __init__(self, directory: Path, port: int, *, primary: int) -> None:
        super().__init__(directory, port, appendonly=False)
        self.config = directory / "sentinel.conf"
        self.primary = primary

    def command(self) -> list[str]:
        if not self.config.exists():  # Sentinel rewrites it: keep what it learnt on restart
            self.config.parent.mkdir(parents=True, exist_ok=True)
            self.config.write_text(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.data}\n"
                'logfile ""\n'
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
        return ["redis-server", str(self.config), "--sentinel"]


class SentinelSet:
    """A primary, its replicas and three Sentinels, all on free ports."""

    def __init__(self, base: Path, *, replicas: int) -> None:
        ports = free_ports(1 + replicas + SENTINELS)
        primary = ports[0]
        self.servers: list[RedisServer] = [
            MemberServer(base / f"redis-{port}", port, primary=None if port == primary else primary)
            for port in ports[: 1 + replicas]
        ]
        self.sentinels = [
            SentinelServer(base / f"sentinel-{port}", port, primary=primary)
            for port in ports[1 + replicas :]
        ]

    def url(self, *, db: int = 0, query: str = "") -> str:
        """The ``redis+sentinel://`` URL of this set's service."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}" + (f"?{query}" if query else "")

    async def master(self) -> dict[str, Any]:
        """What the first Sentinel that answers says of the service's primary."""
        for sentinel in self.sentinels:
            if sentinel.running:
                client = redis.Redis(port=sentinel.port, socket_timeout=2)
                try:
                    return cast(dict[str, Any], await client.sentinel_master(SERVICE))  # pyright: ignore[reportUnknownMemberType]
                except redis.RedisError:
                    continue
                finally:
                    await client.aclose()
        raise RuntimeError("no Sentinel answers")

    async def primary(self) -> RedisServer:
        """The server the Sentinels currently name as primary."""
        port = int((await self.master())["port"])
        return next(server for server in self.servers if server.port == port)

    async def replicas_online(self, primary: RedisServer) -> int:
        """How many replicas ``primary`` streams its writes to (``INFO replication``)."""
        client = redis.Redis(port=primary.port, socket_timeout=2, decode_responses=True)
        try:
            info = cast(dict[str, Any], await client.info("replication"))  # pyright: ignore[reportUnknownMemberType]
        finally:
            await client.aclose()
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave")
            and isinstance(value, dict)
            and value.get("state") == "online"
        )

    async def wait_until_watched(self, *, replicas: int) -> None:
        """Until the primary streams to ``replicas`` replicas and every Sentinel knows
        them and its peers."""

        async def watched() -> bool:
            if await self.replicas_online(self.servers[0]) < replicas:
                return False
            for sentinel in self.sentinels:
                client = redis.Redis(port=sentinel.port, socket_timeout=2)
                try:
                    state = cast(dict[str, Any], await client.sentinel_master(SERVICE))  # pyright: ignore[reportUnknownMemberType]
                except redis.RedisError:
                    return False
                finally:
                    await client.aclose()
                if (
                    state["num-slaves"] < replicas
                    or state["num-other-sentinels"] < SENTINELS - 1
                    or not state["is_master"]
                    or state["is_sdown"]
                ):
                    return False
            return True

        await eventually(watched, within=READY_SECONDS, every=0.2)

    async def wait_for_failover(self, away_from: RedisServer, *, within: float) -> RedisServer:
        """Until the Sentinels name another primary than ``away_from``, and it answers
        as a primary; that new primary."""

        async def promoted() -> bool:
            try:
                port = int((await self.master())["port"])
            except RuntimeError:
                return False
            if port == away_from.port:
                return False
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                role = cast(list[Any], await client.execute_command("ROLE"))  # pyright: ignore[reportUnknownMemberType]
            except redis.RedisError:
                return False
            finally:
                await client.aclose()
            return role[0] == b"master"

        await eventually(promoted, within=within, every=0.05)
        return await self.primary()

    async def close(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            await server.close()


async def _start_all(servers: Sequence[RedisServer]) -> None:
    async with anyio.create_task_group() as group:
        for server in servers:
            group.start_soon(server.start)


@asynccontextmanager
async def throwaway_sentinels(tmp_path: Path, *, replicas: int = 1) -> AsyncGenerator[SentinelSet]:
    """A primary with ``replicas`` replicas and three Sentinels watching them, ready for a
    failover (every Sentinel knows the replicas and its peers); removed on exit."""
    sentinel_set = SentinelSet(tmp_path / "sentinel-set", replicas=replicas)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(sentinel_set.close)
        await sentinel_set.servers[0].start()
        await _start_all([*sentinel_set.servers[1:], *sentinel_set.sentinels])
        await sentinel_set.wait_until_watched(replicas=replicas)
        yield sentinel_set
