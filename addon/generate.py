"""Operators behind the sidebar panel: Generate, Cancel, the layer list and the history.

Generate only gathers the scene's settings into a request body and hands it to the job
watcher (jobs.py); everything slow happens on the watcher's thread. User mistakes (no
prompt, a box inside out, no inference environment) are one ERROR report, never a traceback.
"""
from __future__ import annotations

import json
import os
import random
from typing import Optional

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty
from bpy.types import Operator

from . import installer, jobs, preferences
from .limits import (MAX_FOREGROUNDS, MAX_NAME_CHARS, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIZE, MIN_SIZE,
                     SIZE_MULTIPLE)
from .properties import REGENERATE_SEED_MODES

NO_JOB_ID = ("This stack has no server job id (it was imported from elsewhere or made by an older "
             "version): regenerating one layer needs the job on the server that made it")


def round_size(value: float) -> int:
    """Nearest multiple of 64 inside the server's limits (the transparent decoder works on
    64-pixel tiles)."""
    rounded = int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE
    return max(MIN_SIZE, min(MAX_SIZE, rounded))


def generation_size(scene) -> tuple[int, int, int, int]:
    """(width, height, render width, render height): the render size (with its percentage)
    rounded to multiples of 64. The planes are fitted to the camera frame on import, so a
    slightly different aspect ratio is stretched back to the frame."""
    render = scene.render
    scale = render.resolution_percentage / 100.0
    rw, rh = round(render.resolution_x * scale), round(render.resolution_y * scale)
    return round_size(rw), round_size(rh), rw, rh


def build_request(scene) -> tuple[dict, list]:
    """The POST /v1/jobs body for the scene's settings, and the layer depths (back to front).

    Raises ValueError with an artist-facing sentence for settings the server would refuse."""
    settings = scene.multiplane
    prompt = settings.prompt.strip()
    if not prompt:
        raise ValueError("Write a prompt for the whole scene first (the Prompt field in the Multiplane panel)")
    if len(settings.layers) > MAX_FOREGROUNDS:
        raise ValueError(f"At most {MAX_FOREGROUNDS} foreground layers; remove {len(settings.layers) - MAX_FOREGROUNDS}")
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
        layers.append(item)
    width, height, _rw, _rh = generation_size(scene)
    body = {
        "prompt": prompt,
        "negative_prompt": settings.negative_prompt.strip(),
        "background": settings.background_prompt.strip(),
        "layers": layers,
        "method": settings.method,
        "model": settings.model,
        "width": width,
        "height": height,
        "steps": int(settings.steps),
        "guidance": float(settings.guidance),
        "seed": int(settings.seed),
        "tta_passes": int(settings.tta_passes),
        "name": (settings.stack_name.strip() or f"{scene.name} backdrop")[:MAX_NAME_CHARS],
    }
    depths = [None] + [layer.depth or None for layer in settings.layers]
    return body, depths


def watcher_free_or_report(operator) -> bool:
    """False (with an ERROR report) while a generation or the install runs."""
    if jobs.watcher.busy:
        operator.report({"ERROR"}, "A backdrop is already being generated: wait for it or press Cancel")
        return False
    install = installer.current()
    if install is not None and install.running:
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


def clamped_index(index: int, length: int) -> int:
    """The active row after a removal: `index` kept inside a list of `length` (0 when empty)."""
    return max(0, min(index, length - 1))


def backend_settings_or_report(operator, context):
    """The preferences as BackendSettings when a job can be sent with them, else None after
    an ERROR report (no inference environment, no server URL, online access off)."""
    settings = preferences.backend_settings(context)
    if settings.mode == "LOCAL":
        server = preferences.backend.current()
        if server is None or server.poll() not in ("starting", "ready"):
            probe = settings.make_server()
            try:
                probe.check()
            except preferences.backend.BackendError as error:
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
        watcher = jobs.watcher
        if not ready_to_start_or_report(self, scene):
            return {"CANCELLED"}
        if scene.multiplane.randomize_seed:
            scene.multiplane.seed = random_seed()
        try:
            body, depths = build_request(scene)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        settings = backend_settings_or_report(self, context)
        if settings is None:
            return {"CANCELLED"}
        history = {"prompt": body["prompt"], "model": body["model"], "method": body["method"],
                   "request": json.dumps(body)}
        watcher.start(jobs.JobPlan(body=body, settings=settings, scene_name=scene.name, depths=depths,
                                   history_fields=history))
        jobs.ensure_timer()
        self.report({"INFO"}, f"Generating a {body['width']}x{body['height']} backdrop with "
                              f"{len(body['layers'])} foreground layer(s) ({body['model']}, {body['method']})")
        return {"FINISHED"}


class MULTIPLANE_OT_cancel(Operator):
    """Stop the running generation (or the install), whatever phase it is in"""

    bl_idname = "multiplane.cancel"
    bl_label = "Cancel"

    def execute(self, _context):
        what = jobs.watcher.cancel()
        if not what:
            self.report({"INFO"}, "Nothing to cancel")
            return {"CANCELLED"}
        self.report({"INFO"}, "Install cancelled" if what == "install" else "Cancelling the generation")
        return {"FINISHED"}


