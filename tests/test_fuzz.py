"""Schemathesis against the running API on PostgreSQL: thousands of generated requests, valid and
invalid, none answered with a 5xx, every answer conforming to the OpenAPI schema."""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness import Service, completion_line, fresh_postgres_database, require_servers
from tests.live_server import live_server

pytestmark = pytest.mark.services

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
EXAMPLES_PER_MODE = 150  # per operation and generation mode; operations with few inputs run fewer
MIN_CASES = 2000


def _seed(base: str, session: requests.Session) -> None:
    """A file and a batch, so listings and lookups also answer with objects, not only with 404s."""
    line = json.dumps(completion_line("a")).encode() + b"\n"
    uploaded = session.post(f"{base}/v1/files", files={"file": ("a.jsonl", line)}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    created = session.post(f"{base}/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                       "endpoint": "/v1/completions"})
    assert created.status_code == 200, created.text


def _fuzz(operation, mode: GenerationMode, base: str, session: requests.Session, tally: dict) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_MODE, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call(base_url=base, session=session)
        tally["cases"] += 1
        tally["statuses"][response.status_code] = tally["statuses"].get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as failure:  # noqa: BLE001 - collected, reported together below
            tally["failures"].append(f"{operation.label} [{mode.value}] -> {response.status_code}: "
                                     f"{str(failure)[:400]}")

    try:
        run()
    except Unsatisfiable:  # nothing of this operation can be made invalid (no parameters, say)
        assert mode == GenerationMode.NEGATIVE, operation.label


def test_generated_requests_never_get_a_5xx_and_conform_to_the_schema(tmp_path, tiny_model):
    require_servers()
    with fresh_postgres_database() as database_url:
        svc = Service.embedded(tmp_path, tiny_model, database_url=database_url)  # no keys: the local tenant
        with live_server(svc.client.app) as base, requests.Session() as session:
            _seed(base, session)
            schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
            tally = {"cases": 0, "statuses": {}, "failures": []}
            for result in schema.get_all_operations():
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    _fuzz(result.ok(), mode, base, session, tally)
    failures = tally["failures"]
    assert not failures, f"{len(failures)} of {tally['cases']} cases failed:\n" + "\n".join(failures[:20])
    assert tally["cases"] >= MIN_CASES, tally
    assert not any(status >= 500 for status in tally["statuses"]), tally["statuses"]
    print(tally["cases"], "cases; answers by status:", dict(sorted(tally["statuses"].items())))
