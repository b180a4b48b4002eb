"""Worker pools: which taskq queues are in use, and how each one stands in the broker.

A task names a queue (``Task.queue``, default ``default``); a consumer serves the queues
it is given (``TASKQ_QUEUES``). The store remembers every queue named or served
(``QueueDirectory``), so that ``/health`` and the metrics can ask the broker about each.
"""

from __future__ import annotations

from app.ports import DEFAULT_QUEUE, Broker, QueueDirectory, QueueStats


async def queues_in_use(store: QueueDirectory) -> list[str]:
    """The queues in use, the default one always among them, sorted."""
    return sorted({DEFAULT_QUEUE, *await store.queues_in_use()})


async def pool_stats(store: QueueDirectory, broker: Broker) -> list[QueueStats]:
    """Depth and consumers of every queue in use; raises ``StoreUnavailable`` or
    ``BrokerUnavailable`` when either cannot be asked."""
    return await broker.queue_stats(await queues_in_use(store))
