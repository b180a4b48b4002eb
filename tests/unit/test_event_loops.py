"""Which event loop ``taskq`` runs on: chosen from the command line before it is parsed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest

from app import event_loops
from app.event_loops import (
    BackendError,
    anyio_run_options,
    requested_backend,
    running_backend,
)


@pytest.fixture(autouse=True)
def uvloop_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loops, "uvloop_installed", lambda: True)


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["serve"], {}, "uvloop"),
        (["serve", "--backend", "asyncio"], {}, "asyncio"),
        (["dev", "--backend=trio"], {}, "trio"),
        (["serve"], {"TASKQ_BACKEND": "asyncio"}, "asyncio"),
        # The command line wins over the environment, as for every setting.
        (["serve", "--backend", "uvloop"], {"TASKQ_BACKEND": "asyncio"}, "uvloop"),
        # Not a loop: the default, and the command's option refuses it by name.
        (["serve", "--backend", "tokio"], {}, "uvloop"),
        (["serve"], {"TASKQ_BACKEND": ""}, "uvloop"),
        # After "--", words are arguments, not options.
        (["create", "--", "--backend", "trio"], {}, "uvloop"),
    ],
)
def test_the_loop_asked_for_by_option_then_environment_then_default(
    argv: list[str], environ: dict[str, str], expected: str
) -> None:
    assert requested_backend(argv, environ) == expected


def test_without_uvloop_the_default_is_asyncio_and_asking_for_it_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_loops, "uvloop_installed", lambda: False)
    assert requested_backend(["serve"], {}) == "asyncio"
    with pytest.raises(BackendError, match="pip install uvloop"):
        requested_backend(["serve", "--backend", "uvloop"], {})


@pytest.mark.parametrize("backend", ["uvloop", "asyncio", "trio"])
def test_each_loop_runs_as_named(backend: str) -> None:
    name, options = anyio_run_options(backend)
    # A thread of its own: the test session may hold a loop open in this one.
    with ThreadPoolExecutor(1) as thread:
        ran = thread.submit(anyio.run, _running_backend, backend=name, backend_options=options)
        assert ran.result() == backend


async def _running_backend() -> str:
    return running_backend()
