"""`make demo`: the main job, headless — the whole product path the artist takes.

Blender (bpy as a module) → the Multiplane add-on, registered as Blender registers an
extension → its Generate operator, which starts `python -m server serve` through the
add-on's own backend module (ready line, token in the environment) and submits the job →
the add-on's job watcher, ticked here as Blender's timer would → the stack imported as
camera-fitted planes → the compositor → `demo/backdrop.blend` and a Cycles render
`demo/preview.png` (Standard view transform, few samples).

Uses the real default model (sdxl) when its weights are on disk; otherwise the tiny
random-weight model, and says so loudly (its pictures are noise-like by design).
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

DEMO_PROMPT = "a quiet forest clearing at dusk, soft volumetric light, painterly"
DEMO_BACKGROUND = "tall pine trees and distant mountains"
DEMO_LAYERS = ("a moss-covered boulder", "a red fox sitting", "hanging fern leaves")
DEMO_DEPTHS = (30.0, 14.0, 5.0)  # boulder far, fox in the middle, ferns near the camera
REPO = Path(__file__).resolve().parents[1]
ADDON_PACKAGE = "multiplane"
GENERATE_TIMEOUT = {"tiny": 600.0}  # seconds; real models get an hour (first run downloads)


def choose_model(requested: str | None) -> tuple[str, str]:
    """(model, why): the requested one, else sdxl if complete on disk, else tiny."""
    if requested:
        return requested, "requested"
    from inference.models import preset_availability

    sdxl = next((p for p in preset_availability(None) if p["name"] == "sdxl"), None)
    if sdxl is not None and sdxl["available"]:
        return "sdxl", "SDXL weights found on disk"
    return "tiny", "SDXL + LayerDiffuse weights are not on this machine"


def tiny_banner(why: str) -> str:
    return ("=" * 72 + "\n"
            f"DEMO USES THE TINY RANDOM-WEIGHT MODEL ({why}).\n"
            "The images are meaningless noise; the pipeline, files, planes and compositor are real.\n"
            "Run `python -m server generate --model sdxl ...` (downloads ~9 GB) or put the\n"
            "weights in the Hugging Face cache to get real pictures.\n" + "=" * 72)


def register_addon():
    """Load the repository as the extension package and enable it the way Blender does
    (an entry in preferences.addons, then register()), so its preferences exist."""
    import bpy

    spec = importlib.util.spec_from_file_location(ADDON_PACKAGE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[ADDON_PACKAGE] = package
    spec.loader.exec_module(package)
    if bpy.context.preferences.addons.get(ADDON_PACKAGE) is None:
        bpy.context.preferences.addons.new().module = ADDON_PACKAGE
    package.register()
    return package


def setup_scene(model: str):
    """An empty scene with a camera, render settings for an exact-looking preview, and the
    Multiplane panel filled in as an artist would."""
    import bpy

    scene = bpy.context.scene
    big = model != "tiny"
    scene.render.resolution_x, scene.render.resolution_y = (1024, 576) if big else (512, 288)
    scene.render.resolution_percentage = 100
    camera_data = bpy.data.cameras.new("Camera")
    camera_data.lens = 35.0
    camera_data.clip_end = 1000.0
    camera = bpy.data.objects.new("Camera", camera_data)
    scene.collection.objects.link(camera)
    camera.location = (0.0, -8.0, 1.6)
    camera.rotation_euler = (1.5708, 0.0, 0.0)  # level, looking along +Y
    scene.camera = camera
    settings = scene.multiplane
    settings.stack_name = "Forest clearing"
    settings.prompt = DEMO_PROMPT
    settings.background_prompt = DEMO_BACKGROUND
    settings.negative_prompt = "blurry, low quality"
    for prompt, depth in zip(DEMO_LAYERS, DEMO_DEPTHS):
        layer = settings.layers.add()
        layer.prompt, layer.depth = prompt, depth
    settings.model = model if model in ("sdxl", "sd15", "tiny") else "tiny"
    settings.steps = 30 if big else 4
    settings.guidance = 5.0
    settings.seed = 7
    settings.tta_passes = "8" if big else "2"
    return scene


def setup_preview_render(scene) -> None:
    """Cycles, a few samples, Standard view transform (AgX would change the layers' colours),
    enough transparent bounces to see through every plane."""
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.cycles.use_denoising = False
    scene.cycles.transparent_max_bounces = 32
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"


def run_demo(out: Path, model: str | None = None, device: str = "auto") -> int:
    try:
        import bpy
    except ImportError:
        print("error: `make demo` runs Blender as a Python module (bpy); install it with `make setup`",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    model, why = choose_model(model)
    if model == "tiny":
        print(tiny_banner(why), file=sys.stderr)
    else:
        print(f"demo: model {model!r} ({why})", file=sys.stderr)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    bpy.ops.wm.read_factory_settings(use_empty=True)
    package = register_addon()
    scene = setup_scene(model)
    from multiplane.addon import backend, preferences
    from multiplane.addon.watcher import tick, watcher

    prefs = preferences.get(bpy.context)
    prefs.backend = "LOCAL"
    prefs.python_path = sys.executable  # the engine's environment: the one running this demo
    prefs.device = device
    prefs.output_dir = str(out / "server-output")
    prefs.stacks_dir = str(out / "stacks")
    try:
        bpy.ops.multiplane.generate()
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        package.unregister()
        return 1

    # Blender's timer would call tick() every 0.1 s; nothing else drives it in module mode.
    last = ""
    deadline = time.monotonic() + GENERATE_TIMEOUT.get(model, 3600.0)
    while watcher.busy and time.monotonic() < deadline:
        tick()
        state = watcher.state
        line = f"[{state.fraction:4.0%}] {state.text}"
        if line != last:
            print(f"demo: {line}", file=sys.stderr)
            last = line
        time.sleep(0.1)
    tick()
    state = watcher.state
    if state.phase != "succeeded":
        if watcher.busy:
            watcher.cancel()
        print(f"error: generation {state.phase}: {state.error or state.text}", file=sys.stderr)
        package.unregister()
        return 1
    server = backend.current_server()
    print(f"demo: server {server.info.url if server and server.info else '?'} made {state.stack_dir}",
          file=sys.stderr)

    setup_preview_render(scene)
    scene.render.use_compositing = False  # the preview shows the camera-fitted planes themselves
    scene.render.filepath = str(out / "preview.png")
    bpy.ops.render.render(write_still=True)

    # The compositor an artist would use to drop CG between background and foregrounds.
    bpy.ops.multiplane.build_compositor(behind=1, hide_planes=True)
    scene.render.use_compositing = True
    scene.render.filepath = "//preview.png"
    blend = out / "backdrop.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    planes = len(scene.multiplane.backdrop.objects) if scene.multiplane.backdrop else 0
    package.unregister()  # stops the server it started
    print(f"demo: model {model!r}: {planes} planes in {state.imported!r}; wrote {blend}, "
          f"{out / 'preview.png'} and the stack {state.stack_dir} in {time.monotonic() - started:.0f} s")
    return 0
