"""Proof by render (Cycles, tiny images): a stack with a frame rectangle renders, at the shot's
start, exactly as the frame crop of its composite.png (the engine's linear-light composite)
- at 1:1, 16:9, 2.39:1, 9:16, 1536x640 at 25 % and an anamorphic pixel aspect - with square
texels (no axis stretched); and moving shots (parallax_move, a hand-keyed camera with
rotation, an orthographic truck) over a stack planned for them show no plane edge at any
sampled frame (transparent film: full coverage), and frame 1 is the static render."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, load_rgb, run_in_blender  # noqa: E402

from addon.canvas import plan_canvas  # noqa: E402
from inference.stack.composite import alpha_over  # noqa: E402

TINY_BUDGET = 256 * 256
# name: (render width, height, percentage, pixel aspect x)
STATIC_CASES = {
    "square": (64, 64, 100, 1.0),
    "16:9": (96, 54, 100, 1.0),
    "2.39:1": (239, 100, 100, 1.0),
    "9:16": (54, 96, 100, 1.0),
    "1536x640 at 25%": (1536, 640, 25, 1.0),
    "anamorphic": (64, 54, 100, 2.0),
}
SAMPLES = 16
MOVING_FRAMES = (1, 6, 12, 18, 24)


def _aspect(width: int, height: int, pixel_aspect: float) -> float:
    return width * pixel_aspect / height


# --------------------------------------------------------------------------- inside Blender


def scenario_static_render(stack_dir: str, out_path: str, size: list, projection: str) -> dict:
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    from addon import importer

    scene = bpy.context.scene
    helpers.add_camera(scene, projection=projection, lens=32.0, ortho_scale=5.0, shift=(0.04, -0.06),
                       location=(0.5, -1.0, 2.0), rotation=(1.3, 0.05, 0.3))
    width, height, percentage, pixel_aspect = size
    helpers.setup_exact_render(scene, width, height, samples=SAMPLES)
    scene.render.resolution_percentage = percentage
    scene.render.pixel_aspect_x = pixel_aspect
    bpy.ops.multiplane.import_stack(filepath=stack_dir)
    planes = importer.backdrop_planes(bpy.data.collections["Backdrop: Test Stack"])
    dims = []
    for plane in planes:
        xs = [v.co.x for v in plane.data.vertices]
        ys = [v.co.y for v in plane.data.vertices]
        dims.append([max(xs) - min(xs), max(ys) - min(ys)])
    helpers.render_to(scene, out_path)
    return {"dims": dims}


def scenario_moving_render(out_dir: str, kind: str) -> dict:
    import bpy

    from test_addon_shot import setup_shot

    helpers.reset_blender()
    helpers.register_addon()
    from addon import generate

    scene = bpy.context.scene
    camera = setup_shot(scene, kind)
    helpers.setup_exact_render(scene, 64, 36, samples=2)
    scene.render.film_transparent = True
    scene.render.image_settings.color_mode = "RGBA"
    scene.frame_start, scene.frame_end = 1, 24
    settings = scene.multiplane
    for _ in range(2):
        settings.layers.add().prompt = "a thing"
    out = Path(out_dir)
    if kind == "parallax_move":  # the move is made over a backdrop: first the one for the static shot
        static = helpers.make_stack(out / "static", 64, 36, name="Static", layers=helpers.smooth_layers(64, 36))
        bpy.ops.multiplane.import_stack(filepath=str(static))
        bpy.ops.multiplane.parallax_move(truck=1.0, pedestal=0.3, dolly=1.0)
        bpy.data.collections["Backdrop: Static"].hide_render = True
    plan, margins = generate.plan_request_canvas(scene)
    stack = helpers.make_framed_stack(out / "moving", plan.width, plan.height, plan.frame,
                                      layers=helpers.smooth_layers(plan.width, plan.height))
    bpy.ops.multiplane.import_stack(filepath=str(stack))
    renders = {}
    for frame in MOVING_FRAMES:
        scene.frame_set(frame)
        renders[frame] = str(out / f"frame_{frame:02d}.png")
        helpers.render_to(scene, renders[frame])
    # The same stack under the camera frozen at its start pose: the static render.
    scene.frame_set(1)
    start = camera.matrix_world.copy()
    camera.animation_data_clear()
    camera.constraints.clear()
    camera.matrix_world = start
    bpy.context.view_layer.update()
    still = str(out / "still.png")
    helpers.render_to(scene, still)
    return {"renders": {str(k): v for k, v in renders.items()}, "still": still, "margins": list(margins)}


# --------------------------------------------------------------------------- pytest side


def _bilinear(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sample `image` at fractional texel coordinates (texel centres at integers), clamped."""
    height, width = image.shape[:2]
    xs, ys = np.clip(xs, 0, width - 1), np.clip(ys, 0, height - 1)
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _frame_crop(image: np.ndarray, frame, render_w: int, render_h: int) -> np.ndarray:
    """What a camera of render_w x render_h sees of `image` through `frame`: the image sampled
    at the render's pixel centres, mapped into the frame rectangle."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = frame
    u = (np.arange(render_w) + 0.5) / render_w
    v = (np.arange(render_h) + 0.5) / render_h
    xs = (x0 + u * (x1 - x0)) * width - 0.5
    ys = (y0 + v * (y1 - y0)) * height - 0.5
    grid_x, grid_y = np.meshgrid(xs, ys)
    return _bilinear(image.astype(np.float64), grid_x, grid_y)


@pytest.mark.parametrize("python", blender_pythons())
@pytest.mark.parametrize("name", sorted(STATIC_CASES))
def test_static_render_equals_the_frame_crop_of_the_composite(name, python, tmp_path):
    width, height, percentage, pixel_aspect = STATIC_CASES[name]
    plan = plan_canvas(_aspect(width, height, pixel_aspect), (0.0, 0.0, 0.0, 0.0), TINY_BUDGET)
    layers = helpers.smooth_layers(plan.width, plan.height)
    stack = helpers.make_framed_stack(tmp_path / "stack", plan.width, plan.height, plan.frame, layers=layers,
                                      depths=[30.0, 9.0, 3.0])
    # composite.png as the engine writes it (linear-light over, inference/stack/composite.py).
    Image.fromarray(alpha_over(layers), "RGB").save(stack / "composite.png")
    render_path = tmp_path / "render.png"
    projection = "ORTHO" if name == "9:16" else "PERSP"
    info = run_in_blender(__file__, "scenario_static_render", python=python, stack_dir=str(stack),
                          out_path=str(render_path), size=list(STATIC_CASES[name]), projection=projection)
    render = load_rgb(render_path)
    render_w, render_h = round(width * percentage / 100), round(height * percentage / 100)
    assert render.shape[:2] == (render_h, render_w)
    composite = _frame_crop(load_rgb(stack / "composite.png"), plan.frame, render_w, render_h)
    linear = _frame_crop(helpers.composite_linear(layers), plan.frame, render_w, render_h)
    errors = {"composite": float(np.abs(render - composite).mean()), "linear": float(np.abs(render - linear).mean())}
    assert errors["composite"] <= 1.0, errors  # the issue asks <= 2/255
    assert errors["linear"] <= 1.0, errors  # and against the test's own linear-light composite
    # Control: the whole canvas squeezed into the frame (an import that ignores the frame) is far off.
    whole = _frame_crop(load_rgb(stack / "composite.png"), (0.0, 0.0, 1.0, 1.0), render_w, render_h)
    if not plan.whole:
        assert float(np.abs(render - whole).mean()) > 2.0 * max(errors["composite"], 0.5)
    # Square texels on every plane: neither axis is scaled differently.
    for plane_w, plane_h in info["dims"]:
        assert (plane_w / plan.width) / (plane_h / plan.height) == pytest.approx(1.0, rel=1e-6)


@pytest.fixture(scope="module", params=helpers.per_blender(("parallax_move", "keyed_rotation", "ortho_truck")))
def moving_render(request, tmp_path_factory):
    kind, python = request.param
    out = tmp_path_factory.mktemp(kind)
    return kind, run_in_blender(__file__, "scenario_moving_render", timeout=300, python=python,
                                out_dir=str(out), kind=kind)


def _rgba(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA"), dtype=np.float64)


def test_every_sampled_frame_of_the_move_is_fully_covered(moving_render):
    kind, info = moving_render
    assert any(m > 0.01 for m in info["margins"]), info["margins"]
    for frame, path in info["renders"].items():
        alpha = _rgba(path)[..., 3]
        assert alpha.min() >= 254.0, (kind, frame, float(alpha.min()), int((alpha < 254).sum()))


def test_frame_one_of_the_move_is_the_static_render(moving_render):
    kind, info = moving_render
    first, still = _rgba(info["renders"]["1"]), _rgba(info["still"])
    assert float(np.abs(first - still).mean()) <= 0.5, kind
