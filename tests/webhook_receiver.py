"""A webhook receiver for tests: a small ASGI app served by Hypercorn on a free port,
recording every request it gets."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio

from app.supervisor import serve_http

SECRET = "webhook-secret-for-tests"


@dataclass
class Hook:
    """A request the receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def signed(self) -> bool:
        expected = hmac.new(SECRET.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-taskq-signature", ""), f"sha256={expected}")


@dataclass
class Receiver:
    """A webhook receiver (an ASGI app served by Hypercorn). By the first part of the
    path: ``ok`` answers 200; ``flaky`` 500 to the first two requests of a path, then
    200; ``gone`` 404; ``hang`` never answers; ``hold`` never answers the first request
    of a path, then 200. Every request is recorded, answered or not."""

    hooks: list[Hook] = field(default_factory=list[Hook])
    base: str = ""

    def to(self, path: str) -> str:
        return f"{self.base}/{path}"

    def at(self, path: str) -> list[Hook]:
        return [hook for hook in self.hooks if hook.path == f"/{path}"]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path: str = scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.hooks.append(Hook(scope["method"], path, headers, body))
        seen = len(self.at(path.lstrip("/")))
        kind = path.split("/")[1]
        if kind == "hang" or (kind == "hold" and seen == 1):
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        status = {"flaky": 500 if seen <= 2 else 200, "gone": 404}.get(kind, 200)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        serve = partial(serve_http, receiver, host="127.0.0.1", port=0, stopping=stopping)
        port = await tg.start(serve)
        receiver.base = f"http://127.0.0.1:{port}"
        try:
            yield receiver
        finally:
            stopping.set()  # Hypercorn stops within its graceful timeout
