"""No state the artist cannot leave (issue 11 part 1), in real Blender with a scripted server
(tests/fake_server_client.py): Cancel pressed once, twice or three times (no tick in between:
a double click) in every phase, then Generate at once must run a new job to the end; a worker
that dies silently, and disabling/re-enabling the add-on mid-job, leave a panel that works.
Importing runs inside one watcher tick on Blender's main thread, so no operator can run
during it: Cancel right after it finished says "Nothing to cancel"."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402

PHASES = ("installing", "starting", "submit", "queued", "download", "load", "denoise", "decode", "save", "fetch")


# --------------------------------------------------------------------------- inside Blender


def _setup(output: str):
    import bpy

    helpers.reset_blender()
    package = helpers.register_as_extension()
    import fake_server_client as fake
    from multiplane.addon import preferences
    from multiplane.addon import watcher as watcher_module

    prefs = preferences.get(bpy.context)
    prefs.backend, prefs.server_url, prefs.server_token = "REMOTE", "http://127.0.0.1:9", "t" * 20
    prefs.stacks_dir = str(Path(output) / "stacks")
    fake.FakeServerClient.stack_folder = helpers.make_stack(Path(output) / "template", name="Fake Stack")
    watcher_module.ServerClient = fake.FakeServerClient  # the local server's client
    preferences.ServerClient = fake.FakeServerClient  # "Connect to Server": BackendSettings.remote_client
    scene = bpy.context.scene
    helpers.add_camera(scene)
    scene.render.resolution_x, scene.render.resolution_y = 256, 256
    scene.multiplane.prompt = "a lake"
    scene.multiplane.model = "tiny"
    return package, prefs, scene


def _op(operator) -> str:
    """An operator's outcome: FINISHED / CANCELLED, or its ERROR report."""
    try:
        return "/".join(sorted(operator()))
    except RuntimeError as error:
        return f"ERROR: {error}"


def _tick_until(done, timeout: float = 30.0):
    from multiplane.addon.watcher import tick, watcher

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tick()
        if done(watcher.state):
            return True
        time.sleep(0.02)
    return False


def _reached(phase: str):
    def check(state) -> bool:
        return {
            "starting": state.phase == "starting",
            "submit": state.text == "Submitting the job",
            "queued": state.phase == "queued",
            "download": state.text.startswith("Downloading model weights"),
            "load": state.text.startswith("Loading model"),
            "denoise": state.text.startswith("Denoising step"),
            "decode": state.text.startswith("Decoding layer"),
            "save": state.text.startswith("Saving the stack"),
            "fetch": state.phase == "downloading",
        }[phase]
    return check


def _hold(phase: str, prefs, output: str, attempt: int) -> bool:
    """Start a job (or the install) and wait until it is in `phase`."""
    import bpy

    import fake_server_client as fake
    from multiplane.addon import backend, installer

    if phase == "installing":
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        job = installer.start_install(Path(output) / f"venv-{attempt}", online_access=True,
                                      steps=[("Waiting", sleeper)])
        return job.running
    prefs.backend = "LOCAL" if phase == "starting" else "REMOTE"
    fake.FakeServerClient.hold = phase
    if phase == "starting":
        backend.ensure_server = lambda make: fake.NeverReadyServer()
    if _op(bpy.ops.multiplane.generate) != "FINISHED":
        return False
    return _tick_until(_reached(phase))


def scenario_cancel_every_phase(output: str) -> dict:
    import bpy

    package, prefs, scene = _setup(output)
    import fake_server_client as fake
    from multiplane.addon import backend, preferences
    from multiplane.addon.watcher import watcher

    real_ensure = backend.ensure_server
    results = {}
    attempt = 0
    for phase in PHASES:
        for clicks in (1, 2, 3):
            attempt += 1
            held = _hold(phase, prefs, output, attempt)
            status_while_held = preferences.status_text(bpy.context)[0]
            progress_text = watcher.state.text
            cancels = [_op(bpy.ops.multiplane.cancel) for _ in range(clicks)]  # no tick: a double click
            after_cancel = (watcher.state.phase, watcher.busy)
            backend.ensure_server = real_ensure
            prefs.backend = "REMOTE"
            fake.FakeServerClient.hold = None
            generate = _op(bpy.ops.multiplane.generate)
            finished = _tick_until(lambda s: s.phase in ("succeeded", "failed", "cancelled"))
            results[f"{phase}x{clicks}"] = {
                "held": held, "cancels": cancels, "after_cancel": after_cancel, "generate": generate,
                "finished": finished, "final": watcher.state.phase, "error": watcher.state.error,
                "status_line": status_while_held, "progress_text": progress_text,
            }
    results["cancel_after_success"] = _op(bpy.ops.multiplane.cancel)
    package.unregister()
    return results


