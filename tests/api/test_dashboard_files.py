"""The dashboard's static files, shipped in the package and served under ``/ui``."""

from __future__ import annotations

import httpx
import pytest

from app.api import UI_DIRECTORY

Client = httpx.AsyncClient


async def test_the_root_redirects_to_the_dashboard(client: Client) -> None:
    response = await client.get("/", follow_redirects=False)

    assert 300 <= response.status_code < 400
    assert response.headers["location"] == "/ui/"


async def test_the_dashboard_page_loads_its_script_as_a_module(client: Client) -> None:
    response = await client.get("/ui/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/ui/js/main.js">' in response.text


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(UI_DIRECTORY).as_posix() for p in UI_DIRECTORY.rglob("*.js"))
)
async def test_every_script_is_served_as_javascript(client: Client, path: str) -> None:
    # Browsers refuse an ES module served with another type.
    response = await client.get(f"/ui/{path}")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")


async def test_an_unknown_dashboard_file_is_404(client: Client) -> None:
    response = await client.get("/ui/nothing.js")

    assert response.status_code == 404
