"""``Settings.from_env``: every variable, its default and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import (
    DEFAULT_AMQP_URL,
    DEFAULT_REDIS_URL,
    MEMORY_URL,
    ConfigError,
    Settings,
    parse_roles,
)


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.store_url == DEFAULT_REDIS_URL == "redis://localhost:6379/0"
    assert settings.broker_url == DEFAULT_AMQP_URL
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.key_prefix == ""
    assert settings.api_tokens == ()
    assert settings.roles == ("api", "scheduler", "consumer")
    cores = len(os.sched_getaffinity(0))
    assert settings.processes is None
    assert settings.consumer_processes() == cores
    assert settings.concurrency is None
    assert settings.commands_per_process() == 2, "2 x cores in all, shared by the processes"
    assert Settings(processes=1).commands_per_process() == 2 * cores
    assert Settings(store_url=MEMORY_URL).consumer_processes() == 1, "it lives in one process"
    assert Settings(broker_url=MEMORY_URL).commands_per_process() == 2 * cores
    assert settings.output_limit == 1_048_576
    assert settings.run_history == 100
    assert settings.event_history == 10_000
    assert settings.lease_seconds == 30.0
    assert settings.lookahead_seconds == 1.0
    assert settings.shutdown_grace == 30.0
    assert settings.log_format == "text"


@pytest.mark.parametrize("raw", ["JSON", "yaml", "", " json"])
def test_an_unknown_log_format_is_named(raw: str) -> None:
    with pytest.raises(
        ConfigError, match=f"TASKQ_LOG_FORMAT must be one of text, json, got {raw!r}"
    ):
        Settings.from_env({"TASKQ_LOG_FORMAT": raw})


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"HOME": "/root", "TASKQ_UNKNOWN": "x"}) == Settings()


def test_redis_address_becomes_a_url() -> None:
    settings = Settings.from_env({"REDIS_ADDRESS": "redis.internal:6380"})
    assert settings.store_url == "redis://redis.internal:6380/0"


def test_redis_url_wins_over_redis_address() -> None:
    env = {"REDIS_URL": "redis://primary:6379/2", "REDIS_ADDRESS": "other:6380"}
    assert Settings.from_env(env).store_url == "redis://primary:6379/2"


def test_empty_redis_url_falls_back_to_redis_address() -> None:
    env = {"REDIS_URL": "", "REDIS_ADDRESS": "other:6380"}
    assert Settings.from_env(env).store_url == "redis://other:6380/0"


def test_redis_mq_url_is_the_amqp_url() -> None:
    env = {"REDIS_MQ_URL": "amqp://mq:5672/"}
    assert Settings.from_env(env).broker_url == "amqp://mq:5672/"


def test_amqp_url_wins_over_redis_mq_url() -> None:
    env = {"AMQP_URL": "amqp://primary:5672/", "REDIS_MQ_URL": "amqp://other:5672/"}
    assert Settings.from_env(env).broker_url == "amqp://primary:5672/"


def test_server_host_and_port() -> None:
    settings = Settings.from_env({"SERVER_HOST": "0.0.0.0", "SERVER_PORT": "9000"})
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert isinstance(settings.port, int)


def test_port_zero_is_allowed() -> None:
    assert Settings.from_env({"SERVER_PORT": "0"}).port == 0


@pytest.mark.parametrize("prefix", ["", "team-a:"])
def test_key_prefix(prefix: str) -> None:
    assert Settings.from_env({"TASKQ_KEY_PREFIX": prefix}).key_prefix == prefix


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        ("one", ("one",)),
        ("one,two", ("one", "two")),
        (" one , two ,, three ,", ("one", "two", "three")),
        ("", ()),
    ],
)
def test_api_tokens_are_split_and_stripped(raw: str, tokens: tuple[str, ...]) -> None:
    assert Settings.from_env({"TASKQ_API_TOKENS": raw}).api_tokens == tokens


@pytest.mark.parametrize("raw", [",", " , ", " ", ",,,", " ,\t, "])
def test_api_tokens_naming_no_token_are_refused_rather_than_leaving_the_api_open(
    raw: str,
) -> None:
    with pytest.raises(ConfigError, match="TASKQ_API_TOKENS must list at least one token"):
        Settings.from_env({"TASKQ_API_TOKENS": raw})


def test_secrets_can_be_read_from_files(tmp_path: Path) -> None:
    files = {
        "TASKQ_API_TOKENS": "one,two\n",
        "REDIS_URL": "redis://:pw@db:6379/1\n",
        "AMQP_URL": "amqp://u:pw@mq:5672/",
        "TASKQ_WEBHOOK_SECRET": "hmac key\n",
    }
    env: dict[str, str] = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        env[f"{name}_FILE"] = str(tmp_path / name)
    settings = Settings.from_env(env)
    assert settings.api_tokens == ("one", "two")
    assert settings.store_url == "redis://:pw@db:6379/1"
    assert settings.broker_url == "amqp://u:pw@mq:5672/"
    assert settings.webhook_secret == "hmac key"


def test_an_empty_tokens_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("\n")
    with pytest.raises(ConfigError, match="TASKQ_API_TOKENS must list at least one token"):
        Settings.from_env({"TASKQ_API_TOKENS_FILE": str(tmp_path / "tokens")})


def test_a_secret_and_its_file_together_or_a_missing_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "url").write_text("redis://db")
    both = {"REDIS_URL": "redis://x", "REDIS_URL_FILE": str(tmp_path / "url")}
    with pytest.raises(ConfigError, match="REDIS_URL or REDIS_URL_FILE"):
        Settings.from_env(both)
    with pytest.raises(ConfigError, match="AMQP_URL_FILE: cannot read"):
        Settings.from_env({"AMQP_URL_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("raw", "roles"),
    [
        ("api", ("api",)),
        ("consumer,api", ("api", "consumer")),
        (" consumer , scheduler ", ("scheduler", "consumer")),
        ("scheduler,api,consumer", ("api", "scheduler", "consumer")),
        ("api,api", ("api",)),
    ],
)
def test_roles_are_normalised(raw: str, roles: tuple[str, ...]) -> None:
    assert Settings.from_env({"TASKQ_ROLES": raw}).roles == roles
    assert parse_roles(raw) == roles


def test_empty_roles_mean_all_roles() -> None:
    assert Settings.from_env({"TASKQ_ROLES": ""}).roles == ("api", "scheduler", "consumer")


def test_unknown_role_is_named() -> None:
    with pytest.raises(ConfigError, match="worker"):
        Settings.from_env({"TASKQ_ROLES": "api,worker"})


def test_no_role_at_all_is_an_error() -> None:
    with pytest.raises(ConfigError):
        parse_roles(" , ")


@pytest.mark.parametrize(
    ("name", "attribute", "raw", "value"),
    [
        ("SERVER_PORT", "port", "8081", 8081),
        ("TASKQ_CONCURRENCY", "concurrency", "7", 7),
        ("TASKQ_CONCURRENCY", "concurrency", "1", 1),
        ("TASKQ_PROCESSES", "processes", "1", 1),
        ("TASKQ_PROCESSES", "processes", "3", 3),
        ("TASKQ_OUTPUT_LIMIT", "output_limit", "2048", 2048),
        ("TASKQ_OUTPUT_LIMIT", "output_limit", "1024", 1024),
        ("TASKQ_RUN_HISTORY", "run_history", "5", 5),
        ("TASKQ_EVENT_HISTORY", "event_history", "1", 1),
        ("TASKQ_LEASE_SECONDS", "lease_seconds", "2.5", 2.5),
        ("TASKQ_LEASE_SECONDS", "lease_seconds", "1", 1.0),
        ("TASKQ_LOOKAHEAD_SECONDS", "lookahead_seconds", "0", 0.0),
        ("TASKQ_LOOKAHEAD_SECONDS", "lookahead_seconds", "0.25", 0.25),
        ("TASKQ_LOOKAHEAD_SECONDS", "lookahead_seconds", "60", 60.0),
        ("TASKQ_SHUTDOWN_GRACE", "shutdown_grace", "0", 0.0),
        ("TASKQ_SHUTDOWN_GRACE", "shutdown_grace", "0.25", 0.25),
        ("TASKQ_NOTIFY_TIMEOUT", "notify_timeout", "2.5", 2.5),
        ("TASKQ_NOTIFY_ATTEMPTS", "notify_attempts", "1", 1),
        ("TASKQ_NOTIFY_BACKOFF", "notify_backoff", "0.5", 0.5),
        ("TASKQ_NOTIFY_CONCURRENCY", "notify_concurrency", "64", 64),
    ],
)
def test_numbers(name: str, attribute: str, raw: str, value: float) -> None:
    settings = Settings.from_env({name: raw})
    assert getattr(settings, attribute) == value
    assert type(getattr(settings, attribute)) is type(value)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SERVER_PORT", "http"),
        ("SERVER_PORT", "80.5"),
        ("SERVER_PORT", ""),
        ("TASKQ_CONCURRENCY", "two"),
        ("TASKQ_PROCESSES", "2.5"),
        ("TASKQ_PROCESSES", "all"),
        ("TASKQ_PROCESSES", ""),
        ("TASKQ_OUTPUT_LIMIT", "1MB"),
        ("TASKQ_RUN_HISTORY", "1e3"),
        ("TASKQ_EVENT_HISTORY", "many"),
        ("TASKQ_LEASE_SECONDS", "30s"),
        ("TASKQ_LEASE_SECONDS", "nan"),
        ("TASKQ_LEASE_SECONDS", "inf"),
        ("TASKQ_LOOKAHEAD_SECONDS", "-1"),
        ("TASKQ_LOOKAHEAD_SECONDS", "61"),
        ("TASKQ_LOOKAHEAD_SECONDS", "1s"),
        ("TASKQ_SHUTDOWN_GRACE", "soon"),
        ("TASKQ_SHUTDOWN_GRACE", "nan"),
    ],
)
def test_bad_number_names_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: raw})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SERVER_PORT", "-1"),
        ("TASKQ_CONCURRENCY", "0"),
        ("TASKQ_PROCESSES", "0"),
        ("TASKQ_PROCESSES", "-2"),
        ("TASKQ_OUTPUT_LIMIT", "1023"),
        ("TASKQ_RUN_HISTORY", "0"),
        ("TASKQ_EVENT_HISTORY", "0"),
        ("TASKQ_LEASE_SECONDS", "0.5"),
        ("TASKQ_SHUTDOWN_GRACE", "-0.1"),
    ],
)
def test_number_below_the_minimum_names_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be at least"):
        Settings.from_env({name: raw})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_with_overrides_ignores_none() -> None:
    base = Settings.from_env({"SERVER_PORT": "9000", "SERVER_HOST": "0.0.0.0"})
    changed = base.with_overrides(port=None, host="::1", roles=("api",), key_prefix=None)
    assert changed.port == 9000
    assert changed.host == "::1"
    assert changed.roles == ("api",)
    assert changed.key_prefix == base.key_prefix
    assert base.host == "0.0.0.0"  # the original is left as it was


def test_with_overrides_of_nothing_is_equal() -> None:
    base = Settings()
    assert base.with_overrides() == base
    assert base.with_overrides(port=None, host=None) == base


def test_consumer_processes_share_the_default_concurrency_but_not_a_set_one() -> None:
    cores = len(os.sched_getaffinity(0))
    shared = Settings(processes=cores).commands_per_process()
    assert cores * 2 <= cores * shared < cores * 2 + cores, "2 x cores in all, rounded up"
    assert Settings(processes=3 * cores).commands_per_process() == 1
    assert Settings(processes=cores, concurrency=5).commands_per_process() == 5


def test_a_fraction_where_a_whole_number_is_expected_says_so() -> None:
    with pytest.raises(ConfigError, match=r"TASKQ_PROCESSES must be a whole number, got '2\.5'"):
        Settings.from_env({"TASKQ_PROCESSES": "2.5"})


def test_settings_read_back_from_their_variables_are_the_same(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("a,b\n")
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://default:secret@db:6379/2",
            "AMQP_URL": "amqp://u:p@mq:5672/vhost",
            "SERVER_HOST": "::1",
            "SERVER_PORT": "0",
            "TASKQ_KEY_PREFIX": "{tenant}:",
            "TASKQ_API_TOKENS_FILE": str(tokens),
            "TASKQ_ROLES": "scheduler,consumer",
            "TASKQ_CONCURRENCY": "3",
            "TASKQ_PROCESSES": "5",
            "TASKQ_LEASE_SECONDS": "2.5",
            "TASKQ_SHUTDOWN_GRACE": "0.1",
            "TASKQ_WEBHOOK_SECRET": "hmac key",
            "TASKQ_PUBLIC_URL": "https://ops.example/taskq/",
            "TASKQ_NOTIFY_ATTEMPTS": "3",
            "TASKQ_LOG_FORMAT": "json",
            "TASKQ_EVENT_HISTORY": "50",
        }
    )
    assert settings.log_format == "json"
    assert Settings.from_env(settings.as_env()) == settings
    assert Settings.from_env(Settings().as_env()) == Settings()


def test_run_links_point_at_the_public_url_or_else_at_the_api_address() -> None:
    assert Settings.from_env({}).run_links_base() == "http://127.0.0.1:8080"
    ipv6 = Settings.from_env({"SERVER_HOST": "::1", "SERVER_PORT": "9000"})
    assert ipv6.run_links_base() == "http://[::1]:9000"
    public = Settings.from_env({"TASKQ_PUBLIC_URL": "https://ops.example/taskq/"})
    assert public.run_links_base() == "https://ops.example/taskq"


@pytest.mark.parametrize("raw", ["ops.example", "ftp://ops.example", "https://", "https://a b"])
def test_a_public_url_that_is_not_http_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="TASKQ_PUBLIC_URL"):
        Settings.from_env({"TASKQ_PUBLIC_URL": raw})


async def test_consumer_processes_with_an_in_memory_store_are_refused_at_start() -> None:
    from app.supervisor import run_service

    memory = Settings(store_url=MEMORY_URL, broker_url=MEMORY_URL, port=0)
    with pytest.raises(ConfigError, match="TASKQ_PROCESSES must be 1, got 2"):
        await run_service(memory.with_overrides(processes=2))
