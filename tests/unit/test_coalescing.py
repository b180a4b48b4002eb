"""``Coalescer``: concurrent requests share round trips, with no timer, and a failed or
abandoned request affects no other batch."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import anyio
import pytest

from app.coalescing import Coalescer
from app.ports import StoreUnavailable


class Store:
    """A batched call that holds each round trip until the test lets it answer."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.fail_next = False
        self._answer = anyio.Event()
        self.arrived = anyio.Event()  # the first round trip started

    async def double(self, requests: Sequence[int]) -> list[int]:
        self.batches.append(list(requests))
        self.arrived.set()
        await self._answer.wait()
        self._answer = anyio.Event()
        if self.fail_next:
            self.fail_next = False
            raise StoreUnavailable("down")
        return [2 * r for r in requests]

    async def answer(self) -> None:
        """Let the round trip in flight answer, and the next one start."""
        self._answer.set()
        await anyio.wait_all_tasks_blocked()


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
async def coalescer(store: Store) -> AsyncGenerator[Coalescer[int, int]]:
    serving = Coalescer(store.double, most=3)
    async with anyio.create_task_group() as tg:
        await tg.start(serving.serve)
        yield serving
        tg.cancel_scope.cancel()


async def test_requests_made_during_a_round_trip_share_the_next_one(
    store: Store, coalescer: Coalescer[int, int]
) -> None:
    answers: dict[int, int] = {}

    async def ask(n: int) -> None:
        answers[n] = await coalescer.submit(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, 1)
            await store.arrived.wait()  # idle: the first goes at once, alone
            for n in range(2, 7):
                tg.start_soon(ask, n)
            await anyio.wait_all_tasks_blocked()
            for _ in range(3):
                await store.answer()
    first, second, third = store.batches
    assert first == [1]
    assert len(second) == 3, "at most 3 per round trip"
    assert sorted(second + third) == [2, 3, 4, 5, 6]
    assert answers == {n: 2 * n for n in range(1, 7)}


async def test_a_failed_batch_fails_its_requests_only(
    store: Store, coalescer: Coalescer[int, int]
) -> None:
    failed: list[int] = []
    answers: dict[int, int] = {}

    async def ask(n: int) -> None:
        try:
            answers[n] = await coalescer.submit(n)
        except StoreUnavailable:
            failed.append(n)

    store.fail_next = True
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, 1)
            await store.arrived.wait()
            tg.start_soon(ask, 2)
            await anyio.wait_all_tasks_blocked()
            await store.answer()
            await store.answer()
    assert (failed, answers) == ([1], {2: 4})


async def test_a_request_given_up_before_its_batch_went_out_is_not_sent(
    store: Store, coalescer: Coalescer[int, int]
) -> None:
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(coalescer.submit, 1)
            await store.arrived.wait()
            with anyio.move_on_after(0.05):
                await coalescer.submit(2)
            tg.start_soon(coalescer.submit, 3)
            await anyio.wait_all_tasks_blocked()
            await store.answer()
            await store.answer()
    assert store.batches == [[1], [3]]
