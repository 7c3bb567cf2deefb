"""Extend for Shot, in real Blender against a real server subprocess (tiny model): a stack
generated for a static shot, then a camera move added → `multiplane.extend_for_shot` asks the
server to outpaint the margins the move needs (POST /v1/jobs/{id}/extend) → the watcher's
`tick()` follows the job → the new stack replaces the backdrop's planes in place, the move
shows no plane edge at any frame, and the old canvas's pixels are unchanged away from the
seam. A shot the stack already serves, or one beyond the canvas cap, is one clear report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402

from addon.canvas import extension_offset  # noqa: E402

TIMEOUT = 150.0
SEAM_PX = 8  # the engine feathers a few pixels at the old canvas's border; compare beyond them


# --------------------------------------------------------------------------- inside Blender


def scenario_extend_for_shot(output: str) -> dict:
    import bpy

    from test_addon_generate_flow import _finished, _setup, _tick_until
    from test_addon_shot import _projected

    package, _prefs, scene = _setup(output)
    from multiplane.addon import importer, shot_operators
    from multiplane.addon.watcher import watcher

    settings = scene.multiplane
    out = {}
    bpy.ops.multiplane.generate()
    out["first"] = _tick_until(_finished, TIMEOUT)
    source = settings.history[0]
    out["source"] = {"path": source.path, "job_id": source.job_id}
    collection_name = settings.backdrop.name
    out["poll"] = shot_operators.MULTIPLANE_OT_extend_for_shot.poll(bpy.context)
    # The static shot: the stack serves it already.
    out["nothing"] = helpers.execute_recording(shot_operators.MULTIPLANE_OT_extend_for_shot, bpy.context)
    camera = scene.camera
    scene.frame_start, scene.frame_end = 1, 12
    camera.keyframe_insert("location", frame=1)
    scene.frame_set(12)
    camera.location.x = 60.0  # a move far beyond what a 2048-pixel canvas can hold
    camera.keyframe_insert("location", frame=12)
    out["too_far"] = helpers.execute_recording(shot_operators.MULTIPLANE_OT_extend_for_shot, bpy.context)
    camera.location.x = 0.5
    camera.keyframe_insert("location", frame=12)
    scene.frame_set(1)
    out["busy_after_mistakes"] = watcher.busy

    result = bpy.ops.multiplane.extend_for_shot()
    out["result"] = sorted(result)
    out["second"] = _tick_until(_finished, TIMEOUT)
    new = settings.history[0]
    out["new"] = {"path": new.path, "job_id": new.job_id, "request": json.loads(new.request),
                  "layers": [layer.name for layer in new.layers]}
    out["history_len"] = len(settings.history)
    out["collection_after"] = settings.backdrop.name
    out["collection_before"] = collection_name
    out["backdrops"] = sorted(c.name for c in bpy.data.collections if c.name.startswith("Backdrop: "))
    planes = importer.backdrop_planes(settings.backdrop)
    out["plane_files"] = sorted(bpy.path.abspath(importer.plane_image(p).filepath) for p in planes)
    gaps = []
    for frame in range(1, 13):
        scene.frame_set(frame)
        gaps.append(max(helpers.covers_frame(_projected(scene, camera, p)) for p in planes))
    out["gaps"] = gaps
    # Rendered with transparent film: full coverage at the start, middle and end of the move.
    helpers.setup_exact_render(scene, 256, 256, samples=1)
    scene.render.resolution_percentage = 25
    scene.render.film_transparent, scene.render.image_settings.color_mode = True, "RGBA"
    out["alpha_min"] = {}
    for frame in (1, 6, 12):
        scene.frame_set(frame)
        path = Path(output) / f"extended_{frame}.png"
        helpers.render_to(scene, str(path))
        out["alpha_min"][frame] = int(np.asarray(Image.open(path).convert("RGBA"))[..., 3].min())
    # Control: the stack before the extension, re-imported, shows its edge at the end of the move.
    bpy.ops.multiplane.history_import(index=1)
    scene.frame_set(12)
    helpers.render_to(scene, str(Path(output) / "source_12.png"))
    out["source_alpha_min"] = int(np.asarray(Image.open(Path(output) / "source_12.png").convert("RGBA"))[..., 3].min())
    out.update(_compare_pixels(Path(out["source"]["path"]), Path(new.path), out["new"]["request"]["margins"]))
    package.unregister()
    return out


def _compare_pixels(old_dir: Path, new_dir: Path, request_margins) -> dict:
    """Is every layer's old canvas in the new one, pixel for pixel, away from the seam?"""
    old_manifest = json.loads((old_dir / "stack.json").read_text())
    new_manifest = json.loads((new_dir / "stack.json").read_text())
    ox, oy = extension_offset(old_manifest["width"], old_manifest["height"], old_manifest.get("frame"),
                              request_margins)
    kept, margin_is_old = {}, {}
    for old_layer, new_layer in zip(old_manifest["layers"], new_manifest["layers"]):
        old = np.asarray(Image.open(old_dir / old_layer["file"]))
        grown = np.asarray(Image.open(new_dir / new_layer["file"]))
        h, w = old.shape[:2]
        inside = grown[oy:oy + h, ox:ox + w]
        kept[old_layer["name"]] = bool(np.array_equal(inside[SEAM_PX:-SEAM_PX, SEAM_PX:-SEAM_PX],
                                                      old[SEAM_PX:-SEAM_PX, SEAM_PX:-SEAM_PX]))
        # Control: the first new columns beside the old canvas are not its last ones copied.
        margin_is_old[old_layer["name"]] = bool(np.array_equal(grown[oy:oy + h, ox + w:ox + w + 32], old[:, -32:]))
    return {"sizes": {"old": [old_manifest["width"], old_manifest["height"]],
                      "new": [new_manifest["width"], new_manifest["height"]]},
            "offset": [ox, oy], "old_pixels_kept": kept, "margin_is_old": margin_is_old}


