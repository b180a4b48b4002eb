"""``taskq`` with one more route, ``POST /bench/trivial``, for ``tests/bench/api_create.py``.

Run by path (``python tests/bench/trivial_route_server.py serve --roles api``) so that
``app`` is imported from ``PYTHONPATH`` when it is set: the bench can serve another
checkout's code (main's, to compare) the same way. It is ``taskq`` itself: the same
start-up, settings, Hypercorn and middleware (authentication included); only the app
gains a handler that does nothing, the ceiling ``POST /tasks`` is measured against. The
route exists only in this process: a normal ``taskq serve`` has no benchmark route.
"""

from __future__ import annotations

from typing import Any

import cli  # noqa: F401 (prepares the service process before the slow imports, as taskq does)

TRIVIAL_PATH = "/bench/trivial"


def serve_with_trivial_route() -> None:
    """``taskq`` (its command line as given), its app built with the trivial route."""
    from litestar import Litestar, post

    import app.api as api
    import app.supervisor as supervisor
    from cli.main import main

    @post(TRIVIAL_PATH, status_code=201)
    async def trivial() -> dict[str, str]:
        """Answers a small JSON document without reading the body."""
        return {"status": "ok"}

    create_app = api.create_app

    def create_app_with_trivial_route(*args: Any, **kwargs: Any) -> Litestar:
        app = create_app(*args, **kwargs)
        app.register(trivial)
        return app

    # The supervisor imports ``create_app`` when the api role starts; a checkout from
    # before that (served to compare) bound it when the supervisor was imported.
    api.create_app = create_app_with_trivial_route
    if hasattr(supervisor, "create_app"):
        setattr(supervisor, "create_app", create_app_with_trivial_route)  # noqa: B010
    main()


if __name__ == "__main__":
    serve_with_trivial_route()
