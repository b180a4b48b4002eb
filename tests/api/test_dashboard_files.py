"""The dashboard's static files, shipped in the package and served under ``/ui`` (its page
and the ``/`` redirect: ``test_api.test_html_pages`` and ``test_redirects``)."""

from __future__ import annotations

import httpx
import pytest

from app.api import UI_DIRECTORY

Client = httpx.AsyncClient


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
