"""The Redis store on a Redis Cluster, through redis-py's ``RedisCluster``.

``REDIS_URL=redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS)
names startup nodes; a plain ``redis://`` URL of a node of a cluster is recognised too
(``INFO cluster`` says ``cluster_enabled:1``). The store is the same ``RedisStore``: its
scripts touch several keys, and derive some names from the prefix, which works on a
cluster only when every key of the store lies in one hash slot. So in cluster mode the
key prefix carries a hash tag (``taskq:`` becomes ``{taskq}:``, the empty prefix
``{taskq}:``): the whole store lives on one shard, replicated by that shard's replicas.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.adapters.redis_store import RedisStore
from app.config import ConfigError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_TAG = "taskq"
"""The hash tag of the empty prefix."""
DETECT_TIMEOUT = 2.0
"""Seconds ``serves_cluster`` waits for a node's ``INFO cluster``."""

_COMMAND_TIMEOUT = 5.0
_MAX_BLOCK = 30.0  # as in redis_store: the blocking client's reads wait this long at most
_HASH_TAG = re.compile(r"\{[^{}]+\}")


class ClusterAddress(NamedTuple):
    """Where a cluster is: its startup nodes and how to talk to them."""

    nodes: list[tuple[str, int]]
    tls: bool
    username: str | None
    password: str | None


def parse_cluster_url(url: str) -> ClusterAddress:
    """The startup nodes of ``redis+cluster://[user:password@]host:port[,host:port...][/0]``
    (or ``rediss+cluster://``, or a plain ``redis://``/``rediss://`` URL of one node)."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in (*CLUSTER_SCHEMES, "redis", "rediss"):
        raise ConfigError(f"not a Redis Cluster URL: {url!r}")
    location, _, database = rest.partition("/")
    if database.split("?")[0] not in ("", "0"):
        raise ConfigError(f"a Redis Cluster has only database 0: {url!r}")
    credentials, _, hosts = location.rpartition("@")
    username, _, password = credentials.partition(":")
    nodes = [_node(part, url) for part in hosts.split(",") if part]
    if not nodes:
        raise ConfigError(f"a Redis Cluster URL names at least one node: {url!r}")
    return ClusterAddress(
        nodes,
        tls=scheme.startswith("rediss"),
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


def _node(address: str, url: str) -> tuple[str, int]:
    try:
        parsed = urlsplit(f"//{address}")
        return parsed.hostname or "localhost", parsed.port or 6379
    except ValueError as exc:
        raise ConfigError(f"bad node {address!r} in {url!r}: {exc}") from exc


def cluster_prefix(prefix: str) -> str:
    """``prefix`` with a hash tag, so that every key under it lies in one slot: kept as
    it is when it has one, else ``{prefix}:`` (without its trailing ``:``), and
    ``{taskq}:`` for the empty prefix."""
    if _HASH_TAG.search(prefix):
        return prefix
    return f"{{{prefix.removesuffix(':') or DEFAULT_TAG}}}:"


async def serves_cluster(url: str, *, within: float = DETECT_TIMEOUT) -> bool:
    """Whether the server at the plain ``redis://`` ``url`` is a node of a Redis Cluster
    (``False`` when it does not answer within ``within`` seconds: opened as a single
    server, it is then ridden out as an outage like any)."""
    client = redis.Redis.from_url(url, socket_timeout=within, socket_connect_timeout=within)  # pyright: ignore[reportUnknownMemberType]
    try:
        info = await client.info("cluster")  # pyright: ignore[reportUnknownMemberType]
    except RedisError:
        return False
    finally:
        with contextlib.suppress(RedisError):
            await client.aclose()
    return str(info.get("cluster_enabled")) == "1"


class _SlotProbe(RedisCluster):
    """A client whose ``ping`` asks the master of the store's slot, once, without
    waiting out an outage (``RedisStore.ping``'s meaning on one server)."""

    def __init__(self, key: str, **options: Any) -> None:
        super().__init__(**options)  # pyright: ignore[reportUnknownMemberType]
        self._key = key

    async def ping(self, **_: Any) -> bool:
        await self.initialize()
        node = self.get_node_from_key(self._key)
        return bool(await self.execute_command("PING", target_nodes=node))  # pyright: ignore[reportUnknownMemberType]


def _client_options(address: ClusterAddress) -> dict[str, Any]:
    return {
        "startup_nodes": [ClusterNode(host, port) for host, port in address.nodes],
        "ssl": address.tls,
        "username": address.username,
        "password": address.password,
        "socket_connect_timeout": _COMMAND_TIMEOUT,
        "health_check_interval": 30,
        "client_name": f"taskq-{os.getpid()}",
    }


@asynccontextmanager
async def open_redis_cluster_store(
    url: str,
    *,
    prefix: str,
    run_history: int,
    event_history: int,
    follow_keepalive: float,
    max_followers: int,
) -> AsyncGenerator[RedisStore]:
    """A ``RedisStore`` on a Redis Cluster, under ``cluster_prefix(prefix)``.

    Like ``open_redis_store``: commands retry with backoff (a failover, a moved slot, a
    cluster that is down for a moment), then report the store unavailable; reads that
    wait have a client of their own.
    """
    address = parse_cluster_url(url)
    tagged = cluster_prefix(prefix)
    options = _client_options(address)
    retrying: dict[str, Any] = {
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    client = RedisCluster(socket_timeout=_COMMAND_TIMEOUT, **retrying, **options)
    blocking = RedisCluster(socket_timeout=_MAX_BLOCK + _COMMAND_TIMEOUT, **retrying, **options)
    probe = _SlotProbe(
        f"{tagged}tasks",
        socket_timeout=_COMMAND_TIMEOUT,
        retry=Retry(NoBackoff(), retries=1),
        **options,
    )
    # ``RedisStore`` uses the commands a ``Redis`` and a ``RedisCluster`` have in common.
    store = RedisStore(
        cast(redis.Redis, client),
        blocking=cast(redis.Redis, blocking),
        probe=cast(redis.Redis, probe),
        prefix=tagged,
        run_history=run_history,
        event_history=event_history,
        follow_keepalive=follow_keepalive,
        max_followers=max_followers,
    )
    try:
        yield store
    finally:
        await store.aclose()
        await blocking.aclose()
