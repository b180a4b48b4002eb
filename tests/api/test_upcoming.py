"""``GET /tasks/scheduled``: the upcoming fires, over HTTP, on every store; and the task id
``scheduled`` that route would hide."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.domain import Task, create, utcnow
from app.ports import TaskChange
from tests.api.conftest import Served

Client = httpx.AsyncClient


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def add(client: Client, task_id: str, schedule: dict[str, Any] | None = None) -> None:
    created = await client.post(
        "/tasks", json={"id": task_id, "name": f"{task_id} name", "command": "true"}
    )
    assert created.status_code == 201, created.text
    if schedule is not None:
        scheduled = await client.post(f"/tasks/{task_id}/schedule", json=schedule)
        assert scheduled.status_code == 200, scheduled.text


async def test_lists_fires_in_time_order_paged_by_x_next_cursor(client: Client) -> None:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    await add(client, "every-10m", {"every": 600, "start": iso(start)})
    await add(client, "once", {"at": iso(start + timedelta(minutes=15))})
    window = {"from": iso(start), "to": iso(start + timedelta(minutes=30))}

    first = await client.get("/tasks/scheduled", params={**window, "limit": 2})
    assert first.status_code == 200
    assert first.json() == [
        {
            "task_id": "every-10m",
            "name": "every-10m name",
            "due_at": iso(start),
            "recurring": True,
            "retry": False,
        },
        {
            "task_id": "every-10m",
            "name": "every-10m name",
            "due_at": iso(start + timedelta(minutes=10)),
            "recurring": True,
            "retry": False,
        },
    ]
    cursor = first.headers["X-Next-Cursor"]
    rest = await client.get("/tasks/scheduled", params={"cursor": cursor, "limit": 2})
    assert rest.status_code == 200
    assert [(f["due_at"], f["task_id"], f["recurring"]) for f in rest.json()] == [
        (iso(start + timedelta(minutes=15)), "once", False),
        (iso(start + timedelta(minutes=20)), "every-10m", True),
    ]
    assert "X-Next-Cursor" not in rest.headers  # 30 min is outside [from, to)


async def test_defaults_to_the_next_24_hours(client: Client) -> None:
    soon = datetime.now(UTC) + timedelta(hours=2)
    await add(client, "soon", {"at": iso(soon)})
    await add(client, "tomorrow", {"at": iso(soon + timedelta(hours=23))})
    listing = await client.get("/tasks/scheduled")
    assert listing.status_code == 200
    assert [fire["task_id"] for fire in listing.json()] == ["soon"]


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "later than `from`"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-09T00:00:00Z"}, "longer than 7 days"),
        ({"from": "yesterday"}, "`from` must be an RFC 3339 time"),
        ({"to": "2026-01-01 00:00"}, "`to` must be an RFC 3339 time"),
        ({"cursor": "garbage"}, "cursor is not one this server handed out"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
async def test_bad_queries_get_400_with_a_clear_detail(
    client: Client, params: dict[str, str], detail: str
) -> None:
    response = await client.get("/tasks/scheduled", params=params)
    assert response.status_code == 400
    assert detail in response.json()["detail"]


async def test_a_new_task_may_not_take_the_reserved_id(client: Client) -> None:
    body = {"id": "scheduled", "name": "n", "command": "true"}
    refused = await client.post("/tasks", json=body)
    assert refused.status_code == 400
    assert "'scheduled' is reserved" in refused.json()["detail"]
    bulk = await client.post("/bulk/tasks", json={"tasks": [body]})
    assert bulk.json()[0]["status"] == 400
    assert "reserved" in bulk.json()[0]["detail"]
    assert (await client.get("/tasks")).json() == []


async def test_a_stored_task_with_the_reserved_id_can_still_be_changed_and_deleted(
    served: Served,
) -> None:
    now = utcnow()
    old = Task(id="scheduled", name="from before", command="true", created_at=now, updated_at=now)
    await served.store.commit(TaskChange.of(create(old)))
    client = served.client

    assert (await client.get("/tasks/scheduled")).json() == []  # GET is the upcoming fires
    listed = (await client.get("/tasks")).json()
    assert [task["id"] for task in listed] == ["scheduled"]
    updated = await client.put("/tasks/scheduled", json={"name": "renamed"})
    assert updated.status_code == 200 and updated.json()["name"] == "renamed"
    executed = await client.post("/tasks/scheduled/execute")
    assert executed.status_code == 202
    deleted = await client.delete("/tasks/scheduled")
    assert deleted.status_code == 204
    assert await served.store.get_task("scheduled") is None
