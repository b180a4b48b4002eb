"""Bearer-token authentication of the API, driven in process on every store case.

The app here requires one of ``TOKENS``; ``open_api`` tests parametrise ``api_tokens``
back to none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from app.api import BEARER_SCHEME

Client = httpx.AsyncClient
Json = dict[str, Any]

TOKENS = ("first-token-0123456789", "second-token-abcdef")

# Every operation of the API but ``GET /health``, with a path that reaches its handler.
PROTECTED = [
    ("GET", "/tasks", "/tasks"),
    ("GET", "/tasks/scheduled", "/tasks/scheduled"),
    ("PUT", "/tasks/scheduled", "/tasks/scheduled"),
    ("DELETE", "/tasks/scheduled", "/tasks/scheduled"),
    ("POST", "/tasks", "/tasks"),
    ("POST", "/bulk/tasks", "/bulk/tasks"),
    ("GET", "/tasks/{task_id}", "/tasks/t1"),
    ("PUT", "/tasks/{task_id}", "/tasks/t1"),
    ("DELETE", "/tasks/{task_id}", "/tasks/t1"),
    ("POST", "/tasks/{task_id}/execute", "/tasks/t1/execute"),
    ("POST", "/tasks/{task_id}/schedule", "/tasks/t1/schedule"),
    ("DELETE", "/tasks/{task_id}/schedule", "/tasks/t1/schedule"),
    ("POST", "/tasks/{task_id}/cancel", "/tasks/t1/cancel"),
    ("POST", "/tasks/{task_id}/pause", "/tasks/t1/pause"),
    ("POST", "/tasks/{task_id}/resume", "/tasks/t1/resume"),
    ("GET", "/tasks/{task_id}/runs", "/tasks/t1/runs"),
    ("GET", "/tasks/{task_id}/runs/{run_id}", "/tasks/t1/runs/r1"),
    ("GET", "/tasks/{task_id}/runs/{run_id}/output", "/tasks/t1/runs/r1/output?follow=true"),
    ("GET", "/events", "/events"),
    # "schema" as a task id: only the real /schema routes are open.
    ("GET", "/tasks/{task_id}", "/tasks/schema"),
]
# The dashboard's pages too: they ask for the token when the API answers them 401.
OPEN = [
    "/health",
    "/metrics",
    "/schema",
    "/schema/openapi.json",
    "/swagger/index.html",
    "/",
    "/ui/",
    "/ui/js/main.js",
]
TASK = {"id": "t1", "name": "first", "command": "echo hello"}


@pytest.fixture
def api_tokens() -> Sequence[str]:
    return TOKENS


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def openapi(client: Client) -> Json:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    return response.json()


def assert_refused(response: httpx.Response) -> None:
    """The one answer to every request without a valid token: it says nothing more."""
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status_code": 401, "detail": "Not authorized"}


def requests_for(method: str, url: str) -> dict[str, Any]:
    """A request each handler would accept, so only the token decides the answer."""
    if method == "POST" and url == "/tasks":
        return {"json": TASK}
    if method == "POST" and url == "/bulk/tasks":
        return {"json": {"tasks": [TASK]}}
    if method == "PUT":
        return {"json": {"name": "renamed"}}
    if method == "POST" and url.endswith("/schedule"):
        return {"json": {"at": "2030-01-01T00:00:00Z"}}
    return {}


PROTECTED_IDS = [f"{method} {url}" for method, _, url in PROTECTED]


@pytest.mark.parametrize(("method", "documented", "url"), PROTECTED, ids=PROTECTED_IDS)
@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-header"),
        pytest.param("", id="empty"),
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer ", id="empty-token"),
        pytest.param(f"Basic {TOKENS[0]}", id="other-scheme"),
        pytest.param(TOKENS[0], id="token-without-scheme"),
        pytest.param("Bearer wrong-token", id="wrong-token"),
        pytest.param(f"Bearer {TOKENS[0]}x", id="token-plus-a-char"),
        pytest.param(f"Bearer {TOKENS[0][:-1]}", id="token-prefix"),
        pytest.param(f"Bearer {TOKENS[0]},{TOKENS[1]}", id="the-configured-list"),
    ],
)
async def test_a_protected_operation_refuses_a_request_without_a_valid_token(
    client: Client, method: str, documented: str, url: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = await client.request(method, url, headers=headers, **requests_for(method, url))

    assert_refused(response)


async def test_a_refused_request_changes_nothing(client: Client) -> None:
    assert (await client.post("/tasks", json=TASK, headers=bearer(TOKENS[0]))).status_code == 201

    assert_refused(await client.delete("/tasks/t1", headers=bearer("wrong")))
    assert_refused(await client.post("/tasks", json={**TASK, "id": "t2"}))

    listed = await client.get("/tasks", headers=bearer(TOKENS[0]))
    assert [task["id"] for task in listed.json()] == ["t1"]


@pytest.mark.parametrize("token", TOKENS, ids=["first", "second"])
async def test_either_configured_token_opens_every_operation(client: Client, token: str) -> None:
    auth = bearer(token)

    created = await client.post("/tasks", json=TASK, headers=auth)
    assert created.status_code == 201, created.text
    assert (await client.get("/tasks/t1", headers=auth)).json()["id"] == "t1"
    assert (await client.get("/tasks", headers=auth)).status_code == 200
    renamed = await client.put("/tasks/t1", json={"name": "renamed"}, headers=auth)
    assert renamed.json()["name"] == "renamed"
    run = await client.post("/tasks/t1/execute", headers=auth)
    assert run.status_code == 202, run.text
    runs = await client.get("/tasks/t1/runs", headers=auth)
    assert [r["run_id"] for r in runs.json()] == [run.json()["run_id"]]
    one_run = await client.get(f"/tasks/t1/runs/{run.json()['run_id']}", headers=auth)
    assert one_run.status_code == 200
    assert (await client.delete("/tasks/t1", headers=auth)).status_code == 204
    # The handler's own answers come through unchanged once the token is accepted.
    assert (await client.get("/tasks/t1", headers=auth)).status_code == 404


async def test_the_scheme_name_is_case_insensitive(client: Client) -> None:
    response = await client.get("/tasks", headers={"Authorization": f"bearer {TOKENS[1]}"})

    assert response.status_code == 200


async def test_a_missing_and_a_wrong_token_get_the_same_answer(client: Client) -> None:
    missing = await client.get("/tasks/t1")
    wrong = await client.get("/tasks/t1", headers=bearer("wrong-token"))

    assert missing.status_code == wrong.status_code == 401
    assert missing.content == wrong.content
    assert missing.headers["www-authenticate"] == wrong.headers["www-authenticate"]
    for text in [*TOKENS, "wrong-token", "TASKQ_API_TOKENS", "token"]:
        assert text not in missing.text and text not in wrong.text


@pytest.mark.parametrize("url", OPEN)
async def test_health_the_openapi_and_the_dashboard_pages_need_no_token(
    client: Client, url: str
) -> None:
    response = await client.get(url, follow_redirects=False)

    assert response.status_code in {200, 302}, response.text
    assert "www-authenticate" not in response.headers


async def test_a_cors_preflight_needs_no_token_and_gets_no_data(client: Client) -> None:
    response = await client.options("/tasks/t1")

    assert response.status_code == 204
    assert response.content == b""
    assert "www-authenticate" not in response.headers


async def test_health_needs_no_token_and_reports_the_checks(client: Client) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_openapi_declares_the_bearer_scheme(client: Client) -> None:
    document = await openapi(client)

    assert document["components"]["securitySchemes"][BEARER_SCHEME] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the server's TASKQ_API_TOKENS",
    }
    assert document["paths"]["/health"]["get"].get("security") is None
    assert document["paths"]["/metrics"]["get"].get("security") is None


async def test_openapi_lists_exactly_the_open_and_protected_operations(
    client: Client,
) -> None:
    paths = (await openapi(client))["paths"]

    documented = {(method.upper(), path) for path, ops in paths.items() for method in ops}

    open_operations = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/metrics")}
    assert documented == open_operations | {(m, path) for m, path, _ in PROTECTED}


@pytest.mark.parametrize(("method", "documented", "url"), PROTECTED[:-1], ids=PROTECTED_IDS[:-1])
async def test_openapi_requires_the_token_and_documents_401_on_protected_operations(
    client: Client, method: str, documented: str, url: str
) -> None:
    operation = (await openapi(client))["paths"][documented][method.lower()]

    assert operation["security"] == [{BEARER_SCHEME: []}]
    assert "401" in operation["responses"]


# Without tokens


@pytest.mark.parametrize("api_tokens", [()])
async def test_without_tokens_the_api_is_open(client: Client) -> None:
    assert (await client.post("/tasks", json=TASK)).status_code == 201
    assert (await client.get("/tasks/t1")).status_code == 200
    # A client that sends a token anyway is not refused.
    assert (await client.get("/tasks/t1", headers=bearer("anything"))).status_code == 200


@pytest.mark.parametrize("api_tokens", [()])
async def test_without_tokens_openapi_declares_no_security(client: Client) -> None:
    document = await openapi(client)

    assert "securitySchemes" not in document.get("components", {})
    operations = [op for ops in document["paths"].values() for op in ops.values()]
    assert all("security" not in op for op in operations)
