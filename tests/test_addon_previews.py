"""Live previews in the panel (issue 11 part 2, the add-on side), in real Blender with a
scripted server (tests/fake_server_client.py): while a job denoises, the watcher fetches the
layers' previews into a scratch folder and the panel draws them (background first, the
blended image last); they go away when the job ends, and so does the folder."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402
from test_addon_panel import _draw  # noqa: E402
from test_addon_stuck_states import _op, _setup, _tick_until  # noqa: E402


def scenario_live_previews(output: str) -> dict:
    import bpy

    package, prefs, scene = _setup(output)
    import fake_server_client as fake
    from multiplane.addon import panel
    from multiplane.addon.watcher import preview_folder, watcher

    fake.FakeServerClient.hold = "denoise"
    out = {"generate": _op(bpy.ops.multiplane.generate)}
    out["shown"] = _tick_until(lambda s: bool(s.previews))
    state = watcher.state
    out["names"] = list(state.previews)
    out["step"] = state.preview_step
    out["files"] = [Path(path).is_file() and Path(path).read_bytes()[:4] == b"\x89PNG"
                    for path in state.previews.values()]
    drawn = _draw(panel.draw_panel, bpy.context)
    out["drawn"] = {"problems": drawn["problems"], "texts": [t for t in drawn["texts"] if t]}
    folder = preview_folder(state.job_id)
    out["cancel"] = _op(bpy.ops.multiplane.cancel)
    out["after_cancel"] = dict(watcher.state.previews)
    deadline = time.monotonic() + 10
    while folder.exists() and time.monotonic() < deadline:  # the detached worker cleans up
        time.sleep(0.05)
    out["folder_left"] = folder.exists()
    package.unregister()
    return out


@pytest.mark.parametrize("python", blender_pythons())
def test_the_panel_shows_live_previews_while_a_job_runs(tmp_path, python):
    out = run_in_blender(__file__, "scenario_live_previews", python=python, output=str(tmp_path))
    assert out["generate"] == "FINISHED" and out["shown"]
    assert out["names"] == ["background", "layer_01", "blended"]  # background first, the blend last
    assert out["step"] == 3 and out["files"] == [True, True, True]
    assert out["drawn"]["problems"] == []
    assert "Preview (step 3)" in out["drawn"]["texts"]
    assert {"background", "#01", "blended"} <= set(out["drawn"]["texts"])
    assert out["cancel"] == "FINISHED" and out["after_cancel"] == {}
    assert out["folder_left"] is False
