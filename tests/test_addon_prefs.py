"""Bad preferences in real Blender end as one clear report (or one readable panel error),
never a traceback: a missing interpreter, a dead server URL, no URL, the installer with
Blender's online access off. Runs on bpy 5.0 and, when present, bpy 4.2 LTS."""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402


def _report(operator) -> str:
    """The operator's ERROR report as Blender raises it in background mode ('' if none)."""
    try:
        result = operator()
    except RuntimeError as error:
        return str(error)
    return f"no error: {sorted(result)}"


def scenario_bad_preferences(dead_url: str, slow_python: str) -> dict:
    import bpy

    helpers.reset_blender()
    package = helpers.register_as_extension()
    from multiplane.addon import backend, preferences
    from multiplane.addon.watcher import tick, watcher

    prefs = preferences.get(bpy.context)
    scene = bpy.context.scene
    helpers.add_camera(scene)
    scene.multiplane.prompt = "a lake"
    ops = bpy.ops.multiplane
    out = {}

    prefs.python_path = "/nonexistent/bin/python3"
    out["generate_missing_python"] = _report(ops.generate)
    out["test_missing_python"] = _report(ops.test_connection)
    out["restart_missing_python"] = _report(ops.restart_server)
    out["watcher_after_missing"] = watcher.state.phase
    out["server_started"] = backend.current_server() is not None and backend.current_server().poll() in ("starting", "ready")

    prefs.backend = "REMOTE"
    prefs.server_url = ""
    out["generate_no_url"] = _report(ops.generate)
    out["test_no_url"] = _report(ops.test_connection)
    prefs.server_url = "localhost:8765"
    out["test_bad_url"] = _report(ops.test_connection)
    prefs.server_url = dead_url
    prefs.server_token = "0123456789abcdef0123"
    out["test_dead_url"] = _report(ops.test_connection)
    prefs.server_url = "http://192.0.2.7:8765"  # another machine: needs online access (off here)
    out["generate_offline_remote"] = _report(ops.generate)
    out["test_offline_remote"] = _report(ops.test_connection)
    prefs.server_url = dead_url
    started = time.perf_counter()
    out["generate_dead_url"] = _report(ops.generate)
    out["generate_returned_s"] = time.perf_counter() - started
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and watcher.busy:
        tick()
        time.sleep(0.02)
    tick()
    out["dead_url_state"] = watcher.state.phase
    out["dead_url_error"] = watcher.state.error
    bpy.context.window_manager.clipboard = ""
    out["copy_error"] = _report(ops.copy_error)

    # Cancel while the server is still starting (an interpreter that never gets ready):
    # cancelled at once, and the worker thread ends.
    prefs.backend = "LOCAL"
    prefs.python_path = slow_python
    watcher.clear_error()
    bpy.ops.multiplane.generate()
    tick()
    out["starting_phase"] = watcher.state.phase
    out["cancel_starting"] = _report(ops.cancel)
    out["after_cancel_phase"] = watcher.state.phase
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and watcher.busy:  # the worker thread ends by itself
        tick()
        time.sleep(0.02)
    tick()
    out["worker_done"] = not watcher.busy and watcher.state.phase == "cancelled"
    prefs.python_path = ""
    # Cancel while installing (fake steps; the real ones download GBs).
    from multiplane.addon import installer

    install = installer.start_install(Path(slow_python).parent / "venv", online_access=True,
                                      steps=[("Installing torch", [sys.executable, "-c", "import time; time.sleep(60)"])])
    out["generate_while_installing"] = _report(ops.generate)
    out["cancel_install"] = _report(ops.cancel)
    install.wait(10)
    out["install_state"] = [install.done, install.status]
    out["online_access"] = bpy.app.online_access
    out["install_offline"] = _report(ops.install_environment)
    out["cancel_nothing"] = _report(ops.cancel)
    package.unregister()
    return out


