"""A task whose stored document cannot be read (a hand edit in Redis, another version's
format), through the HTTP API: the listing goes on without it and names it, a request
about it answers a 500 that says so (logged once, without a traceback), nothing but
``DELETE`` changes it, and ``DELETE`` removes it.

Every test runs on the memory store under asyncio and trio, and on Redis."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from tests.api.conftest import Served
from tests.contract.test_unreadable_tasks_contract import SPOILED, spoil, stored_document

UNREADABLE_DETAIL = (
    "task 'bad' is stored, but its document cannot be read (corrupted, or written by "
    "another version of taskq); it can only be deleted"
)


@pytest.fixture
async def client(served: Served) -> httpx.AsyncClient:
    """A client on tasks ``a`` to ``e`` whose ``c`` became unreadable; answers of 5xx
    are this suite's subject, not refused."""
    served.client.event_hooks = {"response": []}
    for task_id in ("a", "b", "bad", "d", "e"):
        created = await served.client.post(
            "/tasks", json={"id": task_id, "name": task_id, "command": "true"}
        )
        assert created.status_code == 201, created.text
    await spoil(served.store, "bad")
    return served.client


async def listed_pages(client: httpx.AsyncClient, **params: Any) -> list[tuple[list[str], str]]:
    """Every page of ``GET /tasks``, each as (task ids, ``X-Unreadable-Tasks``)."""
    pages: list[tuple[list[str], str]] = []
    cursor = None
    while True:
        query = {**params, **({} if cursor is None else {"cursor": cursor})}
        response = await client.get("/tasks", params=query)
        assert response.status_code == 200, response.text
        unreadable = response.headers.get("x-unreadable-tasks", "")
        pages.append(([task["id"] for task in response.json()], unreadable))
        cursor = response.headers.get("x-next-cursor")
        if cursor is None:
            return pages


