"""Schema-driven fuzzing of every route (schemathesis): no 500s and no responses that break the OpenAPI schema."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import LOCAL_URL, make_settings
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app import create_app

EXAMPLES_PER_ROUTE = 60  # 5 routes: a few hundred cases, bounded and derandomised


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    app = create_app(make_settings(tmp_path_factory.mktemp("fuzz")))
    # runs the lifespan: models, database and storage stay on app.state for the fuzzer
    with TestClient(app, base_url=LOCAL_URL):
        yield app


def test_no_server_errors_and_responses_match_schema(fuzz_app: FastAPI) -> None:
    # requests for 127.0.0.1, not schemathesis's "testserver": a service without keys refuses other hosts (403)
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app, headers={"Host": "127.0.0.1"})
    statuses: Counter[int | str] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/results/{patient_id}", "/health"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=LOCAL_URL)
            guarded = response.status_code == 403 and "refused:" in response.text  # by host or origin (browser.py)
            statuses["refused by a guard" if guarded else response.status_code] += 1
            assert response.status_code < 500, (case.path, response.text)
            # Any bytes are schema-valid for `image`, but most are not radiographs: a 422 for them is right, so
            # the "schema-valid data must be accepted" check does not apply; every other check does.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()
    # the cases reached the routes (a refusal of every request by host or origin would pass the checks above)
    assert statuses["refused by a guard"] == 0 and statuses[200] > 0, statuses
