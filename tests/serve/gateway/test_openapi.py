"""schemathesis drives the gateway from its own OpenAPI document: no 5xx, no answer outside the schema.

    pytest tests/serve/gateway/test_openapi.py                  # fast: vLLM faked at the HTTP level
    pytest -m engine tests/serve/gateway/test_openapi.py        # a short run on the real engine

The gateway runs as `tunewheel serve` runs it (uvicorn, real SQLite, an adapter registry, keys
configured) and schemathesis sends what the document allows and what it does not (positive and
negative cases) to every operation with an admin key, so the admin routes are exercised too.
Checked on each answer: not a 5xx, a status the document lists, the documented content type and
body schema. (schemathesis's `negative_data_rejection` is left out: it counts an ignored unknown
query parameter, or the Authorization header this test always sends, as accepted invalid data;
the refusals themselves are asserted one by one in test_limits.py and test_trust.py.) The fast run answers chat from the fake
engine (tests/fixtures/gateway.py); the engine run fuzzes the chat operation alone on the real
vLLM with a tiny answer cap (serve.limits.max_tokens = 4) and no vLLM extensions.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from serve.gateway.app import create_app
from serve.settings import hash_key, load_settings
from tests.fixtures.gateway import start_gateway

ADMIN = "fuzz-admin"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FAST_EXAMPLES = 20   # per operation; 10 operations
ENGINE_EXAMPLES = 12  # the chat operation on the real engine
FAST = {"api_keys": [hash_key("fuzz-user")], "admin_keys": [hash_key(ADMIN)]}
ENGINE = {"admin_keys": [hash_key(ADMIN)],
          "limits": {"max_tokens": 4, "default_max_tokens": 4, "engine_params": [], "max_n": 2}}


def document(serve: dict) -> schemathesis.BaseSchema:
    """The OpenAPI document of a gateway with these [serve] settings (no server needed to build it)."""
    settings_ = load_settings(None, engine={"url": "http://unused"}, serve=serve)
    return schemathesis.openapi.from_dict(create_app(settings_).openapi())


@pytest.fixture(scope="module")
def fuzzed(fake_engine_url, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("fuzz"), fake_engine_url, serve=FAST)
    yield gw
    gw.stop()


@document(FAST).parametrize()
@settings(max_examples=FAST_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_gateway_answers_every_generated_request_within_its_document(case, fuzzed):
    case.call_and_validate(base_url=fuzzed.url, headers={"Authorization": f"Bearer {ADMIN}"}, checks=CHECKS)


@pytest.fixture(scope="module")
def engine_fuzzed(engine_url, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("fuzz-engine"), engine_url, serve=ENGINE)
    yield gw
    gw.stop()


@pytest.mark.engine
@document(ENGINE).include(path="/v1/chat/completions", method="POST").parametrize()
@settings(max_examples=ENGINE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_real_engine_behind_the_gateway_gives_no_5xx_to_generated_chats(case, engine_fuzzed):
    case.call_and_validate(base_url=engine_fuzzed.url, headers={"Authorization": f"Bearer {ADMIN}"}, checks=CHECKS)
