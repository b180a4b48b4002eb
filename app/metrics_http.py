"""``GET /metrics`` and the API's request metrics, over HTTP.

The API serves ``/metrics`` on its own port; a process without the api role serves it
alone on ``TASKQ_METRICS_PORT`` (``metrics_app``).
"""

from __future__ import annotations

import time
from typing import Any, cast

from litestar import Litestar, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Histogram

from app.metrics import CONTENT_TYPE, HTTP_LATENCY, HTTP_REQUESTS, METRICS_PATH, exposition

UNMATCHED_ROUTE = "unmatched"
"""The route label of a request no route matched (a 404): never the raw path."""
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def metrics_handler(*, opt: dict[str, Any]) -> HTTPRouteHandler:
    """The ``GET /metrics`` route handler, with ``opt`` (such as: no authentication)."""

    @get(METRICS_PATH, opt=opt, tags=["metrics"], media_type=CONTENT_TYPE, sync_to_thread=False)
    def metrics() -> Response[bytes]:
        """Prometheus metrics of this process (with ``taskq serve --processes N``: of its
        consumer processes too), in the text exposition format."""
        return Response(exposition(), media_type=CONTENT_TYPE)

    return metrics


def metrics_app() -> Litestar:
    """An application serving ``GET /metrics`` alone (no API, no authentication)."""
    return Litestar(
        route_handlers=[metrics_handler(opt={})], openapi_config=None, logging_config=None
    )


class RequestMetrics:
    """Counts and times every request the wrapped application answers, labelled by the
    route template the router matched (``/tasks/{task_id}``), never by the raw path,
    whose ids would make a series each."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        # The series of each (method, route, status) seen, so that a request does not
        # pay for prometheus_client's label lookup (a lock and a dict) twice over. As
        # few as the labels' values: methods, route templates and status codes.
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        arrived = time.perf_counter()
        answered = False

        async def timed_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self._observe(scope, message["status"], arrived)
            await send(message)

        try:
            await self._app(scope, receive, timed_send)
        except Exception:
            if not answered:  # the server answers 500 for it
                self._observe(scope, 500, arrived)
            raise

    def _observe(self, scope: Scope, status: int, arrived: float) -> None:
        values = cast(dict[str, Any], scope)
        method = values.get("method", "")
        method = method if method in _METHODS else "other"
        # The router writes the template it matched into the scope (this one dict).
        route = str(values.get("path_template") or UNMATCHED_ROUTE)
        key = (method, route, status)
        if (series := self._series.get(key)) is None:
            requests = HTTP_REQUESTS.labels(method, route, str(status))
            series = self._series[key] = (requests, HTTP_LATENCY.labels(method, route))
        series[0].inc()
        series[1].observe(time.perf_counter() - arrived)
