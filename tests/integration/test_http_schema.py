"""Schemathesis against the OpenAPI schema, calling a live keyed server: documented codes, types, bodies, auth."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from mixserver import ADMIN_KEY, run_server, settings_for
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api.app import create_app
from service.config import Settings

pytestmark = pytest.mark.integration

KEY = "schemathesis-key-0123456789"
# The schema is static (it needs no model), so it is built at collection time from an app that never starts.
schema = schemathesis.openapi.from_dict(create_app(Settings(providers=("CPUExecutionProvider",))).openapi())


@pytest.fixture(scope="module")
def keyed(http_store):
    settings = settings_for(http_store, model_version="1", api_keys=(KEY,), admin_key=ADMIN_KEY)
    with run_server(settings) as srv:
        yield srv


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_conforms_to_its_schema(case, keyed):
    # Not checked: that every schema-valid body is accepted. An image's size and content cannot be expressed in JSON
    # Schema (e.g. {"instances": [[[]]]} is schema-valid but not 8x8), so such bodies rightly get a documented 400.
    case.call_and_validate(
        base_url=keyed.base_url,
        headers={"Authorization": f"Bearer {KEY}"},
        excluded_checks=[positive_data_acceptance],
    )
