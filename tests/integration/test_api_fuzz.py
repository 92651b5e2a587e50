"""schemathesis against each service's own OpenAPI document (issue 9.10): every operation, in
positive mode (schema-valid requests must be accepted: the documents say exactly what the server
takes), with the responses as documented and never a 5xx; then negative mode, never a 5xx.

A bounded number of generated examples per operation keeps this inside `make test`.
(Hypothesis is driven directly: schemathesis' lazy pytest fixture loader does not run on
pytest 9 yet, and the apps need the test databases, which exist only once fixtures run.)
"""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure
from schemathesis.specs.openapi.checks import (
    positive_data_acceptance,
    response_schema_conformance,
)

from billing_service.app import create_app as billing_app
from inventory_service.app import create_app as inventory_app
from orders_service.app import create_app as orders_app
from service_runtime.db import create_pool
from tests import tokens

FACTORIES = {"orders": orders_app, "inventory": inventory_app, "billing": billing_app}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples every run: CI stays reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# Refusals JSON Schema cannot express, each documented in the operation's description:
# a bound on stock or money on hand that earlier examples filled up (contracts/limits.py),
# and a sku repeated in one order (uniqueness by a key of the items).
STATE_REFUSALS = ("Stock on hand would be", "Money on hand would be")
REPEATED_SKU = "Each sku may appear once"


def _refused_beyond_the_schema(response) -> bool:
    if response.status_code != 422:
        return False
    body = response.json()
    if str(body.get("message", "")).startswith(STATE_REFUSALS):
        return True
    items = body.get("errors", {}).get("json", {}).get("items")
    return body["errors"]["json"].keys() == {"items"} and any(
        isinstance(e, str) and e.startswith(REPEATED_SKU) for e in items or []
    )


def accepted_unless_refused_beyond_the_schema(ctx, response, case) -> bool | None:
    """positive_data_acceptance, save for the refusals listed above."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except Failure:
        if _refused_beyond_the_schema(response):
            return None
        raise


def _operations(service: str, pool) -> list:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", FACTORIES[service](pool))
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = sum(
        1
        for path in schema.raw_schema["paths"].values()
        for method in path
        if method in {"get", "put", "post", "delete", "patch"}
    )
    assert len(operations) == documented >= 4
    return operations


def _fresh_idempotency_key(case) -> None:
    # A key reused with another body is refused (422) by design: a state, not a shape.
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = str(uuid.uuid4())


def _as_operator(case) -> None:
    """An operator's token (it reaches every operation): the fuzz is about the documents' shapes;
    who may call what is tests/integration/test_auth.py's."""
    case.headers = {**(case.headers or {}), **tokens.bearer(tokens.admin())}


@pytest.mark.parametrize("service", FACTORIES)
def test_schema_valid_requests_are_accepted_and_answered_as_documented(service, service_db_urls):
    pool = create_pool(service_db_urls[service], name=f"fuzz-{service}")
    try:
        for operation in _operations(service, pool):

            @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
            @FUZZ
            def fuzz(case) -> None:
                _fresh_idempotency_key(case)
                _as_operator(case)
                case.call_and_validate(
                    checks=[
                        not_a_server_error,
                        response_schema_conformance,
                        accepted_unless_refused_beyond_the_schema,
                    ]
                )

            fuzz()
    finally:
        pool.close()


@pytest.mark.parametrize("service", FACTORIES)
def test_invalid_requests_never_get_a_5xx(service, service_db_urls):
    pool = create_pool(service_db_urls[service], name=f"fuzz-neg-{service}")
    fuzzed = 0
    try:
        for operation in _operations(service, pool):

            @given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
            @FUZZ
            def fuzz(case) -> None:
                _as_operator(case)
                case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

            try:
                fuzz()
                fuzzed += 1
            except Unsatisfiable:
                pass  # nothing to make invalid: no parameters and no body (/health, /openapi)
    finally:
        pool.close()
    assert fuzzed >= 3