@pytest.mark.parametrize("status", [None, "created"])
async def test_the_listing_pages_past_it_and_names_it(
    client: httpx.AsyncClient, status: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    params = {} if status is None else {"status": status}
    with caplog.at_level(logging.WARNING):
        assert await listed_pages(client, limit=5, **params) == [(["a", "b", "d", "e"], "bad")]
    [warning] = [r for r in caplog.records if "'bad'" in r.getMessage()]
    assert warning.levelno == logging.WARNING and warning.exc_info is None

    assert await listed_pages(client, limit=2, **params) == [
        (["a", "b"], ""),
        (["d"], "bad"),
        (["e"], ""),
    ]
    # A page that ends with it: the next one starts after it, and does not name it again.
    assert await listed_pages(client, limit=3, **params) == [
        (["a", "b"], "bad"),
        (["d", "e"], ""),
    ]


async def test_a_listing_by_queue_pages_past_it_and_names_it(client: httpx.AsyncClient) -> None:
    assert await listed_pages(client, limit=2, queue="default") == [
        (["a", "b"], ""),
        (["d", "e"], "bad"),
    ]
    assert await listed_pages(client, limit=10, queue="other") == [([], "bad")]


async def test_a_page_names_at_most_20_and_the_next_one_goes_on_after_the_20th(
    served: Served, client: httpx.AsyncClient
) -> None:
    """Clients refuse long headers (h11's limit is 16 KiB: 1,000 ids of 128 characters
    would not fit), so a page names at most 20 unreadable tasks and ends at the 20th."""
    spoiled = [f"x{number:02}" for number in range(25)]
    for task_id in spoiled:
        created = await client.post(
            "/tasks", json={"id": task_id, "name": task_id, "command": "true"}
        )
        assert created.status_code == 201, created.text
        await spoil(served.store, task_id)
    readable = [f"x{number:02}-ok" for number in range(25)]  # each right after a spoiled one
    for task_id in readable:
        created = await client.post(
            "/tasks", json={"id": task_id, "name": task_id, "command": "true"}
        )
        assert created.status_code == 201, created.text

    pages = await listed_pages(client, limit=1000)
    assert pages == [
        (["a", "b", "d", "e", *readable[:18]], ",".join(["bad", *spoiled[:19]])),
        (readable[18:], ",".join(spoiled[19:])),
    ]


async def test_reading_it_answers_500_saying_why_and_logs_it_once(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        response = await client.get("/tasks/bad")

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status_code": 500, "detail": UNREADABLE_DETAIL}
    [record] = [r for r in caplog.records if "'bad'" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert "GET /tasks/bad" in record.getMessage()
    assert "truncated" in record.getMessage(), "what is wrong with the document"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/tasks/bad", {"name": "renamed"}),
        ("POST", "/tasks/bad/execute", None),
        ("POST", "/tasks/bad/schedule", {"every": 60}),
        ("POST", "/tasks/bad/schedule", {"at": "2030-01-01T00:00:00Z"}),
        ("DELETE", "/tasks/bad/schedule", None),
        ("POST", "/tasks/bad/cancel", None),
        ("POST", "/tasks/bad/pause", None),
        ("POST", "/tasks/bad/resume", None),
    ],
)
async def test_a_change_of_it_answers_500_and_changes_nothing(
    client: httpx.AsyncClient, served: Served, method: str, path: str, body: object
) -> None:
    response = await client.request(method, path, json=body)

    assert response.status_code == 500
    assert response.json() == {"status_code": 500, "detail": UNREADABLE_DETAIL}
    assert await stored_document(served.store, "bad") == SPOILED
    assert await listed_pages(client, limit=10) == [(["a", "b", "d", "e"], "bad")]
    assert (await client.get("/tasks/bad/runs")).json() == []


async def test_a_chain_to_it_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.put("/tasks/a", json={"chain": {"on_success": ["bad"]}})

    assert response.status_code == 422
    assert "'a'" in response.json()["detail"] and "bad" in response.json()["detail"]
    assert "cannot be read" in response.json()["detail"]
    assert (await client.get("/tasks/a")).json()["chain"] is None


async def test_its_runs_can_be_read(client: httpx.AsyncClient) -> None:
    """Runs are stored apart from the task's document: an unreadable task is still
    there, so its runs are listed (none here) and a run it lacks is a 404 of the run."""
    assert (await client.get("/tasks/bad/runs")).status_code == 200
    missing = await client.get("/tasks/bad/runs/no-such-run")
    assert missing.status_code == 404
    assert "run 'no-such-run'" in missing.json()["detail"]


async def test_deleting_it_removes_it(
    client: httpx.AsyncClient, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.service"):
        response = await client.delete("/tasks/bad")

    assert response.status_code == 204
    [record] = caplog.records
    assert "'bad'" in record.getMessage() and "deleted" in record.getMessage()
    assert (await client.get("/tasks/bad")).status_code == 404
    assert (await client.delete("/tasks/bad")).status_code == 404
    assert await stored_document(served.store, "bad") is None
    assert await listed_pages(client, limit=2) == [(["a", "b"], ""), (["d", "e"], "")]
    assert await listed_pages(client, limit=10, status="created") == [(["a", "b", "d", "e"], "")]


async def test_the_openapi_document_says_so(client: httpx.AsyncClient) -> None:
    document = (await client.get("/schema/openapi.json")).json()
    paths = document["paths"]
    listing = paths["/tasks"]["get"]["responses"]["200"]
    assert "X-Unreadable-Tasks" in listing["headers"]
    for method, path in [
        ("get", "/tasks/{task_id}"),
        ("put", "/tasks/{task_id}"),
        ("post", "/tasks/{task_id}/execute"),
        ("post", "/tasks/{task_id}/cancel"),
    ]:
        assert "cannot be read" in paths[path][method]["responses"]["500"]["description"]
    assert "500" not in paths["/tasks/{task_id}"]["delete"]["responses"]
