"""Opening the ports: the URL scheme picks the adapter (``redis://``,
``redis+sentinel://``, ``redis+cluster://``, ``amqp://``, ``memory://``)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from app.config import ConfigError, parse_amqp_urls
from app.ports import EVENT_HISTORY, FOLLOW_KEEPALIVE, MAX_FOLLOWERS, Broker, Store


@asynccontextmanager
async def open_store(
    url: str,
    *,
    prefix: str = "",
    run_history: int = 100,
    event_history: int = EVENT_HISTORY,
    follow_keepalive: float = FOLLOW_KEEPALIVE,
    max_followers: int = MAX_FOLLOWERS,
) -> AsyncGenerator[Store]:
    """A connected ``Store`` for ``url``, closed on exit.

    ``event_history`` is how many events the event log keeps at least;
    ``follow_keepalive`` and ``max_followers`` shape ``LiveOutput.follow`` and
    ``EventLog.follow_events`` (see there).
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from app.adapters.memory_store import MemoryStore

        yield MemoryStore(
            run_history=run_history,
            event_history=event_history,
            follow_keepalive=follow_keepalive,
            max_followers=max_followers,
        )
    elif scheme in ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "rediss+cluster"):
        from app.adapters.redis_cluster import open_redis_cluster_store
        from app.adapters.redis_store import open_redis_store

        opener = open_redis_cluster_store if await _is_cluster(scheme, url) else open_redis_store
        async with opener(
            url,
            prefix=prefix,
            run_history=run_history,
            event_history=event_history,
            follow_keepalive=follow_keepalive,
            max_followers=max_followers,
        ) as store:
            yield store
    else:
        raise ConfigError(
            "REDIS_URL must start with redis://, rediss://, redis+sentinel://, "
            f"redis+cluster://, rediss+cluster:// or memory://: {url!r}"
        )


async def _is_cluster(scheme: str, url: str) -> bool:
    """Whether ``url`` names a Redis Cluster: by its scheme, or a plain ``redis://`` URL
    of a cluster node."""
    if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        return False
    from app.adapters.redis_cluster import CLUSTER_SCHEMES, serves_cluster

    return scheme in CLUSTER_SCHEMES or await serves_cluster(url)


@asynccontextmanager
async def open_broker(
    url: str, *, prefix: str = "", require_connection: bool = True
) -> AsyncGenerator[Broker]:
    """A connected ``Broker`` for ``url``, closed on exit; without ``require_connection``,
    it opens even while the broker is down, connecting in the background. ``url`` may
    list several RabbitMQ nodes of one cluster, comma-separated."""
    scheme = urlsplit(parse_amqp_urls(url)[0]).scheme
    if scheme == "memory":
        from app.adapters.memory_broker import MemoryBroker

        yield MemoryBroker()
    elif scheme in ("amqp", "amqps"):
        from app.adapters.amqp_broker import open_amqp_broker

        async with open_amqp_broker(
            url, prefix=prefix, require_connection=require_connection
        ) as broker:
            yield broker
    else:
        raise ConfigError(f"AMQP_URL must start with amqp://, amqps:// or memory://: {url!r}")