def scenario_dead_worker_and_reenable(output: str) -> dict:
    import bpy

    package, prefs, scene = _setup(output)
    import fake_server_client as fake
    from multiplane.addon.watcher import watcher

    out = {}
    # A worker thread that ends without a word (a bug, or a BaseException): the watcher must not
    # wait for it.
    fake.FakeServerClient.hold = "die"
    out["die_generate"] = _op(bpy.ops.multiplane.generate)
    out["die_resolved"] = _tick_until(lambda s: not watcher.busy, timeout=10)
    out["die_state"] = (watcher.state.phase, watcher.state.error)
    bpy.ops.multiplane.clear_error()

    # Disable and re-enable while a job runs.
    fake.FakeServerClient.hold = "denoise"
    fake.FakeServerClient.cancelled_jobs.clear()
    bpy.ops.multiplane.generate()
    out["running_before"] = _tick_until(_reached("denoise"))
    package.unregister()
    package.register()
    out["after_reenable"] = (watcher.state.phase, watcher.state.text, watcher.busy)
    fake.FakeServerClient.hold = None
    out["generate_after_reenable"] = _op(bpy.ops.multiplane.generate)
    out["finished_after_reenable"] = _tick_until(lambda s: s.phase in ("succeeded", "failed"))
    out["final"] = (watcher.state.phase, watcher.state.error)
    out["server_told_to_cancel"] = len(fake.FakeServerClient.cancelled_jobs)

    # Import with an empty path refuses instead of re-importing the last stack.
    out["import_empty"] = _op(lambda: bpy.ops.multiplane.import_stack(filepath=""))
    package.unregister()
    return out


# --------------------------------------------------------------------------- pytest side


@pytest.mark.parametrize("python", blender_pythons())
def test_cancel_once_twice_thrice_in_every_phase_then_generate(tmp_path, python):
    out = run_in_blender(__file__, "scenario_cancel_every_phase", timeout=400, python=python,
                         output=str(tmp_path))
    for phase in PHASES:
        for clicks in (1, 2, 3):
            run = out[f"{phase}x{clicks}"]
            assert run["held"], (phase, clicks, run)
            assert run["cancels"][0] == "FINISHED", run
            # Further clicks find nothing left to cancel, and say so (CANCELLED, no error).
            assert run["cancels"][1:] == ["CANCELLED"] * (clicks - 1), run
            assert run["after_cancel"][1] is False, run  # the panel is free at once
            # (the install is no job: the watcher keeps showing the last job's end)
            assert run["after_cancel"][0] in ("cancelled", "idle", "succeeded" if phase == "installing" else ""), run
            assert run["generate"] == "FINISHED", run
            assert run["finished"] and run["final"] == "succeeded", run
    # While the server starts, the status line tells the progress bar's story.
    starting = out["startingx1"]
    assert starting["progress_text"].startswith("Starting the inference server")
    assert starting["status_line"] == "Local server starting…", starting
    assert out["cancel_after_success"] == "CANCELLED"


@pytest.mark.parametrize("python", blender_pythons())
def test_dead_worker_and_disable_reenable_leave_a_working_panel(tmp_path, python):
    out = run_in_blender(__file__, "scenario_dead_worker_and_reenable", python=python, output=str(tmp_path))
    assert out["die_generate"] == "FINISHED" and out["die_resolved"]
    phase, error = out["die_state"]
    assert phase == "failed" and "worker stopped without a result" in error
    assert out["running_before"]
    phase, text, busy = out["after_reenable"]
    assert phase == "cancelled" and not busy and "add-on was disabled" in text
    assert out["generate_after_reenable"] == "FINISHED" and out["finished_after_reenable"]
    assert out["final"] == ["succeeded", ""]
    assert out["server_told_to_cancel"] == 1  # the job was cancelled on the server too
    assert out["import_empty"].startswith("ERROR: ") and "no stack given" in out["import_empty"]
