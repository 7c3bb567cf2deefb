"""Layers from blockout proxies, end to end in real Blender against a real server subprocess
(tiny model): three proxies at different depths → `multiplane.layers_from_selected` → three
layers whose boxes and depths are the proxies' → Generate → the stack records them and its
planes stand at the proxies' depths; with box-shaped synthetic layers written into that
generated stack (as the import tests do: the tiny model's pixels are noise), a Cycles render
shows each layer exactly inside its proxy's screen box."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402

TIMEOUT = 200.0
PROXIES = (("Tree", (-2.2, 7.0, 0.2), 1.4), ("Rock", (0.4, 13.0, -0.8), 2.2), ("Hut", (3.5, 22.0, 1.0), 3.5))
COLORS = {"Tree": (250, 30, 30), "Rock": (30, 250, 30), "Hut": (30, 30, 250)}
RENDER = (96, 54)


def scenario_layers_from_proxies(output: str) -> dict:
    import bpy
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector
    from PIL import Image

    from test_addon_generate_flow import _finished, _setup, _tick_until

    package, _prefs, scene = _setup(output)
    from multiplane.addon import importer
    from multiplane.addon.canvas import frame_to_canvas

    settings = scene.multiplane
    settings.layers.clear()
    camera = scene.camera
    camera.location, camera.rotation_euler = (0.0, -2.0, 0.5), (math.radians(90.0), 0.0, 0.0)
    helpers.setup_exact_render(scene, *RENDER, samples=4)
    for obj in bpy.data.objects:
        obj.select_set(False)
    for name, location, size in PROXIES:
        bpy.ops.mesh.primitive_cube_add(size=size, location=location)
        bpy.context.active_object.name = name
    for obj in bpy.data.objects:
        obj.select_set(obj.name in COLORS)
    bpy.ops.multiplane.layers_from_selected(hide_proxies=True)
    for layer in settings.layers:
        layer.prompt = f"a {layer.name.lower()}"

    def screen_box(obj) -> list:
        view = [world_to_camera_view(scene, camera, obj.matrix_world @ Vector(c)) for c in obj.bound_box]
        return [min(p.x for p in view), min(1 - p.y for p in view), max(p.x for p in view), max(1 - p.y for p in view)]

    truth = {obj.name: {"box": screen_box(obj), "depth": -(camera.matrix_world.inverted() @ obj.location).z}
             for obj in bpy.data.objects if obj.name in COLORS}
    layers = [{"name": layer.name, "box": list(layer.box), "depth": layer.depth} for layer in settings.layers]
    bpy.ops.multiplane.generate()
    run = _tick_until(_finished, TIMEOUT)
    folder = Path(settings.history[0].path)
    manifest = json.loads((folder / "stack.json").read_text())
    planes = importer.backdrop_planes(settings.backdrop)
    plane_depths = {p[importer.PROP_LAYER]: -(camera.matrix_world.inverted() @ p.matrix_world.translation).z
                    for p in planes}
    # Box-shaped synthetic layers into the generated stack (each layer opaque inside its box).
    frame = manifest.get("frame") or [0.0, 0.0, 1.0, 1.0]
    width, height = manifest["width"], manifest["height"]
    for entry in manifest["layers"][1:]:
        x0, y0, x1, y1 = frame_to_canvas(entry["box"], frame)
        pixels = np.zeros((height, width, 4), np.uint8)
        pixels[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = (*COLORS[entry["name"]], 255)
        Image.fromarray(pixels, "RGBA").save(folder / entry["file"])
    Image.fromarray(np.full((height, width, 3), 128, np.uint8), "RGB").save(folder / manifest["layers"][0]["file"])
    bpy.ops.multiplane.history_import()
    render = str(Path(output) / "render.png")
    helpers.render_to(scene, render)
    hidden = {obj.name: obj.hide_render for obj in bpy.data.objects if obj.name in COLORS}
    package.unregister()
    return {"run": run, "truth": truth, "layers": layers, "manifest_layers": manifest["layers"],
            "plane_depths": plane_depths, "render": render, "hidden": hidden, "frame": frame}


@pytest.mark.parametrize("python", blender_pythons())
def test_three_proxies_become_three_layers_at_their_boxes_and_depths(python, tmp_path):
    out = run_in_blender(__file__, "scenario_layers_from_proxies", timeout=500, python=python, output=str(tmp_path))
    assert out["run"]["state"] == "succeeded", out["run"]
    truth = out["truth"]
    assert [layer["name"] for layer in out["layers"]] == ["Hut", "Rock", "Tree"]  # far to near
    for layer in out["layers"]:
        assert layer["box"] == pytest.approx(truth[layer["name"]]["box"], abs=1e-5)
        assert layer["depth"] == pytest.approx(truth[layer["name"]]["depth"], rel=1e-5)
    stacked = {entry["name"]: entry for entry in out["manifest_layers"][1:]}
    assert sorted(stacked) == ["Hut", "Rock", "Tree"]  # the layers are named after their proxies
    for name, entry in stacked.items():
        assert entry["box"] == pytest.approx(truth[name]["box"], abs=1e-5)  # frame coordinates
        assert entry["depth"] == pytest.approx(truth[name]["depth"], rel=1e-5)
        assert out["plane_depths"][name] == pytest.approx(truth[name]["depth"], rel=1e-5)
    assert all(out["hidden"].values())
    render = helpers.load_rgb(Path(out["render"]))
    height, width = render.shape[:2]
    for name, color in COLORS.items():
        hit = np.all(np.abs(render - color) < 40, axis=-1)
        ys, xs = np.nonzero(hit)
        assert len(xs), name
        seen = [xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height]
        # Pixel-quantized: within a pixel and a half of the proxy's projected box.
        assert seen == pytest.approx(truth[name]["box"], abs=1.5 / min(width, height)), (name, seen)
