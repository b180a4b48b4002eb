"""Redis through Sentinel: the ``redis+sentinel://`` URL, the clients redis-py's own
``Sentinel`` hands out for the service's primary, and acknowledged writes (``WAIT``).

``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?options]``

- the hosts are the Sentinels (port 26379 when omitted); ``user:password`` are those of
  the Redis servers themselves;
- options: ``sentinel_username`` / ``sentinel_password`` (when the Sentinels ask for their
  own), ``min_replicas=N`` (every commit waits until N replicas have it, ``WAIT``) and
  ``replica_timeout`` (milliseconds that wait lasts at most, default 1000).

The clients are redis-py's ``master_for`` clients: each new connection asks the Sentinels
where the primary is, so after a failover the next connection goes to the promoted
replica, and a demoted primary's ``READONLY`` reply drops the connection like an outage
(``SentinelManagedConnection``). The store then treats a failover as it treats Redis
being away: ``StoreUnavailable`` until the promoted primary answers.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qsl, unquote

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from app.config import ConfigError
from app.ports import StoreUnavailable

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REPLICA_TIMEOUT_MS = 1000
MAX_REPLICA_TIMEOUT_MS = 4000
"""Below the store's command timeout (5 s), so that a ``WAIT`` never looks like a hang."""
SENTINEL_TIMEOUT = 1.0
"""Seconds one Sentinel may take to answer before the next one is asked."""

_HOST_PORT = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>[^:]*))?"
)
_OPTIONS = ("sentinel_username", "sentinel_password", "min_replicas", "replica_timeout")


class ReplicaAcks(NamedTuple):
    """Commits wait (``WAIT replicas timeout_ms``) until ``replicas`` replicas have them."""

    replicas: int
    timeout_ms: int

    def queue(self, pipe: Pipeline) -> None:
        """Add the ``WAIT`` after the writes queued on ``pipe`` (same connection: ``WAIT``
        waits for that connection's own writes)."""
        pipe.wait(self.replicas, self.timeout_ms)  # pyright: ignore[reportUnknownMemberType]

    async def check(self, client: redis.Redis, acknowledged: object) -> None:
        """``StoreUnavailable`` unless ``WAIT``'s reply counts enough replicas: the write
        is on the primary but could be lost with it, so it is not acknowledged."""
        if isinstance(acknowledged, ResponseError) and "replica" in str(acknowledged):
            # The primary was demoted between the commit and its WAIT: the commit is on a
            # server that now follows the new primary, which never got it.
            raise StoreUnavailable(f"Redis: the primary was demoted: {acknowledged}")
        if isinstance(acknowledged, Exception):
            raise acknowledged
        if not isinstance(acknowledged, int) or acknowledged < self.replicas:
            await _ask_for_the_primary(client)
            raise StoreUnavailable(
                f"Redis: a write reached {acknowledged} of the {self.replicas} replicas"
                f" required (min_replicas) within {self.timeout_ms} ms"
            )


async def _ask_for_the_primary(client: redis.Redis) -> None:
    """Ask the Sentinels where the primary is now: if they name another one (the replicas
    left this one, which has not heard yet), the pool drops its connections to this one
    rather than writing to it until the Sentinels demote it."""
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        with contextlib.suppress(RedisError):
            await pool.get_master_address()


