"""The throwaway servers of ``tests/e2e/servers.py`` start, restart and go away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiormq
import pytest
import redis.asyncio as redis

from tests.e2e.servers import port_accepts, process_alive, throwaway_rabbitmq, throwaway_redis

pytestmark = pytest.mark.e2e


async def test_a_throwaway_redis_keeps_what_its_aof_acknowledged_across_a_kill(
    tmp_path: Path,
) -> None:
    async with throwaway_redis(tmp_path) as server:
        assert server.port != 6379
        await command(server.url, "SET", "before-kill", "kept")
        await server.kill()
        assert not await port_accepts(server.port)
        await server.start()
        assert await command(server.url, "GET", "before-kill") == "kept"
        await command(server.url, "SET", "before-stop", "kept too")
        await server.stop()
        await server.start()
        assert await command(server.url, "GET", "before-stop") == "kept too"
        directory, port = server.directory, server.port
    assert not directory.exists()
    assert not await port_accepts(port)


async def test_a_throwaway_redis_without_aof_forgets_on_restart(tmp_path: Path) -> None:
    async with throwaway_redis(tmp_path, appendonly=False) as server:
        await command(server.url, "SET", "key", "value")
        await server.kill()
        await server.start()
        assert await command(server.url, "GET", "key") is None


async def command(url: str, *args: str) -> Any:
    """One command on a connection of its own (the server restarts between commands)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return await client.execute_command(*args)  # pyright: ignore[reportUnknownMemberType]
    finally:
        await client.aclose()


async def test_a_throwaway_rabbitmq_node_stops_and_starts_its_app(tmp_path: Path) -> None:
    async with throwaway_rabbitmq(tmp_path) as node:
        assert node.port != 5672
        print(f"node started in {node.started_in:.1f} s")
        async with aiormq.connect(node.url) as connection:
            channel = await connection.channel()
            await channel.queue_declare("persisted", durable=True)
            await channel.basic_publish(
                b"hello",
                routing_key="persisted",
                properties=aiormq.spec.Basic.Properties(delivery_mode=2),
            )
        await node.stop_app()
        assert not await port_accepts(node.port)
        await node.start_app()
        async with aiormq.connect(node.url) as connection:
            channel = await connection.channel()
            declared = await channel.queue_declare("persisted", passive=True)
            assert declared.message_count == 1
        base, port, beam = node.base, node.port, node.beam
    assert beam is not None
    assert not base.exists()
    assert not await port_accepts(port)
    assert not process_alive(beam)
    # The shared servers were not touched.
    assert await port_accepts(5672) and await port_accepts(6379)
