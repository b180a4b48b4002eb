"""A consumer process serves no HTTP, so it does without the HTTP stack: the service's
modules import Hypercorn, Litestar and the app only in the roles that serve HTTP
(``app.supervisor``). A fresh interpreter shows what importing them loads."""

from __future__ import annotations

import subprocess
import sys

HTTP_STACK = ("litestar", "hypercorn", "app.api", "app.metrics_http")


def loaded_after(statement: str) -> set[str]:
    """The modules of the HTTP stack a fresh interpreter has loaded after ``statement``."""
    check = f"{statement}; import sys; print(*(m for m in {HTTP_STACK!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60
    )
    return set(result.stdout.split())


def test_the_service_modules_load_no_http_stack() -> None:
    assert loaded_after("import cli.main, app.supervisor") == set()


def test_the_check_sees_the_stack_when_it_is_loaded() -> None:
    assert loaded_after("import app.api") >= {"litestar", "app.api"}
