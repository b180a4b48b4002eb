"""``TASKQ_QUEUES`` / ``--queues``: the queues a consumer serves, each with its own
concurrency if given."""

from __future__ import annotations

import pytest

from app.config import ConfigError, Settings, format_queues, parse_queues


def test_the_default_is_the_default_queue_at_the_general_concurrency() -> None:
    settings = Settings.from_env({"TASKQ_CONCURRENCY": "3"})
    assert settings.queues == (("default", None),)
    assert settings.queue_concurrency() == {"default": 3}


def test_each_queue_has_its_own_concurrency_or_the_general_one() -> None:
    settings = Settings.from_env(
        {"TASKQ_QUEUES": " build=4, deploy ,a.b-c_1=1", "TASKQ_CONCURRENCY": "2"}
    )
    assert settings.queues == (("build", 4), ("deploy", None), ("a.b-c_1", 1))
    assert settings.queue_concurrency() == {"build": 4, "deploy": 2, "a.b-c_1": 1}


def test_queues_go_through_the_environment_unchanged() -> None:
    settings = Settings.from_env({"TASKQ_QUEUES": "build=4,deploy"})
    assert settings.as_env()["TASKQ_QUEUES"] == "build=4,deploy"
    assert Settings.from_env(settings.as_env()).queues == settings.queues
    assert format_queues(parse_queues("default")) == "default"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "'' is not a queue name"),
        ("a,,b", "'' is not a queue name"),
        ("a b", "'a b' is not a queue name"),
        ("x" * 65, "is not a queue name"),
        ("a/b", "'a/b' is not a queue name"),
        ("=3", "'' is not a queue name"),
        ("a=0", "the concurrency of 'a' must be a whole number of at least 1, got '0'"),
        ("a=-1", "got '-1'"),
        ("a=x", "got 'x'"),
        ("a=", "got ''"),
        ("a=1.5", "got '1.5'"),
        ("a=²", "got '²'"),
        ("a,b=2,a", "queue 'a' is named twice"),
    ],
)
def test_a_bad_spec_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match="TASKQ_QUEUES") as refused:
        Settings.from_env({"TASKQ_QUEUES": text})
    assert says in str(refused.value)
