"""Settings from the environment.

The variable names are those of the system taskq replaces (``REDIS_ADDRESS``,
``REDIS_MQ_URL``, ``SERVER_HOST``/``SERVER_PORT``) plus taskq's own ``TASKQ_*``. A secret
(``TASKQ_API_TOKENS``, ``REDIS_URL``, ``AMQP_URL``, ``REDIS_MQ_URL``,
``TASKQ_WEBHOOK_SECRET``) may be given as a file instead, through ``NAME_FILE``, so that
it need never be in any environment.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from app.domain import DEFAULT_QUEUE, QUEUE_NAME_PATTERN
from app.logs import LOG_FORMATS
from app.ports import ALL_ROLES, EVENT_HISTORY, FOLLOW_KEEPALIVE, MAX_FOLLOWERS, Role

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
MEMORY_URL = "memory://"
MAX_LOOKAHEAD_SECONDS = 60.0
"""A dispatch sent ahead of its time waits unacknowledged in a consumer: far less than
RabbitMQ's consumer timeout, and than a lease."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset
    narrows), the default number of consumer processes."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ConfigError(ValueError):
    """A setting has a value taskq cannot use; the message names the setting."""


QueueSpec = tuple[str, int | None]
"""A queue a consumer serves, and the commands it runs from it at once (``None``: the
general concurrency)."""


