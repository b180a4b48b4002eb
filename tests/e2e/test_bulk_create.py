"""``taskq create --from FILE`` against a real ``taskq serve``: many tasks in batches through
``POST /bulk/tasks``, an answer per task, and the due ones run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import httpx
import pytest
import redis.asyncio as redis

from tests.e2e.harness import cli, running, service_env, taskq_command, wait_for_task

pytestmark = pytest.mark.e2e

TOKEN = "bulk-token"


async def create_from(url: str, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """``taskq create --from ...``: its exit code, stdout and stderr."""
    env = {**os.environ, "TASKQ_API_URL": url, "TASKQ_TOKEN": TOKEN}
    result = await anyio.run_process(
        [*taskq_command(), "create", "--from", *args], input=stdin, env=env, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_create_from_a_file_answers_each_task_and_runs_the_due_ones(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    lines = [
        {
            "id": "due-now",
            "name": "due",
            "command": "echo bulk",
            "scheduled_at": "2020-01-01T00:00:00Z",
        },
        {"id": "nameless", "name": "", "command": "true"},
        {"id": "later", "name": "later", "command": "true", "scheduled_at": "2999-01-01T00:00:00Z"},
    ]
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")

    env = service_env(prefix, TASKQ_API_TOKENS=TOKEN)
    async with running(["serve"], env) as service:
        url = service.api_url
        assert url is not None
        code, out, err = await create_from(url, str(tasks_file))

        assert code == 1, err
        assert out.splitlines() == [
            "1: created due-now",
            "2: nameless not created: Invalid request: Expected `str` of length >= 1 (name)"
            " (HTTP 400)",
            "3: created later",
        ]
        assert "1 of 3 tasks were not created" in err
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            task = await wait_for_task(http, "due-now", {"completed", "failed"})
            assert task["status"] == "completed"
            assert (await http.get("/tasks/nameless")).status_code == 404
            assert (await http.get("/tasks/later")).json()["status"] == "pending"

        # A JSON array on standard input; an id already taken is that task's failure only.
        batch = [
            {"id": "later", "name": "again", "command": "true"},
            {"name": "x", "args": ["true"]},
        ]
        code, out, err = await create_from(url, "-", stdin=json.dumps(batch).encode())
        assert code == 1
        assert out.splitlines()[0] == "1: later not created: task 'later' already exists (HTTP 409)"
        assert out.splitlines()[1].startswith("2: created task-")

        # Every task created: exit code 0, and --json prints the answers.
        batch = [{"id": f"many-{n}", "name": "many", "command": "true"} for n in range(3)]
        stdout = await cli(
            url,
            "create",
            "--from",
            "-",
            "--json",
            stdin=json.dumps(batch).encode(),
            env={"TASKQ_TOKEN": TOKEN},
        )
        assert [answer["status"] for answer in json.loads(stdout)] == [201, 201, 201]
    assert await servers.zcard(f"{prefix}tasks") == 6


async def test_create_from_needs_the_token_like_every_command(
    prefix: str, servers: redis.Redis, tmp_path: Path
) -> None:
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps([{"id": "a", "name": "a", "command": "true"}]))

    async with running(
        ["serve", "--roles", "api"], service_env(prefix, TASKQ_API_TOKENS=TOKEN)
    ) as service:
        assert service.api_url is not None
        err = await cli(service.api_url, "create", "--from", str(tasks_file), expect_code=1)

    assert "HTTP 401" in err
    assert await servers.zcard(f"{prefix}tasks") == 0
