"""Property-based fuzzing of the OpenAPI schema (schemathesis): whatever a client sends that
the schema allows (and much it does not), the server never answers 5xx and its answers match
the documented schemas. In-process over a fake engine, bounded to a few seconds."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from inference.errors import MultiplaneError
from server.app import ServerInfo, create_app
from server.jobs import JobManager
from server.security import allowed_hosts
from tools.fake_engine import FakeEngine

PORT = 45124
TOKEN = "fuzz-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Host": f"127.0.0.1:{PORT}"}


def build_app():
    # Jobs fail at once instead of writing fuzz-sized stacks: the API, not the engine, is
    # under test here.
    engine = FakeEngine(fail_with=MultiplaneError("fuzzing: nothing is generated"))
    manager = JobManager(engine, Path(tempfile.mkdtemp(prefix="multiplane-fuzz-")), max_queue=8)
    manager.start()
    return create_app(manager, token=TOKEN, hosts=allowed_hosts("127.0.0.1", PORT),
                      info=ServerInfo(version="fuzz"))


APP = build_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, headers=HEADERS)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_never_errors_and_matches_its_schema(case):
    if case.path.endswith("/events"):
        pytest.skip("streams are covered in test_server_process.py")
    response = case.call(headers=HEADERS)
    assert response.status_code < 500, (case.method, case.path, response.text)
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance])


def test_schema_documents_every_endpoint():
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/health", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/files/{name}", "/v1/models",
            "/v1/models/{name}/download"} <= paths
    post = schema.raw_schema["paths"]["/v1/jobs"]["post"]
    assert "429" in post["responses"] and "401" in post["responses"]
