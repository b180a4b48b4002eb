"""Which event loop a ``taskq`` service process runs on.

``uvloop`` (asyncio's API over libuv) is the default wherever it is installed: it is a
dependency of taskq on Linux and macOS. Measured on this project's 2-core machine over
compare's workload (``python -m tests.bench.cpu_budget --versus DIR --rounds 4``, DIR a
checkout defaulting to asyncio), taskq's processes took 0.92x the CPU a task (0.89x
read per process in two alternating pairs), and dispatched tasks started sooner
(lateness p50 0.5-0.7 against 0.9-1.2 ms). ``asyncio`` is the standard library's loop,
the fallback where uvloop is not installed (``--backend asyncio`` asks for it anyway).
``trio`` serves ``taskq dev`` only: the AMQP and Redis clients need asyncio.

The loop must be chosen before it starts, so before the command line is parsed:
``requested_backend`` reads ``--backend`` (or ``TASKQ_BACKEND``) from the arguments.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

BACKENDS = ("uvloop", "asyncio", "trio")
SERVER_BACKENDS = ("uvloop", "asyncio")
"""The loops ``taskq serve`` runs on (its AMQP and Redis clients are asyncio's)."""
BACKEND_VARIABLE = "TASKQ_BACKEND"


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def default_backend() -> str:
    return "uvloop" if uvloop_installed() else "asyncio"


class BackendError(ValueError):
    """An event loop that is not known, or not installed."""


def requested_backend(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The loop ``argv`` (a ``taskq`` command line, without the program) asks for with
    ``--backend X``, else ``TASKQ_BACKEND``, else the default. A value that is not a
    loop is left to the command line's parser to refuse (it names the choices); a
    request for uvloop where it is not installed is refused here."""
    chosen = environ.get(BACKEND_VARIABLE) or default_backend()
    for index, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--backend" and index + 1 < len(argv):
            chosen = argv[index + 1]
        elif arg.startswith("--backend="):
            chosen = arg.split("=", 1)[1]
    if chosen not in BACKENDS:
        return default_backend()
    if chosen == "uvloop" and not uvloop_installed():
        raise BackendError("the uvloop event loop is not installed: pip install uvloop")
    return chosen


def anyio_run_options(backend: str) -> tuple[str, dict[str, Any]]:
    """AnyIO's ``backend`` and ``backend_options`` for ``backend``."""
    if backend == "uvloop":
        return "asyncio", {"use_uvloop": True}
    return backend, {}


def running_backend() -> str:
    """The loop this process runs on (within ``anyio.run``)."""
    import sniffio

    library = sniffio.current_async_library()
    if library != "asyncio":
        return library
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"
