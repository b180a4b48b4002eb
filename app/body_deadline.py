"""A deadline for a request's body: a client trickling it cannot hold a connection and
a request handler for ever.

Hypercorn bounds the headers (its ``keep_alive_timeout`` runs until a request's headers
are complete) but not the body: it waits as long as bytes keep coming, however slowly.
"""

from __future__ import annotations

import anyio
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.status_codes import HTTP_408_REQUEST_TIMEOUT
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

DEFAULT_BODY_SECONDS = 10.0


class RequestTimeout(HTTPException):
    """The request's body did not arrive in time (408); the connection is closed."""

    status_code = HTTP_408_REQUEST_TIMEOUT


class BodyDeadline(ASGIMiddleware):
    """Answers 408 when a request's body has not all arrived ``seconds`` after its
    headers did."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, seconds: float = DEFAULT_BODY_SECONDS) -> None:
        self.seconds = seconds

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        deadline = anyio.current_time() + self.seconds
        body_complete = False

        async def receive_in_time() -> ReceiveMessage:
            nonlocal body_complete
            if body_complete:  # later messages (a disconnect) are not the body's
                return await receive()
            with anyio.CancelScope(deadline=deadline):
                message = await receive()
                body_complete = message["type"] != "http.request" or not message.get(
                    "more_body", False
                )
                return message
            raise RequestTimeout(
                detail=f"The request body did not arrive within {self.seconds:g} s",
                headers={"Connection": "close"},
            )

        await next_app(scope, receive_in_time, send)
