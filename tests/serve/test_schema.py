"""Schemathesis against a live ``ti serve`` (127.0.0.1): no 5xx, and every response matches the
OpenAPI schema the app publishes (status codes, content types, bodies)."""

from __future__ import annotations

import pytest

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra (make installs it)")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serve.conftest import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_schema(tmp_path_factory):
    """A server with small limits, so that the valid requests hypothesis finds stay cheap."""
    data = tmp_path_factory.mktemp("schemathesis") / "data"
    server = ServerProcess(
        data, "--refine", "2", "--max-refine", "3", "--max-sample-steps", "2", "--max-images", "2",
        "--max-files", "3", "--max-queue", "1000", "--max-per-key", "1000",
    )  # fmt: skip
    server.start()
    try:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    finally:
        server.stop()


def test_the_api_keeps_its_schema(live_schema):
    """Each operation's generated requests (20 per operation, bounded), checked one by one."""
    from hypothesis import given

    failures, ran, calls = [], 0, []
    for result in live_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=60)
            calls.append(case.operation.path)

        try:
            check()
        except Exception as err:  # noqa: BLE001 - every operation is tried; all failures are reported
            failures.append(f"{operation.method.upper()} {operation.path}: {err}")
        ran += 1
    assert ran >= 12 and len(calls) >= 100, (ran, len(calls))
    assert not failures, "\n\n".join(failures)
