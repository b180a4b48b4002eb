"""``CancelNotices``, one suite for every adapter."""

from __future__ import annotations

import anyio

from app.ports import Store
from tests.contract.stores import StoreOpener


async def test_a_cancel_announced_anywhere_reaches_every_listener(
    store: Store, open_another: StoreOpener
) -> None:
    async with (
        open_another() as other,
        store.cancel_notices() as here,
        other.cancel_notices() as there,
    ):
        await other.announce_cancel("run-1")
        await store.announce_cancel("run-2")
        with anyio.fail_after(5):
            assert [await anext(here), await anext(here)] == ["run-1", "run-2"]
            assert [await anext(there), await anext(there)] == ["run-1", "run-2"]
