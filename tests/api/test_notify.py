"""A task's ``notify`` through the API: set, shown, replaced and cleared; a bad one is a
400 that changes nothing; a run shows how its notifications went.

Runs on every store case (``served`` in conftest.py), which also refuses any 5xx answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.api.test_api import (
    Client,
    assert_problem,
    create_task,
    execute,
    get_task,
    state_unchanged,
)

HOOK = "https://hooks.example/taskq?key=abc"
EVERY = {
    "on_start": HOOK,
    "on_success": HOOK,
    "on_failure": "http://10.0.0.1:8080/failed",
    "on_not_started": HOOK,
    "on_still_running": {"url": HOOK, "after": 600},
    "success_ping": "https://hc-ping.com/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278",
}


async def test_notify_is_stored_shown_replaced_and_cleared(client: Client) -> None:
    created = await create_task(client, notify=EVERY)
    assert created["notify"] == EVERY
    assert (await get_task(client, "t1"))["notify"] == EVERY
    replaced = await client.put("/tasks/t1", json={"notify": {"on_failure": HOOK}})
    assert replaced.json()["notify"] == {"on_failure": HOOK}
    assert (await client.put("/tasks/t1", json={"name": "x"})).json()["notify"] == {
        "on_failure": HOOK
    }
    cleared = await client.put("/tasks/t1", json={"notify": None})
    assert cleared.json()["notify"] is None


@pytest.mark.parametrize(
    ("notify", "mentioned"),
    [
        pytest.param({"on_start": "ftp://example.com/x"}, "on_start", id="not-http"),
        pytest.param({"on_start": "example.com/hook"}, "on_start", id="no-scheme"),
        pytest.param({"on_start": "https://"}, "on_start", id="no-host"),
        pytest.param({"on_start": "https://a.example/ x"}, "on_start", id="space"),
        pytest.param({"on_start": "https://a.example/\n"}, "on_start", id="newline"),
        pytest.param({"on_start": "https://a.example/\x01"}, "on_start", id="control"),
        pytest.param({"on_start": "https://a.example/" + "x" * 2048}, "on_start", id="too-long"),
        pytest.param({"on_start": 1}, "on_start", id="not-a-string"),
        pytest.param({"on_finish": HOOK}, "on_finish", id="unknown-event"),
        pytest.param({"on_still_running": HOOK}, "on_still_running", id="still-running-url"),
        pytest.param({"on_still_running": {"url": HOOK}}, "after", id="still-running-no-after"),
        pytest.param(
            {"on_still_running": {"url": HOOK, "after": 0}}, "after", id="still-running-after-0"
        ),
        pytest.param(
            {"on_still_running": {"url": HOOK, "after": 8 * 86400}},
            "after",
            id="still-running-after-too-long",
        ),
        pytest.param("https://a.example/", "notify", id="not-an-object"),
    ],
)
async def test_a_bad_notify_is_refused_and_changes_nothing(
    client: Client, notify: object, mentioned: str
) -> None:
    await create_task(client, id="kept", notify={"on_failure": HOOK})
    async with state_unchanged(client):
        created = await client.post(
            "/tasks", json={"id": "t1", "name": "n", "command": "true", "notify": notify}
        )
        assert_problem(created, 400, mentioned)
        updated = await client.put("/tasks/kept", json={"notify": notify})
        assert_problem(updated, 400, mentioned)


async def test_a_run_shows_its_notifications(
    client: Client, finish_active_run: Callable[[str], Awaitable[None]]
) -> None:
    await create_task(client, notify={"on_success": HOOK, "on_failure": HOOK})
    await execute(client, "t1")
    await finish_active_run("t1")
    [run] = (await client.get("/tasks/t1/runs")).json()
    pending = {
        "event": "on_success",
        "url": HOOK,
        "state": "pending",
        "attempts": 0,
        "last_error": None,
        "delivered_at": None,
    }
    assert run["notifications"] == [pending]
    shown = (await client.get(f"/tasks/t1/runs/{run['run_id']}")).json()
    assert shown["notifications"] == [pending]
    with_output = (await client.get("/tasks/t1/runs", params={"output": "true"})).json()
    assert with_output[0]["notifications"] == [pending]


async def test_runs_of_a_task_without_notify_show_none(
    client: Client, finish_active_run: Callable[[str], Awaitable[None]]
) -> None:
    await create_task(client)
    await execute(client, "t1")
    await finish_active_run("t1")
    [run] = (await client.get("/tasks/t1/runs")).json()
    assert run["notifications"] == []
