"""Several GPUs in one box (issue 12 part 7): `--devices` gives one worker per device, each
with its own engine; jobs go to the first free worker in FIFO order; health lists the devices
and what each runs; a cancel stops only its own job. A real server process over two fake
engines (`tools/fake_server.py` accepts any device name)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tools.testing import REPO, ServerProcess

pytestmark = pytest.mark.slow

DEVICES = ("fake:0", "fake:1")


def wait_until(predicate, timeout: float = 30.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_workers_run_two_jobs_at_once_in_order_and_cancel_hits_the_right_one(tmp_path):
    s = ServerProcess(tmp_path / "stacks", fake_step_seconds=0.1, extra_args=("--devices", ",".join(DEVICES)))
    try:
        health = s.client.get("/v1/health").json()
        assert [d["device"] for d in health["devices"]] == list(DEVICES)
        assert all(d["running"] is None and d["loaded_model"] is None for d in health["devices"])

        first, second = s.submit(steps=40, prompt="first"), s.submit(steps=40, prompt="second")
        third = s.submit(steps=2, prompt="third")
        both = wait_until(lambda: all(s.job(j["id"])["status"] == "running" for j in (first, second)),
                          what="two jobs running at once")
        assert both
        a, b = s.job(first["id"]), s.job(second["id"])
        assert {a["device"], b["device"]} == set(DEVICES)  # one per device
        assert a["device"] == DEVICES[0]  # the first job to the first free worker
        waiting = s.job(third["id"])
        assert waiting["status"] == "queued" and waiting["position"] == 2 and waiting["device"] is None
        running = {d["device"]: d["running"] for d in s.client.get("/v1/health").json()["devices"]}
        assert running == {a["device"]: first["id"], b["device"]: second["id"]}

        s.client.delete(f"/v1/jobs/{second['id']}")  # the second device's job only
        assert s.wait(second["id"])["status"] == "cancelled"
        step_before = s.job(first["id"])["progress"]["step"]
        assert s.job(first["id"])["status"] == "running"
        # the freed device takes the next job in line; the first keeps going
        done_third = s.wait(third["id"])
        assert done_third["status"] == "succeeded" and done_third["device"] == b["device"]
        wait_until(lambda: s.job(first["id"])["progress"]["step"] > step_before, what="the first job's next step")
        done_first = s.wait(first["id"])
        assert done_first["status"] == "succeeded" and done_first["device"] == a["device"]
        starts = [s.job(j["id"])["started"] for j in (first, second, third)]
        assert starts == sorted(starts)  # arrival order
        models = {d["device"]: d["loaded_model"] for d in s.client.get("/v1/health").json()["devices"]}
        assert models == {DEVICES[0]: "tiny", DEVICES[1]: "tiny"}  # each worker its own warm model
    finally:
        s.stop()


def test_bad_device_lists_are_one_line_start_up_errors(tmp_path):
    for devices in ("cuda:0,cuda:0", "fake:0,,fake:1"):
        proc = subprocess.run([sys.executable, "-m", "tools.fake_server", "--port", "0", "--output-root",
                               str(tmp_path / "stacks"), "--devices", devices], cwd=REPO, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "devices" in proc.stderr


def test_a_missing_gpu_in_the_list_is_refused_by_the_real_engine(tmp_path):
    import torch

    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has several GPUs")
    proc = subprocess.run([sys.executable, "-m", "server", "serve", "--port", "0", "--output-root",
                           str(tmp_path / "stacks"), "--devices", "cpu,cuda:7"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "cuda" in proc.stderr, proc.stderr
