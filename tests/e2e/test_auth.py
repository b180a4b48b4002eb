"""``TASKQ_API_TOKENS`` on a real ``taskq dev`` process, used through the CLI and HTTP."""

from __future__ import annotations

import json

import httpx
import pytest

from app.supervisor import OPEN_API_WARNING
from tests.e2e.harness import cli, running, service_env

pytestmark = pytest.mark.e2e


async def test_with_tokens_the_cli_needs_taskq_token(prefix: str) -> None:
    env = service_env(prefix, TASKQ_API_TOKENS="t1,t2")
    async with running(["dev", "--port", "0"], env) as service:
        assert service.api_url is not None
        url = service.api_url
        assert not any(OPEN_API_WARNING in line for line in service.log)

        # An empty TASKQ_TOKEN is no token at all (the test runner's own may be set).
        message = await cli(url, "list", expect_code=1, env={"TASKQ_TOKEN": ""})
        assert "401" in message and "TASKQ_TOKEN" in message, message
        message = await cli(url, "list", expect_code=1, env={"TASKQ_TOKEN": "t3"})
        assert "401" in message, message

        with_token = {"TASKQ_TOKEN": "t2"}
        await cli(url, "create", "--id", "a1", "--name", "A", "--command", "true", env=with_token)
        listed = json.loads(await cli(url, "list", "--json", env=with_token))
        assert [task["id"] for task in listed] == ["a1"]
        assert "a1" in await cli(url, "--token", "t1", "get", "--id", "a1")

        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/schema/openapi.json")).status_code == 200
            refused = await http.get("/tasks")
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
        assert await service.stop() == 0


async def test_without_tokens_the_api_is_open_and_the_log_says_so(prefix: str) -> None:
    env = service_env(prefix)
    env.pop("TASKQ_API_TOKENS", None)
    async with running(["dev", "--port", "0"], env) as service:
        assert service.api_url is not None
        warnings = [line for line in service.log if OPEN_API_WARNING in line]
        assert warnings and "WARNING" in warnings[0], service.dump()
        await cli(service.api_url, "create", "--id", "o1", "--name", "O", "--command", "true")
        assert "o1" in await cli(service.api_url, "list", env={"TASKQ_TOKEN": ""})
        assert await service.stop() == 0
