"""The server process dies with the add-on: parent death, stdin closing, SIGTERM mid-job,
and a kill -9 mid-job followed by a restart (real engine, tiny model)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.testing import ServerProcess

pytestmark = pytest.mark.slow


def test_exits_when_parent_dies(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    s = ServerProcess(tmp_path / "stacks", parent_pid=parent.pid, stdin=subprocess.DEVNULL)
    try:
        assert s.client.get("/v1/health").status_code == 200
        parent.kill()  # left a zombie on purpose (not reaped yet): still counts as dead
        t0 = time.monotonic()
        assert s.wait_exit(5) == 0
        assert time.monotonic() - t0 < 2.0
    finally:
        parent.wait()
        s.stop()


def test_exits_when_stdin_closes(tmp_path):
    s = ServerProcess(tmp_path / "stacks")
    try:
        job = s.submit(steps=60)
        s.wait_for_step(job["id"], 1)
        t0 = time.monotonic()
        s.proc.stdin.close()
        assert s.wait_exit(5) == 0
        assert time.monotonic() - t0 < 2.0
        assert list((tmp_path / "stacks").iterdir()) == []
    finally:
        s.stop()


def test_sigterm_mid_job_exits_cleanly(tmp_path):
    root = tmp_path / "stacks"
    s = ServerProcess(root, token=None)
    try:
        job = s.submit(steps=60, layers=[{"prompt": "a boat"}])
        s.wait_for_step(job["id"], 1)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait_exit(5) == 0
        assert time.monotonic() - t0 < 2.0
        assert list(root.iterdir()) == []  # no stack, no temp folder
        assert not Path(s.ready["token_file"]).exists()
    finally:
        s.stop()


def test_kill_9_mid_job_then_restart_serves_finished_stacks(tmp_path):
    root = tmp_path / "stacks"
    s = ServerProcess(root)
    try:
        finished = s.wait(s.submit(name="Survivor")["id"])
        assert finished["status"] == "succeeded"
        doomed = s.submit(steps=60)
        s.wait_for_step(doomed["id"], 1)
        s.proc.kill()
        s.proc.wait()
    finally:
        s.stop()
    (root / ".half.tmp-0123abcd").mkdir()  # what a kill during the save would leave
    (root / ".half.tmp-0123abcd" / "background.png").write_bytes(b"partial")
    s2 = ServerProcess(root)
    try:
        jobs = s2.client.get("/v1/jobs").json()["jobs"]
        assert [j["id"] for j in jobs] == [finished["id"]]
        assert jobs[0]["status"] == "succeeded" and jobs[0]["stack"]["name"] == "Survivor"
        for name in finished["stack"]["files"]:
            r = s2.client.get(f"/v1/jobs/{finished['id']}/files/{name}")
            assert r.status_code == 200 and r.content == (root / finished["id"] / name).read_bytes()
        assert sorted(p.name for p in root.iterdir()) == [finished["id"]]
    finally:
        s2.stop()


def _serve(args, tmp_path, timeout=60):
    return subprocess.run([sys.executable, "-m", "server", "serve", "--output-root",
                           str(tmp_path / "stacks"), *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_missing_device_fails_before_ready_with_a_message(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _serve(["--port", "0", "--device", "cuda"], tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""  # no ready line
    assert "device" in proc.stderr and "cuda" in proc.stderr


def test_bad_max_batch_fails_before_ready_naming_the_option(tmp_path):
    proc = _serve(["--port", "0", "--device", "cpu", "--max-batch", "0"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "max_batch" in proc.stderr and "positive integer" in proc.stderr


def test_port_in_use_fails_before_ready_with_a_message(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = _serve(["--port", str(port), "--device", "cpu"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"127.0.0.1:{port}" in proc.stderr
