"""``redis+sentinel://`` URLs: what they name, and what is wrong with a bad one."""

from __future__ import annotations

import pytest

from app.adapters import open_store
from app.adapters.redis_sentinel import ReplicaAcks, SentinelService
from app.config import ConfigError


def test_one_sentinel_and_a_service() -> None:
    service = SentinelService.from_url("redis+sentinel://sentinel-1:26380/taskq")
    assert service == SentinelService(sentinels=(("sentinel-1", 26380),), service_name="taskq")
    assert service.acks is None, "no WAIT unless asked for"


def test_every_part() -> None:
    url = (
        "redis+sentinel://app:s%40cret@10.0.0.1:26379,10.0.0.2,[::1]:26381/my%20service/3"
        "?sentinel_username=watcher&sentinel_password=pw&min_replicas=1&replica_timeout=250"
    )
    service = SentinelService.from_url(url)
    assert service.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26381))
    assert (service.service_name, service.db) == ("my service", 3)
    assert (service.username, service.password) == ("app", "s@cret")
    assert service.server_options() == {"db": 3, "username": "app", "password": "s@cret"}
    assert service.sentinel_options()["username"] == "watcher"
    assert service.sentinel_options()["password"] == "pw"
    assert service.acks == ReplicaAcks(replicas=1, timeout_ms=250)


def test_a_password_alone_and_the_default_replica_timeout() -> None:
    service = SentinelService.from_url("redis+sentinel://:pw@h:1/s?min_replicas=2")
    assert (service.username, service.password) == (None, "pw")
    assert service.acks == ReplicaAcks(replicas=2, timeout_ms=1000)
    assert SentinelService.from_url("redis+sentinel://h/s?min_replicas=0").acks is None


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+sentinel:///taskq", "names no Sentinel"),
        ("redis+sentinel://h:1", "names no service"),
        ("redis+sentinel://h:1/", "names no service"),
        ("redis+sentinel://h:port/taskq", "'h:port': the port must be a number from 1 to 65535"),
        ("redis+sentinel://h:0/taskq", "the port must be a number from 1 to 65535"),
        ("redis+sentinel://h:1,h:70000/taskq", "'h:70000': the port must be a number"),
        ("redis+sentinel://h:1,/taskq", "'' is not a Sentinel's host:port"),
        ("redis+sentinel://h:1/taskq/zero", "the database after the service name must be"),
        ("redis+sentinel://h:1/taskq?min_replica=1", "unknown option min_replica (known: "),
        ("redis+sentinel://h:1/taskq?min_replicas=-1", "min_replicas must be a whole number"),
        ("redis+sentinel://h:1/taskq?replica_timeout=0", "replica_timeout must be a whole"),
        ("redis+sentinel://h:1/taskq?replica_timeout=9000", "replica_timeout must be at most"),
    ],
)
def test_a_bad_url_is_refused_saying_why(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_URL ") as refused:
        SentinelService.from_url(url)
    assert complaint in str(refused.value)


def test_passwords_stay_out_of_the_error() -> None:
    url = "redis+sentinel://user:hunter2@h:x/taskq?sentinel_password=hunter3"
    with pytest.raises(ConfigError) as refused:
        SentinelService.from_url(url)
    message = str(refused.value)
    assert "hunter" not in message
    assert "user:***@h:x" in message and "sentinel_password=***" in message


async def test_opening_a_store_on_a_bad_url_says_why() -> None:
    with pytest.raises(ConfigError, match="names no service"):
        async with open_store("redis+sentinel://127.0.0.1:1"):
            pass
