"""Schemathesis fuzzes every operation of the OpenAPI document: no input gives a 5xx, and
every response has a documented status code and matches its documented schema.

On both backends: Postgres refuses some strings SQLite takes (NUL bytes). Bounded
(FUZZ_EXAMPLES per operation) to stay in the default suite's time budget.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from api_support import Api
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

FUZZ_EXAMPLES = 10
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
pytestmark = pytest.mark.timeout(300)


def test_fuzz_openapi_finds_no_server_error(api: Api) -> None:
    auth = api.tenant()
    api.job_id(auth)  # something to find, cancel, page through
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures: list[str] = []
    cases: Counter[str] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.headers = {**(case.headers or {}), **auth}
            cases[case.operation.label] += 1
            case.validate_response(case.call(), checks=CHECKS)

        try:
            fuzz()
        except Exception as exc:  # the smallest failing example, after shrinking
            failures.append(f"{operation.label}: {exc}")
    width = max(map(len, cases))
    print(f"\n{'route':<{width}}  cases")  # shown with -rA or -s
    for label in sorted(cases):
        print(f"{label:<{width}}  {cases[label]:>5}")
    assert not failures, "\n\n".join(failures)
    assert set(cases) == {op.label for op in operations}, "an operation ran no case"
