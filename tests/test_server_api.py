"""The HTTP API in-process, over a fake engine (fast): auth, Host guard, validation, queue,
cancel, failures, retention and restart. The real process with the real engine is tested in
test_server_process.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from inference.errors import MissingWeights
from inference.methods import edit_plan, work_plan
from inference.progress import Progress, WorkPlan
from inference.request import LayerSpec, StackRequest
from inference.stack import load_stack
from server.app import ServerInfo, create_app
from server.events import status_stream
from server.jobs import JobManager
from server.progress import DENOISE_SHARE, SAVE_START, overall_fraction
from server.security import allowed_hosts
from tools.fake_engine import BrokenEngine, FakeEngine
from tools.testing import output_entries

PORT = 45123
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SMALL = {"prompt": "a misty lake", "model": "tiny", "method": "independent", "width": 256,
         "height": 256, "steps": 2, "tta_passes": 1}


class Api:
    """A TestClient bound to one JobManager; `wait` polls a job to a terminal state."""

    def __init__(self, root: Path, engine=None, **manager_options):
        self.engine = engine or FakeEngine()
        self.manager = JobManager(self.engine, root, **manager_options)
        self.manager.start()
        app = create_app(self.manager, token=TOKEN, hosts=allowed_hosts("127.0.0.1", PORT),
                         info=ServerInfo(version="test"))
        self.client = TestClient(app, base_url=f"http://127.0.0.1:{PORT}")

    def submit(self, **fields) -> dict:
        r = self.client.post("/v1/jobs", json={**SMALL, **fields}, headers=AUTH)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.client.get(f"/v1/jobs/{job_id}", headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.01)
        raise AssertionError(f"job {job_id} did not finish: {job}")

    def wait_running(self, job_id: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] == "running" and job["progress"]["phase"] == "denoise":
                return job
            time.sleep(0.005)
        raise AssertionError(f"job {job_id} did not start: {job}")

    def close(self):
        self.client.close()
        assert self.manager.close(timeout=5.0)


@pytest.fixture
def api(tmp_path):
    a = Api(tmp_path / "out")
    yield a
    a.close()


@pytest.fixture
def slow_api(tmp_path):
    a = Api(tmp_path / "out", engine=FakeEngine(step_seconds=0.05), max_queue=3)
    yield a
    a.close()


# -- security -------------------------------------------------------------------------

PRIVATE = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
           ("DELETE", "/v1/jobs/x"), ("GET", "/v1/jobs/x/events"),
           ("GET", "/v1/jobs/x/files/stack.json"), ("GET", "/v1/models"),
           ("POST", "/v1/models/tiny/download")]


@pytest.mark.parametrize("method,path", PRIVATE)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", "Basic abc", "Bearer"])
def test_every_endpoint_but_health_needs_the_token(api, method, path, header):
    headers = {"Authorization": header} if header else {}
    r = api.client.request(method, path, headers=headers, json=SMALL if method == "POST" else None)
    assert r.status_code == 401, (method, path, r.text)
    assert r.headers["www-authenticate"] == "Bearer"
    assert "token" in r.json()["detail"]


def test_docs_page_works_offline(api):
    page = api.client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    assert "/openapi.json" in html and "/docs-assets/swagger-ui-bundle.js" in html
    assert "https://" not in html and "http://" not in html  # nothing from a CDN
    script = api.client.get("/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.text
    assert api.client.get("/docs-assets/swagger-ui.css").status_code == 200
    assert api.client.get("/openapi.json").json()["info"]["title"] == "Multiplane inference server"


def test_health_needs_no_token_and_reports_the_queue(api):
    r = api.client.get("/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["version"] == "test"
    assert body["queue_length"] == 0 and body["running"] is None


@pytest.mark.parametrize("host", ["evil.example:45123", "127.0.0.1:1", "localhost", "",
                                  "127.0.0.1.evil.example:45123", "0.0.0.0:45123"])
def test_foreign_host_header_is_rejected(api, host):
    for path in ("/v1/health", "/v1/jobs"):
        r = api.client.get(path, headers={**AUTH, "Host": host})
        assert r.status_code == 421, (host, path)
        assert "Host header" in r.json()["detail"]


@pytest.mark.parametrize("host", ["127.0.0.1:45123", "localhost:45123", "[::1]:45123",
                                  "LOCALHOST:45123"])
def test_loopback_host_names_are_accepted(api, host):
    assert api.client.get("/v1/jobs", headers={**AUTH, "Host": host}).status_code == 200


def test_no_cors_headers(api):
    r = api.client.options("/v1/jobs", headers={"Origin": "http://evil.example",
                                                "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


def test_oversized_body_is_refused_before_parsing(api):
    r = api.client.post("/v1/jobs", content=b"x" * 300_000,
                        headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


# -- validation -----------------------------------------------------------------------

INVALID = [
    ({"prompt": ""}, ["prompt"]),
    ({"prompt": "   "}, ["prompt"]),
    ({"prompt": "x" * 1001}, ["prompt"]),
    ({"negative_prompt": "x" * 1001}, ["negative_prompt"]),
    ({"background": "x" * 1001}, ["background"]),
    ({"layers": [{"prompt": "a"}] * 9}, ["layers"]),
    ({"layers": [{"prompt": ""}]}, ["layers", 0, "prompt"]),
    ({"layers": [{"prompt": "a", "seed": 2**32}]}, ["layers", 0, "seed"]),
    ({"layers": [{"prompt": "a", "seed": -1}]}, ["layers", 0, "seed"]),
    ({"layers": [{"prompt": "a", "box": [0, 0, 1.5, 1]}]}, ["layers", 0, "box"]),
    ({"layers": [{"prompt": "a", "box": [-0.1, 0, 1, 1]}]}, ["layers", 0, "box"]),
    ({"layers": [{"prompt": "a", "box": [0.5, 0, 0.5, 1]}]}, ["layers", 0, "box"]),
    ({"layers": [{"prompt": "a", "box": [0, 0.8, 1, 0.2]}]}, ["layers", 0, "box"]),
    ({"layers": [{"prompt": "a", "box": [0, 0, 1]}]}, ["layers", 0, "box"]),
    ({"layers": [{"prompt": "a", "colour": "red"}]}, ["layers", 0, "colour"]),
    ({"layers": [{"prompt": "a", "name": "x"}, {"prompt": "b", "name": "x"}]}, ["layers"]),
    ({"width": 255}, ["width"]),
    ({"width": 2049}, ["width"]),
    ({"width": 300}, ["width"]),
    ({"width": "512"}, ["width"]),
    ({"width": 512.5}, ["width"]),
    ({"height": 192}, ["height"]),
    ({"height": 4096}, ["height"]),
    ({"steps": 0}, ["steps"]),
    ({"steps": 151}, ["steps"]),
    ({"steps": True}, ["steps"]),
    ({"guidance": -0.5}, ["guidance"]),
    ({"guidance": 30.01}, ["guidance"]),
    ({"seed": -1}, ["seed"]),
    ({"seed": 2**32}, ["seed"]),
    ({"tta_passes": 3}, ["tta_passes"]),
    ({"inter_layer_strength": 4.5}, ["inter_layer_strength"]),
    ({"mask_guidance": -0.1}, ["mask_guidance"]),
    ({"method": "harmonized", "layers": [{"prompt": "a"}, {"prompt": "b"}]}, ["layers"]),
    ({"method": "magic"}, ["method"]),
    ({"model": "no-such-model"}, ["model"]),
    ({"model": "relative/path"}, ["model"]),
    ({"export_psd": "yes"}, ["export_psd"]),
    ({"colour": "red"}, ["colour"]),
    ({"frame": [0.5, 0, 0.4, 1]}, ["frame"]),
    ({"frame": [0, 0, 1, 1.2]}, ["frame"]),
    ({"frame": [0, 0, 1]}, ["frame"]),
    ({"frame": ["0", 0, 1, 1]}, ["frame", 0]),
]


@pytest.mark.parametrize("change,loc", INVALID, ids=[json.dumps(c)[:40] for c, _ in INVALID])
def test_each_out_of_range_field_is_a_422_naming_it(api, change, loc):
    r = api.client.post("/v1/jobs", json={**SMALL, **change}, headers=AUTH)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert ["body", *loc] in [e["loc"] for e in errors], errors
    assert api.manager.list() == []  # nothing was queued


def test_whole_numbers_written_as_floats_are_integers(api):
    """JSON (and JSON Schema's "integer") does not tell 512 from 512.0."""
    job = api.submit(width=512.0, steps=2.0, layers=[{"prompt": "a", "seed": 7.0}])
    assert (job["request"]["width"], job["request"]["steps"]) == (512, 2)
    assert isinstance(job["request"]["width"], int) and job["request"]["layers"][0]["seed"] == 7


def test_custom_validator_messages_are_specific(api):
    r = api.client.post("/v1/jobs", json={**SMALL, "width": 300}, headers=AUTH)
    assert "multiple of 64" in r.json()["detail"][0]["msg"] and "320" in r.json()["detail"][0]["msg"]
    r = api.client.post("/v1/jobs", json={**SMALL, "model": "no-such-model"}, headers=AUTH)
    msg = r.json()["detail"][0]["msg"]
    assert "no-such-model" in msg and "tiny" in msg


def test_a_model_path_missing_on_the_server_is_a_404(api):
    for path in ("/no/such/folder", "/" + "x" * 300, "/nul\x00byte"):
        r = api.client.post("/v1/jobs", json={**SMALL, "model": path}, headers=AUTH)
        assert r.status_code == 404 and "model path" in r.json()["detail"], r.text
    assert api.manager.list() == []


@pytest.mark.parametrize("body", [b"{bad json", b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe{"])
def test_malformed_json_is_a_422(api, body):
    r = api.client.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def test_limits_come_from_the_engine_request_module(api, monkeypatch):
    """The accepted maximum is exactly inference.request's: 2048 ok, 2112 not; 8 layers ok."""
    from inference import request

    ok = {**SMALL, "width": request.MAX_SIZE, "layers": [{"prompt": "a"}] * request.MAX_FOREGROUNDS}
    r = api.client.post("/v1/jobs", json=ok, headers=AUTH)
    assert r.status_code == 202, r.text
    api.client.delete(f"/v1/jobs/{r.json()['id']}", headers=AUTH)


# -- jobs -----------------------------------------------------------------------------

def test_happy_path_files_are_served_from_the_stack(api):
    created = api.submit(layers=[{"prompt": "a heron", "box": [0.1, 0.2, 0.5, 0.9]}],
                         export_psd=True, name="Lake")
    assert created["status"] in ("queued", "running") and created["position"] in (0, 1)
    job = api.wait(created["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["fraction"] == 1.0 and job["error"] is None
    assert job["started"] and job["finished"] and job["created"] <= job["started"] <= job["finished"]
    stack = job["stack"]
    assert stack["name"] == "Lake"
    assert set(stack["files"]) == {"stack.json", "background.png", "layer_01.png", "composite.png",
                                   "stack.psd"}
    assert Path(stack["path"]) == api.manager.output_root / job["id"]
    load_stack(stack["path"])
    for name in stack["files"]:
        r = api.client.get(f"/v1/jobs/{job['id']}/files/{name}", headers=AUTH)
        assert r.status_code == 200
        assert r.content == (Path(stack["path"]) / name).read_bytes()
    manifest = api.client.get(f"/v1/jobs/{job['id']}/files/stack.json", headers=AUTH).json()
    assert manifest["layers"][1]["box"] == [0.1, 0.2, 0.5, 0.9]


def test_the_frame_is_recorded_and_boxes_stay_in_frame_coordinates(api):
    job = api.wait(api.submit(width=384, height=256, frame=[0.125, 0.0, 0.875, 0.75],
                              layers=[{"prompt": "a heron", "box": [0.1, 0.2, 0.5, 0.9]}])["id"])
    assert job["status"] == "succeeded", job
    assert job["request"]["frame"] == [0.125, 0.0, 0.875, 0.75]
    manifest = api.client.get(f"/v1/jobs/{job['id']}/files/stack.json", headers=AUTH).json()
    assert manifest["frame"] == [0.125, 0.0, 0.875, 0.75] and manifest["width"] == 384
    assert manifest["layers"][1]["box"] == [0.1, 0.2, 0.5, 0.9]
    import numpy as np
    from PIL import Image

    from tools.fake_engine import FAKE_FRAME_COLOUR, FAKE_MARGIN_COLOUR

    background = np.asarray(Image.open(Path(job["stack"]["path"]) / "background.png"))
    assert background[:192, 48:336].reshape(-1, 3).tolist() == [list(FAKE_FRAME_COLOUR)] * (192 * 288)
    assert background[192:].reshape(-1, 3).tolist() == [list(FAKE_MARGIN_COLOUR)] * (64 * 384)
    plain = api.wait(api.submit()["id"])
    assert api.client.get(f"/v1/jobs/{plain['id']}/files/stack.json", headers=AUTH).json()["frame"] is None


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "%2E%2E", ".hidden", "nothing.png",
                                  "%2Fetc%2Fpasswd", "stack.json%00.png"])
def test_only_listed_files_are_served(api, name):
    job = api.wait(api.submit()["id"])
    (Path(job["stack"]["path"]) / "extra.txt").write_text("not listed")
    for bad in (name, "extra.txt"):
        r = api.client.get(f"/v1/jobs/{job['id']}/files/{bad}", headers=AUTH)
        assert r.status_code == 404, (bad, r.status_code)


def test_unknown_job_is_404(api):
    for method, path in [("GET", "/v1/jobs/nope"), ("DELETE", "/v1/jobs/nope"),
                         ("GET", "/v1/jobs/nope/events"), ("GET", "/v1/jobs/nope/files/stack.json"),
                         ("GET", "/v1/jobs/..%2F..")]:
        assert api.client.request(method, path, headers=AUTH).status_code == 404, path


def test_jobs_run_in_fifo_order_and_report_positions(tmp_path):
    a = Api(tmp_path / "out", engine=FakeEngine(step_seconds=0.02))
    try:
        jobs = [a.submit(prompt=f"job {i}") for i in range(5)]
        assert [j["position"] for j in jobs] == [0, 1, 2, 3, 4]
        done = [a.wait(j["id"]) for j in jobs]
        assert all(j["status"] == "succeeded" for j in done)
        assert a.engine.calls == [f"job {i}" for i in range(5)]
        starts = [j["started"] for j in done]
        assert starts == sorted(starts)
        listed = a.client.get("/v1/jobs", headers=AUTH).json()["jobs"]
        assert [j["id"] for j in listed] == [j["id"] for j in reversed(jobs)]  # newest first
    finally:
        a.close()


def test_full_queue_is_a_429_with_a_message(slow_api):
    first = slow_api.submit(steps=40)
    slow_api.wait_running(first["id"])
    waiting = [slow_api.submit() for _ in range(3)]
    r = slow_api.client.post("/v1/jobs", json=SMALL, headers=AUTH)
    assert r.status_code == 429
    assert "queue is full" in r.json()["detail"]
    assert slow_api.client.get("/v1/health").json()["queue_length"] == 3
    for job in [first, *waiting]:
        slow_api.client.delete(f"/v1/jobs/{job['id']}", headers=AUTH)


def test_cancel_queued_job_is_immediate_and_it_never_runs(slow_api):
    running = slow_api.submit(steps=20, prompt="running")
    queued = slow_api.submit(prompt="queued")
    behind = slow_api.submit(prompt="behind")
    assert slow_api.job(behind["id"])["position"] == 2
    r = slow_api.client.delete(f"/v1/jobs/{queued['id']}", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert slow_api.job(behind["id"])["position"] == 1  # moved up
    assert slow_api.wait(behind["id"])["status"] == "succeeded"
    assert "queued" not in slow_api.engine.calls
    assert slow_api.job(running["id"])["status"] == "succeeded"
    assert not (slow_api.manager.output_root / queued["id"]).exists()


def test_cancel_running_job_stops_within_a_step(slow_api):
    job = slow_api.submit(steps=100)
    slow_api.wait_running(job["id"])
    t0 = time.monotonic()
    r = slow_api.client.delete(f"/v1/jobs/{job['id']}", headers=AUTH)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = slow_api.wait(job["id"])
    assert done["status"] == "cancelled" and done["stack"] is None
    assert time.monotonic() - t0 < 0.5  # one fake step is 0.05 s
    assert done["progress"]["step"] < 100
    assert output_entries(slow_api.manager.output_root) == []  # no folder, no temp folder
    r = slow_api.client.delete(f"/v1/jobs/{job['id']}", headers=AUTH)
    assert r.status_code == 409


def test_engine_error_fails_the_job_with_its_message(tmp_path):
    engine = FakeEngine(fail_with=MissingWeights(["unet.safetensors"], "run the download"))
    a = Api(tmp_path / "out", engine=engine)
    try:
        job = a.wait(a.submit()["id"])
        assert job["status"] == "failed"
        assert job["error"].startswith("missing model files:") and "unet.safetensors" in job["error"]
    finally:
        a.close()


def test_unexpected_error_is_reported_and_the_server_keeps_serving(tmp_path, caplog):
    a = Api(tmp_path / "out", engine=BrokenEngine())
    try:
        job = a.wait(a.submit()["id"])
        assert job["status"] == "failed"
        assert job["error"] == "internal error: RuntimeError: simulated crash"
        assert "Traceback" in caplog.text and "simulated crash" in caplog.text
        a.engine.fail_with = None
        assert a.wait(a.submit()["id"])["status"] == "succeeded"
    finally:
        a.close()


def test_out_of_memory_frees_the_model(tmp_path):
    class OutOfMemoryError(RuntimeError):
        pass

    engine = FakeEngine(fail_with=OutOfMemoryError("CUDA out of memory"))
    a = Api(tmp_path / "out", engine=engine)
    try:
        job = a.wait(a.submit()["id"])
        assert job["status"] == "failed" and job["error"].startswith("out of memory")
        assert engine.loaded_model is None
    finally:
        a.close()


def test_progress_is_monotone_and_reaches_one(slow_api):
    api = slow_api
    seen = []
    api.submit(steps=2)  # keeps the worker busy while we subscribe
    job = api.submit(layers=[{"prompt": "a"}, {"prompt": "b"}], steps=3)
    first, unsubscribe = api.manager.subscribe(job["id"], lambda s: s and seen.append(s))
    assert first.status == "queued"
    api.wait(job["id"])
    unsubscribe()
    fractions = [s.progress.fraction for s in [first, *seen]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    versions = [s.version for s in seen]
    assert versions == sorted(set(versions))  # one snapshot per change, in order
    layers = {s.progress.layer for s in seen if s.progress.phase == "denoise"}
    assert layers == {0, 1, 2}


def test_overall_fraction_weights_layers_equally():
    plan = WorkPlan(layers=3, steps=10)  # layer after layer (`independent`)

    def f(phase, step=0, total=0, layer=None, layers=3):
        return overall_fraction(plan, Progress(phase=phase, step=step, total=total, layer=layer, layers=layers))

    assert f("load") == 0.0
    assert f("denoise", 0, 10, 0) == 0.0
    assert f("denoise", 10, 10, 0) == pytest.approx(SAVE_START * DENOISE_SHARE / 3)
    assert f("decode", 1, 1, 0) == pytest.approx(SAVE_START / 3)
    assert f("denoise", 5, 10, 1) == pytest.approx(SAVE_START * (1 + DENOISE_SHARE / 2) / 3)
    assert f("decode", 1, 1, 2) == pytest.approx(SAVE_START)
    assert f("save") == SAVE_START
    # every event of a 3-layer job, in the engine's order, never goes down
    events = [("load", 0, 0, None)]
    for layer in range(3):
        events += [("denoise", s, 4, layer) for s in range(5)] + [("decode", s, 8, layer) for s in range(9)]
    values = [f(*e) for e in events] + [f("save")]
    assert values == sorted(values)


def test_fraction_of_joint_methods_covers_all_layers_while_denoising():
    request = StackRequest(prompt="p", method="joint", steps=6, layers=(LayerSpec("a"), LayerSpec("b")))
    plan = work_plan(request)  # declared by the method before anything runs
    assert plan.joint and plan.layers == 3
    events = [Progress("load")]
    events += [Progress("denoise", s, 6, None, 3) for s in range(7)]  # all layers at once
    for layer in range(3):
        events += [Progress("decode", s, 2, layer, 3) for s in range(3)]
    events.append(Progress("save", layers=3))
    values = [overall_fraction(plan, p) for p in events]
    assert values == sorted(values)
    assert values[7] == pytest.approx(SAVE_START * DENOISE_SHARE)  # denoise done for all layers
    assert values[-2] == pytest.approx(SAVE_START)
    # The very first report already counts against all three layers, not against the first.
    assert values[1] == 0.0 and values[2] == pytest.approx(SAVE_START * DENOISE_SHARE / 6)


def test_fraction_of_a_regenerated_layer_gives_its_decode_the_whole_decode_share():
    plan = edit_plan(layers=3, steps=4, regenerated=2)  # only layer 2 is decoded again
    denoised = overall_fraction(plan, Progress("denoise", 4, 4, None, 3))
    halfway = overall_fraction(plan, Progress("decode", 1, 2, 2, 3))
    decoded = overall_fraction(plan, Progress("decode", 2, 2, 2, 3))
    assert denoised == pytest.approx(SAVE_START * DENOISE_SHARE)
    assert halfway == pytest.approx(SAVE_START * (DENOISE_SHARE + (1 - DENOISE_SHARE) / 2))
    assert decoded == pytest.approx(SAVE_START)


def test_harmonized_plan_counts_both_passes():
    request = StackRequest(prompt="p", method="harmonized", steps=5, layers=(LayerSpec("a"),))
    plan = work_plan(request)
    assert (plan.joint, plan.runs, plan.layers) == (True, 2, 2)
    # the engine reports one step counter over both passes (total 2 × steps)
    assert overall_fraction(plan, Progress("denoise", 5, 10, None, 2)) == pytest.approx(
        SAVE_START * DENOISE_SHARE / 2)


def test_eta_is_estimated_while_denoising(tmp_path):
    a = Api(tmp_path / "out", engine=FakeEngine(step_seconds=0.02))
    try:
        job = a.submit(steps=30)
        deadline = time.monotonic() + 5
        eta = None
        while eta is None and time.monotonic() < deadline:
            eta = a.job(job["id"])["progress"]["eta_seconds"]
            time.sleep(0.02)
        assert eta is not None and 0 < eta < 5
        a.wait(job["id"])
    finally:
        a.close()


def test_retention_removes_the_oldest_stacks(tmp_path):
    a = Api(tmp_path / "out", retention=2)
    try:
        ids = []
        for i in range(4):
            ids.append(a.wait(a.submit(prompt=f"p{i}")["id"])["id"])
        folders = output_entries(a.manager.output_root)
        assert folders == sorted(ids[2:])
        listed = [j["id"] for j in a.client.get("/v1/jobs", headers=AUTH).json()["jobs"]]
        assert listed == [ids[3], ids[2]]
        assert a.client.get(f"/v1/jobs/{ids[0]}", headers=AUTH).status_code == 404
    finally:
        a.close()


def test_restart_lists_finished_stacks_and_serves_them(tmp_path):
    root = tmp_path / "out"
    a = Api(root)
    job = a.wait(a.submit(name="Kept", layers=[{"prompt": "a"}])["id"])
    a.close()
    # leftovers of a crash: a half-written stack and a foreign folder
    (root / f".{'x' * 5}.tmp-0123abcd").mkdir()
    (root / "not-a-stack").mkdir()
    b = Api(root)
    try:
        listed = b.client.get("/v1/jobs", headers=AUTH).json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        restored = listed[0]
        assert restored["status"] == "succeeded" and restored["stack"]["name"] == "Kept"
        assert restored["stack"]["files"] == job["stack"]["files"]
        r = b.client.get(f"/v1/jobs/{job['id']}/files/layer_01.png", headers=AUTH)
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert output_entries(root) == sorted([job["id"], "not-a-stack"])
    finally:
        b.close()


def test_models_are_listed_with_availability(api, tmp_path):
    r = api.client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert "tiny" in models and "sdxl" in models
    assert isinstance(models["sdxl"]["available"], bool)
    # The canvas planner's budget per model: its native size squared.
    for name, size in (("sdxl", 1024), ("sd15", 512), ("tiny", 256)):
        assert models[name]["details"]["default_size"] == size
        assert models[name]["details"]["pixel_budget"] == size * size


def test_listing_models_does_not_import_torch(tmp_path):
    """GET /v1/models on a cold server answers Test Connection's short timeout: listing the
    presets reads files only (importing torch alone took seconds on a busy machine)."""
    import subprocess
    import sys

    code = ("import sys; from server.presets import list_presets; list_presets(None); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_download_of_unknown_model_is_404(api):
    r = api.client.post("/v1/models/no-such-model/download", headers=AUTH)
    assert r.status_code == 404 and "no-such-model" in r.json()["detail"]


def test_shutdown_cancels_queued_and_running_jobs(tmp_path):
    a = Api(tmp_path / "out", engine=FakeEngine(step_seconds=0.05))
    running = a.submit(steps=100)
    queued = a.submit()
    a.wait_running(running["id"])
    t0 = time.monotonic()
    assert a.manager.close(timeout=2.0)
    assert time.monotonic() - t0 < 0.5
    assert a.manager.get(running["id"]).status == "cancelled"
    assert a.manager.get(queued["id"]).status == "cancelled"
    assert output_entries(a.manager.output_root) == []
    r = a.client.post("/v1/jobs", json=SMALL, headers=AUTH)
    assert r.status_code == 503
    a.client.close()


def test_download_job_reports_through_the_jobs_endpoints(api):
    """The tiny model needs no download (it is built locally): the job succeeds."""
    r = api.client.post("/v1/models/tiny/download", headers=AUTH)
    assert r.status_code == 202 and r.json()["kind"] == "download" and r.json()["model"] == "tiny"
    job = api.wait(r.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["progress"]["fraction"] == 1.0 and job["stack"] is None
    # downloads do not occupy the generation queue
    assert api.client.get("/v1/health").json()["queue_length"] == 0


def test_download_without_network_fails_listing_the_files(api, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache: all is missing
    r = api.client.post("/v1/models/sdxl/download", headers=AUTH)
    assert r.status_code == 202
    job = api.wait(r.json()["id"], timeout=60)
    assert job["status"] == "failed"
    assert job["error"].startswith("missing model files:") and "Offline" in job["error"]
    # a generation job still runs afterwards
    assert api.wait(api.submit()["id"])["status"] == "succeeded"


def test_event_stream_sends_keepalives_and_ends_after_terminal_status():
    import asyncio

    from server.schemas import JobOut

    async def collect():
        updates: asyncio.Queue = asyncio.Queue()
        unsubscribed = []
        def snapshot(version: int, status: str) -> JobOut:
            return JobOut(id="j", kind="generate", status=status, created="2026-12-01T00:00:00Z", version=version)

        first = snapshot(1, "running")
        chunks = []

        async def feed():
            await asyncio.sleep(0.12)
            updates.put_nowait(snapshot(1, "running"))  # stale: not sent again
            updates.put_nowait(snapshot(2, "cancelled"))
            updates.put_nowait(snapshot(3, "running"))  # after the end: ignored

        feeder = asyncio.ensure_future(feed())
        async for chunk in status_stream(first, updates, lambda: unsubscribed.append(True), 0.05):
            chunks.append(chunk)
        await feeder
        return chunks, unsubscribed

    chunks, unsubscribed = asyncio.run(collect())
    events = [c for c in chunks if c.startswith("id:")]
    assert [json.loads(e.split("data: ", 1)[1])["version"] for e in events] == [1, 2]
    assert events[0].startswith("id: 1\nevent: status\ndata: ") and events[0].endswith("\n\n")
    assert chunks.count(": keep-alive\n\n") >= 1
    assert unsubscribed == [True]


# -- extend (outpainting for a new shot) -----------------------------------------------

@pytest.mark.parametrize("body, loc, needle", [
    ({"margins": [0.25, -0.1, 0, 0]}, ["margins"], "margins.top = -0.1 is outside 0..4"),
    ({"margins": [0.25, 0, 0]}, ["margins"], "at least 4"),
    ({"margins": [0.25, 0, 0, "0"]}, ["margins", 3], ""),
    ({"margins": [4, 0, 4, 0]}, ["margins"], "more than the cap of 2048"),
    ({"margins": [0, 0, 0, 0]}, ["margins"], "nothing to extend"),
    ({"margins": [0.25, 0, 0, 0], "tta_passes": 3}, ["tta_passes"], "must be one of"),
    ({"margins": [0.25, 0, 0, 0], "seed": 1}, ["seed"], ""),
])
def test_extend_refuses_bad_margins_by_name_before_queueing(api, body, loc, needle):
    job = api.wait(api.submit()["id"])
    r = api.client.post(f"/v1/jobs/{job['id']}/extend", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    matching = [e for e in errors if e["loc"] == ["body", *loc]]
    assert matching and needle in matching[0]["msg"], errors
    assert [j.id for j in api.manager.list()] == [job["id"]]  # nothing was queued


def test_extend_writes_a_new_larger_stack_and_leaves_the_old_one(api):
    from inference.canvas import plan_extension

    source = api.wait(api.submit(width=384, height=256, frame=[0.125, 0.0, 0.875, 0.75],
                                 layers=[{"prompt": "a heron", "box": [0.1, 0.2, 0.5, 0.9], "depth": 4.0}],
                                 name="Lake")["id"])
    folder = Path(source["stack"]["path"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    r = api.client.post(f"/v1/jobs/{source['id']}/extend", json={"margins": [0.5, 0.1, 0.2, 0.0]}, headers=AUTH)
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["kind"] == "extend" and created["request"]["source"] == source["id"]
    assert created["request"]["margins"] == [0.5, 0.1, 0.2, 0.0] and created["model"] == "tiny"
    job = api.wait(created["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["fraction"] == 1.0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    plan = plan_extension(384, 256, (0.125, 0.0, 0.875, 0.75), (0.5, 0.1, 0.2, 0.0))
    manifest = api.client.get(f"/v1/jobs/{job['id']}/files/stack.json", headers=AUTH).json()
    assert (manifest["width"], manifest["height"]) == (plan.width, plan.height)
    assert manifest["frame"] == pytest.approx(list(plan.frame)) and manifest["name"] == "Lake"
    assert manifest["layers"][1]["box"] == [0.1, 0.2, 0.5, 0.9] and manifest["layers"][1]["depth"] == 4.0
    assert manifest["shot"]["margins"] == [0.5, 0.1, 0.2, 0.0]
    # An extended stack can be extended again, like any finished one.
    again = api.client.post(f"/v1/jobs/{job['id']}/extend", json={"margins": [1.0, 0.1, 0.2, 0.0]}, headers=AUTH)
    assert again.status_code == 202 and api.wait(again.json()["id"])["status"] == "succeeded"


def test_extend_needs_a_finished_stack(api, tmp_path):
    assert api.client.post("/v1/jobs/nope/extend", json={"margins": [0.1, 0, 0, 0]},
                           headers=AUTH).status_code == 404
    slow = Api(tmp_path / "slow", engine=FakeEngine(step_seconds=0.2))
    try:
        running = slow.submit(steps=50)
        r = slow.client.post(f"/v1/jobs/{running['id']}/extend", json={"margins": [0.1, 0, 0, 0]}, headers=AUTH)
        assert r.status_code == 409 and "no finished stack" in r.json()["detail"]
        slow.client.delete(f"/v1/jobs/{running['id']}", headers=AUTH)
    finally:
        slow.close()


def test_a_stack_from_an_earlier_run_can_be_extended(tmp_path):
    """Like regenerate: a stack listed after a restart is a job, and extends by its id."""
    root = tmp_path / "out"
    a = Api(root)
    job = a.wait(a.submit(name="Kept")["id"])
    a.close()
    b = Api(root)
    try:
        r = b.client.post(f"/v1/jobs/{job['id']}/extend", json={"margins": [0.0, 0.5, 0.0, 0.0]}, headers=AUTH)
        assert r.status_code == 202, r.text
        done = b.wait(r.json()["id"])
        assert done["status"] == "succeeded", done
        assert load_stack(done["stack"]["path"]).height == 384  # 256 + 128 above, in 64-pixel tiles
    finally:
        b.close()


def test_several_engines_run_jobs_side_by_side_in_arrival_order(tmp_path):
    """--devices in-process: one worker per engine, the queue's head to the first free one."""
    engines = [FakeEngine(step_seconds=0.02), FakeEngine(step_seconds=0.02)]
    for i, engine in enumerate(engines):
        engine.device = f"fake:{i}"
    a = Api(tmp_path / "out", engine=engines)
    try:
        jobs = [a.submit(prompt=f"job {i}", steps=3) for i in range(6)]
        done = [a.wait(j["id"]) for j in jobs]
        assert all(j["status"] == "succeeded" for j in done)
        starts = [j["started"] for j in done]
        assert starts == sorted(starts)
        assert {j["device"] for j in done} == {"fake:0", "fake:1"}
        assert sorted(engines[0].calls + engines[1].calls) == sorted(f"job {i}" for i in range(6))
        health = a.client.get("/v1/health").json()
        assert [d["device"] for d in health["devices"]] == ["fake:0", "fake:1"]
        assert all(d["running"] is None and d["loaded_model"] == "tiny" for d in health["devices"])
    finally:
        a.close()
