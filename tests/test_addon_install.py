"""The first run installs itself (issue 11 part 4): the real "Install Inference Environment"
operator in Blender, with real pip, into the extension's user folder (a path with spaces and
non-ASCII characters), from this machine's package sources (a local torch wheel through
PIP_FIND_LINKS, PyPI for the rest; pip's cache is the developer's, so reruns are quick); then
Generate starts the server from that environment and makes a tiny stack. A failing install
leaves its log and no environment that looks complete. The platform branches (Windows venv
layout and process handling, the torch build per machine) are unit tests that patch the
platform: Windows and macOS cannot run here."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import run_in_blender  # noqa: E402

from addon import backend, installer  # noqa: E402

INSTALL_TIMEOUT = 1500.0
USER_FOLDER = "Blender user Jörg Müller"  # spaces and non-ASCII, as in real user names


# --------------------------------------------------------------------------- platform branches


def test_venv_layout_per_platform():
    assert backend.venv_python(Path("C:/Users/Jörg Müller/venv"), "win32") == Path(
        "C:/Users/Jörg Müller/venv") / "Scripts" / "python.exe"
    assert backend.venv_python(Path("/home/jörg/venv"), "linux") == Path("/home/jörg/venv/bin/python")
    assert backend.venv_python(Path("/Users/j/venv"), "darwin") == Path("/Users/j/venv/bin/python")


def test_child_processes_get_their_own_group_and_no_console(monkeypatch):
    windows = backend.child_process_options("win32")
    assert windows["creationflags"] & 0x08000000 and windows["creationflags"] & 0x00000200
    assert "start_new_session" not in windows
    assert backend.child_process_options("linux") == {"start_new_session": True}
    assert backend.child_process_options("darwin") == {"start_new_session": True}


def test_stopping_a_tree_uses_taskkill_on_windows_and_the_group_elsewhere(monkeypatch):
    calls = []

    class Running:
        pid = 4242

        def poll(self):
            return None

        def terminate(self):
            calls.append("terminate")

    monkeypatch.setattr(backend.subprocess, "run", lambda args, **kw: calls.append(args))
    backend.terminate_tree(Running(), "win32")
    assert calls == [["taskkill", "/PID", "4242", "/T", "/F"]]
    calls.clear()
    monkeypatch.setattr(backend.os, "killpg", lambda pid, sig: calls.append(("killpg", pid, int(sig))), raising=False)
    backend.terminate_tree(Running(), "linux")
    import signal

    assert calls == [("killpg", 4242, int(signal.SIGTERM))]
    calls.clear()

    def gone(pid, sig):
        raise ProcessLookupError(pid)

    monkeypatch.setattr(backend.os, "killpg", gone, raising=False)
    backend.terminate_tree(Running(), "darwin")
    assert calls == ["terminate"]  # no group (already gone): the process itself


def test_a_real_process_group_is_stopped_with_its_children(tmp_path):
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(child.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            **backend.child_process_options())
    child = int(proc.stdout.readline())
    backend.terminate_tree(proc)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize("platform,smi,wheels,build,index,reason", [
    ("linux", None, [], "cpu", installer.TORCH_INDEX + "cpu", "no NVIDIA GPU"),
    ("win32", None, [], "cpu", installer.TORCH_INDEX + "cpu", "no NVIDIA GPU"),
    ("linux", "| NVIDIA-SMI 570.1   Driver Version: 570.1   CUDA Version: 12.8 |", [], "cu128",
     installer.TORCH_INDEX + "cu128", "CUDA 12.8"),
    ("win32", "CUDA Version: 13.1", [], "cu130", installer.TORCH_INDEX + "cu130", "CUDA 13.1"),
    ("linux", "CUDA Version: 12.7", [], "cu126", installer.TORCH_INDEX + "cu126", "CUDA 12.7"),
    ("win32", "CUDA Version: 11.8", [], "cpu", installer.TORCH_INDEX + "cpu", "older than"),
    ("darwin", None, [], "default", None, "Apple Metal"),
    ("linux", None, ["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"], "cpu", None,
     "this machine's package sources"),
    ("linux", "CUDA Version: 12.8", ["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"], "cu128",
     installer.TORCH_INDEX + "cu128", "CUDA 12.8"),  # a local CPU wheel is no CUDA build
])
def test_torch_build_per_machine(tmp_path, platform, smi, wheels, build, index, reason):
    for name in wheels:
        (tmp_path / name).write_bytes(b"")
    choice = installer.choose_torch(platform, smi, f"https://example.invalid/wheels {tmp_path}")
    assert (choice.build, choice.index_url) == (build, index)
    assert reason in choice.reason
    steps = installer.install_steps(Path("C:/Users/Jörg Müller/venv"), "python", Path("requirements.txt"), choice)
    torch_step = steps[1][1]
    assert (("--index-url" in torch_step) == (index is not None)) and installer.TORCH_SPEC in torch_step
    assert build in steps[1][0]


def test_the_complete_marker_is_the_one_both_sides_use():
    assert backend.MANAGED_COMPLETE_MARKER == installer.COMPLETE_MARKER


# --------------------------------------------------------------------------- inside Blender


def _prepare(output: str):
    import bpy

    helpers.reset_blender()
    helpers.register_as_extension()
    from multiplane.addon import preferences

    bpy.context.preferences.system.use_online_access = True  # installing downloads
    prefs = preferences.get(bpy.context)
    prefs.device = "cpu"
    prefs.output_dir = str(Path(output) / "server output")
    return prefs, preferences


def _wait_for_install(timeout: float) -> dict:
    from multiplane.addon import installer as live_installer
    from multiplane.addon.watcher import tick

    job = live_installer.current_install()
    statuses, fractions = [], []
    deadline = time.monotonic() + timeout
    while job.running and time.monotonic() < deadline:
        tick()
        if not statuses or statuses[-1] != job.status:
            statuses.append(job.status)
        fractions.append(job.fraction)
        time.sleep(0.5)
    return {"done": job.done, "error": job.error, "statuses": statuses,
            "monotonic": all(a <= b for a, b in zip(fractions, fractions[1:])), "final_fraction": job.fraction,
            "log": job.log_path.read_text(encoding="utf-8", errors="replace") if job.log_path.is_file() else ""}


def scenario_failing_install(output: str) -> dict:
    import bpy

    prefs, preferences = _prepare(output)
    from multiplane.addon import backend as live_backend
    from multiplane.addon import installer as live_installer

    out = {"operator": sorted(bpy.ops.multiplane.install_environment())}
    out.update(_wait_for_install(300))
    venv = preferences.managed_venv()
    out["venv_python_exists"] = live_backend.venv_python(venv).is_file()
    out["complete"] = live_installer.is_complete(venv)
    out["found"] = str(live_backend.find_python(venv) or "")
    out["status_line"] = preferences.status_text(bpy.context)[0]
    out["user_dir"] = str(preferences.user_dir())
    return out


def scenario_real_install_then_generate(output: str) -> dict:
    import bpy

    prefs, preferences = _prepare(output)
    from multiplane.addon import backend as live_backend
    from multiplane.addon import installer as live_installer
    from multiplane.addon.watcher import tick, watcher

    out = {"operator": sorted(bpy.ops.multiplane.install_environment())}
    out["torch"] = [live_installer.current_install().torch.build, live_installer.current_install().torch.reason]
    out.update(_wait_for_install(INSTALL_TIMEOUT))
    venv = preferences.managed_venv()
    out["venv"] = str(venv)
    out["complete"] = live_installer.is_complete(venv)
    if out["error"] or not out["complete"]:
        return out
    python = live_backend.venv_python(venv)
    prefs.python_path = str(python)  # the checkout's .venv would be found first otherwise
    scene = bpy.context.scene
    helpers.add_camera(scene)
    scene.render.resolution_x, scene.render.resolution_y = 256, 256
    settings = scene.multiplane
    settings.prompt, settings.model, settings.method, settings.steps, settings.tta_passes = (
        "a lake", "tiny", "independent", 2, "1")
    out["generate"] = sorted(bpy.ops.multiplane.generate())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and watcher.state.phase not in ("succeeded", "failed", "cancelled"):
        tick()
        time.sleep(0.05)
    out["job"] = [watcher.state.phase, watcher.state.error]
    server = live_backend.current_server()
    out["server_python"] = str(server.python) if server else ""
    out["stack_files"] = sorted(p.name for p in Path(watcher.state.stack_dir).iterdir()) if watcher.state.stack_dir else []
    import multiplane

    multiplane.unregister()
    return out


def _environment(monkeypatch, tmp_path: Path) -> Path:
    user = tmp_path / USER_FOLDER
    monkeypatch.setenv("BLENDER_USER_DATAFILES", str(user / "datafiles"))
    # pip's cache outlives the test (HOME is a throw-away folder in the scenario): reruns reuse it.
    monkeypatch.setenv("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    return user


def test_a_failed_install_leaves_a_log_and_nothing_that_looks_complete(tmp_path, monkeypatch):
    user = _environment(monkeypatch, tmp_path)
    empty = tmp_path / "no wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    out = run_in_blender(__file__, "scenario_failing_install", timeout=400, output=str(tmp_path))
    assert out["operator"] == ["FINISHED"] and out["done"]
    assert out["user_dir"].startswith(str(user))
    assert out["error"].startswith("Installing torch (cpu) failed"), out["error"]
    assert "Full log:" in out["error"] and "ERROR:" in out["log"] and "torch==2.13.0" in out["log"]
    assert out["venv_python_exists"] and not out["complete"]  # a venv is there, but it does not count
    assert out["found"] in ("", str(helpers.REPO_ROOT / ".venv" / "bin" / "python"))
    assert "install failed" in out["status_line"] or out["found"]


def test_the_real_operator_installs_then_generate_uses_that_environment(tmp_path, monkeypatch):
    user = _environment(monkeypatch, tmp_path)
    out = run_in_blender(__file__, "scenario_real_install_then_generate", timeout=INSTALL_TIMEOUT + 400,
                         output=str(tmp_path))
    assert out["operator"] == ["FINISHED"]
    assert out["torch"][0] == "cpu" and "package sources" in out["torch"][1]  # /opt/wheels' CPU wheel
    assert out["error"] is None and out["complete"], (out["error"], out["log"][-3000:])
    assert out["venv"].startswith(str(user))
    assert out["monotonic"] and out["final_fraction"] == 1.0
    labels = ("Creating the environment", "Installing torch (cpu)", "Installing the engine",
              "Installing the tokenizer vocabulary")
    for label in labels:
        assert any(status.startswith(label) for status in out["statuses"]), (label, out["statuses"])
    assert out["log"].count("Successfully installed") >= 2
    assert out["generate"] == ["FINISHED"]
    assert out["job"] == ["succeeded", ""], out["job"]
    assert out["server_python"] == str(backend.venv_python(Path(out["venv"])))
    assert {"background.png", "stack.json", "composite.png"} <= set(out["stack_files"])
