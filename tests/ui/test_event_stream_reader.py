"""The dashboard's Server-Sent Events reader (``app/ui/js/sse.js``), run in the browser
over streams cut at awkward places: the events must come out whole whatever the chunks."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Page

pytestmark = pytest.mark.e2e

# Reads `chunks` as one response body with the page's own module; answers the events.
READ = """async (chunks) => {
  const { readEvents } = await import("/ui/js/sse.js");
  const encoder = new TextEncoder();
  const body = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
      controller.close();
    },
  });
  const events = [];
  await readEvents(new Response(body), (event) => events.push(event));
  return events;
}"""


async def read(page: Page, dev_url: str, chunks: list[str]) -> list[dict[str, Any]]:
    await page.goto(f"{dev_url}/ui/#/new")
    return await page.evaluate(READ, chunks)


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(
            ['id: 1-0\r\nevent: task.created\r\ndata: {"a": 1}\r\n\r\n'], id="one-chunk-crlf"
        ),
        pytest.param(
            ["id: 1-0\r", "\nevent: task.cre", 'ated\r\ndata: {"a"', ": 1}\r\n\r", "\n"],
            id="split-crlf",
        ),
        pytest.param(['id: 1-0\nevent: task.created\ndata: {"a": 1}\n\n'], id="lf"),
        pytest.param(
            [": keepalive\n\n", "id: 1-0\nevent: task.created\n", 'data: {"a": 1}\n\n'],
            id="comment",
        ),
    ],
)
async def test_an_event_comes_out_whole_however_the_stream_is_cut(
    page: Page, dev_url: str, chunks: list[str]
) -> None:
    events = await read(page, dev_url, chunks)

    assert events == [{"id": "1-0", "event": "task.created", "data": '{"a": 1}'}]


async def test_data_lines_join_and_an_unfinished_event_is_dropped(page: Page, dev_url: str) -> None:
    chunks = [
        "event: end\ndata: first\ndata:second\n\n",
        "data: cut off by the end of the stream\n",
    ]

    events = await read(page, dev_url, chunks)

    assert events == [{"id": None, "event": "end", "data": "first\nsecond"}]
