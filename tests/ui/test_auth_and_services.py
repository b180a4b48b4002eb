"""The dashboard with authentication on, and against the real stack (``taskq serve`` with
Redis and RabbitMQ)."""

from __future__ import annotations

import re
import socket

import httpx
import pytest
import redis.asyncio as redis
from playwright.async_api import Page, Request, expect

from tests.e2e.harness import running, service_env

pytestmark = pytest.mark.e2e

TOKEN = "ui-test-token-0123456789"


async def test_a_token_entered_once_is_kept_for_the_session_and_never_put_in_a_url(
    page: Page, prefix: str
) -> None:
    env = service_env(prefix, TASKQ_API_TOKENS=TOKEN)
    async with running(["dev", "--port", "0"], env) as service:
        assert service.api_url is not None
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=service.api_url, headers=headers) as api:
            created = await api.post(
                "/tasks", json={"id": "ui-secret", "name": "secret", "command": "true"}
            )
            assert created.status_code == 201
        requests: list[Request] = []
        page.on("request", lambda request: requests.append(request))
        login = page.locator("dialog#login")

        await page.goto(f"{service.api_url}/ui/")
        await expect(login).to_be_visible()
        await expect(page.locator("tr[data-task-id='ui-secret']")).to_have_count(0)
        await login.get_by_label("Token").fill("wrong-token")
        await login.get_by_role("button", name="Sign in").click()
        await expect(login).to_contain_text("That token was refused.")
        await login.get_by_label("Token").fill(TOKEN)
        await login.get_by_role("button", name="Sign in").click()

        await expect(login).to_be_hidden()
        await expect(page.locator("tr[data-task-id='ui-secret']")).to_contain_text("created")
        # Kept for the tab's session: a reload asks for nothing.
        await page.reload()
        await expect(page.locator("tr[data-task-id='ui-secret']")).to_contain_text("created")
        await expect(login).to_be_hidden()
        assert all(TOKEN not in request.url for request in requests)
        api_calls = [r for r in requests if "/tasks" in r.url and "/ui/" not in r.url]
        authorized = [await r.header_value("authorization") for r in api_calls]
        assert authorized and authorized[-1] == f"Bearer {TOKEN}"

        await page.get_by_role("button", name="Forget token").click()
        await expect(login).to_be_visible()


async def test_the_dashboard_over_redis_and_rabbitmq(
    page: Page, prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve"], service_env(prefix)) as service:
        assert service.api_url is not None
        await page.goto(f"{service.api_url}/ui/#/new")
        await page.get_by_label("Name").fill("on the real stack")
        await page.get_by_label("Command").fill("echo stored in redis")
        await page.get_by_label("ID (optional)").fill("ui-real")
        await page.get_by_role("button", name="Create").click()
        await expect(page).to_have_url(re.compile(r"#/tasks/ui-real$"))

        await page.get_by_role("button", name="Run now").click()

        heading = page.locator(".task-head h1 .badge", has_text=re.compile("^completed$"))
        await expect(heading).to_be_visible()
        await page.locator("table.runs tbody tr").first.click()
        await expect(page.locator("pre.run-output")).to_have_text("stored in redis\n")
        assert await servers.exists(f"{prefix}task:ui-real")


def list_reads(requests: list[Request]) -> list[Request]:
    return [r for r in requests if re.search(r"/tasks\?", r.url)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_live_updates_resume_after_a_drop_without_missing_an_event(
    page: Page, prefix: str, servers: redis.Redis
) -> None:
    env = service_env(prefix, SERVER_PORT=str(free_port()))
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))
    async with running(["serve"], env) as service:
        assert service.api_url is not None
        url = service.api_url
        await page.goto(f"{url}/ui/")
        await expect(page.locator("#live")).to_have_text("live")
        async with httpx.AsyncClient(base_url=url) as api:
            await api.post("/tasks", json={"id": "ui-before", "name": "b", "command": "true"})
        await expect(page.locator("tr[data-task-id='ui-before']")).to_be_visible()
        # Hold the page's reconnects back until after a change it must not miss.
        await page.route("**/events*", lambda route: route.abort())
    await expect(page.locator("#live")).to_have_text("reconnecting…")

    async with running(["serve"], env) as service, httpx.AsyncClient(base_url=url) as api:
        await api.post("/tasks", json={"id": "ui-meanwhile", "name": "m", "command": "true"})
        await page.unroute("**/events*")

        await expect(page.locator("tr[data-task-id='ui-meanwhile']")).to_be_visible()
        resumed = [r for r in requests if "/events" in r.url][-1]
        assert await resumed.header_value("last-event-id")
        # From the events replayed, not by reading the list again.
        assert len(list_reads(requests)) == 1


async def test_the_task_list_names_a_task_it_cannot_read_and_deletes_it(
    page: Page, prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve", "--roles", "api"], service_env(prefix)) as service:
        assert service.api_url is not None
        async with httpx.AsyncClient(base_url=service.api_url) as api:
            for task_id in ("ui-fine", "ui-spoiled"):
                created = await api.post(
                    "/tasks", json={"id": task_id, "name": task_id, "command": "true"}
                )
                assert created.status_code == 201, created.text
        await servers.set(f"{prefix}task:ui-spoiled", '{"id":"ui-spoiled","oops')

        await page.goto(f"{service.api_url}/ui/")

        await expect(page.locator("tr[data-task-id='ui-fine']")).to_be_visible()
        note = page.locator(".unreadable")
        await expect(note).to_contain_text("Not listed: ui-spoiled")
        await expect(note).to_contain_text("cannot be read")
        await note.get_by_role("button", name="Delete ui-spoiled").click()
        await page.locator("#confirm").get_by_role("button", name="Delete").click()
        await expect(note).to_be_hidden()
        assert not await servers.exists(f"{prefix}task:ui-spoiled")
        await expect(page.locator("tr[data-task-id='ui-fine']")).to_be_visible()


async def test_a_task_page_names_the_runs_it_cannot_read(
    page: Page, prefix: str, servers: redis.Redis
) -> None:
    async with running(["serve", "--roles", "api"], service_env(prefix)) as service:
        assert service.api_url is not None
        async with httpx.AsyncClient(base_url=service.api_url) as api:
            created = await api.post(
                "/tasks", json={"id": "ui-runs", "name": "ui-runs", "command": "true"}
            )
            assert created.status_code == 201, created.text
        await servers.hset(f"{prefix}runs:ui-runs", "0001-spoiled", '{"run_id":"0001-sp')  # pyright: ignore[reportUnknownMemberType]

        await page.goto(f"{service.api_url}/ui/#/tasks/ui-runs")

        note = page.locator(".unreadable")
        await expect(note).to_contain_text("Runs not listed: 0001-spoiled")
        await expect(note).to_contain_text("cannot be read")
        await expect(page.locator("table.runs")).to_contain_text("No runs yet.")
