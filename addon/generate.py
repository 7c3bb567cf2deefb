"""Generate and Cancel, and what they need: the request body from the scene's settings,
the checks before a job starts, a new seed, and the watcher's error (copy, dismiss).

Generate only gathers the scene's settings into a request body and hands it to the job
watcher (watcher.py); everything slow happens on the watcher's thread. User mistakes (no
prompt, a box inside out, no inference environment) are one ERROR report, never a traceback.
"""
from __future__ import annotations

import json
import random

import bpy
from bpy.types import Operator

from . import backend, installer, preferences, shot, shot_operators
from .canvas import CanvasPlan
from .geometry import GeometryError, check_depth_order
from .limits import MAX_FOREGROUNDS, MAX_NAME_CHARS, MAX_SEED
from .watcher import JobPlan, ensure_timer, watcher


def plan_request_canvas(scene) -> tuple[CanvasPlan, tuple[float, float, float, float]]:
    """(canvas plan, shot margins) for the scene: the render's exact aspect, the margins the
    camera's motion needs for the layers' depths (when 'Margins for the Camera Move' is on),
    the model's pixel budget. The margins are remembered on the scene for the panel.

    Raises ValueError (shot.ShotError) with an artist-facing sentence."""
    settings = scene.multiplane
    margins = shot.NO_MARGINS
    if settings.use_shot_margins and scene.camera is not None:
        distances = shot.generation_distances([layer.depth for layer in settings.layers])
        margins = shot.margins_for(shot.read_shot(scene), distances)
    plan = shot.plan_for_scene(scene, settings.model, margins)
    settings.shot_margins = margins
    if settings.use_shot_margins:
        settings.shot_warning = ""  # the new stack is planned for this shot
    return plan, margins


def check_layer_depths(settings) -> None:
    """ValueError (artist-facing) unless the layers' depths, as the importer will place them,
    get nearer from back to front - caught before generating, not at the import after it."""
    distances = shot.generation_distances([layer.depth for layer in settings.layers])
    try:
        check_depth_order(distances)
    except GeometryError as error:
        raise ValueError(f"Depths: {error} (layer 0 is the background, at {distances[0]:g}; depth 0 spreads a "
                         "layer automatically): change the layers' depths or their order") from None


def build_request(scene) -> dict:
    """The POST /v1/jobs body for the scene's settings. A layer's depth (0 = spread between
    the importer's Near and Far) travels in it: the engine writes it into the stack. Layers
    laid out from proxy objects get their box and depth from them first; the canvas is
    planned from the frame's aspect, the shot's margins and the model (`frame` says where
    the camera frame sits in it; boxes stay in frame coordinates).

    Raises ValueError with an artist-facing sentence for settings the server would refuse."""
    settings = scene.multiplane
    prompt = settings.prompt.strip()
    if not prompt:
        raise ValueError("Write a prompt for the whole scene first (the Prompt field in the Multiplane panel)")
    if len(settings.layers) > MAX_FOREGROUNDS:
        raise ValueError(f"At most {MAX_FOREGROUNDS} foreground layers; remove {len(settings.layers) - MAX_FOREGROUNDS}")
    shot_operators.refresh_proxy_layers(scene)
    check_layer_depths(settings)
    layers = []
    for index, layer in enumerate(settings.layers, start=1):
        text = layer.prompt.strip()
        if not text:
            raise ValueError(f"Foreground layer {index} has no prompt: write one or remove the layer")
        item = {"prompt": text}
        if layer.use_box:
            x0, y0, x1, y1 = (float(v) for v in layer.box)
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"Foreground layer {index}'s box is empty or inside out: it needs "
                                 f"left < right and top < bottom (it is {x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f})")
            item["box"] = [x0, y0, x1, y1]
        if layer.depth > 0:
            item["depth"] = float(layer.depth)
        if layer.proxy is not None and shot_operators.proxy_layer_name(layer.proxy):
            item["name"] = shot_operators.proxy_layer_name(layer.proxy)  # the layer is named after its proxy
        layers.append(item)
    plan, _margins = plan_request_canvas(scene)
    body = {
        "prompt": prompt,
        "negative_prompt": settings.negative_prompt.strip(),
        "background": settings.background_prompt.strip(),
        "layers": layers,
        "method": settings.method,
        "model": settings.model,
        "width": plan.width,
        "height": plan.height,
        "steps": int(settings.steps),
        "guidance": float(settings.guidance),
        "seed": int(settings.seed),
        "tta_passes": int(settings.tta_passes),
        "name": (settings.stack_name.strip() or f"{scene.name} backdrop")[:MAX_NAME_CHARS],
    }
    for export in ("export_psd", "export_exr"):
        if getattr(settings, export):
            body[export] = True
    if not plan.whole:  # absent = the whole image (what servers before issue 10 understand)
        body["frame"] = list(plan.frame)
    return body


