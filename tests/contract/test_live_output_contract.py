"""``LiveOutput``, one suite for every adapter: the in-memory one is the reference, Redis
must match."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest
import redis.asyncio as redis

from app.adapters.output_followers import BACKLOG_PAGES
from app.ports import (
    ENDED_OUTPUT_TTL,
    LIVE_OUTPUT_TTL,
    OutputChunk,
    OutputPage,
    Store,
    TooManyFollowers,
)
from tests.conftest import REDIS_URL
from tests.contract.stores import StoreOpener, finishing, kept, redis_ttl, running_run


async def test_output_reads_back_in_order_and_a_follower_gets_what_comes_next(
    store: Store,
) -> None:
    await store.append_output("r", OutputChunk(0, b"hello "), keep=1000)
    await store.append_output("r", OutputChunk(6, b"world\n"), keep=1000)
    async with store.follow("r") as pages:
        first = await anext(pages)
        assert list(first.chunks) == [OutputChunk(0, b"hello "), OutputChunk(6, b"world\n")]
        assert not first.ended
        await store.append_output("r", OutputChunk(12, b"again\n"), keep=1000)
        with anyio.fail_after(5):
            second = await anext(pages)
    assert (list(second.chunks), second.ended) == ([OutputChunk(12, b"again\n")], False)


async def first_and_next_page(
    store: Store, run_id: str, meanwhile: Callable[[], Awaitable[object]]
) -> tuple[OutputPage, OutputPage]:
    """A follower's first page, and its next one: the one ``meanwhile`` (run while the
    follower waits for it) brings."""
    pages_seen: list[OutputPage] = []

    async def follower() -> None:
        async with store.follow(run_id) as pages:
            pages_seen.append(await anext(pages))
            started.set()
            pages_seen.append(await anext(pages))

    started = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower)
            await started.wait()
            await anyio.wait_all_tasks_blocked()
            await meanwhile()
    first, following = pages_seen
    return first, following


async def test_a_waiting_follower_wakes_when_output_is_appended_elsewhere(
    store: Store, open_another: StoreOpener
) -> None:
    async with open_another() as other:
        _, page = await first_and_next_page(
            store, "r", lambda: other.append_output("r", OutputChunk(0, b"line\n"), keep=100)
        )
    assert (list(page.chunks), page.ended) == ([OutputChunk(0, b"line\n")], False)


async def test_a_quiet_run_gets_an_empty_page_every_keepalive(
    open_configured: StoreOpener,
) -> None:
    async with open_configured(follow_keepalive=0.2) as store, store.follow("r") as pages:
        await anext(pages)
        started = time.monotonic()
        with anyio.fail_after(5):
            quiet = await anext(pages)
        assert (list(quiet.chunks), quiet.ended) == ([], False)
        assert time.monotonic() - started >= 0.15


async def xread_connections(client_name: str) -> list[dict[str, str]]:
    """The connections of this process's stores blocked in ``XREAD`` now."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        listed = await client.client_list()  # pyright: ignore[reportUnknownMemberType]
    finally:
        await client.aclose()
    return [c for c in listed if c.get("name") == client_name and c.get("cmd") == "xread"]


async def test_a_follow_quiet_for_longer_than_redis_py_s_default_read_timeout_goes_on(
    adapter: str, open_configured: StoreOpener
) -> None:
    """redis-py 8 reads with a 5 s timeout by default: a longer ``XREAD BLOCK`` must
    still return normally, on the connection it started on."""
    if adapter != "redis":
        pytest.skip("a Redis client's read timeout")
    name = f"taskq-{os.getpid()}"
    blocked: list[dict[str, str]] = []

    async def look_while_blocked() -> None:
        await anyio.sleep(5.5)
        blocked.extend(await xread_connections(name))

    async with open_configured(follow_keepalive=6.5) as store, store.follow("r") as pages:
        await anext(pages)
        started = time.monotonic()
        with anyio.fail_after(12):
            async with anyio.create_task_group() as tg:
                tg.start_soon(look_while_blocked)
                quiet = await anext(pages)
                assert (list(quiet.chunks), quiet.ended) == ([], False)
        assert time.monotonic() - started >= 6
    # Still the connection that started the read 5.5 s earlier: it never reconnected.
    assert len(blocked) == 1 and int(blocked[0]["age"]) >= 5


async def test_followers_of_one_run_share_one_read_and_each_gets_everything(
    adapter: str, store: Store
) -> None:
    task, run = await running_run(store, "a")
    await store.append_output(run.run_id, OutputChunk(0, b"early\n"), keep=1000)
    received: list[bytes] = []
    ended: list[bool] = []
    followers = 40
    blocked = 0

    async def follower() -> None:
        nonlocal blocked
        data = b""
        async with store.follow(run.run_id) as pages:
            async for page in pages:
                blocked += 1
                data += b"".join(chunk.data for chunk in page.chunks)
                if page.ended:
                    ended.append(True)
        received.append(data)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(followers):
                tg.start_soon(follower)
            await anyio.wait_all_tasks_blocked()
            for n in range(3):
                await store.append_output(
                    run.run_id, OutputChunk(6 + 5 * n, f"line{n}".encode()), keep=1000
                )
                await anyio.sleep(0.05)
            if adapter == "redis":
                reading = await xread_connections(f"taskq-{os.getpid()}")
                assert len(reading) <= 1
            await store.commit(finishing(task, run))
    assert received == [b"early\nline0line1line2"] * followers
    assert ended == [True] * followers