@dataclass(frozen=True, slots=True)
class SentinelService:
    """Where a ``redis+sentinel://`` URL points: a service the Sentinels watch."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    acks: ReplicaAcks | None = None

    @classmethod
    def from_url(cls, url: str) -> SentinelService:
        """Parse ``url`` (see the module docstring); ``ConfigError`` saying what is wrong."""
        scheme, separator, rest = url.partition("://")
        if not separator or scheme != SCHEME:
            raise _error(url, f"must start with {SCHEME}://")
        rest, _, query = rest.partition("?")
        rest = rest.partition("#")[0]
        location, _, path = rest.partition("/")
        userinfo, at, hosts = location.rpartition("@")
        username, password = _credentials(userinfo) if at else (None, None)
        service_name, db = _service_and_db(url, path)
        options = _options(url, query)
        replicas = _whole(url, options, "min_replicas", 0, minimum=0)
        timeout_ms = _whole(url, options, "replica_timeout", DEFAULT_REPLICA_TIMEOUT_MS, minimum=1)
        if timeout_ms > MAX_REPLICA_TIMEOUT_MS:
            raise _error(url, f"replica_timeout must be at most {MAX_REPLICA_TIMEOUT_MS} (ms)")
        return cls(
            sentinels=_sentinels(url, hosts),
            service_name=service_name,
            db=db,
            username=username,
            password=password,
            sentinel_username=options.get("sentinel_username"),
            sentinel_password=options.get("sentinel_password"),
            acks=ReplicaAcks(replicas, timeout_ms) if replicas else None,
        )

    def sentinel_options(self) -> dict[str, Any]:
        """How to reach the Sentinels: quickly given up on, as the next one is asked."""
        options: dict[str, Any] = {
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
        }
        if self.sentinel_username is not None:
            options["username"] = self.sentinel_username
        if self.sentinel_password is not None:
            options["password"] = self.sentinel_password
        return options

    def server_options(self) -> dict[str, Any]:
        """How to reach the Redis servers of the service."""
        return {"db": self.db, "username": self.username, "password": self.password}


_CLIENT_REPR = re.compile(
    r"<redis\.asyncio\.client\.Redis\(.*?,host=([^,]+),port=(\d+),.*?\)>\)>\)>"
)


class Sentinels(Sentinel):
    """redis-py's ``Sentinel``, with two repairs:

    - its "no master found" names each Sentinel by its address instead of its client's
      whole repr (the message reaches ``/health``);
    - it keeps one client per Sentinel. ``discover_master`` moves the Sentinel that
      answered to the front by the index it found it at, and lookups run at once (every
      connection a failover breaks asks): when another lookup has reordered the list
      meanwhile, the swap lists one Sentinel twice and drops another, whose client is
      then never asked again nor closed (its sockets outlive the store, and a uvloop
      loop cannot close while they are open)."""

    def __init__(self, sentinels: list[tuple[str, int]], **options: Any) -> None:
        super().__init__(sentinels, **options)
        self._clients: tuple[redis.Redis, ...] = tuple(self.sentinels)

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        try:
            return cast(tuple[str, int], await super().discover_master(service_name))
        except MasterNotFoundError as exc:
            raise MasterNotFoundError(_CLIENT_REPR.sub(r"\1:\2", str(exc))) from None
        finally:
            self._one_client_per_sentinel()

    def _one_client_per_sentinel(self) -> None:
        """Keep the order redis-py chose, each client once, and every client."""
        listed = {id(client): client for client in self.sentinels}
        kept = list(listed.values())
        self.sentinels = kept + [client for client in self._clients if id(client) not in listed]

    async def aclose(self) -> None:
        self._one_client_per_sentinel()
        await super().aclose()


@asynccontextmanager
async def sentinel_clients(
    service: SentinelService, *, command_timeout: float, blocking_timeout: float, **options: Any
) -> AsyncGenerator[tuple[redis.Redis, redis.Redis, redis.Redis]]:
    """Clients to ``service``'s primary, as ``RedisStore`` takes them: commands answered
    within ``command_timeout``; reads that wait (``blocking_timeout``); and a probe that
    tries once more at once but does not wait out an outage. ``options`` are the
    connections' (retry, timeouts, client name). The caller closes the clients; the
    connections to the Sentinels are closed on exit."""
    sentinel = Sentinels(
        list(service.sentinels),
        sentinel_kwargs=service.sentinel_options(),
        **service.server_options(),
    )
    name = service.service_name
    try:
        client = _primary(sentinel, name, {**options, "socket_timeout": command_timeout})
        blocking = _primary(sentinel, name, {**options, "socket_timeout": blocking_timeout})
        probe = _primary(
            sentinel,
            name,
            {**options, "socket_timeout": command_timeout, "retry": Retry(NoBackoff(), retries=1)},
        )
        yield client, blocking, probe
    finally:
        await sentinel.aclose()


def _primary(sentinel: Sentinel, service_name: str, options: dict[str, Any]) -> redis.Redis:
    """A client whose connections go to the primary the Sentinels name at the time."""
    return sentinel.master_for(service_name, **options)  # pyright: ignore[reportUnknownMemberType]


def _error(url: str, why: str) -> ConfigError:
    return ConfigError(f"REDIS_URL {_redacted(url)!r}: {why}")


def _redacted(url: str) -> str:
    """``url`` without its passwords (it goes into error messages and logs)."""
    url = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"(sentinel_password=)[^&#]*", r"\1***", url)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _sentinels(url: str, hosts: str) -> tuple[tuple[str, int], ...]:
    if not hosts:
        raise _error(url, "names no Sentinel (host:port[,host:port...])")
    found: list[tuple[str, int]] = []
    for entry in hosts.split(","):
        match = _HOST_PORT.fullmatch(entry.strip())
        if match is None:
            raise _error(url, f"{entry!r} is not a Sentinel's host:port")
        host = match["ipv6"] or match["host"]
        found.append((host, _port(url, entry, match["port"])))
    return tuple(found)


def _port(url: str, entry: str, text: str | None) -> int:
    if text is None:
        return DEFAULT_SENTINEL_PORT
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _error(url, f"{entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def _service_and_db(url: str, path: str) -> tuple[str, int]:
    service_name, _, db_text = path.partition("/")
    service_name = unquote(service_name)
    if not service_name:
        raise _error(url, "names no service: add /service_name after the Sentinels")
    db_text = db_text.rstrip("/")
    if not db_text:
        return service_name, 0
    if not db_text.isdigit():
        raise _error(url, f"the database after the service name must be a number, got {db_text!r}")
    return service_name, int(db_text)


def _options(url: str, query: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise _error(url, f"unknown option {', '.join(unknown)} (known: {', '.join(_OPTIONS)})")
    return options


def _whole(url: str, options: dict[str, str], name: str, default: int, *, minimum: int) -> int:
    text = options.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) < minimum:
        raise _error(url, f"{name} must be a whole number of at least {minimum}, got {text!r}")
    return int(text)