def watcher_free_or_report(operator) -> bool:
    """False (with an ERROR report) while a generation or the install runs."""
    if watcher.busy:
        operator.report({"ERROR"}, "A backdrop is already being generated: wait for it or press Cancel")
        return False
    install = installer.current_install()
    if install is not None and install.running and not install.cancelled:  # a cancelled one is ending
        operator.report({"ERROR"}, "The inference environment is still being installed: wait for it or cancel it")
        return False
    return True


def ready_to_start_or_report(operator, scene) -> bool:
    """False (with an ERROR report) when a job cannot start now: the watcher or the install is
    busy, or the scene has no camera to fit the layers to."""
    if not watcher_free_or_report(operator):
        return False
    if scene.camera is None:
        operator.report({"ERROR"}, "The scene has no active camera: the layers are fitted to its view. Add one first")
        return False
    return True


def random_seed() -> int:
    """A new seed inside the server's range (and Blender's 32-bit IntProperty)."""
    return random.randint(0, min(MAX_SEED, 2**31 - 1))


def backend_settings_or_report(operator, context):
    """The preferences as BackendSettings when a job can be sent with them, else None after
    an ERROR report (no inference environment, no server URL, online access off)."""
    settings = preferences.backend_settings(context)
    if settings.mode == "LOCAL":
        server = backend.current_server()
        if server is None or server.poll() not in ("starting", "ready"):
            probe = settings.make_server()
            try:
                probe.check()
            except backend.BackendError as error:
                operator.report({"ERROR"}, f"Cannot start the inference server: {error}")
                return None
    elif not settings.url:
        operator.report({"ERROR"}, "No server URL: enter it in the Multiplane preferences (or choose Start Local Process)")
        return None
    elif settings.remote_needs_online_access():
        operator.report({"ERROR"}, preferences.OFFLINE_REMOTE)
        return None
    return settings


class MULTIPLANE_OT_generate(Operator):
    """Generate a layered backdrop from the prompts and import it as camera-filling planes (runs in the background)"""

    bl_idname = "multiplane.generate"
    bl_label = "Generate"

    def execute(self, context):
        scene = context.scene
        if not ready_to_start_or_report(self, scene):
            return {"CANCELLED"}
        if scene.multiplane.randomize_seed:
            scene.multiplane.seed = random_seed()
        try:
            body = build_request(scene)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        settings = backend_settings_or_report(self, context)
        if settings is None:
            return {"CANCELLED"}
        history = {"prompt": body["prompt"], "model": body["model"], "method": body["method"],
                   "request": json.dumps(body)}
        watcher.start(JobPlan(body=body, settings=settings, scene_name=scene.name, history_fields=history))
        ensure_timer()
        margins = shot.describe_margins(tuple(scene.multiplane.shot_margins))
        self.report({"INFO"}, f"Generating a {body['width']}x{body['height']} backdrop with "
                              f"{len(body['layers'])} foreground layer(s) ({body['model']}, {body['method']}; "
                              f"margins for the camera move: {margins})")
        return {"FINISHED"}


class MULTIPLANE_OT_cancel(Operator):
    """Stop the running generation (or the install), whatever phase it is in"""

    bl_idname = "multiplane.cancel"
    bl_label = "Cancel"

    def execute(self, _context):
        what = watcher.cancel()
        if not what:
            self.report({"INFO"}, "Nothing to cancel")
            return {"CANCELLED"}
        self.report({"INFO"}, "Install cancelled" if what == "install" else "Cancelling the generation")
        return {"FINISHED"}


class MULTIPLANE_OT_randomize_seed(Operator):
    """Pick a new random seed"""

    bl_idname = "multiplane.randomize_seed"
    bl_label = "Randomize Seed"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        context.scene.multiplane.seed = random_seed()
        return {"FINISHED"}


class MULTIPLANE_OT_copy_error(Operator):
    """Copy the last error to the clipboard (to paste into a bug report)"""

    bl_idname = "multiplane.copy_error"
    bl_label = "Copy Error"

    def execute(self, context):
        error = watcher.state.error
        if not error:
            self.report({"INFO"}, "No error to copy")
            return {"CANCELLED"}
        context.window_manager.clipboard = error
        self.report({"INFO"}, "Error copied to the clipboard")
        return {"FINISHED"}


class MULTIPLANE_OT_clear_error(Operator):
    """Dismiss the last error"""

    bl_idname = "multiplane.clear_error"
    bl_label = "Dismiss Error"

    def execute(self, _context):
        watcher.clear_error()
        return {"FINISHED"}


CLASSES = (
    MULTIPLANE_OT_generate,
    MULTIPLANE_OT_cancel,
    MULTIPLANE_OT_randomize_seed,
    MULTIPLANE_OT_copy_error,
    MULTIPLANE_OT_clear_error,
)


# Blender's own helper: registers CLASSES in order and unregisters them in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
