"""Which processes prepare themselves at start, and how secrets are taken out of argv."""

from __future__ import annotations

import pytest

from app.config import Settings
from app.startup import environment_without_secrets, service_command, split_secrets


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["serve"], "serve"),
        (["dev", "--port", "0"], "dev"),
        (["--token", "t", "--api-url", "http://x", "serve"], "serve"),
        (["--token=t", "dev"], "dev"),
        (["list"], None),
        (["--token", "serve", "list"], None),  # "serve" is the token here
        (["create", "--command", "serve"], None),
        ([], None),
    ],
)
def test_only_serve_and_dev_are_prepared(args: list[str], command: str | None) -> None:
    assert service_command(args) == command


def test_secret_flags_and_variables_are_taken_out() -> None:
    argv = [
        "taskq",
        "--token",
        "client-token",
        "serve",
        "--redis-url",
        "redis://:pw@db/0",
        "--amqp-url=amqp://u:pw@mq/",
        "--port",
        "0",
    ]
    environ = {"TASKQ_API_TOKENS": "a,b", "REDIS_URL": "redis://env", "HOME": "/root"}
    kept, secrets = split_secrets(argv, environ)
    assert kept == ["taskq", "serve", "--port", "0"]
    assert secrets == {
        "TASKQ_API_TOKENS": "a,b",
        "TASKQ_TOKEN": "client-token",
        "REDIS_URL": "redis://:pw@db/0",  # the flag wins over the variable
        "AMQP_URL": "amqp://u:pw@mq/",
    }


def test_nothing_to_hide_means_nothing_taken() -> None:
    assert split_secrets(["taskq", "serve", "--roles", "api"], {"HOME": "/root"}) == (
        ["taskq", "serve", "--roles", "api"],
        {},
    )


def test_a_consumer_process_environment_keeps_no_secret_nor_a_file_standing_for_one() -> None:
    parent = {
        "PATH": "/bin",
        "TASKQ_KEY_PREFIX": "p:",
        "TASKQ_API_TOKENS": "token",
        "REDIS_URL_FILE": "/run/secrets/redis",
        "AMQP_URL_FILE": "/run/secrets/amqp",
    }
    environment = environment_without_secrets(parent)
    assert environment == {"PATH": "/bin", "TASKQ_KEY_PREFIX": "p:"}
    # The handed-over settings then read as they are (a value and its file together
    # would be refused).
    handed_over = Settings(store_url="redis://db/1", broker_url="amqp://mq/").as_env()
    settings = Settings.from_env({**environment, **handed_over})
    assert (settings.store_url, settings.broker_url) == ("redis://db/1", "amqp://mq/")
