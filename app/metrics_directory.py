"""Where the processes of one ``taskq serve --processes N`` keep their metrics.

Each process counts in memory of its own, so the parent's ``/metrics`` cannot see its
consumer processes' counts by itself. prometheus_client's multiprocess mode has every
process write its values to files in one directory, which the parent's scrape reads
together (``app.metrics``). The parent makes a private directory for its service, its
consumer processes inherit it (``PROMETHEUS_MULTIPROC_DIR``), and it is removed when the
service stops, or by the next service to start if this one was killed.

Standard library only: prometheus_client reads the variable when it is first imported,
so it must be set before anything imports ``app.metrics``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator
from contextlib import contextmanager

MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "taskq-metrics-"


@contextmanager
def metrics_directory(*, several_processes: bool) -> Generator[str | None]:
    """For a service of ``several_processes``, a private directory for their metrics,
    named by ``PROMETHEUS_MULTIPROC_DIR`` in this process's environment (and so in its
    consumer processes') while the context lasts, then removed; yields its path.

    Yields the directory already named when there is one (a consumer process, which
    inherited its parent's), and ``None`` for a service of one process."""
    inherited = os.environ.get(MULTIPROCESS_VARIABLE)
    if inherited or not several_processes:
        yield inherited
        return
    _remove_stale_directories()
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROCESS_VARIABLE] = path
    try:
        yield path
    finally:
        del os.environ[MULTIPROCESS_VARIABLE]
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_directories() -> None:
    """Remove the directories of services that could not remove theirs (killed with
    SIGKILL): this user's, named after a process that no longer runs."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name.removeprefix(_PREFIX).partition("-")[0]
        path = os.path.join(root, name)
        if not name.startswith(_PREFIX) or not pid.isdigit() or _runs(int(pid)):
            continue
        if os.stat(path).st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True