async def test_followers_beyond_the_limit_are_refused_until_one_leaves(
    open_configured: StoreOpener,
) -> None:
    async with open_configured(max_followers=2) as store:
        async with store.follow("a") as _, store.follow("b") as second:
            with pytest.raises(TooManyFollowers):
                async with store.follow("a"):
                    pass
            await anext(second)
        async with store.follow("a") as again:
            assert not (await anext(again)).ended


async def test_trimming_drops_whole_chunks_and_keeps_the_newest_bytes(store: Store) -> None:
    for n in range(10):
        await store.append_output("r", OutputChunk(n * 100, bytes([n]) * 100), keep=350)
    page = await kept(store, "r")
    assert [chunk.offset for chunk in page.chunks] == [700, 800, 900]
    assert page.chunks[0].data == bytes([7]) * 100

    await store.append_output("r", OutputChunk(1000, b"x" * 500), keep=350)
    assert list((await kept(store, "r")).chunks) == [OutputChunk(1000, b"x" * 500)]


async def test_a_resent_chunk_is_kept_once(store: Store) -> None:
    chunk = OutputChunk(0, b"once\n")
    await store.append_output("r", chunk, keep=100)
    # A follower starting between a chunk and its resend changes nothing.
    await kept(store, "r")
    await store.append_output("r", chunk, keep=100)
    await store.append_output("r", OutputChunk(5, b"more\n"), keep=100)
    await store.append_output("r", OutputChunk(5, b"more\n"), keep=100)
    assert list((await kept(store, "r")).chunks) == [chunk, OutputChunk(5, b"more\n")]


async def test_the_commit_that_ends_a_run_ends_its_followed_output(
    store: Store, open_another: StoreOpener
) -> None:
    task, run = await running_run(store, "a")
    async with open_another() as other:
        first, page = await first_and_next_page(
            store, run.run_id, lambda: other.commit(finishing(task, run))
        )
    assert (list(first.chunks), first.ended) == ([], False)
    assert (list(page.chunks), page.ended) == ([], True)


async def test_output_of_an_ended_run_is_final(store: Store) -> None:
    task, run = await running_run(store, "a")
    await store.append_output(run.run_id, OutputChunk(0, b"printed\n"), keep=100)
    await store.commit(finishing(task, run))
    await store.append_output(run.run_id, OutputChunk(8, b"late\n"), keep=100)
    late_follower = await kept(store, run.run_id)
    assert late_follower.ended
    assert list(late_follower.chunks) == [OutputChunk(0, b"printed\n")]


async def test_ending_a_run_nobody_followed_leaves_no_live_output(
    store: Store, adapter: str, prefix: str
) -> None:
    task, run = await running_run(store, "a")
    await store.commit(finishing(task, run))
    if adapter == "redis":
        assert await redis_ttl(f"{prefix}output:{run.run_id}") == -2
    follower = await kept(store, run.run_id)
    assert (list(follower.chunks), follower.ended) == ([], False)


async def test_live_output_expires_in_redis(store: Store, adapter: str, prefix: str) -> None:
    if adapter != "redis":
        pytest.skip("only Redis expires keys; the memory store forgets on the same schedule")
    task, run = await running_run(store, "a")
    await store.append_output(run.run_id, OutputChunk(0, b"out\n"), keep=100)
    assert 0 < await redis_ttl(f"{prefix}output:{run.run_id}") <= LIVE_OUTPUT_TTL
    await kept(store, "silent")
    assert 0 < await redis_ttl(f"{prefix}output:silent") <= LIVE_OUTPUT_TTL
    await store.commit(finishing(task, run))
    assert 0 < await redis_ttl(f"{prefix}output:{run.run_id}") <= ENDED_OUTPUT_TTL
    await kept(store, run.run_id)  # does not keep it longer
    assert 0 < await redis_ttl(f"{prefix}output:{run.run_id}") <= ENDED_OUTPUT_TTL


async def test_a_follower_that_falls_behind_skips_ahead_without_holding_others_back(
    store: Store,
) -> None:
    async with store.follow("r") as fast, store.follow("r") as slow:
        await anext(fast)
        await anext(slow)
        with anyio.fail_after(10):
            for n in range(BACKLOG_PAGES + 8):
                await store.append_output("r", OutputChunk(n, b"x"), keep=1000)
                assert [chunk.offset for chunk in (await anext(fast)).chunks] == [n]
            behind = await anext(slow)
    # The oldest pages were dropped for the slow follower: it goes on from a later one.
    assert [chunk.offset for chunk in behind.chunks] == [8]
