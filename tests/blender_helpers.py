"""Shared by the add-on tests: a small stack written straight to disk, and a way to run
Blender code in a fresh process.

Blender (bpy) keeps global state for the life of a process and writes caches under
$HOME, so every Blender scenario runs in its own subprocess with HOME pointing at a
temporary folder; it returns plain JSON, and the pytest side does the asserting.
The stack is written with Pillow and json only (not with inference/stack/), exactly as
docs/stack-format.md describes it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent

# Colours of the test layers, and how soft their edges are (pixels of alpha ramp).
FEATHER_PX = 1.5


# --------------------------------------------------------------------------- stack fixture


def _soft_mask(distance_inside: np.ndarray) -> np.ndarray:
    """Alpha from a signed distance (positive inside): a FEATHER_PX-wide linear ramp."""
    return np.clip(distance_inside / FEATHER_PX + 0.5, 0.0, 1.0)


def stack_layers(width: int, height: int) -> list[np.ndarray]:
    """Background RGB + three straight-alpha RGBA foregrounds, uint8, back to front.

    The background has gradients, a 1 pixel white border and a 2x2-pixel checker patch, so
    a plane that is off by a fraction of a pixel shows up at once. The foregrounds are a
    disc, a rectangle and an ellipse with soft edges, overlapping each other.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = (x + 0.5) / width, (y + 0.5) / height  # pixel centres, 0..1
    background = np.zeros((height, width, 3), np.float64)
    background[..., 0] = 40 + 180 * cx
    background[..., 1] = 30 + 150 * cy
    background[..., 2] = 200 - 120 * cx
    checker = ((x // 2 + y // 2) % 2 == 0)
    patch = (cx > 0.06) & (cx < 0.45) & (cy > 0.55) & (cy < 0.94)
    background[patch & checker] = (250, 240, 20)
    background[patch & ~checker] = (10, 20, 90)
    border = (x == 0) | (y == 0) | (x == width - 1) | (y == height - 1)
    background[border] = (255, 255, 255)

    scale = min(width, height)
    px, py = x + 0.5, y + 0.5
    disc = _soft_mask(0.22 * scale - np.hypot(px - 0.35 * width, py - 0.40 * height))
    rect_half = (0.18 * width, 0.14 * height)
    rect = _soft_mask(np.minimum(rect_half[0] - np.abs(px - 0.62 * width),
                                 rect_half[1] - np.abs(py - 0.55 * height)))
    ex, ey = (px - 0.70 * width) / (0.20 * width), (py - 0.25 * height) / (0.12 * height)
    ellipse = _soft_mask((1.0 - np.hypot(ex, ey)) * 0.12 * height)

    def rgba(color: tuple[int, int, int], alpha: np.ndarray) -> np.ndarray:
        layer = np.zeros((height, width, 4), np.float64)
        layer[..., :3] = color
        layer[..., 3] = 255 * alpha
        return np.clip(np.floor(layer + 0.5), 0, 255).astype(np.uint8)

    return [
        np.clip(np.floor(background + 0.5), 0, 255).astype(np.uint8),
        rgba((230, 40, 30), disc),
        rgba((30, 200, 60), rect),
        rgba((40, 90, 240), ellipse),
    ]


def composite_encoded(layers: list[np.ndarray]) -> np.ndarray:
    """Alpha-over of straight-alpha layers on the encoded (sRGB) values, as the format defines."""
    result = layers[0].astype(np.float64)
    for layer in layers[1:]:
        alpha = layer[..., 3:4] / 255.0
        result = layer[..., :3] * alpha + result * (1.0 - alpha)
    return np.clip(np.floor(result + 0.5), 0, 255).astype(np.uint8)


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


def composite_linear(layers: list[np.ndarray]) -> np.ndarray:
    """Alpha-over in linear light, as a renderer or Blender's compositor blends; float 0..255."""
    result = srgb_to_linear(layers[0] / 255.0)
    for layer in layers[1:]:
        alpha = layer[..., 3:4] / 255.0
        result = srgb_to_linear(layer[..., :3] / 255.0) * alpha + result * (1.0 - alpha)
    return linear_to_srgb(result) * 255.0


def make_stack(folder: Path, width: int = 64, height: int = 48, name: str = "Test Stack",
               depths: list[float | None] | None = None, layers: list[np.ndarray] | None = None) -> Path:
    """Write a complete stack folder (PNGs + stack.json) and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = layers if layers is not None else stack_layers(width, height)
    depths = depths if depths is not None else [None] * len(layers)
    entries = []
    for index, array in enumerate(layers):
        is_background = index == 0
        layer_name = "background" if is_background else f"layer_{index:02d}"
        file_name = f"{layer_name}.png"
        Image.fromarray(array, "RGB" if is_background else "RGBA").save(folder / file_name)
        entries.append({
            "name": layer_name,
            "kind": "background" if is_background else "foreground",
            "prompt": f"test layer {index}",
            "seed": 1000 + index,
            "file": file_name,
            "box": None if is_background else [0.1, 0.1, 0.9, 0.9],
            "mask": None,
            "depth": depths[index],
        })
    Image.fromarray(composite_encoded(layers), "RGB").save(folder / "composite.png")
    manifest = {
        "format": "multiplane.stack",
        "format_version": 1,
        "name": name,
        "created": "2025-01-01T00:00:00Z",
        "method": "independent",
        "width": width,
        "height": height,
        "prompt": "a test scene",
        "negative_prompt": "",
        "seed": 1000,
        "steps": 4,
        "guidance": 5.0,
        "model": {"preset": "test", "base": "none", "files": {}},
        "layers": entries,
        "composite": "composite.png",
        "blended": None,
        "timings": {"load": 0.0, "denoise": 0.0, "decode": 0.0, "save": 0.0, "total": 0.0},
        "exports": [],
    }
    (folder / "stack.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


def smooth_layers(width: int, height: int) -> list[np.ndarray]:
    """Background RGB + two RGBA foregrounds with nothing sharper than a few pixels: smooth
    gradients and wide soft-edged blobs, so a render resampled at other pixel centres
    compares with the composite by its values, not by aliasing."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = (x + 0.5) / width, (y + 0.5) / height
    background = np.stack([40 + 180 * u, 30 + 150 * v, 200 - 120 * u * v], axis=-1)
    feather = max(6.0, 0.05 * min(width, height))

    def blob(cx: float, cy: float, radius: float, color) -> np.ndarray:
        distance = np.hypot((u - cx) * width, (v - cy) * height)
        alpha = np.clip((radius * min(width, height) - distance) / feather + 0.5, 0.0, 1.0)
        layer = np.zeros((height, width, 4), np.float64)
        layer[..., :3] = color
        layer[..., 3] = 255 * alpha
        return np.clip(np.floor(layer + 0.5), 0, 255).astype(np.uint8)

    return [np.clip(np.floor(background + 0.5), 0, 255).astype(np.uint8),
            blob(0.35, 0.45, 0.25, (230, 60, 40)), blob(0.65, 0.55, 0.18, (40, 200, 90))]


def make_framed_stack(folder: Path, width: int, height: int, frame, name: str = "Test Stack",
                      depths: list[float | None] | None = None, layers: list[np.ndarray] | None = None) -> Path:
    """make_stack, then record the camera `frame` (x0, y0, x1, y1) inside the canvas in stack.json."""
    folder = make_stack(folder, width, height, name=name, depths=depths, layers=layers)
    manifest = json.loads((folder / "stack.json").read_text(encoding="utf-8"))
    manifest["frame"] = [float(v) for v in frame]
    (folder / "stack.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


def covers_frame(corners, tolerance: float = 1e-6) -> float:
    """How far a plane's projected quad (camera-view corners, in order) falls short of holding
    the whole frame [0, 1]^2: <= 0 when it covers it (a convex quad holds the frame when it
    holds the frame's four corners)."""
    worst = -1.0
    count = len(corners)
    area = sum(corners[i][0] * corners[(i + 1) % count][1] - corners[(i + 1) % count][0] * corners[i][1]
               for i in range(count))
    orientation = 1.0 if area > 0 else -1.0
    for px, py in ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)):
        for i in range(count):
            (ax, ay), (bx, by) = corners[i][:2], corners[(i + 1) % count][:2]
            length = ((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5
            # Signed distance of the frame corner outside edge a->b (positive: outside).
            outside = -orientation * ((bx - ax) * (py - ay) - (by - ay) * (px - ax)) / length
            worst = max(worst, outside)
    return worst - tolerance


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


# --------------------------------------------------------------------------- Blender in a subprocess

_RUNNER = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    spec = importlib.util.spec_from_file_location("multiplane_blender_scenario", {module!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(sys.argv[1], encoding="utf-8") as handle:
        kwargs = json.load(handle)
    result = getattr(module, {function!r})(**kwargs)
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    if {hard_exit!r}:
        import os
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
""")

# Older bpy wheels misbehave while the interpreter shuts down after an add-on registered
# (4.2.23 crashes once a PointerProperty poll callback was registered, 4.5.15 hangs if
# the add-on is still registered). 5.0 exits cleanly. Set MULTIPLANE_BLENDER_HARD_EXIT=1
# to run these tests against such a wheel: the result is written, then os._exit(0).
HARD_EXIT = os.environ.get("MULTIPLANE_BLENDER_HARD_EXIT") == "1"

# Another Python with bpy for every scenario that does not pick one itself, e.g.
# MULTIPLANE_BLENDER_PYTHON=.venv-bpy42/bin/python (`make test-bpy42` runs the add-on tests so).
BLENDER_PYTHON = os.environ.get("MULTIPLANE_BLENDER_PYTHON") or None


def bpy42_python() -> str | None:
    """The interpreter of the bpy 4.2 LTS environment (`make bpy42` makes .venv-bpy42), or
    $MULTIPLANE_BPY42_PYTHON; None when there is none (those test variants are skipped)."""
    candidates = [os.environ.get("MULTIPLANE_BPY42_PYTHON"), str(REPO_ROOT / ".venv-bpy42" / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def blender_pythons() -> list:
    """pytest params: the current bpy (5.0), plus bpy 4.2 when its environment exists."""
    import pytest

    found = bpy42_python()
    return [pytest.param(None, id="bpy-current", marks=pytest.mark.each_blender),
            pytest.param(found, id="bpy-4.2",
                         marks=[pytest.mark.each_blender,
                                pytest.mark.skipif(found is None, reason="no bpy 4.2 environment (make bpy42)")])]


def per_blender(kinds) -> list:
    """pytest params (kind, python) of every kind on every Blender of blender_pythons() (the
    4.2 variants skipped without its environment), for module-scoped scenario fixtures."""
    import pytest

    return [pytest.param((kind, python.values[0]), id=f"{kind}-{python.id}", marks=python.marks)
            for kind in kinds for python in blender_pythons()]


def run_in_blender(module_file: str, function: str, timeout: float = 120.0, python: str | None = None,
                   **kwargs: Any) -> Any:
    """Call `function(**kwargs)` from `module_file` in a fresh Python with bpy; return its JSON result.

    HOME is a throw-away folder so Blender's caches and preferences never touch the real one.
    `python`: another interpreter with bpy (e.g. bpy42_python()), default
    $MULTIPLANE_BLENDER_PYTHON, else this one; another interpreter always gets the hard exit.
    """
    with tempfile.TemporaryDirectory(prefix="multiplane-blender-") as scratch:
        scratch_path = Path(scratch)
        home = scratch_path / "home"
        home.mkdir()
        args_file, result_file = scratch_path / "args.json", scratch_path / "result.json"
        args_file.write_text(json.dumps(kwargs), encoding="utf-8")
        python = python or BLENDER_PYTHON
        # Other bpy wheels (4.2, 4.5) crash or hang at interpreter exit: the result is
        # written first, then they leave with os._exit(0).
        hard_exit = HARD_EXIT or python is not None
        code = _RUNNER.format(root=str(REPO_ROOT), tests=str(TESTS_DIR), module=str(module_file),
                              function=function, hard_exit=hard_exit)
        env = dict(os.environ, HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
        proc = subprocess.run([python or sys.executable, "-c", code, str(args_file), str(result_file)],
                              cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result_file.exists():
            raise AssertionError(f"Blender scenario {function} failed (exit {proc.returncode}):\n"
                                 f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
        return json.loads(result_file.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- inside Blender


def reset_blender() -> None:
    """An empty factory scene (call first in every scenario)."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)


def add_camera(scene, projection: str = "PERSP", lens: float = 50.0, ortho_scale: float = 6.0,
               sensor_fit: str = "AUTO", shift: tuple[float, float] = (0.0, 0.0),
               location: tuple[float, float, float] = (0.0, 0.0, 0.0),
               rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)):
    """Add a camera, make it the scene's active camera, return the object."""
    import bpy

    data = bpy.data.cameras.new("Test Camera")
    data.type = projection
    data.lens = lens
    data.ortho_scale = ortho_scale
    data.sensor_fit = sensor_fit
    data.shift_x, data.shift_y = shift
    data.clip_end = 1000.0
    camera = bpy.data.objects.new("Test Camera", data)
    scene.collection.objects.link(camera)
    camera.location = location
    camera.rotation_euler = rotation
    scene.camera = camera
    bpy.context.view_layer.update()
    return camera


def setup_exact_render(scene, width: int, height: int, samples: int = 4) -> None:
    """Cycles settings under which an emissive plane renders its texture's exact values.

    Standard view transform (no tone curve), black world, no dither, no denoise, a tiny
    pixel filter (every sample at the pixel centre), enough transparent bounces to see
    through every plane. Cycles samples partial transparency stochastically, so soft
    edges need a few dozen samples to settle.
    """
    import bpy

    scene.render.engine = "CYCLES"
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = False
    scene.render.dither_intensity = 0.0
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    scene.render.image_settings.color_depth = "8"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    scene.display_settings.display_device = "sRGB"
    world = bpy.data.worlds.new("Black")
    world.color = (0.0, 0.0, 0.0)
    if world.node_tree is not None:  # 5.x worlds always have nodes
        for node in world.node_tree.nodes:
            if node.bl_idname == "ShaderNodeBackground":
                node.inputs["Color"].default_value = (0.0, 0.0, 0.0, 1.0)
                node.inputs["Strength"].default_value = 0.0
    scene.world = world
    cycles = scene.cycles
    cycles.device = "CPU"
    cycles.samples = samples
    cycles.use_adaptive_sampling = False
    cycles.use_denoising = False
    # A 0.01-pixel Gaussian puts every sample at the pixel centre (Cycles' BOX filter
    # ignores the width and would average the whole pixel, blurring the texture).
    cycles.pixel_filter_type = "GAUSSIAN"
    cycles.filter_width = 0.01
    cycles.transparent_max_bounces = 32
    cycles.max_bounces = 4
    cycles.seed = 0


def render_to(scene, path: str) -> None:
    import bpy

    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)


def register_addon():
    """Import the repo's add-on package and register it; returns the module."""
    import addon

    addon.register()
    return addon


def register_as_extension(name: str = "multiplane"):
    """Load the repository root as the package `name` and enable it the way Blender enables
    an add-on (an entry in preferences.addons, then register()), so its AddonPreferences
    work. Returns the package module."""
    import bpy

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    if bpy.context.preferences.addons.get(name) is None:
        bpy.context.preferences.addons.new().module = name
    package.register()
    return package


def execute_recording(operator_class, context, **props) -> tuple[list[str], list[list]]:
    """Run an operator's execute() on a stand-in carrying `props` and a recording report();
    returns (result, [[kinds, message], ...]). bpy.ops shows only ERROR reports (as
    RuntimeError), and a test must see the WARNING and INFO ones too."""
    from types import SimpleNamespace

    reports: list[list] = []
    stand_in = SimpleNamespace(**props, report=lambda kinds, message: reports.append([sorted(kinds), message]))
    result = operator_class.execute(stand_in, context)
    return sorted(result), reports


def import_module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