class MULTIPLANE_OT_layer_add(Operator):
    """Add a foreground layer in front of the active one"""

    bl_idname = "multiplane.layer_add"
    bl_label = "Add Layer"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        settings = context.scene.multiplane
        if len(settings.layers) >= MAX_FOREGROUNDS:
            self.report({"ERROR"}, f"At most {MAX_FOREGROUNDS} foreground layers")
            return {"CANCELLED"}
        settings.layers.add()
        new_index = len(settings.layers) - 1
        if len(settings.layers) > 1:
            target = min(settings.layer_index + 1, new_index)
            settings.layers.move(new_index, target)
            new_index = target
        settings.layer_index = new_index
        return {"FINISHED"}


class MULTIPLANE_OT_layer_remove(Operator):
    """Remove the active foreground layer"""

    bl_idname = "multiplane.layer_remove"
    bl_label = "Remove Layer"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        settings = context.scene.multiplane
        if not len(settings.layers) or not 0 <= settings.layer_index < len(settings.layers):
            self.report({"ERROR"}, "No foreground layer selected")
            return {"CANCELLED"}
        settings.layers.remove(settings.layer_index)
        settings.layer_index = clamped_index(settings.layer_index, len(settings.layers))
        return {"FINISHED"}


class MULTIPLANE_OT_layer_move(Operator):
    """Move the active foreground layer back or forward"""

    bl_idname = "multiplane.layer_move"
    bl_label = "Move Layer"
    bl_options = {"REGISTER", "UNDO"}

    direction: EnumProperty(items=(("UP", "Up", "Further back (earlier in the list)"),
                                   ("DOWN", "Down", "Further forward (later in the list)")))

    def execute(self, context):
        settings = context.scene.multiplane
        index = settings.layer_index
        target = index - 1 if self.direction == "UP" else index + 1
        if not (0 <= index < len(settings.layers) and 0 <= target < len(settings.layers)):
            return {"CANCELLED"}
        settings.layers.move(index, target)
        settings.layer_index = target
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
        error = jobs.watcher.state.error
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
        jobs.watcher.clear_error()
        return {"FINISHED"}


def _history_item(operator, context):
    history = context.scene.multiplane.history
    index = operator.index if operator.index >= 0 else context.scene.multiplane.history_index
    if not 0 <= index < len(history):
        operator.report({"ERROR"}, "No generated stack selected")
        return None
    return history[index]


class MULTIPLANE_OT_history_import(Operator):
    """Import this generated stack again (replaces its planes in place)"""

    bl_idname = "multiplane.history_import"
    bl_label = "Re-import Stack"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(default=-1, options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        item = _history_item(self, context)
        if item is None:
            return {"CANCELLED"}
        return bpy.ops.multiplane.import_stack("EXEC_DEFAULT", filepath=item.path)


class MULTIPLANE_OT_history_open_folder(Operator):
    """Open the stack's folder in the file manager"""

    bl_idname = "multiplane.history_open_folder"
    bl_label = "Open Folder"

    index: IntProperty(default=-1, options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        item = _history_item(self, context)
        if item is None:
            return {"CANCELLED"}
        if not os.path.isdir(item.path):
            self.report({"ERROR"}, f"The folder {item.path} no longer exists")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=item.path)
        return {"FINISHED"}


class MULTIPLANE_OT_history_remove(Operator):
    """Forget this stack (its files stay on disk)"""

    bl_idname = "multiplane.history_remove"
    bl_label = "Remove from History"
    bl_options = {"REGISTER", "UNDO"}

    index: IntProperty(default=-1, options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        settings = context.scene.multiplane
        item = _history_item(self, context)
        if item is None:
            return {"CANCELLED"}
        settings.history.remove(list(settings.history).index(item))
        settings.history_index = clamped_index(settings.history_index, len(settings.history))
        return {"FINISHED"}


def read_stack_manifest(folder: str) -> dict:
    """A history item's stack.json, its "layers" a non-empty list of dicts (back to front);
    ValueError with an artist-facing sentence when the folder or manifest is gone or broken."""
    path = os.path.join(folder, "stack.json")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"The stack's folder {folder} (or its stack.json) no longer exists") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read {path}: {error}") from None
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{path} lists no layers")
    manifest["layers"] = [layer if isinstance(layer, dict) else {} for layer in layers]
    return manifest


def build_regenerate_request(layers: list[dict], layer_index: int, prompt: str,
                             seed: Optional[int], tta_passes: int) -> dict:
    """The POST /v1/jobs/{id}/regenerate body; ValueError (artist-facing) for a layer that is
    not in the stack or an edit that changes nothing."""
    if not 0 <= layer_index < len(layers):
        raise ValueError(f"The stack has no layer {layer_index}: choose 0 (background) to {len(layers) - 1}")
    prompt = prompt.strip()
    if prompt and len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The new prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}")
    old_prompt = str(layers[layer_index].get("prompt") or "").strip()
    if prompt == old_prompt and seed is None:
        prompt = ""
    if not prompt and seed is None:
        raise ValueError("Nothing to change: write a new prompt for the layer and/or choose a new seed")
    body = {"layer_index": int(layer_index), "tta_passes": int(tta_passes)}
    if prompt:
        body["prompt"] = prompt
    if seed is not None:
        body["seed"] = int(seed)
    return body


