"""The real server process (`python -m server serve`) with the real engine and the tiny model,
over loopback: announce, token and Host checks, end to end with SSE, cancel, 20 concurrent jobs.
The process life cycle (parent death, stdin, signals, restart) is in test_server_lifecycle.py."""
from __future__ import annotations

import selectors
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from inference.stack import load_stack
from tools.testing import FAST, ServerProcess, output_entries, sse_events

pytestmark = pytest.mark.slow


def hidden_entries(root: Path) -> list[str]:
    return [name for name in output_entries(root) if name.startswith(".")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve") / "stacks"
    s = ServerProcess(root)
    s.wait(s.submit()["id"])  # warm: the tiny model is built and loaded once
    yield s
    s.stop()


# -- announce, auth, host -------------------------------------------------------------

def test_ready_line_and_generated_token_file(tmp_path):
    s = ServerProcess(tmp_path / "stacks", token=None)
    try:
        ready = s.ready
        assert ready["event"] == "ready" and ready["pid"] == s.proc.pid
        assert ready["url"].startswith("http://127.0.0.1:") and int(ready["url"].rsplit(":", 1)[1]) > 0
        from server import __version__

        assert ready["version"] == __version__
        token_file = Path(ready["token_file"])
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        assert len(s.token) >= 32
        assert s.client.get("/v1/jobs").status_code == 200
        assert httpx.get(f"{s.url}/v1/jobs").status_code == 401
        health = httpx.get(f"{s.url}/v1/health").json()
        assert health["device"]["type"] == "cpu" and health["torch"] and health["diffusers"]
        # exactly one line on stdout, then end-of-file while the server keeps running
        sel = selectors.DefaultSelector()
        sel.register(s.proc.stdout, selectors.EVENT_READ)
        assert sel.select(5), "stdout still open after the ready line"
        assert s.proc.stdout.read() == b""
        assert s.proc.poll() is None and s.client.get("/v1/health").status_code == 200
        s.proc.send_signal(signal.SIGINT)
        assert s.wait_exit(5) == 0
        assert not token_file.exists()
    finally:
        s.stop()


def test_token_and_host_are_enforced(server):
    url = server.url
    assert httpx.get(f"{url}/v1/jobs").status_code == 401
    assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{int(port) + 1}"):
        r = server.client.get("/v1/health", headers={"Host": host})
        assert r.status_code == 421, host
    assert server.client.get("/v1/jobs", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_bad_bodies_are_422_naming_the_field(server):
    r = server.client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    for change, loc in [({"width": 100}, "width"), ({"steps": 1000}, "steps"),
                        ({"model": "nope"}, "model"), ({"surprise": 1}, "surprise")]:
        r = server.client.post("/v1/jobs", json={**FAST, **change})
        assert r.status_code == 422 and ["body", loc] in [e["loc"] for e in r.json()["detail"]]


# -- the job life cycle with the real engine ------------------------------------------

def test_end_to_end_with_sse_and_downloadable_stack(server, tmp_path):
    job = server.submit(layers=[{"prompt": "a heron", "box": [0.1, 0.1, 0.6, 0.9], "name": "heron"}],
                        background="reeds and water", seed=7)
    events = [e for _, e in sse_events(server, job["id"])]
    assert events[-1]["status"] == "succeeded", events[-1]
    assert events[0]["id"] == job["id"]
    versions = [e["version"] for e in events]
    assert versions == sorted(set(versions))
    fractions = [e["progress"]["fraction"] for e in events]
    assert fractions == sorted(fractions), fractions  # never decreases
    assert fractions[-1] == 1.0
    phases = [e["progress"]["phase"] for e in events]
    assert {"denoise", "decode", "save"} <= set(phases)
    denoise_events = [e for e in events if e["progress"]["phase"] == "denoise"]
    denoise_steps = [(e["progress"]["layer"], e["progress"]["step"]) for e in denoise_events]
    for before, after in zip(denoise_events, denoise_events[1:]):
        if (before["progress"]["layer"], before["progress"]["step"]) == (after["progress"]["layer"],
                                                                         after["progress"]["step"]):
            # a live-preview refresh is a change too: the same step, new previews
            assert after["previews"] and after["previews"] != before["previews"], (before, after)
    denoise_steps = [step for i, step in enumerate(denoise_steps) if i == 0 or step != denoise_steps[i - 1]]
    # The stream starts with the snapshot current when it connects (a warm tiny model may be
    # past its first step by then), then carries one event per change.
    expected = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert denoise_steps and denoise_steps == expected[expected.index(denoise_steps[0]):], denoise_steps

    final = server.job(job["id"])
    files = final["stack"]["files"]
    assert {"stack.json", "background.png", "layer_01.png", "composite.png"} <= set(files)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in files:
        r = server.client.get(f"/v1/jobs/{job['id']}/files/{name}")
        assert r.status_code == 200
        (copy / name).write_bytes(r.content)
    stack = load_stack(copy)  # a complete, valid stack
    assert stack.layers[1].name == "heron" and list(stack.layers[1].box) == [0.1, 0.1, 0.6, 0.9]
    assert stack.width == 256 and stack.seed == 7
    assert server.client.get(f"/v1/jobs/{job['id']}/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
    listed = [j["id"] for j in server.client.get("/v1/jobs").json()["jobs"]]
    assert job["id"] in listed


@pytest.mark.parametrize("method,layers", [("joint", 2), ("harmonized", 1)])
def test_methods_that_denoise_layers_together(server, method, layers):
    job = server.submit(method=method, layers=[{"prompt": f"thing {i}"} for i in range(layers)])
    events = [e for _, e in sse_events(server, job["id"])]
    final = events[-1]
    assert final["status"] == "succeeded", final["error"]
    fractions = [e["progress"]["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    joint_steps = [e for e in events if e["progress"]["phase"] == "denoise" and e["progress"]["layer"] is None]
    assert joint_steps, "these methods denoise all layers in one run"
    files = final["stack"]["files"]
    if method == "harmonized":
        assert {"mask_01.png", "blended.png"} <= set(files)
    for name in files:
        assert server.client.get(f"/v1/jobs/{job['id']}/files/{name}").status_code == 200


def test_cancel_running_job_stops_within_one_step(server):
    job = server.submit(steps=60)
    server.wait_for_step(job["id"], 1)
    cancel_sent = {}
    events: list[tuple[float, dict]] = []

    seen_steps = threading.Event()
    count = [0]

    def on_event(e):
        count[0] += e["progress"]["phase"] == "denoise"
        if count[0] >= 4:  # enough steps seen to know how long one takes
            seen_steps.set()

    def watch():
        events.extend(sse_events(server, job["id"], on_event))

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert seen_steps.wait(60)
    r = server.client.delete(f"/v1/jobs/{job['id']}")
    cancel_sent["answered"] = time.monotonic()
    assert r.status_code == 200 and r.json()["cancel_requested"]
    watcher.join(30)
    assert events and events[-1][1]["status"] == "cancelled"
    # "Within one step" counted in steps, not seconds (a busy machine stretches both alike):
    # after the cancel was answered, only the step in flight and at most one more report.
    after = [e for t, e in events if t > cancel_sent["answered"] and e["progress"]["phase"] == "denoise"
             and e["status"] == "running"]
    steps_after = {e["progress"]["step"] for e in after}
    assert len(steps_after) <= 2, steps_after  # the step in flight, at most one more
    assert events[-1][1]["progress"]["step"] < 60
    assert job["id"] not in [p.name for p in server.root.iterdir()]
    assert hidden_entries(server.root) == []


def test_cancel_queued_job(server):
    running = server.submit(steps=40)
    queued = server.submit(prompt="never runs")
    server.wait_for_step(running["id"], 1)
    r = server.client.delete(f"/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    server.client.delete(f"/v1/jobs/{running['id']}")
    assert server.wait(running["id"])["status"] == "cancelled"
    assert server.job(queued["id"])["started"] is None


def test_twenty_concurrent_submissions_fifo_and_flat_memory(server):
    proc = psutil.Process(server.ready["pid"])
    server.wait(server.submit(steps=1)["id"])
    rss_before = proc.memory_info().rss

    def submit(i):
        r = httpx.post(f"{server.url}/v1/jobs", json={**FAST, "steps": 1, "prompt": f"job {i}"},
                       headers={"Authorization": f"Bearer {server.token}"}, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()

    with ThreadPoolExecutor(20) as pool:
        created = list(pool.map(submit, range(20)))
    done = [server.wait(j["id"], timeout=120) for j in created]
    assert all(j["status"] == "succeeded" for j in done), [j["error"] for j in done]
    arrival = sorted(done, key=lambda j: (j["created"], j["id"]))
    # first come, first served: start times follow arrival (creation) order
    by_start = sorted(done, key=lambda j: j["started"])
    assert [j["id"] for j in by_start] == [j["id"] for j in arrival]
    rss_after = proc.memory_info().rss
    growth_mb = (rss_after - rss_before) / 2**20
    assert growth_mb < 60, f"server RSS grew {growth_mb:.1f} MB over 20 jobs"


def test_regenerate_one_layer_as_a_new_job(server):
    import hashlib

    job = server.submit(method="joint", layers=[{"prompt": "a heron"}, {"prompt": "a reed"}])
    final = [e for _, e in sse_events(server, job["id"])][-1]
    assert final["status"] == "succeeded", final["error"]

    r = server.client.post(f"/v1/jobs/{job['id']}/regenerate", json={"layer_index": 5, "seed": 3})
    assert r.status_code == 422 and "layer_index" in r.text
    r = server.client.post(f"/v1/jobs/{job['id']}/regenerate", json={"layer_index": 1})
    assert r.status_code == 422 and "prompt" in r.text
    r = server.client.post(f"/v1/jobs/{job['id']}/regenerate",
                           json={"layer_index": 2, "prompt": "a cattail", "tta_passes": 1})
    assert r.status_code == 202, r.text
    edit = r.json()
    assert edit["kind"] == "regenerate" and edit["request"]["source"] == job["id"]
    done = [e for _, e in sse_events(server, edit["id"])][-1]
    assert done["status"] == "succeeded", done["error"]

    def digest(job_id, name):
        return hashlib.sha256(server.client.get(f"/v1/jobs/{job_id}/files/{name}").content).hexdigest()

    assert digest(edit["id"], "background.png") == digest(job["id"], "background.png")
    assert digest(edit["id"], "layer_01.png") == digest(job["id"], "layer_01.png")
    assert digest(edit["id"], "layer_02.png") != digest(job["id"], "layer_02.png")
    assert server.client.post("/v1/jobs/nope/regenerate", json={"layer_index": 0, "seed": 1}).status_code == 404


def test_extend_a_stack_as_a_new_job(server):
    """The worker runs the real Engine.extend: a larger stack, the old one untouched."""
    import numpy as np

    from inference.stack import load_layer_images

    job = server.wait(server.submit(method="joint", layers=[{"prompt": "a heron", "box": [0.2, 0.2, 0.8, 1.0]}])["id"])
    assert job["status"] == "succeeded", job["error"]
    old_dir = Path(job["stack"]["path"])
    before = {p.name: p.read_bytes() for p in old_dir.iterdir()}
    r = server.client.post(f"/v1/jobs/{job['id']}/extend", json={"margins": [0.0, 0.0, 0.3, 0.0], "tta_passes": 1})
    assert r.status_code == 202, r.text
    done = [e for _, e in sse_events(server, r.json()["id"])][-1]
    assert done["status"] == "succeeded", done["error"]
    assert done["kind"] == "extend" and done["progress"]["fraction"] == 1.0
    assert {p.name: p.read_bytes() for p in old_dir.iterdir()} == before
    old, new = load_stack(old_dir), load_stack(done["stack"]["path"])
    assert new.width > old.width and new.height == old.height and new.frame[0] == 0.0
    assert [layer.name for layer in new.layers] == [layer.name for layer in old.layers]
    kept = load_layer_images(old, old_dir)
    for before_px, after_px in zip(kept, load_layer_images(new, done["stack"]["path"])):
        np.testing.assert_array_equal(after_px[:, :old.width - 4], before_px[:, :old.width - 4])
