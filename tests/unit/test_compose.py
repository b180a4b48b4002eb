"""compose.yaml, which no test here can run (no Docker engine): every taskq service's
settings are ones taskq accepts, and the servers they name are services of the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.adapters.redis_sentinel import SentinelService
from app.config import Settings, parse_amqp_urls

COMPOSE = Path(__file__).parents[2] / "compose.yaml"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved
    return loaded


def taskq_services() -> dict[str, dict[str, str]]:
    """Each service built from this project, with its environment."""
    return {
        name: {key: str(value) for key, value in service["environment"].items()}
        for name, service in compose()["services"].items()
        if "build" in service
    }


def test_every_profile_runs_each_role() -> None:
    roles: dict[str, set[str]] = {}
    for service in compose()["services"].values():
        if "build" in service:
            for profile in service["profiles"]:
                roles.setdefault(profile, set()).add(service["command"][-1])
    assert roles == {
        "split": {"api", "scheduler", "consumer"},
        "replicated": {"api", "scheduler", "consumer"},
    }


@pytest.mark.parametrize("name", sorted(taskq_services()))
def test_a_taskq_service_has_settings_taskq_accepts(name: str) -> None:
    env = taskq_services()[name]
    services = compose()["services"]
    settings = Settings.from_env(env)

    for node in parse_amqp_urls(settings.broker_url):
        assert urlsplit(node).hostname in services
    store = urlsplit(settings.store_url)
    if store.scheme == "redis+sentinel":
        watched = SentinelService.from_url(settings.store_url)
        assert {host for host, _ in watched.sentinels} <= set(services)
        # The Sentinels monitor the service the URL names, on a Redis of this file.
        config = compose()["configs"]["sentinel"]["content"]
        monitor = re.search(r"^sentinel monitor (\S+) (\S+) (\d+) (\d+)$", config, re.M)
        assert monitor is not None
        assert monitor[1] == watched.service_name
        assert monitor[2] in services
        assert int(monitor[4]) <= len(watched.sentinels) // 2 + 1  # a majority can agree
    else:
        assert store.scheme == "redis"
        assert store.hostname in services


def test_the_replicated_profile_lists_every_rabbitmq_node_and_sentinel() -> None:
    services = compose()["services"]
    rabbits = {name for name in services if name.startswith("rabbit-")}
    sentinels = {name for name in services if name.startswith("sentinel-")}
    env = taskq_services()["api-replicated"]
    assert {urlsplit(u).hostname for u in parse_amqp_urls(env["AMQP_URL"])} == rabbits
    listed = SentinelService.from_url(env["REDIS_URL"]).sentinels
    assert {host for host, _ in listed} == sentinels
    assert len(rabbits) == 3
    assert len(sentinels) == 3