@pytest.fixture(scope="module")
def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("python", blender_pythons())
def test_bad_preferences_give_clear_reports(python, dead_url, tmp_path):
    slow_python = tmp_path / "slow-python"
    slow_python.write_text("#!/bin/sh\nexec sleep 60\n")
    slow_python.chmod(0o755)
    out = run_in_blender(__file__, "scenario_bad_preferences", python=python, dead_url=dead_url,
                         slow_python=str(slow_python))
    for key, value in out.items():
        if isinstance(value, str):
            assert "Traceback" not in value, (key, value)

    assert "Cannot start the inference server: the Python interpreter /nonexistent/bin/python3 does not exist" \
        in out["generate_missing_python"]
    assert "Install inference environment" in out["generate_missing_python"]
    assert "/nonexistent/bin/python3 does not exist" in out["test_missing_python"]
    assert "/nonexistent/bin/python3 does not exist" in out["restart_missing_python"]
    assert out["watcher_after_missing"] == "idle" and not out["server_started"]

    assert "No server URL" in out["generate_no_url"]
    assert "no server URL" in out["test_no_url"]
    assert "not an http:// or https:// address" in out["test_bad_url"]
    assert f"Connection failed: the Multiplane server at {dead_url} refused the connection" in out["test_dead_url"]
    assert "online access is disabled" in out["generate_offline_remote"]
    assert "online access is disabled" in out["test_offline_remote"]
    # Generate itself never waits for the network: the failure arrives through the watcher.
    assert out["generate_dead_url"].startswith("no error") and out["generate_returned_s"] < 0.5
    assert out["dead_url_state"] == "failed"
    assert out["dead_url_error"] == (f"the Multiplane server at {dead_url} refused the connection "
                                     f"(nothing is listening there)")
    assert out["copy_error"].startswith("no error")

    assert out["starting_phase"] == "starting"
    assert out["cancel_starting"].startswith("no error") and out["after_cancel_phase"] == "cancelled"
    assert out["worker_done"]

    assert "still being installed" in out["generate_while_installing"]
    assert out["cancel_install"].startswith("no error") and out["install_state"] == [True, "cancelled"]

    assert out["online_access"] is False  # Blender as a module starts with online access off
    assert "online access is disabled" in out["install_offline"]
    assert out["cancel_nothing"].startswith("no error: ['CANCELLED']")


# --------------------------------------------------------------------------- installed as a user would


def scenario_installed_extension(package: str) -> dict:
    import bpy

    helpers.reset_blender()
    bpy.ops.extensions.package_install_files(filepath=package, repo="user_default", enable_on_install=True)
    preferences = sys.modules["bl_ext.user_default.multiplane.addon.preferences"]
    prefs = preferences.get(bpy.context)
    settings = preferences.backend_settings(bpy.context)
    helpers.add_camera(bpy.context.scene)
    bpy.context.scene.multiplane.prompt = "a lake"
    return {
        "addon_id": preferences.ADDON_ID,
        "prefs_class": type(prefs).__name__ if prefs is not None else None,
        "user_dir": str(preferences.user_dir()),
        "home": str(Path.home()),
        "python": str(settings.python) if settings.python else None,
        "status": preferences.status_text(bpy.context)[0],
        "generate": _report(bpy.ops.multiplane.generate),
        "panel_registered": hasattr(bpy.types, "VIEW3D_PT_multiplane"),
    }


def test_installed_extension_has_preferences_and_asks_for_an_environment(tmp_path):
    import subprocess

    built = subprocess.run([sys.executable, "-m", "addon_tools", "build", "--output-dir", str(tmp_path)],
                           cwd=helpers.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    package = built.stdout.strip().splitlines()[-1]
    out = run_in_blender(__file__, "scenario_installed_extension", package=package)
    assert out["addon_id"] == "bl_ext.user_default.multiplane"
    assert out["prefs_class"] == "MultiplanePreferences" and out["panel_registered"]
    # Its own writable folder, inside the (throw-away) home; no checkout .venv beside it.
    assert out["user_dir"].startswith(out["home"]) and "multiplane" in out["user_dir"]
    assert out["python"] is None
    assert out["status"] == "No inference environment: click Install Inference Environment"
    assert "no Python for the inference server" in out["generate"] and "Install inference environment" in out["generate"]
