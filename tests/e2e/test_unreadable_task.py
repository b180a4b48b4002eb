"""A task document spoiled by hand in Redis, against a real ``taskq serve --roles api``:
the API and the CLI go on serving the other tasks, say what is wrong with that one, and
``taskq delete`` removes it."""

from __future__ import annotations

import json
import os

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.e2e.harness import cli, running, service_env, taskq_command

pytestmark = pytest.mark.e2e

SPOILED = '{"id":"bad","oops'


async def test_a_spoiled_task_is_reported_and_can_be_deleted(
    prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve", "--roles", "api"], service_env(prefix)) as api:
        assert api.api_url is not None
        url = api.api_url
        for task_id in ("a", "bad", "c"):
            await cli(url, "create", "--id", task_id, "--name", task_id, "--command", "true")
        await servers.set(f"{prefix}task:bad", SPOILED)

        async with httpx.AsyncClient(base_url=url) as http:
            listed = await http.get("/tasks", params={"limit": 5})
            assert listed.status_code == 200
            assert [task["id"] for task in listed.json()] == ["a", "c"]
            assert listed.headers["X-Unreadable-Tasks"] == "bad"
            for method in ("GET", "PUT"):
                answer = await http.request(method, "/tasks/bad", json={"name": "x"})
                assert answer.status_code == 500
                assert (
                    "task 'bad' is stored, but its document cannot be read"
                    in (answer.json()["detail"])
                )
            assert await servers.get(f"{prefix}task:bad") == SPOILED

            code, out, err = await taskq(url, "list", "--json")
            assert code == 0
            assert [task["id"] for task in json.loads(out)] == ["a", "c"]
            assert "cannot be read: bad" in err
            code, _, err = await taskq(url, "get", "--id", "bad")
            assert code == 1 and "cannot be read" in err and "HTTP 500" in err

            assert (await cli(url, "delete", "--id", "bad")).strip() == "deleted bad"

            assert (await http.get("/tasks/bad")).status_code == 404
            listed = await http.get("/tasks")
            assert [task["id"] for task in listed.json()] == ["a", "c"]
            assert "X-Unreadable-Tasks" not in listed.headers
        assert await servers.exists(f"{prefix}task:bad") == 0
        assert await servers.zscore(f"{prefix}tasks", "bad") is None
        assert await servers.zscore(f"{prefix}status:created", "bad") is None

    log = "\n".join(api.log)
    assert "task 'bad' is stored, but its document cannot be read" in log
    assert "Traceback" not in log, "an unreadable document is no bug: no traceback"


async def taskq(api_url: str, *args: str) -> tuple[int, str, str]:
    """Run a ``taskq`` client command: its exit code, stdout and stderr."""
    env = {**os.environ, "TASKQ_API_URL": api_url}
    result = await anyio.run_process([*taskq_command(), *args], env=env, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()
