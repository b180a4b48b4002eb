"""A small HTTP client for the taskq API (what the CLI commands call)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import unquote

import httpx

RUN_OUTPUT_EVENTS = ("output", "end")
"""The events of a run's output stream; any other (an empty keep-alive) is skipped."""


class ApiError(Exception):
    """The API answered with an error, or could not be reached."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ApiClient:
    """Calls the taskq API; every method raises ``ApiError`` on failure."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        try:
            response = await self._http.request(
                method,
                path,
                json=json,
                params={k: v for k, v in (params or {}).items() if v is not None},
            )
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the taskq API at {self._http.base_url}: {exc}") from exc
        if response.is_error:
            raise _api_error(response)
        return response

    async def create_task(self, body: dict[str, Any]) -> Any:
        return (await self.request("POST", "/tasks", json=body)).json()

    async def create_tasks(self, bodies: list[Any]) -> list[Any]:
        """``POST /bulk/tasks``: one answer per task, in order."""
        return (await self.request("POST", "/bulk/tasks", json={"tasks": bodies})).json()  # type: ignore[no-any-return]

    async def list_tasks(
        self,
        *,
        status: str | None,
        limit: int | None,
        cursor: str | None,
        queue: str | None = None,
    ) -> tuple[list[Any], str | None, list[str]]:
        """A page of ``GET /tasks``, the next page's cursor, and the ids the page left
        out because their stored documents cannot be read (``X-Unreadable-Tasks``)."""
        params = {"status": status, "limit": limit, "cursor": cursor, "queue": queue}
        response = await self.request("GET", "/tasks", params=params)
        return (
            response.json(),
            response.headers.get("x-next-cursor"),
            _ids_named(response, "x-unreadable-tasks"),
        )

    async def upcoming(
        self, *, start: str | None, end: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Any], str | None]:
        """A page of ``GET /tasks/scheduled`` and the next page's cursor."""
        params = {"from": start, "to": end, "limit": limit, "cursor": cursor}
        response = await self.request("GET", "/tasks/scheduled", params=params)
        return response.json(), response.headers.get("x-next-cursor")

    async def get_task(self, task_id: str) -> Any:
        return (await self.request("GET", f"/tasks/{task_id}")).json()

    async def update_task(self, task_id: str, body: dict[str, Any]) -> Any:
        return (await self.request("PUT", f"/tasks/{task_id}", json=body)).json()

    async def delete_task(self, task_id: str) -> None:
        await self.request("DELETE", f"/tasks/{task_id}")

    async def execute_task(self, task_id: str) -> Any:
        return (await self.request("POST", f"/tasks/{task_id}/execute")).json()

    async def schedule_task(self, task_id: str, body: dict[str, Any]) -> Any:
        return (await self.request("POST", f"/tasks/{task_id}/schedule", json=body)).json()

    async def post_action(self, task_id: str, action: str) -> Any:
        """``POST /tasks/{id}/{action}`` (cancel, pause, resume)."""
        return (await self.request("POST", f"/tasks/{task_id}/{action}")).json()

    async def unschedule_task(self, task_id: str) -> Any:
        return (await self.request("DELETE", f"/tasks/{task_id}/schedule")).json()

    async def list_runs(
        self, task_id: str, *, limit: int | None, output: bool = False
    ) -> tuple[list[Any], list[str]]:
        """The task's runs, newest first; with ``output``, each with its output (the server
        may then answer fewer than ``limit``). And the ids of the runs left out because
        their stored documents cannot be read (``X-Unreadable-Runs``)."""
        params = {"limit": limit, "output": "true" if output else None}
        response = await self.request("GET", f"/tasks/{task_id}/runs", params=params)
        return response.json(), _ids_named(response, "x-unreadable-runs")

    async def get_run(self, task_id: str, run_id: str) -> Any:
        return (await self.request("GET", f"/tasks/{task_id}/runs/{run_id}")).json()

    async def run_output(
        self, task_id: str, run_id: str, *, follow: bool
    ) -> AsyncGenerator[tuple[str, Any]]:
        """The events of ``GET .../output`` as (event, decoded data), as they arrive."""
        path = f"/tasks/{task_id}/runs/{run_id}/output"
        params = {"follow": "true"} if follow else {}
        try:
            async with self._http.stream("GET", path, params=params) as response:
                if response.is_error:
                    await response.aread()
                    raise _api_error(response)
                async for event, data, _ in _server_sent_events(response.aiter_lines()):
                    if event in RUN_OUTPUT_EVENTS:
                        yield event, json.loads(data)
        except httpx.HTTPError as exc:
            raise ApiError(f"the output stream from {self._http.base_url} broke: {exc}") from exc

    async def events(
        self, *, after: str | None, task_id: str | None
    ) -> AsyncGenerator[tuple[str, str, Any]]:
        """The events of ``GET /events`` as (event, id, decoded data), as they arrive,
        until the server closes the stream. ``ApiError`` without a status code: the
        server could not be reached, or the stream broke."""
        headers = {} if after is None else {"Last-Event-ID": after}
        params = {} if task_id is None else {"task_id": task_id}
        try:
            async with self._http.stream(
                "GET", "/events", params=params, headers=headers
            ) as response:
                if response.is_error:
                    await response.aread()
                    raise _api_error(response)
                async for event, data, event_id in _server_sent_events(response.aiter_lines()):
                    yield event, event_id, json.loads(data)
        except httpx.HTTPError as exc:
            raise ApiError(f"the event stream from {self._http.base_url} broke: {exc}") from exc


async def _server_sent_events(lines: AsyncIterator[str]) -> AsyncGenerator[tuple[str, str, str]]:
    """(event, data, last event id) of each event in a ``text/event-stream``, parsed as the
    HTML spec says: comments (keep-alives) are skipped, ``data`` lines join with newlines,
    a block without any ``data`` line dispatches nothing, and the last event id is the
    newest ``id`` field seen (it carries over to events without one)."""
    event, data, last_id = "", "", ""
    async for line in lines:
        if not line:
            if data:
                yield event or "message", data.removesuffix("\n"), last_id
            event, data = "", ""
            continue
        field, colon, value = line.partition(":")
        if not field and colon:
            continue  # a comment
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data += value + "\n"
        elif field == "id" and "\0" not in value:
            last_id = value


def _api_error(response: httpx.Response) -> ApiError:
    if response.status_code == 401:
        hint = "is TASKQ_TOKEN (or --token) one of the server's TASKQ_API_TOKENS?"
        return ApiError(f"{_error_detail(response)}: {hint}", response.status_code)
    return ApiError(_error_detail(response), response.status_code)


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = cast(dict[str, Any], body).get("detail") if isinstance(body, dict) else None
    text = str(detail) if detail else (response.text.strip() or response.reason_phrase)
    return f"{text} (HTTP {response.status_code})"


@asynccontextmanager
async def open_client(base_url: str, token: str | None) -> AsyncGenerator[ApiClient]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30.0)
    except httpx.InvalidURL as exc:
        raise ApiError(f"the API URL {base_url!r} is not valid: {exc}") from exc
    async with http:
        yield ApiClient(http)


def _ids_named(response: httpx.Response, header: str) -> list[str]:
    """The ids ``header`` names (comma-separated, each percent-encoded); none if absent."""
    return [unquote(item_id) for item_id in response.headers.get(header, "").split(",") if item_id]
