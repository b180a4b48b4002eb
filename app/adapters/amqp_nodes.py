"""Which RabbitMQ node of a cluster to connect to next (``AMQP_URL`` listing several).

Every node of a cluster serves every queue (a quorum queue is replicated to them), so
any node will do; the order only decides how fast a process finds one that answers.
"""

from __future__ import annotations

from collections.abc import Sequence

from yarl import URL

SINGLE_NODE_TIMEOUT = 15.0
"""Seconds to connect to RabbitMQ when ``AMQP_URL`` names one node: there is nowhere else."""

PER_NODE_TIMEOUT = 4.0
"""Seconds to connect to one node of several before trying the next: a node that is down
usually refuses at once, but one cut off by the network only times out."""


def node_name(url: str) -> str:
    """``url`` as logs and ``/health`` may show it: without its password and query."""
    return str(URL(url).with_password(None).with_query(None))


class NodeRotation:
    """The order in which to try the nodes: as listed, except that a node that failed
    (lost, refused, timed out) goes last, so that the others are tried first."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("a RabbitMQ cluster needs at least one node URL")
        self._urls = tuple(urls)
        self._order = list(urls)

    def order(self) -> list[str]:
        """Every node, in the order to try them now."""
        return list(self._order)

    def failed(self, url: str) -> None:
        """``url`` was lost or could not be reached: try it after the others."""
        self._order.remove(url)
        self._order.append(url)

    @property
    def connect_timeout(self) -> float:
        """Seconds one attempt on one node may take."""
        return SINGLE_NODE_TIMEOUT if len(self._order) == 1 else PER_NODE_TIMEOUT

    def describe(self) -> str:
        """The nodes, for messages: the one URL, or "any of" the list."""
        names = [node_name(url) for url in self._urls]
        return names[0] if len(names) == 1 else "any of " + ", ".join(names)
