"""``taskq runs`` on a task with a run whose stored document cannot be read: the runs it
can read are listed, and the others named on stderr (the JSON on stdout stays the list
of runs). The command runs in process, against the API served in process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

import cli.main
from cli.client import ApiClient
from tests.api.conftest import Served
from tests.contract.test_unreadable_runs_contract import spoil_run, with_runs


@pytest.fixture
def through_served(served: Served, monkeypatch: pytest.MonkeyPatch) -> httpx.AsyncClient:
    """CLI commands talk to the served app."""

    @asynccontextmanager
    async def open_client(_: str, __: str | None) -> AsyncIterator[ApiClient]:
        yield ApiClient(served.client)

    monkeypatch.setattr(cli.main, "open_client", open_client)
    return served.client


async def taskq(*args: str) -> None:
    await cli.main.cli.main(list(args), standalone_mode=False)


@pytest.mark.parametrize("as_json", [False, True])
async def test_runs_names_the_unreadable_ones_on_stderr(
    served: Served,
    through_served: httpx.AsyncClient,
    capsys: pytest.CaptureFixture[str],
    as_json: bool,
) -> None:
    _, [oldest, spoiled, newest] = await with_runs(served.store, "a", 3)
    await spoil_run(served.store, "a", spoiled.run_id)

    await taskq("runs", "--id", "a", *(["--json"] if as_json else []))

    out, err = capsys.readouterr()
    if as_json:
        assert [run["run_id"] for run in json.loads(out)] == [newest.run_id, oldest.run_id]
    else:
        assert newest.run_id in out and oldest.run_id in out
    assert spoiled.run_id not in out
    assert f"cannot be read: {spoiled.run_id}" in err


async def test_runs_says_nothing_more_when_every_run_can_be_read(
    served: Served, through_served: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    await with_runs(served.store, "a", 2)
    await taskq("runs", "--id", "a")
    assert capsys.readouterr().err == ""
