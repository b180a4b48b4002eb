"""The API of a real ``taskq serve --roles api`` while Redis or RabbitMQ is out of reach.

Orchestrators and load balancers probe ``/health`` with a timeout of about a second:
it must answer well within it, whatever the dependencies do. Redis here is a throwaway
server a test kills, stops (SIGSTOP: it hangs) and starts again; RabbitMQ is reached
through a forwarder a test opens when it wants the broker back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import redis.asyncio as redis
from anyio.abc import SocketStream, TaskGroup, TaskStatus

from app.api import HEALTH_CHECK_SECONDS
from tests.conftest import AMQP_URL, REDIS_URL, eventually
from tests.e2e.harness import running, service_env
from tests.e2e.servers import RedisServer, free_port, throwaway_redis

pytestmark = pytest.mark.e2e

# What an orchestrator's probe waits, and what "at once" means for a refused connection.
PROBE_TIMEOUT = 1.0
AT_ONCE = 0.3
# The first request to find Redis gone waits out the client's retries (about 3 s).
DISCOVERY_SECONDS = 10.0
RECOVERY_SECONDS = 5.0


async def timed(request: httpx.Request, http: httpx.AsyncClient) -> tuple[httpx.Response, float]:
    began = anyio.current_time()
    response = await http.send(request)
    return response, anyio.current_time() - began


@asynccontextmanager
async def api_over(
    prefix: str, *, redis_url: str, amqp_url: str = AMQP_URL, **extra: str
) -> AsyncGenerator[httpx.AsyncClient]:
    env = service_env(prefix, REDIS_URL=redis_url, AMQP_URL=amqp_url, **extra)
    async with running(["serve", "--roles", "api"], env, name="api") as api:
        assert api.api_url is not None
        async with httpx.AsyncClient(base_url=api.api_url, timeout=30) as http:
            yield http


@asynccontextmanager
async def stopped(server: RedisServer) -> AsyncGenerator[None]:
    """Redis frozen with SIGSTOP: connections are accepted, nothing is answered."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def test_health_answers_within_a_probe_timeout_when_redis_hangs_or_refuses(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    async with (
        throwaway_redis(tmp_path, appendonly=False) as store,
        api_over(prefix, redis_url=store.url) as http,
    ):
        up, up_took = await timed(http.build_request("GET", "/health"), http)
        assert up.status_code == 200, up.text
        head, _ = await timed(http.build_request("HEAD", "/health"), http)
        assert (head.status_code, head.content) == (200, b"")

        async with stopped(store):
            hung, hung_took = await timed(http.build_request("GET", "/health"), http)
        await store.kill()
        refused, refused_took = await timed(http.build_request("GET", "/health"), http)
        head_refused, _ = await timed(http.build_request("HEAD", "/health"), http)

    print(
        f"GET /health: up {up_took * 1000:.0f} ms, Redis hanging {hung_took * 1000:.0f} ms, "
        f"refusing {refused_took * 1000:.0f} ms ({refused.json()['checks']['store']['detail']})"
    )
    assert hung.status_code == 503
    assert hung_took < PROBE_TIMEOUT
    assert hung.json()["checks"]["store"] == {
        "status": "down",
        "detail": f"no answer within {HEALTH_CHECK_SECONDS:g} s",
    }
    assert hung.json()["checks"]["broker"]["status"] == "up"

    assert refused.status_code == 503
    assert refused_took < AT_ONCE
    detail = refused.json()["checks"]["store"]["detail"]
    assert detail.startswith("ConnectionRefusedError: ")
    assert f"127.0.0.1:{store.port}" in detail
    assert refused.headers["Retry-After"].isdigit()
    assert (head_refused.status_code, head_refused.content) == (503, b"")


async def test_while_redis_is_down_requests_fail_fast_with_retry_after_until_it_is_back(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    async with (
        throwaway_redis(tmp_path) as store,
        api_over(prefix, redis_url=store.url) as http,
    ):
        created = await http.post("/tasks", json={"id": "kept", "name": "k", "command": "true"})
        assert created.status_code == 201, created.text
        await store.kill()

        with anyio.fail_after(DISCOVERY_SECONDS):
            first, first_took = await timed(http.build_request("GET", "/tasks/kept"), http)
        assert first.status_code == 503
        assert first.headers["Retry-After"].isdigit()

        latencies: list[float] = []
        for _ in range(20):
            response, took = await timed(http.build_request("GET", "/tasks/kept"), http)
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) >= 1
            assert "Redis" in response.json()["detail"]
            latencies.append(took)

        await store.start()
        back_at = anyio.current_time()

        async def answers() -> bool:
            return (await http.get("/tasks/kept")).status_code == 200

        await eventually(answers, within=RECOVERY_SECONDS, every=0.05)
        recovered_after = anyio.current_time() - back_at

    print(
        f"Redis down: first request {first_took:.2f} s; next 20: max "
        f"{max(latencies) * 1000:.0f} ms, mean {sum(latencies) / 20 * 1000:.1f} ms; "
        f"served again {recovered_after:.2f} s after Redis was back"
    )
    assert max(latencies) < AT_ONCE


