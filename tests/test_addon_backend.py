"""The add-on's process and network plumbing, without Blender (these modules are stdlib only):
the managed server (start from the ready line, token in the environment, stop, dies with its
parent, clear errors for bad interpreters), the HTTP client's error sentences, and the
installer (offline refusal, pip progress, cancel, failures)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from addon import backend, installer
from addon.client import ServerClient, ServerError, describe_models, describe_validation_error

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"


# --------------------------------------------------------------------------- managed server


def test_managed_server_starts_answers_and_stops(tmp_path):
    server = backend.ManagedServer(PYTHON, device="cpu", output_root=tmp_path / "out",
                                   log_path=tmp_path / "server.log")
    started = time.monotonic()
    server.start()
    assert time.monotonic() - started < 1.0  # start() never waits for the ready line
    assert server.poll() in ("starting", "ready")
    info = server.wait_ready(90)
    try:
        assert server.poll() == "ready" and info.url.startswith("http://127.0.0.1:")
        assert server.token not in " ".join(server.command())  # the token travels in the environment
        client = ServerClient(info.url, info.token)
        assert client.health()["status"] == "ok"
        client.check_token()
        models = {m["name"]: m for m in client.models()}
        assert models["tiny"]["available"]  # built in code whenever needed: always ready
        summary = describe_models(list(models.values()))
        assert "tiny ready" in summary and all(summary.count(name) == 1 for name in ("sdxl", "sd15", "tiny"))
        with pytest.raises(ServerError, match="refused the token") as caught:
            ServerClient(info.url, "wrong-token-0123456789").check_token()
        assert caught.value.status == 401
        with pytest.raises(ServerError, match=r"layers\[0\]\.prompt: must not be empty"):
            client.submit({"prompt": "x", "model": "tiny", "layers": [{"prompt": "  "}]})
        assert server in backend._running
    finally:
        stop_started = time.monotonic()
        server.stop()
    assert server._proc.poll() is not None
    assert time.monotonic() - stop_started < backend.STOP_TIMEOUT / 2 + 0.5  # stdin EOF was enough
    assert server.poll() == "stopped" and server not in backend._running
    assert "starting:" in (tmp_path / "server.log").read_text()


def test_server_dies_with_the_process_that_started_it(tmp_path):
    """A Python (standing in for Blender) starts the server and exits without stopping it:
    atexit + the stdin pipe take the server down."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from addon import backend
        server = backend.ManagedServer({str(PYTHON)!r}, device="cpu", output_root={str(tmp_path / 'out')!r})
        server.start()
        server.wait_ready(90)
        print(server.pid, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_missing_interpreter_is_a_clear_error(tmp_path):
    server = backend.ManagedServer(tmp_path / "no" / "python", log_path=tmp_path / "log")
    with pytest.raises(backend.BackendError, match=r"python does not exist: fix the path .*Install inference environment"):
        server.start()
    with pytest.raises(backend.BackendError, match="no Python for the inference server"):
        backend.ManagedServer(None).check()
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    with pytest.raises(backend.BackendError, match="is not executable"):
        backend.ManagedServer(not_executable).start()


def _fake_python(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return script


def test_interpreter_without_the_engine_fails_with_its_error(tmp_path):
    python = _fake_python(tmp_path, 'echo "error: No module named torch" >&2; exit 3')
    server = backend.ManagedServer(python, log_path=tmp_path / "server.log")
    server.start()
    with pytest.raises(backend.BackendError) as caught:
        server.wait_ready(20)
    message = str(caught.value)
    assert "could not start (exit code 3)" in message and "No module named torch" in message
    assert str(tmp_path / "server.log") in message
    assert server.poll() == "failed"
    server.stop()


def test_no_ready_line_times_out(tmp_path):
    python = _fake_python(tmp_path, "exec sleep 30")
    server = backend.ManagedServer(python, ready_timeout=0.5, log_path=tmp_path / "server.log")
    server.start()
    with pytest.raises(backend.BackendError, match="did not become ready within 0.5 s"):
        server.wait_ready()
    assert server._proc.poll() is not None  # killed, not left behind
    server.stop()


def test_stopping_in_the_background_never_waits_for_a_stubborn_server(tmp_path):
    """Disabling the add-on runs on Blender's UI thread: it hands the waiting to a thread.
    This server ignores stdin EOF and SIGTERM, so only the kill after the grace ends it."""
    python = _fake_python(tmp_path, "trap '' TERM\n"
                                    'echo \'{"event": "ready", "url": "http://127.0.0.1:9"}\'\n'
                                    "exec sleep 60")
    server = backend.ManagedServer(python, log_path=tmp_path / "server.log")
    server.start()
    server.wait_ready(20)
    thread = backend.stop_all_in_background()
    assert server._proc.poll() is None and server.poll() == "stopped"  # returned without waiting
    thread.join(30)
    assert server._proc.poll() is not None and server not in backend._running


def test_find_python_prefers_the_checkout_venv(tmp_path):
    assert backend.find_python(tmp_path / "managed") == REPO / ".venv" / "bin" / "python"


# --------------------------------------------------------------------------- client errors


def test_model_summary_says_what_a_first_job_downloads():
    models = [{"name": "sdxl", "available": False, "size_bytes": 9_100_000_000, "download_bytes": 6_900_000_000},
              {"name": "sd15", "available": False, "size_bytes": 4_300_000_000},
              {"name": "tiny", "available": True, "size_bytes": 2_000_000, "download_bytes": 0}]
    assert describe_models(models) == "sdxl to download: 6.9 GB, sd15 to download: 4.3 GB, tiny ready"
    assert describe_models([]) == "no models"


def test_client_errors_are_sentences():
    with pytest.raises(ServerError, match="not an http:// or https:// address"):
        ServerClient("localhost:8765")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ServerError, match=f"127.0.0.1:{port} refused the connection") as caught:
        ServerClient(f"http://127.0.0.1:{port}").health()
    assert caught.value.unreachable
    # A server that accepts but never answers: a timeout, said as such.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ServerError, match="did not answer within 0.3 s"):
            ServerClient(url, timeout=0.3).health()
    finally:
        listener.close()


def test_validation_errors_name_the_field():
    detail = [{"loc": ["body", "layers", 2, "box"], "msg": "Value error, box needs x0 < x1", "type": "value_error"},
              {"loc": ["body", "width"], "msg": "must be a multiple of 64", "type": "value_error"}]
    assert describe_validation_error(detail) == "layers[2].box: box needs x0 < x1; width: must be a multiple of 64"


# --------------------------------------------------------------------------- installer


def test_installer_refuses_when_online_access_is_off(tmp_path):
    with pytest.raises(installer.InstallError, match="online access is disabled"):
        installer.start_install(tmp_path / "venv", online_access=False)
    assert not (tmp_path / "venv").exists()


def test_pip_progress_parsing():
    progress = installer.PipProgress()
    fractions = []
    for line in ["Looking in indexes: https://download.pytorch.org/whl/cpu",
                 "Collecting torch==2.13.0", "  Downloading torch-2.13.0-cp311-none-linux_x86_64.whl (190.2 MB)",
                 "Collecting filelock (from torch==2.13.0)", "Collecting sympy",
                 "Installing collected packages: sympy, filelock, torch",
                 "Successfully installed filelock-3 sympy-1 torch-2.13.0"]:
        progress.feed(line)
        fractions.append(progress.fraction)
        if line.startswith("  Downloading"):
            assert progress.text == "downloading torch-2.13.0-cp311-none-linux_x86_64.whl"
    assert fractions == sorted(fractions) and 0 < fractions[1] < fractions[4] < 0.8
    assert fractions[5] == pytest.approx(0.85) and fractions[-1] == 1.0


def _step(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_install_runs_steps_with_progress_and_a_log(tmp_path):
    pip_like = "print('Collecting a'); print('Collecting b'); print('Installing collected packages: a, b'); " \
               "print('Successfully installed a-1 b-2')"
    job = installer.start_install(tmp_path / "venv", online_access=True,
                                  steps=[("Step one", _step(pip_like)), ("Step two", _step(pip_like))])
    assert job.wait(30)
    assert job.error is None and job.status == "installed" and job.fraction == 1.0
    log = (tmp_path / "install.log").read_text()
    assert sum(line == "Successfully installed a-1 b-2" for line in log.splitlines()) == 2


def test_install_cancel_and_failure(tmp_path):
    job = installer.start_install(tmp_path / "venv", online_access=True,
                                  steps=[("Slow", _step("import time; print('Collecting x', flush=True); time.sleep(60)")),
                                         ("Never", _step("print('no')"))])
    deadline = time.monotonic() + 10
    while "collecting x" not in job.status and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(installer.InstallError, match="already running"):
        installer.start_install(tmp_path / "venv", online_access=True, steps=[])
    started = time.monotonic()
    job.cancel()
    assert job.wait(10) and time.monotonic() - started < 6
    assert job.status == "cancelled" and "cancelled" in job.error
    assert "no" not in (tmp_path / "install.log").read_text().splitlines()

    job = installer.start_install(tmp_path / "venv", online_access=True,
                                  steps=[("Installing torch", _step("import sys; print('ERROR: No matching distribution'); sys.exit(1)"))])
    assert job.wait(30)
    assert job.error.startswith("Installing torch failed (exit code 1): ERROR: No matching distribution")
    assert str(tmp_path / "install.log") in job.error


def test_install_cancel_returns_at_once_and_kills_a_stubborn_step(tmp_path):
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('Collecting x', flush=True); time.sleep(60)")
    job = installer.start_install(tmp_path / "venv", online_access=True, steps=[("Stubborn", _step(code))])
    deadline = time.monotonic() + 10
    while "collecting x" not in job.status and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    assert job._proc.poll() is None and job.cancelled  # the caller was not held
    assert job.wait(30) and job.status == "cancelled"
    assert job._proc.poll() is not None


def test_install_steps_follow_the_makefile(tmp_path):
    steps = installer.install_steps(tmp_path / "venv", "/usr/bin/python3.11", REPO / "requirements.txt")
    labels = [label for label, _ in steps]
    assert labels[0] == "Creating the environment" and steps[0][1] == ["/usr/bin/python3.11", "-m", "venv", str(tmp_path / "venv")]
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_SPEC ?= {installer.TORCH_SPEC}" in makefile
    assert f"OPEN_CLIP_SPEC ?= {installer.OPEN_CLIP_SPEC}" in makefile
    assert installer.TORCH_SPEC in steps[1][1]
    assert steps[2][1][-2:] == ["-r", str(REPO / "requirements.txt")]
