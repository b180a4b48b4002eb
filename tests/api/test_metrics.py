"""``GET /metrics`` on the API, and the requests it counts: by route template, never by
the raw path."""

from __future__ import annotations

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app.metrics_http import UNMATCHED_ROUTE
from tests.metrics_samples import value

Client = httpx.AsyncClient


def requests_counted(**labels: str) -> float:
    return value("taskq_http_requests_total", **labels)


async def test_requests_are_counted_by_route_template_never_by_raw_path(client: Client) -> None:
    by_template = {"method": "GET", "route": "/tasks/{task_id}", "status": "404"}
    unmatched = {"method": "GET", "route": UNMATCHED_ROUTE, "status": "404"}
    before = requests_counted(**by_template), requests_counted(**unmatched)

    for task_id in ("one", "two"):
        assert (await client.get(f"/tasks/{task_id}")).status_code == 404
    assert (await client.get("/no/such/path")).status_code == 404

    after = requests_counted(**by_template), requests_counted(**unmatched)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)
    routes = {
        sample.labels["route"]
        for family in REGISTRY.collect()
        if family.name == "taskq_http_requests"
        for sample in family.samples
    }
    assert not {"/tasks/one", "/tasks/two", "/no/such/path"} & routes


async def test_metrics_are_prometheus_text_that_parses(client: Client) -> None:
    await client.get("/tasks")

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["taskq_runs_finished"].type == "counter"
    assert families["taskq_http_request_duration_seconds"].type == "histogram"
    assert any(
        s.labels == {"method": "GET", "route": "/tasks", "status": "200"}
        for s in families["taskq_http_requests"].samples
    )
