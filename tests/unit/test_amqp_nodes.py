"""Several RabbitMQ nodes in ``AMQP_URL``: how the list is read, and the order nodes are tried."""

from __future__ import annotations

import pytest

from app.adapters.amqp_nodes import (
    PER_NODE_TIMEOUT,
    SINGLE_NODE_TIMEOUT,
    NodeRotation,
    node_name,
)
from app.config import ConfigError, Settings, parse_amqp_urls

A = "amqp://guest:guest@rabbit-a:5672/"
B = "amqp://guest:guest@rabbit-b:5672/"
C = "amqps://user:secret@rabbit-c:5671/vhost?heartbeat=5"


@pytest.mark.parametrize(
    "text",
    [
        "amqp://guest:guest@localhost:5672/",
        "amqp://user:pa,ss@localhost/",  # a comma in a password leaves one URL whole
        "memory://",
        "localhost:5672",  # not checked here, as before: opening the broker says what is wrong
    ],
)
def test_one_url_is_taken_as_it_is(text: str) -> None:
    assert parse_amqp_urls(text) == (text,)
    assert Settings.from_env({"AMQP_URL": text}).broker_url == text


def test_several_urls_are_the_nodes_in_order() -> None:
    assert parse_amqp_urls(f"{A},{B},{C}") == (A, B, C)
    assert parse_amqp_urls(f" {A} , {B}\n") == (A, B)
    assert Settings.from_env({"AMQP_URL": f"{A},{B}"}).broker_url == f"{A},{B}"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (f"{A},", "node 2 is empty"),
        (f"{A},,{B}", "AMQP_URL lists 3 RabbitMQ nodes, but node 2 is empty"),
        (
            f"{A},rabbit-b:5672",
            "node 2 is not a full amqp:// or amqps:// URL with a host: 'rabbit-b:5672'",
        ),
        (f"memory://,{A}", "node 1 is not a full amqp:// or amqps:// URL"),
        (f"{A},http://rabbit-b/", "node 2 is not a full amqp://"),
        (f"{A},amqp:///vhost", "node 2 is not a full amqp://"),
        (f"{A},{A}", "names a node twice"),
    ],
)
def test_a_wrong_list_is_refused_naming_the_node(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as raised:
        parse_amqp_urls(text)
    assert "guest:guest" not in str(raised.value), "no password in the message"
    with pytest.raises(ConfigError, match=error):
        Settings.from_env({"AMQP_URL": text})


def test_node_names_leave_out_the_password_and_query() -> None:
    assert node_name(C) == "amqps://user@rabbit-c:5671/vhost"


def test_nodes_are_tried_in_the_order_given() -> None:
    assert NodeRotation([A, B, C]).order() == [A, B, C]


def test_a_lost_or_unreachable_node_is_tried_last() -> None:
    nodes = NodeRotation([A, B, C])
    nodes.failed(A)  # lost the connection to A: the others first
    assert nodes.order() == [B, C, A]
    nodes.failed(B)  # B did not answer either
    assert nodes.order() == [C, A, B]
    nodes.failed(C)
    assert nodes.order() == [A, B, C], "every node failed: around again"


def test_one_node_is_given_longer_to_answer_than_one_of_several() -> None:
    assert NodeRotation([A]).connect_timeout == SINGLE_NODE_TIMEOUT
    assert NodeRotation([A, B]).connect_timeout == PER_NODE_TIMEOUT < SINGLE_NODE_TIMEOUT


def test_nodes_are_described_for_messages_without_passwords() -> None:
    assert NodeRotation([A]).describe() == "amqp://guest@rabbit-a:5672/"
    assert NodeRotation([A, B]).describe() == (
        "any of amqp://guest@rabbit-a:5672/, amqp://guest@rabbit-b:5672/"
    )
