"""Take the README's screenshot of the dashboard: ``python -m tests.ui.screenshot [PATH]``.

Starts ``taskq dev``, gives it a few tasks in different states, and shoots the task list
in Debian's chromium (the browser the tests use). Default path: ``docs/dashboard.png``.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
from playwright.async_api import async_playwright, expect

from tests.e2e.harness import running, service_env, wait_for_task
from tests.ui.conftest import CHROMIUM

TASKS: list[dict[str, Any]] = [
    {"id": "backup-db", "name": "Back up the database", "command": "echo dumped; sleep 0.4"},
    {"id": "disk-report", "name": "Disk usage report", "command": "df -h /"},
    {"id": "import-orders", "name": "Import orders", "command": "sleep 300"},
    {"id": "rotate-logs", "name": "Rotate logs", "command": "echo rotated"},
    {"id": "sync-crm", "name": "Sync the CRM", "command": "echo 'CRM down'; exit 2"},
    {"id": "weekly-digest", "name": "Send the weekly digest", "command": "echo sent"},
]
SCHEDULES: dict[str, dict[str, Any]] = {
    "backup-db": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
    "disk-report": {"every": 3600},
    "rotate-logs": {"cron": "0 0 * * 0", "timezone": "UTC"},
    "weekly-digest": {"cron": "0 30 8 * * 1", "timezone": "Europe/London"},
}
RUN_NOW = ["backup-db", "disk-report", "sync-crm", "import-orders"]


async def populate(api: httpx.AsyncClient) -> None:
    assert (await api.post("/bulk/tasks", json={"tasks": TASKS})).status_code == 200
    for task_id, schedule in SCHEDULES.items():
        await api.post(f"/tasks/{task_id}/schedule", json=schedule)
    for task_id in RUN_NOW:
        await api.post(f"/tasks/{task_id}/execute")
    for task_id in ("backup-db", "disk-report", "sync-crm"):
        await wait_for_task(api, task_id, {"pending", "completed", "failed"})
    await wait_for_task(api, "import-orders", {"running"})
    await api.post("/tasks/rotate-logs/pause")


async def shoot(path: Path) -> None:
    env = service_env(f"taskq-shot-{uuid.uuid4().hex[:8]}:")
    async with running(["dev", "--port", "0"], env) as service, async_playwright() as playwright:
        assert service.api_url is not None
        async with httpx.AsyncClient(base_url=service.api_url) as api:
            await populate(api)
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, chromium_sandbox=False)
        page = await browser.new_page(viewport={"width": 1280, "height": 400})
        await page.goto(f"{service.api_url}/ui/")
        await expect(page.locator("table.tasks tbody tr")).to_have_count(len(TASKS))
        await expect(page.locator("#live")).to_have_text("live")
        await page.screenshot(path=path, full_page=True)
        await browser.close()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    anyio.run(shoot, target)
