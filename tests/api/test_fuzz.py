"""Property-based fuzzing of the API against its own OpenAPI document (schemathesis).

Schemathesis reads ``/schema/openapi.json`` from the in-process app and, for every
operation, sends generated requests through its ASGI client: data the document calls
valid must be accepted (2xx, or 404/409 for a task that does not exist or is busy), data
it calls invalid must be refused with a 4xx, and no answer may be a 5xx. Every answer
must be documented: its status code, content type, headers and body schema, and
``Allow`` must name the path's methods. The app requires a token, so the run also checks
that every operation declaring the bearer scheme refuses requests without it.

The number of examples is bounded and generation derandomized, so a CI run is
repeatable and takes well under a minute.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from litestar import Litestar
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from app.adapters import open_broker, open_store
from app.api import create_app
from app.service import TaskService
from tests.api.conftest import MEMORY_URL

TOKEN = "fuzz-token"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
    unsupported_method,
    allow_header_conformance,
]
# Valid data is refused with 400 only where a rule lies beyond JSON Schema: a cursor this
# server did not hand out, a cron expression or time zone name that does not parse, and
# a recurrence that never fires, a window of upcoming fires that ends before it starts
# or lasts too long. A chain naming a task that does not exist, or looping, is a 422
# anywhere a task is created or updated.
BEYOND_SCHEMA = ["/tasks", "/tasks/{task_id}/schedule", "/tasks/scheduled"]
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ["2xx", 404, 409, 422]},
            "negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 409, 413]},
        },
        "operations": [
            {
                "include-path": path,
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ["2xx", 400, 404, 409, 422]}
                },
            }
            for path in BEYOND_SCHEMA
        ],
    }
)

Message = dict[str, Any]


class FuzzedApi:
    """The API over a new memory store and broker, opened in the ASGI lifespan.

    The store and broker create AnyIO primitives, so they must be made on a running event
    loop: schemathesis runs the lifespan, and then every request, on its own loop thread.
    """

    def __init__(self) -> None:
        self._app: Litestar | None = None
        self._resources = AsyncExitStack()

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        assert self._app is not None, "schemathesis starts the lifespan before any request"
        await self._app(scope, receive, send)  # pyright: ignore[reportArgumentType]

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                store = await self._resources.enter_async_context(open_store(MEMORY_URL))
                broker = await self._resources.enter_async_context(open_broker(MEMORY_URL))
                self._app = create_app(
                    TaskService(store),
                    checks={"store": store.ping, "broker": broker.ping},
                    tokens=[TOKEN],
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._resources.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


# ``GET /events`` answers a valid request with a stream that never ends, and an ASGI
# client waits for a whole answer: its refusals are checked in tests/api/test_events.py
# and its stream end to end (tests/e2e/test_events.py).
NEVER_ENDING = "/events"
documented = schemathesis.openapi.from_asgi("/schema/openapi.json", FuzzedApi(), config=CONFIG)
schema = documented.exclude(path=NEVER_ENDING)


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_answers_every_generated_request_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