async def forward(port: int, to_host: str, to_port: int, *, task_status: TaskStatus[None]) -> None:
    """Accept on 127.0.0.1:``port`` and pipe each connection to ``to_host:to_port``."""

    async def pipe(source: SocketStream, sink: SocketStream, tg: TaskGroup) -> None:
        try:
            async for chunk in source:
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        tg.cancel_scope.cancel()

    async def relay(client: SocketStream) -> None:
        async with (
            client,
            await anyio.connect_tcp(to_host, to_port) as upstream,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(pipe, client, upstream, tg)
            tg.start_soon(pipe, upstream, client, tg)

    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port) as listener:
        task_status.started()
        await listener.serve(relay)


async def test_the_api_role_starts_and_serves_tasks_while_rabbitmq_is_down(
    prefix: str, servers: redis.Redis
) -> None:
    broker_port = free_port()
    shared = urlsplit(AMQP_URL)
    amqp_url = shared._replace(
        netloc=f"{shared.username}:{shared.password}@127.0.0.1:{broker_port}"
    ).geturl()
    async with api_over(prefix, redis_url=REDIS_URL, amqp_url=amqp_url) as http:
        health, took = await timed(http.build_request("GET", "/health"), http)
        assert health.status_code == 503, health.text
        assert took < AT_ONCE
        assert health.json()["checks"]["broker"]["status"] == "down"
        assert health.json()["checks"]["store"]["status"] == "up"
        broker: dict[str, str] = {}

        async def says_why() -> bool:  # once the first attempt to connect has failed
            nonlocal broker
            broker = (await http.get("/health")).json()["checks"]["broker"]
            return "ConnectionRefusedError" in broker["detail"]

        await eventually(says_why, within=5, every=0.05)
        assert f"127.0.0.1:{broker_port}" in broker["detail"], broker
        print(f"broker check while RabbitMQ refuses ({took * 1000:.0f} ms): {broker['detail']}")

        task = {"id": "t1", "name": "first", "command": "true"}
        assert (await http.post("/tasks", json=task)).status_code == 201
        assert (await http.put("/tasks/t1", json={"name": "renamed"})).status_code == 200
        assert (await http.get("/tasks/t1")).json()["name"] == "renamed"
        assert (await http.delete("/tasks/t1")).status_code == 204

        async with anyio.create_task_group() as tg:
            await tg.start(
                forward, broker_port, shared.hostname or "127.0.0.1", shared.port or 5672
            )
            began = anyio.current_time()

            async def broker_up() -> bool:
                return (await http.get("/health")).status_code == 200

            await eventually(broker_up, within=15, every=0.1)
            print(f"broker up in /health {anyio.current_time() - began:.2f} s after RabbitMQ")
            tg.cancel_scope.cancel()


async def trickle(http_url: str, head: bytes, body: bytes, *, every: float) -> tuple[bytes, float]:
    """Send ``head`` at once and ``body`` a byte every ``every`` s; what the server
    sent back before closing, and after how long."""
    url = httpx.URL(http_url)
    answer = bytearray()
    began = anyio.current_time()

    async def send_slowly(stream: SocketStream) -> None:
        await stream.send(head)
        for byte in body:
            await anyio.sleep(every)
            await stream.send(bytes([byte]))

    async def read_answer(stream: SocketStream, tg: TaskGroup) -> None:
        try:
            async for chunk in stream:
                answer.extend(chunk)
        except anyio.BrokenResourceError:
            pass
        tg.cancel_scope.cancel()

    async with (
        await anyio.connect_tcp(url.host, url.port or 80) as stream,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(send_slowly, stream)
        tg.start_soon(read_answer, stream, tg)
    return bytes(answer), anyio.current_time() - began


async def test_a_request_body_sent_too_slowly_is_cut_with_408(
    prefix: str, servers: redis.Redis
) -> None:
    deadline = 1.0
    body = b'{"id": "slow", "name": "s", "command": "true"}'
    head = (
        b"POST /tasks HTTP/1.1\r\nHost: taskq\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n" % len(body)
    )
    env = {"TASKQ_REQUEST_TIMEOUT": f"{deadline:g}"}
    async with api_over(prefix, redis_url=REDIS_URL, **env) as http:
        with anyio.fail_after(deadline + 10):
            # A keep-alive connection: closing it after the 408 is the server's doing.
            answer, took = await trickle(str(http.base_url), head + b"\r\n", body, every=0.1)
        with anyio.fail_after(10):
            # The slow client was cut off, not the server: a prompt request is served.
            prompt = head + b"Connection: close\r\n\r\n"
            answer_2, took_2 = await trickle(str(http.base_url), prompt, body, every=0)
        with anyio.fail_after(20):
            _, headers_took = await trickle(
                str(http.base_url), b"", b"GET /health HTTP/1.1\r\nHost: taskq\r\n", every=0.2
            )

    status_line = answer.partition(b"\r\n")[0].decode()
    print(
        f"body trickled 1 byte/0.1 s: {status_line} after {took:.2f} s; "
        f"headers trickled: closed after {headers_took:.2f} s"
    )
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert deadline <= took < deadline + 1
    assert b'"status_code":408' in answer
    assert answer_2.startswith(b"HTTP/1.1 201 "), answer_2
    assert took_2 < deadline
    assert headers_took < 5 + 1  # Hypercorn's keep_alive_timeout closes it
