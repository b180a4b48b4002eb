"""Live output: the consumer forwards what a command prints while it runs, followers read it.

Over the in-memory store (the reference adapter) with real child processes, on both
backends; the Redis store goes through the same port cases in tests/contract.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest

from app.adapters.memory_broker import MemoryBroker
from app.adapters.memory_store import MemoryStore
from app.domain import RunNotFound, RunStatus, TaskNotFound, TaskStatus
from app.live_output import (
    FLUSH_SECONDS,
    KeepAlive,
    OutputEnd,
    OutputEvent,
    OutputRelay,
    OutputText,
    follow_output,
)
from app.ports import OutputChunk
from app.service import TaskService
from tests.conftest import eventually
from tests.contract.stores import kept
from tests.unit.test_consumer import consuming, finished, submit

WAIT = 10


async def next_text(events: AsyncIterator[OutputEvent]) -> str:
    """The next output text, skipping keep-alives."""
    with anyio.fail_after(WAIT):
        async for event in events:
            if isinstance(event, OutputText):
                return event.text
            assert isinstance(event, KeepAlive), event
    raise AssertionError("the stream ended")


async def rest_of(events: AsyncGenerator[OutputEvent]) -> tuple[str, OutputEnd]:
    """The text up to the end event, and the end event; closes ``events``."""
    text = ""
    with anyio.fail_after(WAIT):
        async with aclosing(events):
            async for event in events:
                if isinstance(event, OutputEnd):
                    return text, event
                if isinstance(event, OutputText):
                    text += event.text
    raise AssertionError("the stream ended without an end event")


async def test_a_follower_gets_lines_while_the_command_runs_then_the_end(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    go_on = tmp_path / "go-on"
    # The command prints a line, then waits for the test to have read it.
    script = f"echo first; while [ ! -e {go_on} ]; do sleep 0.02; done; echo second"
    async with consuming(store, broker):
        queued = await submit(store, broker, "live", script)
        async with aclosing(
            await follow_output(store, "live", queued.run_id, follow=True)
        ) as events:
            assert await next_text(events) == "first\n"
            task = await store.get_task("live")
            assert task is not None and task.status == TaskStatus.RUNNING
            go_on.touch()
            text, end = await rest_of(events)
    assert text == "second\n"
    assert end.run is not None and end.run.status == RunStatus.COMPLETED
    assert end.run.output == "first\nsecond\n"


async def test_following_a_short_run_gets_its_whole_output_from_the_record(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    async with consuming(store, broker):
        # Queued, not yet started: the follower waits for it.
        queued = await submit(store, broker, "short", "echo quick")
        events = await follow_output(store, "short", queued.run_id, follow=True)
        text, end = await rest_of(events)
    # It ended before its first batch was forwarded: the record supplies the output.
    assert text == "quick\n"
    assert end.run is not None and end.run.status == RunStatus.COMPLETED


async def test_following_a_finished_run_replays_its_record(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    async with consuming(store, broker):
        queued = await submit(store, broker, "done", "printf 'a\\nb'; exit 3")
        await finished(store, "done")
    events = await follow_output(store, "done", queued.run_id, follow=True)
    text, end = await rest_of(events)
    assert text == "a\nb"
    assert end.run is not None and end.run.exit_code == 3


async def test_a_cancelled_run_keeps_what_it_printed_and_followers_see_the_end(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    async with consuming(store, broker):
        queued = await submit(store, broker, "stop", "echo before; exec sleep 60")
        async with aclosing(
            await follow_output(store, "stop", queued.run_id, follow=True)
        ) as events:
            assert await next_text(events) == "before\n"
            await TaskService(store).cancel("stop")
            text, end = await rest_of(events)
        task = await finished(store, "stop")
    assert task.status == TaskStatus.CANCELLED
    assert text == ""
    assert end.run is not None and end.run.status == RunStatus.CANCELLED
    assert end.run.output == "before\n"


async def test_without_follow_the_stream_stops_at_what_there_is_now(
    store: MemoryStore, broker: MemoryBroker, tmp_path: Path
) -> None:
    go_on = tmp_path / "go-on"
    async with consuming(store, broker):
        queued = await submit(
            store, broker, "now", f"echo so-far; while [ ! -e {go_on} ]; do sleep 0.02; done"
        )
        async with aclosing(
            await follow_output(store, "now", queued.run_id, follow=True)
        ) as events:
            assert await next_text(events) == "so-far\n"
            snapshot = await follow_output(store, "now", queued.run_id, follow=False)
            seen = [event async for event in snapshot]
            go_on.touch()
            await rest_of(events)
    assert seen == [OutputText("so-far\n")]


async def test_an_unknown_run_or_task_is_refused_before_anything_is_streamed(
    store: MemoryStore, broker: MemoryBroker
) -> None:
    async with consuming(store, broker):
        await submit(store, broker, "t", "true")
        await finished(store, "t")
    service = TaskService(store)
    with pytest.raises(RunNotFound):
        await service.output("t", "no-such-run", follow=True)
    with pytest.raises(TaskNotFound):
        await service.output("no-such-task", "no-such-run", follow=True)


async def test_the_relay_writes_nothing_for_a_command_that_ends_within_one_interval(
    store: MemoryStore,
) -> None:
    relay = OutputRelay(store, keep=1000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.forward)
        live = relay.open("r1")
        live.append(b"tiny")
        relay.close(live)  # the run ends before its first interval
        await live.finish()
        tg.cancel_scope.cancel()
    page = await kept(store, "r1")
    assert list(page.chunks) == []


async def test_the_relay_forwards_in_batches_and_keeps_the_newest_bytes_in_order(
    store: MemoryStore,
) -> None:
    relay = OutputRelay(store, keep=10)
    first: list[OutputChunk] = []
    live = relay.open("r2")
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.forward)
        live.append(b"0123456789")
        live.append(b"abcde")  # more than `keep` before the first batch: the oldest go

        async def forwarded() -> bool:
            first[:] = (await kept(store, "r2")).chunks
            return bool(first)

        await eventually(forwarded, within=FLUSH_SECONDS * 20, every=FLUSH_SECONDS / 5)
        live.append(b"XY")
        relay.close(live)
        tg.cancel_scope.cancel()
    assert first == [OutputChunk(5, b"56789abcde")]
    await live.finish()  # in use now: the rest goes out before the run's end is recorded
    page = await kept(store, "r2")
    # The store keeps at most `keep` bytes too, dropping whole chunks from the oldest.
    assert list(page.chunks) == [OutputChunk(15, b"XY")]
