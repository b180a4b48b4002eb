"""A run whose stored document cannot be read (a hand edit in Redis, another version's
format), through the HTTP API: the run listing goes on without it and names it in
``X-Unreadable-Runs``, a request about it answers a 500 that says so (logged once,
without a traceback), and a change that needs it changes nothing.

Every test runs on the memory store under asyncio and trio, and on Redis."""

from __future__ import annotations

import logging

import httpx
import pytest

from app.ports import MAX_UNREADABLE_NAMED
from tests.api.conftest import Served
from tests.contract.test_unreadable_runs_contract import spoil_run, with_runs


def unreadable_detail(run_id: str) -> str:
    return (
        f"run {run_id!r} of task 'a' is stored, but its document cannot be read "
        "(corrupted, or written by another version of taskq)"
    )


@pytest.fixture
async def client(served: Served) -> httpx.AsyncClient:
    """A client whose answers of 5xx are this suite's subject, not refused."""
    served.client.event_hooks = {"response": []}
    return served.client


@pytest.fixture
async def run_ids(served: Served) -> list[str]:
    """Task ``a`` with three ended runs, the middle one unreadable; their ids, oldest
    first."""
    _, runs = await with_runs(served.store, "a", 3)
    await spoil_run(served.store, "a", runs[1].run_id)
    return [run.run_id for run in runs]


@pytest.mark.parametrize("output", [False, True])
async def test_the_listing_leaves_it_out_and_names_it(
    client: httpx.AsyncClient,
    run_ids: list[str],
    output: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    oldest, spoiled, newest = run_ids
    params = {"output": "true"} if output else {}
    with caplog.at_level(logging.WARNING):
        response = await client.get("/tasks/a/runs", params=params)

    assert response.status_code == 200, response.text
    assert [run["run_id"] for run in response.json()] == [newest, oldest]
    assert response.headers["x-unreadable-runs"] == spoiled
    [warning] = [r for r in caplog.records if spoiled in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None


async def test_a_listing_of_readable_runs_has_no_header(
    client: httpx.AsyncClient, served: Served
) -> None:
    await with_runs(served.store, "b", 2)
    response = await client.get("/tasks/b/runs")
    assert response.status_code == 200 and len(response.json()) == 2
    assert "x-unreadable-runs" not in response.headers


async def test_a_task_whose_every_run_is_unreadable_is_still_there(
    client: httpx.AsyncClient, served: Served
) -> None:
    _, [run] = await with_runs(served.store, "b", 1)
    await spoil_run(served.store, "b", run.run_id)
    response = await client.get("/tasks/b/runs")
    assert (response.status_code, response.json()) == (200, [])
    assert response.headers["x-unreadable-runs"] == run.run_id


async def test_the_header_names_at_most_so_many(
    client: httpx.AsyncClient, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    _, runs = await with_runs(served.store, "b", MAX_UNREADABLE_NAMED + 2)
    for run in runs:
        await spoil_run(served.store, "b", run.run_id)

    with caplog.at_level(logging.WARNING):
        response = await client.get("/tasks/b/runs", params={"limit": 100})

    assert (response.status_code, response.json()) == (200, [])
    newest_first = [run.run_id for run in reversed(runs)]
    assert response.headers["x-unreadable-runs"].split(",") == newest_first[:MAX_UNREADABLE_NAMED]
    [warning] = [r for r in caplog.records if "left out" in r.getMessage()]
    assert f"{len(runs)} run(s)" in warning.getMessage()
    assert newest_first[-1] not in warning.getMessage(), "names as many as the header"


@pytest.mark.parametrize("path", ["/tasks/a/runs/{run_id}", "/tasks/a/runs/{run_id}/output"])
async def test_reading_it_answers_500_saying_why_and_logs_it_once(
    client: httpx.AsyncClient, run_ids: list[str], path: str, caplog: pytest.LogCaptureFixture
) -> None:
    spoiled = run_ids[1]
    with caplog.at_level(logging.WARNING):
        response = await client.get(path.format(run_id=spoiled))

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status_code": 500, "detail": unreadable_detail(spoiled)}
    [record] = [r for r in caplog.records if spoiled in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert f"GET {path.format(run_id=spoiled)}" in record.getMessage()
    assert "truncated" in record.getMessage(), "what is wrong with the document"
    # The others answer.
    assert (await client.get(f"/tasks/a/runs/{run_ids[0]}")).status_code == 200


async def test_a_change_that_needs_the_active_run_answers_500_and_changes_nothing(
    client: httpx.AsyncClient, served: Served
) -> None:
    await client.post("/tasks", json={"id": "a", "name": "a", "command": "true"})
    queued = (await client.post("/tasks/a/execute")).json()
    await spoil_run(served.store, "a", queued["run_id"])
    before = (await client.get("/tasks/a")).json()

    for method, path, body in [
        ("POST", "/tasks/a/execute", None),
        ("POST", "/tasks/a/schedule", {"at": "2099-01-01T00:00:00Z"}),
    ]:
        response = await client.request(method, path, json=body)
        assert response.status_code == 500, response.text
        assert response.json() == {
            "status_code": 500,
            "detail": unreadable_detail(queued["run_id"]),
        }
    assert (await client.get("/tasks/a")).json() == before
    # Deleting the task still works.
    assert (await client.delete("/tasks/a")).status_code == 204
    assert (await client.get("/tasks/a")).status_code == 404


async def test_cancel_frees_a_task_whose_queued_run_cannot_be_read(
    client: httpx.AsyncClient, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """No consumer can start that run: cancelling closes it from what the task knows of
    it, and its document now says what was wrong with the old one; the task runs again."""
    await client.post("/tasks", json={"id": "a", "name": "a", "command": "true"})
    queued = (await client.post("/tasks/a/execute")).json()
    await spoil_run(served.store, "a", queued["run_id"])

    with caplog.at_level(logging.WARNING):
        response = await client.post("/tasks/a/cancel")
    assert response.status_code == 202, response.text
    task = response.json()
    assert task["status"] == "cancelled"
    assert task["active_run"] is None
    assert task["last_run"]["run_id"] == queued["run_id"]
    [warning] = [r for r in caplog.records if "cancelling its task without it" in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None

    run = (await client.get(f"/tasks/a/runs/{queued['run_id']}")).json()
    assert run["status"] == "cancelled"
    assert run["attempt"] == queued["attempt"]
    assert run["error"].startswith("cancelled; its stored document could not be read: ")
    assert "x-unreadable-runs" not in (await client.get("/tasks/a/runs")).headers

    again = await client.post("/tasks/a/execute")
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "queued"


async def test_the_openapi_document_says_so(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    listing = paths["/tasks/{task_id}/runs"]["get"]["responses"]["200"]
    assert "X-Unreadable-Runs" in listing["headers"]
    assert str(MAX_UNREADABLE_NAMED) in listing["headers"]["X-Unreadable-Runs"]["description"]
    for path in ("/tasks/{task_id}/runs/{run_id}", "/tasks/{task_id}/runs/{run_id}/output"):
        assert "cannot be read" in paths[path]["get"]["responses"]["500"]["description"]