# --------------------------------------------------------------------------- pytest side


@pytest.mark.parametrize("python", blender_pythons())
def test_extend_for_shot_outpaints_the_margins_the_move_needs(python, tmp_path):
    out = run_in_blender(__file__, "scenario_extend_for_shot", timeout=400, python=python, output=str(tmp_path))
    assert out["first"]["state"] == "succeeded", out["first"]
    assert out["poll"] is True
    result, reports = out["nothing"]
    assert result == ["CANCELLED"] and "already has the margins" in reports[-1][1], reports
    result, reports = out["too_far"]
    assert result == ["CANCELLED"] and reports[-1][0] == ["ERROR"], reports
    assert "margins.right" in reports[-1][1] and "smaller move" in reports[-1][1], reports
    assert not out["busy_after_mistakes"]

    assert out["result"] == ["FINISHED"]
    assert out["second"]["state"] == "succeeded", out["second"]
    new, source = out["new"], out["source"]
    assert new["job_id"] != source["job_id"] and new["path"] != source["path"]
    request = new["request"]
    assert request["source"] == source["job_id"] and request["extend"] is True
    left, top, right, bottom = request["margins"]
    # A 0.5 truck right, nearest layer at 6 (frame 6 * 36 / 50 = 4.32 wide there).
    assert right == pytest.approx(0.5 / 4.32, rel=1e-4) and left == top == bottom == 0.0
    assert out["history_len"] == 2
    assert out["collection_after"] == out["collection_before"] and out["backdrops"] == [out["collection_before"]]
    assert all(Path(path).parent == Path(new["path"]) for path in out["plane_files"])
    assert max(out["gaps"]) <= 0.0, out["gaps"]
    assert all(value >= 254 for value in out["alpha_min"].values()), out["alpha_min"]
    assert out["source_alpha_min"] == 0

    sizes = out["sizes"]
    assert sizes["new"][0] > sizes["old"][0] and sizes["new"][1] == sizes["old"][1], sizes
    assert out["offset"][0] == 0  # the canvas grew to the right only
    assert len(out["old_pixels_kept"]) == 2 and all(out["old_pixels_kept"].values()), out["old_pixels_kept"]
    assert not all(out["margin_is_old"].values()), "the new margin is outpainted, not a copy"
