"""Schemathesis over the running service's /openapi.json: generated requests of every shape, valid and not, as
an admin and as a researcher. No answer is a 5xx, and every answer conforms to the documented schema (status
codes, content types, bodies). Driven through Hypothesis directly: schemathesis 4.32's pytest plugin does not
run under pytest 9 (it reads a `Function._nodeid` that pytest 9 dropped)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.access_world import World

pytestmark = pytest.mark.security

# Schema-valid is not always acceptable: the service's rules go beyond JSON Schema (normalised, look-alike-free
# names; a real email; 20 characters of purpose; the licence's own sha256; the server's grant limits), so a
# schema-valid body can rightly get one line of 422. Every other check runs, negative data rejection included.
RULES_BEYOND_THE_SCHEMA = [schemathesis.checks.positive_data_acceptance]


def test_every_answer_conforms_and_none_is_a_server_error(access_world: World) -> None:
    access_world.release()  # something to find
    tokens = [access_world.person(role, prefix=f"fuzz-{role}").token for role in ("admin", "researcher")]
    schema = schemathesis.openapi.from_url(f"{access_world.srv.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: dict[str, str] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:  # type: ignore[no-untyped-def]
            for token in tokens:
                case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, excluded_checks=RULES_BEYOND_THE_SCHEMA)

        try:
            run()
        except (Exception, BaseExceptionGroup) as e:  # collect every operation's failure, not just the first
            failures[operation.label] = str(e)[:1500]
    assert not failures, failures
