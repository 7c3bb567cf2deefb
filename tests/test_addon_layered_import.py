"""The layered round trip in real Blender (bpy 5.0 and 4.2) against a real server subprocess:
a stack is imported, exported to PSD and ORA, edited as an editor would (new pixels, a moved
layer, a hidden one), and `multiplane.import_layered_file` brings it back through the server as a
new history stack whose planes replace the old ones in place, with the edits visible (in the
planes' images and in the compositor's render of its multilayer EXR)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, load_rgb, run_in_blender  # noqa: E402
from test_addon_compositor import _expected_linear  # noqa: E402

WIDTH, HEIGHT = 100, 70
NAMES = ["background", "disc", "rect", "ellipse"]
STACK_NAME = "Round Trip"


# --------------------------------------------------------------------------- inside Blender


def scenario_round_trip(stack_dir: str, edited_file: str, broken_psd: str, output: str) -> dict:
    import bpy

    from test_addon_generate_flow import _finished, _setup, _tick_until

    package, _prefs, scene = _setup(output)
    from multiplane.addon.watcher import watcher

    helpers.setup_exact_render(scene, WIDTH, HEIGHT, samples=1)
    bpy.ops.multiplane.import_stack(filepath=stack_dir)
    before = scene.multiplane.backdrop
    out = {"before": sorted(o.get("multiplane_layer") for o in before.objects),
           "depths_before": {o["multiplane_layer"]: o["multiplane_depth"] for o in before.objects},
           "distance_before": {o["multiplane_layer"]: (o.matrix_world.translation - scene.camera.location).length
                               for o in before.objects}}
    out["start"] = sorted(bpy.ops.multiplane.import_layered_file(filepath=edited_file, export_exr=True))
    out["run"] = _tick_until(_finished)
    collection = scene.multiplane.backdrop
    out["same_collection"] = collection == before and len([c for c in bpy.data.collections
                                                          if c.name.startswith("Backdrop: ")]) == 1
    planes = sorted(collection.objects, key=lambda o: o["multiplane_layer_index"])
    out["after"] = [o["multiplane_layer"] for o in planes]
    out["depths_after"] = {o["multiplane_layer"]: o["multiplane_depth"] for o in planes}
    out["distance_after"] = {o["multiplane_layer"]: (o.matrix_world.translation - scene.camera.location).length
                             for o in planes}
    out["stack_dir"] = watcher.state.stack_dir
    out["warnings"] = list(watcher.state.warnings)
    out["pixels"] = {}
    for obj in planes:
        image = next(n.image for n in obj.active_material.node_tree.nodes if n.bl_idname == "ShaderNodeTexImage")
        width, height = image.size
        pixels = np.array(image.pixels[:], dtype=np.float64).reshape(height, width, 4)[::-1]  # bottom row first
        path = Path(output) / f"plane_{obj['multiplane_layer']}.npy"
        np.save(path, np.round(pixels * 255.0))
        out["pixels"][obj["multiplane_layer"]] = str(path)
    item = scene.multiplane.history[0]
    out["history"] = {"count": len(scene.multiplane.history), "method": item.method, "path": item.path,
                      "name": item.name, "job_id": bool(item.job_id)}
    scene.multiplane.history_index = 0
    out["regenerate_poll"] = bpy.ops.multiplane.history_regenerate_layer.poll()
    bpy.ops.multiplane.build_compositor(behind=0, source="EXR")
    out["render"] = str(Path(output) / "round_trip.png")
    helpers.render_to(scene, out["render"])

    # Bad files: refused in Blender (wrong kind), or by the server with its reason.
    try:
        bpy.ops.multiplane.import_layered_file(filepath=str(Path(output) / "notes.txt"))
        out["not_layered"] = ""
    except RuntimeError as error:
        out["not_layered"] = str(error)
    bpy.ops.multiplane.import_layered_file(filepath=broken_psd)
    out["broken"] = _tick_until(_finished)
    out["planes_after_broken"] = len(scene.multiplane.backdrop.objects)
    package.unregister()
    return out


# --------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from inference.stack import LayerStack, StackLayer, write_stack
    from test_layered_import import EDITORS

    folder = tmp_path_factory.mktemp("round-trip")
    images = helpers.stack_layers(WIDTH, HEIGHT)
    layers = [StackLayer(name=name, kind="background" if i == 0 else "foreground") for i, name in enumerate(NAMES)]
    write_stack(folder / "stack", LayerStack(name=STACK_NAME, width=WIDTH, height=HEIGHT, layers=layers),
                images[0], images[1:], export_psd=True, export_ora=True)
    new_rect = {kind: edit(folder / "stack" / f"stack.{kind}", folder / f"edited.{kind}")
                for kind, edit in EDITORS.items()}
    (folder / "broken.psd").write_bytes(b"8BPS not really")
    return folder, images, new_rect


@pytest.mark.parametrize("kind", ["psd", "ora"])
@pytest.mark.parametrize("python", blender_pythons())
def test_layered_round_trip_replaces_the_backdrop_in_place(files, tmp_path, python, kind):
    from test_layered_import import _shifted

    folder, images, new_rects = files
    new_rect = new_rects[kind]
    (tmp_path / "notes.txt").write_text("not a picture")
    out = run_in_blender(__file__, "scenario_round_trip", timeout=400, python=python,
                         stack_dir=str(folder / "stack"), edited_file=str(folder / f"edited.{kind}"),
                         broken_psd=str(folder / "broken.psd"), output=str(tmp_path))
    assert out["start"] == ["FINISHED"]
    assert out["run"]["state"] == "succeeded", out["run"]
    assert out["before"] == sorted(NAMES)
    assert out["same_collection"], "the imported stack replaced the backdrop in place"
    assert out["after"] == ["background", "disc", "rect"]  # the hidden layer's plane is gone
    for name in out["after"]:  # the kept layers stay where they were
        assert out["depths_after"][name] == pytest.approx(out["depths_before"][name])
        assert out["distance_after"][name] == pytest.approx(out["distance_before"][name])
    assert len(set(out["depths_before"].values())) == len(NAMES)
    assert out["warnings"] == ["hidden layer 'ellipse' skipped"]
    assert out["history"] == {"count": 1, "method": "imported", "path": out["stack_dir"], "name": STACK_NAME,
                              "job_id": True}
    assert out["regenerate_poll"] is False
    expected = {"background": np.concatenate([images[0], np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=2),
                "disc": _shifted(images[1], 12, 5), "rect": new_rect}
    for name, path in out["pixels"].items():
        pixels = np.load(path)
        visible = expected[name][..., 3] > 0
        assert np.array_equal(pixels[..., 3], expected[name][..., 3]), name
        assert np.abs(pixels[visible] - expected[name][visible]).max() <= 0.5, name
    # The compositor (from the new stack's EXR) renders the edited layers' linear composite.
    edited_layers = [images[0], expected["disc"], new_rect]
    rendered = load_rgb(Path(out["render"]))
    assert np.abs(rendered - _expected_linear(edited_layers, 0, cg=False)).max() <= 1.0
    assert np.abs(rendered - _expected_linear(images, 0, cg=False)).mean() > 5.0  # the edits show

    assert "not a layered file: choose a .psd or .ora file" in out["not_layered"]
    broken = out["broken"]
    assert broken["state"] == "failed" and "not a readable Photoshop file" in broken["error"], broken
    assert out["planes_after_broken"] == 3  # nothing lost
