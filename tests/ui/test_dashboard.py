"""The dashboard in a real browser against ``taskq dev``: what an operator sees and does."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.conftest import eventually
from tests.e2e.harness import wait_for_task
from tests.webhook_receiver import receiving

pytestmark = pytest.mark.e2e


async def create(api: httpx.AsyncClient, task_id: str, command: str, **fields: Any) -> None:
    response = await api.post(
        "/tasks", json={"id": task_id, "name": task_id, "command": command, **fields}
    )
    assert response.status_code == 201, response.text


async def open_task(page: Page, url: str, task_id: str) -> None:
    await page.goto(f"{url}/ui/#/tasks/{task_id}")
    await expect(page.locator(".task-head h1")).to_contain_text(task_id)


def heading_status(page: Page, status: str) -> Any:
    return page.locator(".task-head h1 .badge", has_text=re.compile(f"^({status})$"))


async def test_the_root_opens_the_task_list(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await create(api, "ui-listed", "true")

    await page.goto(dev_url)

    assert page.url.endswith("/ui/")
    row = page.locator("tr[data-task-id='ui-listed']")
    await expect(row).to_contain_text("created")
    await row.get_by_role("link", name="ui-listed").click()
    await expect(page).to_have_url(re.compile(r"#/tasks/ui-listed$"))


async def test_a_task_created_from_the_form_shows_its_settings_and_schedule_in_words(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await page.goto(f"{dev_url}/ui/#/new")
    await page.get_by_label("Name").fill("Nightly report")
    await page.get_by_label("Command").fill("echo report")
    await page.get_by_label("ID (optional)").fill("ui-nightly")
    await page.get_by_label("on a cron schedule").check()
    await page.get_by_label("Cron expression").fill("30 2 * * 1-5")
    await page.get_by_label("Time zone").fill("Europe/Berlin")
    await page.get_by_role("button", name="Create").click()

    await expect(page).to_have_url(re.compile(r"#/tasks/ui-nightly$"))
    settings = page.locator("dl.settings")
    await expect(settings).to_contain_text("At 02:30, Monday through Friday (Europe/Berlin)")
    await expect(settings).to_contain_text("echo report")
    task = (await api.get("/tasks/ui-nightly")).json()
    assert task["name"] == "Nightly report"
    assert task["schedule"]["cron"] == "30 2 * * 1-5"


async def test_the_api_refusal_of_a_create_is_shown_in_its_words(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await create(api, "ui-taken", "true")
    await page.goto(f"{dev_url}/ui/#/new")
    await page.get_by_label("Name").fill("again")
    await page.get_by_label("Command").fill("true")
    await page.get_by_label("ID (optional)").fill("ui-taken")
    await page.get_by_role("button", name="Create").click()

    await expect(page.locator("form.create").get_by_role("alert")).to_contain_text("already exists")
    await expect(page).to_have_url(re.compile(r"#/new$"))


async def test_a_finished_run_shows_its_output(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await create(api, "ui-output", "echo first line; echo second line >&2; exit 3")
    await api.post("/tasks/ui-output/execute")
    await wait_for_task(api, "ui-output", {"failed"})

    await open_task(page, dev_url, "ui-output")
    run = page.locator("table.runs tbody tr").first
    await expect(run).to_contain_text("failed")
    await run.click()

    await expect(page.locator("pre.run-output")).to_have_text("first line\nsecond line\n")
    await expect(page.locator(".run-state")).to_contain_text("exit 3")


async def test_a_task_page_shows_its_queue_and_chain_and_a_run_where_it_came_from(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await create(api, "ui-chain-next", "true")
    await create(api, "ui-chain-alarm", "true")
    await create(
        api,
        "ui-chain-first",
        "true",
        queue="default",
        chain={"on_success": ["ui-chain-next"], "on_failure": ["ui-chain-alarm"]},
    )
    await api.post("/tasks/ui-chain-first/execute")
    await wait_for_task(api, "ui-chain-first", {"completed"})
    await wait_for_task(api, "ui-chain-next", {"completed"})

    await open_task(page, dev_url, "ui-chain-first")
    settings = page.locator("dl.settings")
    await expect(settings.locator("dt", has_text="Queue").locator("+ dd")).to_have_text("default")
    await expect(settings.locator("[data-chain='on_success']")).to_have_text(
        "on_success → ui-chain-next"
    )
    await expect(settings.locator("[data-chain='on_failure']")).to_have_text(
        "on_failure → ui-chain-alarm"
    )
    await page.locator("table.runs tbody tr").first.click()
    triggered = page.locator("ul.chain [data-chain='triggered']")
    await expect(triggered).to_contain_text("triggered ui-chain-next queued")

    # From the run's line to the task it triggered, and back through "triggered by".
    await triggered.get_by_role("link", name="ui-chain-next").click()
    await expect(page.locator(".task-head h1")).to_contain_text("ui-chain-next")
    await expect(page.locator("dl.settings [data-chain]")).to_have_count(0)
    await page.locator("table.runs tbody tr").first.click()
    await expect(page.locator("ul.chain [data-chain='triggered-by']")).to_contain_text(
        "triggered by ui-chain-first run"
    )


async def test_pause_and_resume_a_schedule(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await create(api, "ui-hourly", "true")
    await api.post("/tasks/ui-hourly/schedule", json={"every": 3600})
    await open_task(page, dev_url, "ui-hourly")
    await expect(page.locator("dl.settings")).to_contain_text("Every hour")

    await page.get_by_role("button", name="Pause").click()
    await expect(heading_status(page, "paused")).to_be_visible()
    assert (await api.get("/tasks/ui-hourly")).json()["paused"] is True

    await page.get_by_role("button", name="Resume").click()
    await expect(heading_status(page, "paused")).to_have_count(0)
    assert (await api.get("/tasks/ui-hourly")).json()["paused"] is False


async def test_delete_asks_for_confirmation_first(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await create(api, "ui-doomed", "true")
    await open_task(page, dev_url, "ui-doomed")
    dialog = page.locator("dialog#confirm")

    await page.get_by_role("button", name="Delete").click()
    await expect(dialog).to_contain_text("Delete task ui-doomed and all its runs?")
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    assert (await api.get("/tasks/ui-doomed")).status_code == 200

    await page.get_by_role("button", name="Delete").click()
    await dialog.get_by_role("button", name="Delete").click()
    await expect(page).to_have_url(re.compile(r"#/$"))
    await expect(page.locator("tr[data-task-id='ui-doomed']")).to_have_count(0)
    assert (await api.get("/tasks/ui-doomed")).status_code == 404


async def test_the_list_filters_by_status_and_pages(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    tasks = [{"id": f"ui-page-{n:03d}", "name": "paged", "command": "true"} for n in range(60)]
    assert (await api.post("/bulk/tasks", json={"tasks": tasks})).status_code == 200
    await create(api, "ui-will-fail", "false")
    await api.post("/tasks/ui-will-fail/execute")
    await wait_for_task(api, "ui-will-fail", {"failed"})

    await page.goto(f"{dev_url}/ui/")
    await page.get_by_label("Status").select_option("failed")
    await expect(page).to_have_url(re.compile(r"#/\?status=failed$"))
    rows = page.locator("table.tasks tbody tr")
    await expect(rows.filter(has_text="ui-will-fail")).to_have_count(1)
    for status in await rows.locator("td.status .badge").all_inner_texts():
        assert status == "failed"

    await page.get_by_label("Status").select_option("")
    await expect(rows).to_have_count(50)
    first_page = await rows.locator("td:first-child").all_inner_texts()
    first_id = rows.first.locator("td").first
    await page.get_by_role("button", name="Next →").click()
    await expect(first_id).not_to_have_text(first_page[0])
    second_page = await rows.locator("td:first-child").all_inner_texts()
    assert not set(first_page) & set(second_page)
    assert first_page == sorted(first_page) and second_page == sorted(second_page)
    assert first_page[-1] < second_page[0]
    await page.get_by_role("button", name="← Previous").click()
    await expect(first_id).to_have_text(first_page[0])


# Live updates: these need GET /events.


async def test_a_run_started_from_the_page_turns_completed_without_a_reload(
    page: Page, dev_url: str
) -> None:
    await page.goto(f"{dev_url}/ui/#/new")
    await page.get_by_label("Name").fill("hello")
    # Long enough that the page shows it running first: only an event can tell it ended.
    await page.get_by_label("Command").fill("sleep 1; echo hello from the dashboard")
    await page.get_by_label("ID (optional)").fill("ui-hello")
    await page.get_by_role("button", name="Create").click()
    await expect(heading_status(page, "created")).to_be_visible()
    await page.evaluate("window.sameDocument = true")

    await page.get_by_role("button", name="Run now").click()

    await expect(heading_status(page, "pending|running")).to_be_visible()
    await expect(heading_status(page, "completed")).to_be_visible()
    run = page.locator("table.runs tbody tr").first
    await expect(run).to_contain_text("completed")
    assert await page.evaluate("window.sameDocument") is True, "the page was reloaded"
    await run.click()
    await expect(page.locator("pre.run-output")).to_have_text("hello from the dashboard\n")


async def test_the_list_follows_tasks_created_run_and_deleted_elsewhere(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await page.goto(f"{dev_url}/ui/")
    await expect(page.locator("#live")).to_have_text("live")
    row = page.locator("tr[data-task-id='ui-elsewhere']")

    await create(api, "ui-elsewhere", "sleep 0.2")
    await expect(row).to_contain_text("created")
    await api.post("/tasks/ui-elsewhere/execute")
    await expect(row.locator("td.status")).to_have_text("completed")
    await expect(row.locator("td.last-run")).to_contain_text("exit 0")
    await api.delete("/tasks/ui-elsewhere")
    await expect(row).to_have_count(0)


async def test_a_running_command_s_output_arrives_line_by_line(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    # A line a second, for six seconds.
    await create(api, "ui-ticker", "for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done")
    await open_task(page, dev_url, "ui-ticker")
    # The new run's output shows as it comes, with no further click.
    await page.get_by_role("button", name="Run now").click()

    await expect(page.locator("table.runs tbody tr.selected")).to_have_count(1)
    output = page.locator("pre.run-output")
    state = page.locator(".run-state")
    await expect(output).to_contain_text("tick 1\ntick 2\n")
    # Seen while the command still runs: it prints its last line four seconds later.
    assert "tick 6" not in await output.inner_text()
    await expect(state).to_contain_text("running")
    await expect(output).to_have_text("".join(f"tick {i}\n" for i in range(1, 7)))
    await expect(state).to_contain_text("completed")
    await expect(heading_status(page, "completed")).to_be_visible()


async def test_cancel_a_running_command(page: Page, dev_url: str, api: httpx.AsyncClient) -> None:
    await create(api, "ui-sleeper", "sleep 60")
    await open_task(page, dev_url, "ui-sleeper")
    await page.get_by_role("button", name="Run now").click()
    await expect(heading_status(page, "running")).to_be_visible()

    await page.get_by_role("button", name="Cancel").click()

    await expect(heading_status(page, "cancelled")).to_be_visible()
    await expect(page.locator("table.runs tbody tr").first).to_contain_text("cancelled")
    assert (await api.get("/tasks/ui-sleeper")).json()["status"] == "cancelled"


# Upcoming fires: these need GET /tasks/scheduled.


async def test_the_upcoming_fires_of_the_next_hours(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    await create(api, "ui-half-hourly", "true")
    await api.post("/tasks/ui-half-hourly/schedule", json={"every": 1800})
    at = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    await create(api, "ui-once", "true", scheduled_at=at)
    await create(
        api, "ui-far", "true", scheduled_at=(datetime.now(UTC) + timedelta(days=2)).isoformat()
    )

    await page.goto(f"{dev_url}/ui/#/upcoming")
    await page.get_by_label("Window").select_option("6")

    rows = page.locator("table.upcoming tbody tr")
    await expect(rows.filter(has_text="ui-half-hourly")).to_have_count(12)
    once = rows.filter(has_text="ui-once")
    await expect(once).to_have_count(1)
    await expect(once).to_contain_text("once")
    await expect(rows.filter(has_text="ui-far")).to_have_count(0)
    await expect(rows.filter(has_text="ui-half-hourly").first).to_contain_text("recurring")
    due = [
        datetime.fromisoformat(d)
        for d in await rows.evaluate_all("rs => rs.map(r => r.dataset.due)")
    ]
    assert due == sorted(due), "in time order"
    await once.get_by_role("link", name="ui-once").click()
    await expect(page).to_have_url(re.compile(r"#/tasks/ui-once$"))


async def test_a_run_s_page_shows_how_its_notifications_went(
    page: Page, dev_url: str, api: httpx.AsyncClient
) -> None:
    async with receiving() as receiver:
        notify = {"on_success": receiver.to("ok/ui"), "on_failure": receiver.to("ok/ui-failed")}
        await create(api, "ui-notified", "true", notify=notify)
        await api.post("/tasks/ui-notified/execute")
        task = await wait_for_task(api, "ui-notified", {"completed"})
        run_path = f"/tasks/ui-notified/runs/{task['last_run']['run_id']}"

        async def delivered() -> bool:
            records = (await api.get(run_path)).json()["notifications"]
            return [r["state"] for r in records] == ["delivered"]

        await eventually(delivered, within=10, every=0.05)

    # A run's own address opens the task's page with that run shown.
    await page.goto(f"{dev_url}/ui/#{run_path}")

    hook = page.locator("ul.notifications li[data-event='on_success']")
    await expect(hook).to_contain_text(f"{receiver.to('ok/ui')} delivered 1 attempt")
    await expect(page.locator("table.runs tbody tr.selected")).to_have_count(1)
    await expect(page.locator("dl.settings")).to_contain_text(
        f"on_failure → {receiver.to('ok/ui-failed')}"
    )
