"""Small pieces of orderly shutdown shared by the roles."""

from __future__ import annotations

import anyio


async def cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once ``event`` is set (how a role hears "stop")."""
    await event.wait()
    scope.cancel()


async def cancel_after(delay: float, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` after ``delay`` seconds (the end of a grace period)."""
    await anyio.sleep(delay)
    scope.cancel()