def _selected_history_item(context):
    settings = context.scene.multiplane
    if 0 <= settings.history_index < len(settings.history):
        return settings.history[settings.history_index]
    return None


class MULTIPLANE_OT_history_regenerate_layer(Operator):
    """Regenerate one layer of this stack with a new prompt and/or seed, keeping the other layers exactly; the result is a new stack that replaces the backdrop's planes in place (the old one stays in the history)"""

    bl_idname = "multiplane.history_regenerate_layer"
    bl_label = "Regenerate Layer"

    index: IntProperty(default=-1, options={"SKIP_SAVE", "HIDDEN"})
    layer: IntProperty(name="Layer", description="0 = background, 1.. = foregrounds (back to front)",
                       default=1, min=0, options={"SKIP_SAVE"})
    prompt: StringProperty(name="New Prompt", description="The layer's new prompt (empty: keep it)",
                           default="", options={"SKIP_SAVE"})
    seed_mode: EnumProperty(name="Seed", items=REGENERATE_SEED_MODES, default="KEEP", options={"SKIP_SAVE"})
    seed: IntProperty(name="New Seed", default=0, min=0, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        item = _selected_history_item(context)
        if item is None:
            cls.poll_message_set("Select a generated stack in the list first")
            return False
        if not item.job_id:
            cls.poll_message_set(NO_JOB_ID)
            return False
        return True

    def execute(self, context):
        scene = context.scene
        item = _history_item(self, context)
        if item is None:
            return {"CANCELLED"}
        if not item.job_id:
            self.report({"ERROR"}, NO_JOB_ID)
            return {"CANCELLED"}
        if not ready_to_start_or_report(self, scene):
            return {"CANCELLED"}
        if self.seed_mode == "RANDOM":
            seed = random_seed()
        elif self.seed_mode == "SET":
            seed = int(self.seed)
        else:
            seed = None
        try:
            manifest = read_stack_manifest(item.path)
            layers = manifest["layers"]
            body = build_regenerate_request(layers, self.layer, self.prompt, seed,
                                            int(scene.multiplane.tta_passes))
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        settings = backend_settings_or_report(self, context)
        if settings is None:
            return {"CANCELLED"}
        here = jobs.server_identity(settings)
        if item.server and item.server != here:
            self.report({"ERROR"}, f"This stack was made by {jobs.describe_server_identity(item.server)}, but "
                                   f"the add-on now uses {jobs.describe_server_identity(here)}, which does not "
                                   f"know its job: switch back in the Multiplane preferences, or change the "
                                   f"layer's prompt and Generate again")
            return {"CANCELLED"}
        # The new stack keeps the source's name, so its import replaces the same backdrop
        # collection in place (the previous version stays in the history to re-import).
        source_name = str(manifest.get("name") or os.path.basename(os.path.normpath(item.path)))
        depths = [layer.get("depth") if isinstance(layer.get("depth"), (int, float)) else None for layer in layers]
        history = {"prompt": item.prompt, "model": item.model, "method": item.method,
                   "request": json.dumps({"source": item.job_id, **body})}
        jobs.watcher.start(jobs.JobPlan(body=body, settings=settings, scene_name=scene.name, depths=depths,
                                        history_fields=history, regenerate_from=item.job_id,
                                        stack_name=source_name, source_folder=item.path))
        jobs.ensure_timer()
        what = "the background" if self.layer == 0 else f"layer {self.layer}"
        changes = " and ".join(part for part in (
            f"prompt {body['prompt']!r}" if "prompt" in body else "",
            f"seed {body['seed']}" if "seed" in body else "") if part)
        self.report({"INFO"}, f"Regenerating {what} of {item.name} with {changes}")
        return {"FINISHED"}


CLASSES = (
    MULTIPLANE_OT_generate,
    MULTIPLANE_OT_cancel,
    MULTIPLANE_OT_layer_add,
    MULTIPLANE_OT_layer_remove,
    MULTIPLANE_OT_layer_move,
    MULTIPLANE_OT_randomize_seed,
    MULTIPLANE_OT_copy_error,
    MULTIPLANE_OT_clear_error,
    MULTIPLANE_OT_history_import,
    MULTIPLANE_OT_history_open_folder,
    MULTIPLANE_OT_history_remove,
    MULTIPLANE_OT_history_regenerate_layer,
)


# Blender's own helper: registers CLASSES in order and unregisters them in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
