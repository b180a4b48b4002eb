"""Redis Cluster URLs and the hash-tagged key prefix (``app.adapters.redis_cluster``)."""

from __future__ import annotations

import pytest

from app.adapters.redis_cluster import ClusterAddress, cluster_prefix, parse_cluster_url
from app.config import ConfigError


@pytest.mark.parametrize(
    ("url", "address"),
    [
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001",
            ClusterAddress([("10.0.0.1", 7000), ("10.0.0.2", 7001)], False, None, None),
        ),
        (
            "rediss+cluster://user:p%40ss@redis-a:7000,redis-b/0",
            ClusterAddress([("redis-a", 7000), ("redis-b", 6379)], True, "user", "p@ss"),
        ),
        (
            "redis+cluster://:secret@[::1]:7000",
            ClusterAddress([("::1", 7000)], False, None, "secret"),
        ),
        ("redis://node-1:7000/0", ClusterAddress([("node-1", 7000)], False, None, None)),
        ("rediss://node-1", ClusterAddress([("node-1", 6379)], True, None, None)),
    ],
)
def test_cluster_urls_name_their_startup_nodes(url: str, address: ClusterAddress) -> None:
    assert parse_cluster_url(url) == address


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+cluster://", "at least one node"),
        ("redis+cluster://a:7000/3", "only database 0"),
        ("redis+cluster://a:port", "bad node"),
        ("redis+sentinel://a:26379/mymaster", "not a Redis Cluster URL"),
        ("10.0.0.1:7000", "not a Redis Cluster URL"),
    ],
)
def test_bad_cluster_urls_are_refused_saying_why(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_cluster_url(url)


@pytest.mark.parametrize(
    ("prefix", "tagged"),
    [
        ("", "{taskq}:"),
        ("taskq:", "{taskq}:"),
        ("tenant-a:", "{tenant-a}:"),
        ("tenant-a", "{tenant-a}:"),
        ("{mine}:", "{mine}:"),  # already tagged: kept as it is
        ("app:{mine}:", "app:{mine}:"),
        ("odd{}:", "{odd{}}:"),  # an empty tag is no tag: Redis hashes the whole key
    ],
)
def test_the_key_prefix_gets_a_hash_tag(prefix: str, tagged: str) -> None:
    assert cluster_prefix(prefix) == tagged
