"""Property-based fuzzing of the OpenAPI schema (schemathesis, every check it has): whatever a
client sends that the schema allows (and much it does not), the server never answers 5xx,
accepts what the schema allows, refuses what it forbids, and its answers match the
documented schemas. In-process over a fake engine, bounded to a few seconds per endpoint."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from inference.errors import MultiplaneError
from inference.models import preset_names
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


def states_only_json_schema_rules(body) -> bool:
    """False for a job body breaking one of the documented rules JSON Schema cannot state
    (so the schema cannot promise them): a box's or the frame's x0 < x1 and y0 < y1, unique
    layer names, and a model that is a preset or an existing path on the server. Only these
    are left out; every other body is sent and judged by every check."""
    if not isinstance(body, dict):
        return True
    if not _ordered_rect(body.get("frame")):
        return False
    model = body.get("model")
    if isinstance(model, str) and model.lower() not in preset_names() and not os.path.exists(model):
        return False
    layers = body.get("layers")
    if not isinstance(layers, list):
        return True
    names = [layer.get("name") for layer in layers if isinstance(layer, dict) and layer.get("name")]
    if len(names) != len(set(names)):
        return False
    return all(_ordered_rect(layer.get("box") if isinstance(layer, dict) else None) for layer in layers)


def _ordered_rect(rect) -> bool:
    """False only for four numbers that are not x0 < x1 and y0 < y1."""
    if isinstance(rect, list) and len(rect) == 4 and all(isinstance(v, (int, float)) for v in rect):
        return rect[0] < rect[2] and rect[1] < rect[3]
    return True


schema.hook("filter_body")(lambda _context, body: states_only_json_schema_rules(body))
# The coverage phase builds its boundary bodies without hooks (a [0, 0, 0, 0] box is on the
# schema's boundary and breaks x0 < x1), so there, and only there, schema-valid bodies are
# not required to be accepted; the fuzzing phase requires it of every filtered body.
schema.config.phases.coverage.checks.positive_data_acceptance.enabled = False


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_never_errors_and_matches_its_schema(case):
    if case.path.endswith("/events"):
        pytest.skip("streams are covered in test_server_process.py")
    case.call_and_validate(headers=HEADERS)  # every check schemathesis has, 5xx included


def test_schema_documents_every_endpoint():
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/health", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/files/{name}", "/v1/models",
            "/v1/models/{name}/download"} <= paths
    post = schema.raw_schema["paths"]["/v1/jobs"]["post"]
    assert "429" in post["responses"] and "401" in post["responses"]
