"""``GET /tasks/{id}/runs/{run_id}/output``: a run's output as Server-Sent Events.

In process, httpx's ASGI transport hands over a response once it is complete, so these
tests check what the stream says; that it arrives while the command runs is checked
end to end in tests/e2e/test_live_output.py.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx

from app.domain import Outcome, finish_run, start_run, utcnow
from app.ports import OutputChunk, TaskChange
from tests.api.conftest import Served
from tests.api.test_api import assert_problem, create_task, execute

Client = httpx.AsyncClient


def events_of(response: httpx.Response) -> list[tuple[str, Any]]:
    """(event, decoded data) of each event in a ``text/event-stream`` body."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[tuple[str, Any]] = []
    for block in response.text.split("\r\n\r\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


async def start_the_run(served: Served, run_id: str) -> None:
    """Do what a consumer does when it takes the queued run."""
    task = await served.store.get_task("t1")
    run = await served.store.get_run("t1", run_id)
    assert task is not None and run is not None
    started = start_run(task, run, "test-worker", utcnow(), lease_until=utcnow())
    await served.store.commit(TaskChange.of(started))


async def end_the_run(served: Served, run_id: str, output: str, exit_code: int = 0) -> None:
    """Do what a consumer does when the command exits."""
    task = await served.store.get_task("t1")
    run = await served.store.get_run("t1", run_id)
    assert task is not None and run is not None
    outcome = Outcome(exit_code=exit_code, duration=0.5, output=output, truncated=False)
    await served.store.commit(TaskChange.of(finish_run(task, run, outcome, utcnow())))


async def test_a_finished_run_streams_its_output_then_the_end(served: Served) -> None:
    await create_task(served.client)
    run_id = (await execute(served.client, "t1"))["run_id"]
    await start_the_run(served, run_id)
    await end_the_run(served, run_id, "hello\nworld\n", exit_code=2)

    response = await served.client.get(f"/tasks/t1/runs/{run_id}/output")

    assert response.status_code == 200
    (output, text), (end, run) = events_of(response)
    assert (output, text) == ("output", {"text": "hello\nworld\n"})
    assert end == "end"
    assert (run["run_id"], run["status"], run["exit_code"]) == (run_id, "failed", 2)
    assert "output" not in run  # already sent


async def test_following_streams_the_live_chunks_then_the_end(served: Served) -> None:
    await create_task(served.client)
    run_id = (await execute(served.client, "t1"))["run_id"]
    await start_the_run(served, run_id)
    store = served.store
    await store.append_output(run_id, OutputChunk(0, b"one\n"), keep=1000)
    response: list[httpx.Response] = []

    async def follow() -> None:
        url = f"/tasks/t1/runs/{run_id}/output"
        response.append(await served.client.get(url, params={"follow": "true"}))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await store.append_output(run_id, OutputChunk(4, b"two\n"), keep=1000)
            await end_the_run(served, run_id, "one\ntwo\n")

    events = events_of(response[0])
    assert "".join(data["text"] for event, data in events if event == "output") == "one\ntwo\n"
    assert events[-1][0] == "end" and events[-1][1]["status"] == "completed"


async def test_without_follow_a_running_run_streams_what_there_is_and_stops(
    served: Served,
) -> None:
    await create_task(served.client)
    run_id = (await execute(served.client, "t1"))["run_id"]
    await start_the_run(served, run_id)
    await served.store.append_output(run_id, OutputChunk(0, b"so far\n"), keep=1000)

    with anyio.fail_after(10):
        response = await served.client.get(f"/tasks/t1/runs/{run_id}/output")

    assert events_of(response) == [("output", {"text": "so far\n"})]


async def test_output_of_an_unknown_run_or_task_is_404(client: Client) -> None:
    await create_task(client)

    assert_problem(await client.get("/tasks/t1/runs/nope/output?follow=true"), 404, "nope")
    assert_problem(await client.get("/tasks/ghost/runs/nope/output"), 404, "ghost")


async def test_a_bad_follow_value_is_400(client: Client) -> None:
    await create_task(client)
    run_id = (await execute(client, "t1"))["run_id"]

    assert_problem(await client.get(f"/tasks/t1/runs/{run_id}/output?follow=maybe"), 400, "follow")