@dataclass(frozen=True, slots=True)
class Settings:
    store_url: str = DEFAULT_REDIS_URL
    broker_url: str = DEFAULT_AMQP_URL
    host: str = "127.0.0.1"
    port: int = 8080
    key_prefix: str = ""
    api_tokens: tuple[str, ...] = ()
    roles: tuple[Role, ...] = ALL_ROLES
    # Commands one consumer process runs at once; None: see ``commands_per_process``.
    concurrency: int | None = None
    # The queues the consumer role serves, each with its own concurrency if given.
    queues: tuple[QueueSpec, ...] = ((DEFAULT_QUEUE, None),)
    output_limit: int = 1_048_576
    run_history: int = 100
    event_history: int = EVENT_HISTORY
    lease_seconds: float = 30.0
    lookahead_seconds: float = 1.0
    shutdown_grace: float = 30.0
    request_timeout: float = 10.0
    follow_keepalive: float = FOLLOW_KEEPALIVE
    max_followers: int = MAX_FOLLOWERS
    # Processes the consumer role runs as; None: see ``consumer_processes``.
    processes: int | None = None
    # Notifications (``app.notifier``): the HMAC key of their signature (None: unsigned),
    # the base of the run links in their bodies (None: see ``run_links_base``), and how
    # they are delivered.
    webhook_secret: str | None = None
    public_url: str | None = None
    notify_timeout: float = 10.0
    notify_attempts: int = 8
    notify_backoff: float = 5.0
    notify_concurrency: int = 16
    # Where a process without the api role serves /metrics; None: nowhere.
    metrics_port: int | None = None
    log_format: str = "text"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if url := _secret(env, "REDIS_URL"):
            values["store_url"] = url
        elif address := env.get("REDIS_ADDRESS"):
            values["store_url"] = f"redis://{address}/0"
        if url := _secret(env, "AMQP_URL") or _secret(env, "REDIS_MQ_URL"):
            parse_amqp_urls(url)  # several nodes: each must be a full URL
            values["broker_url"] = url
        if host := env.get("SERVER_HOST"):
            values["host"] = host
        if "TASKQ_KEY_PREFIX" in env:
            values["key_prefix"] = env["TASKQ_KEY_PREFIX"]
        if (tokens := _secret(env, "TASKQ_API_TOKENS")) is not None:
            values["api_tokens"] = parse_tokens(tokens)
        if roles := env.get("TASKQ_ROLES"):
            values["roles"] = parse_roles(roles)
        if (queues := env.get("TASKQ_QUEUES")) is not None:
            values["queues"] = parse_queues(queues)
        if secret := _secret(env, "TASKQ_WEBHOOK_SECRET"):
            values["webhook_secret"] = secret
        if public_url := env.get("TASKQ_PUBLIC_URL"):
            values["public_url"] = parse_public_url(public_url)
        if (log_format := env.get("TASKQ_LOG_FORMAT")) is not None:
            values["log_format"] = parse_log_format(log_format)
        for name, (attribute, kind, minimum) in _NUMBERS.items():
            if (raw := env.get(name)) is not None:
                values[attribute] = _number(name, raw, kind, minimum)
        if values.get("lookahead_seconds", 0) > MAX_LOOKAHEAD_SECONDS:
            raise ConfigError(
                f"TASKQ_LOOKAHEAD_SECONDS must be at most {MAX_LOOKAHEAD_SECONDS:g}, "
                f"got {env['TASKQ_LOOKAHEAD_SECONDS']!r}"
            )
        return cls(**values)

    def as_env(self) -> dict[str, str]:
        """These settings as the variables ``from_env`` reads back into the same
        settings (how a consumer process started by ``taskq serve`` gets them)."""
        env = {
            "REDIS_URL": self.store_url,
            "AMQP_URL": self.broker_url,
            "SERVER_HOST": self.host,
            "TASKQ_KEY_PREFIX": self.key_prefix,
            "TASKQ_ROLES": ",".join(self.roles),
            "TASKQ_QUEUES": format_queues(self.queues),
            "TASKQ_LOG_FORMAT": self.log_format,
        }
        if self.api_tokens:
            env["TASKQ_API_TOKENS"] = ",".join(self.api_tokens)
        if self.webhook_secret:
            env["TASKQ_WEBHOOK_SECRET"] = self.webhook_secret
        if self.public_url:
            env["TASKQ_PUBLIC_URL"] = self.public_url
        for name, (attribute, _, _) in _NUMBERS.items():
            if (value := getattr(self, attribute)) is not None:
                env[name] = repr(value)
        return env

    def consumer_processes(self) -> int:
        """Processes the consumer role runs as: ``processes`` when set, else one per
        usable core, or 1 with an in-memory store or broker (it lives in one process)."""
        if self.processes is not None:
            return self.processes
        if MEMORY_URL in (self.store_url, self.broker_url):
            return 1
        return usable_cores()

    def spawns_consumer_processes(self) -> bool:
        """Whether this service runs its consumer role as processes of its own."""
        return "consumer" in self.roles and self.consumer_processes() > 1

    def commands_per_process(self) -> int:
        """Commands one consumer process runs at once: ``concurrency`` when set, else
        2 x cores shared by the consumer processes (rounded up), so that the default
        number of commands a machine runs at once does not grow with their number."""
        if self.concurrency is not None:
            return self.concurrency
        return -(-2 * usable_cores() // self.consumer_processes())

    def queue_concurrency(self) -> dict[str, int]:
        """Commands one consumer process runs at once from each queue it serves."""
        general = self.commands_per_process()
        return {name: general if count is None else count for name, count in self.queues}

    def run_links_base(self) -> str:
        """Where the API is reached, for the run links in notifications:
        ``TASKQ_PUBLIC_URL``, else ``http://SERVER_HOST:SERVER_PORT``."""
        if self.public_url:
            return self.public_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def with_overrides(self, **overrides: Any) -> Settings:
        """These settings with every non-``None`` override applied (CLI flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# Numeric settings: variable -> (attribute, type, smallest value allowed).
_NUMBERS: dict[str, tuple[str, type[int] | type[float], float]] = {
    "SERVER_PORT": ("port", int, 0),
    "TASKQ_CONCURRENCY": ("concurrency", int, 1),
    "TASKQ_PROCESSES": ("processes", int, 1),
    "TASKQ_OUTPUT_LIMIT": ("output_limit", int, 1024),
    "TASKQ_RUN_HISTORY": ("run_history", int, 1),
    "TASKQ_EVENT_HISTORY": ("event_history", int, 1),
    "TASKQ_LEASE_SECONDS": ("lease_seconds", float, 1),
    "TASKQ_LOOKAHEAD_SECONDS": ("lookahead_seconds", float, 0),
    "TASKQ_SHUTDOWN_GRACE": ("shutdown_grace", float, 0),
    "TASKQ_REQUEST_TIMEOUT": ("request_timeout", float, 0.1),
    "TASKQ_KEEPALIVE_SECONDS": ("follow_keepalive", float, 0.1),
    "TASKQ_MAX_FOLLOWERS": ("max_followers", int, 1),
    "TASKQ_NOTIFY_TIMEOUT": ("notify_timeout", float, 0.1),
    "TASKQ_NOTIFY_ATTEMPTS": ("notify_attempts", int, 1),
    "TASKQ_NOTIFY_BACKOFF": ("notify_backoff", float, 0.01),
    "TASKQ_NOTIFY_CONCURRENCY": ("notify_concurrency", int, 1),
    "TASKQ_METRICS_PORT": ("metrics_port", int, 0),
}


def parse_public_url(text: str) -> str:
    """``TASKQ_PUBLIC_URL``: an http(s) URL, without a trailing slash."""
    if not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", text):
        raise ConfigError(f"TASKQ_PUBLIC_URL must be an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def parse_amqp_urls(text: str) -> tuple[str, ...]:
    """The node URLs of ``AMQP_URL``: one URL (taken as it is), or several comma-separated
    ``amqp://`` / ``amqps://`` URLs, nodes of one RabbitMQ cluster to be tried in turn.

    A comma in a password (``amqp://user:pa,ss@host/``) leaves a single URL whole; in a
    list, commas in passwords must be written ``%2C``.
    """
    if "," not in text or _commas_only_in_userinfo(text):
        return (text,)
    parts = [part.strip() for part in text.split(",")]
    nodes = len(parts)
    for number, part in enumerate(parts, 1):
        where = f"AMQP_URL lists {nodes} RabbitMQ nodes, but node {number}"
        parsed = urlsplit(part)
        if not part:
            raise ConfigError(f"{where} is empty (a stray comma?)")
        if parsed.scheme not in ("amqp", "amqps") or not parsed.hostname:
            raise ConfigError(
                f"{where} is not a full amqp:// or amqps:// URL with a host:"
                f" {_without_userinfo(part)!r}"
            )
    if len(set(parts)) < nodes:
        raise ConfigError(f"AMQP_URL names a node twice: {_without_userinfo(text)!r}")
    return tuple(parts)


def _commas_only_in_userinfo(text: str) -> bool:
    parts = urlsplit(text)
    host = parts.netloc.rpartition("@")[2]
    return bool(parts.scheme) and "," not in host + parts.path + parts.query + parts.fragment


def _without_userinfo(text: str) -> str:
    return re.sub(r"//[^/@,]*@", "//", text)


def parse_tokens(text: str) -> tuple[str, ...]:
    """The comma-separated tokens of ``TASKQ_API_TOKENS``; a value naming none is refused
    rather than leaving the API open."""
    tokens = tuple(token.strip() for token in text.split(",") if token.strip())
    if not tokens:
        raise ConfigError(
            f"TASKQ_API_TOKENS must list at least one token, got {text!r}"
            " (unset it to run an open API)"
        )
    return tokens


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """``name``'s value (``None`` when unset or empty), or the contents of the file
    ``name_FILE`` names (without its trailing newline); setting both is an error."""
    path = env.get(f"{name}_FILE")
    if path is None:
        return env.get(name) or None
    if env.get(name):
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}_FILE: cannot read {path!r}: {exc}") from None


def parse_log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise ConfigError(f"TASKQ_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {text!r}")
    return text


def parse_queues(text: str) -> tuple[QueueSpec, ...]:
    """``TASKQ_QUEUES`` / ``--queues``: comma-separated queue names, each optionally with
    its own concurrency (``build=4,deploy``)."""
    specs: list[QueueSpec] = []
    for part in (part.strip() for part in text.split(",")):
        name, has_count, count_text = (p.strip() for p in part.partition("="))
        if not re.fullmatch(QUEUE_NAME_PATTERN, name):
            raise ConfigError(
                f"TASKQ_QUEUES: {name!r} is not a queue name (1-64 letters, digits, '_', "
                f"'.', '-'); expected a comma-separated list like 'build=4,deploy', got {text!r}"
            )
        count = None
        if has_count:
            if not re.fullmatch(r"[0-9]{1,6}", count_text) or int(count_text) < 1:
                raise ConfigError(
                    f"TASKQ_QUEUES: the concurrency of {name!r} must be a whole number of at "
                    f"least 1, got {count_text!r}"
                )
            count = int(count_text)
        if any(name == seen for seen, _ in specs):
            raise ConfigError(f"TASKQ_QUEUES: queue {name!r} is named twice in {text!r}")
        specs.append((name, count))
    return tuple(specs)


def format_queues(queues: tuple[QueueSpec, ...]) -> str:
    """``queues`` as ``parse_queues`` reads them."""
    return ",".join(name if count is None else f"{name}={count}" for name, count in queues)


def parse_roles(text: str) -> tuple[Role, ...]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ALL_ROLES]
    if unknown or not names:
        raise ConfigError(
            f"roles must be a comma-separated subset of {','.join(ALL_ROLES)}, got {text!r}"
        )
    return tuple(role for role in ALL_ROLES if role in names)


def _number(name: str, raw: str, kind: type[int] | type[float], minimum: float) -> int | float:
    try:
        value = kind(raw)
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {expected}, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value
