"""The history of generated stacks: re-import one, open its folder, or regenerate one of
its layers on the server that made it (a new stack; the others stay
byte-identical)."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty
from bpy.types import Operator

from .generate import backend_settings_or_report, random_seed, ready_to_start_or_report
from .limits import MAX_PROMPT_CHARS
from .properties import REGENERATE_SEED_MODES
from .stack_reader import LayerInfo, read_stack
from .watcher import JobPlan, describe_server_identity, ensure_timer, server_identity, watcher

IMPORTED = ("This stack was imported from a layered file: it has no model or prompts to regenerate a "
            "layer from; edit the file in the painting program and import it again")
NO_JOB_ID = ("This stack has no server job id (it was imported from elsewhere or made by an older "
             "version): regenerating one layer needs the job on the server that made it")


class OnHistoryItem:
    """Mix-in of the history operators: `index` says which stack (-1: the selected one)."""

    index: IntProperty(name="Stack", description="Which stack of the history (-1: the selected one)",
                        default=-1, options={"SKIP_SAVE", "HIDDEN"})

    def history_item(self, context):
        """The stack this operator works on, or None after an ERROR report."""
        history = context.scene.multiplane.history
        index = self.index if self.index >= 0 else context.scene.multiplane.history_index
        if not 0 <= index < len(history):
            self.report({"ERROR"}, "No generated stack selected")
            return None
        return history[index]


class MULTIPLANE_OT_history_import(Operator, OnHistoryItem):
    """Import this generated stack again (replaces its planes in place)"""

    bl_idname = "multiplane.history_import"
    bl_label = "Re-import Stack"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        item = self.history_item(context)
        if item is None:
            return {"CANCELLED"}
        return bpy.ops.multiplane.import_stack("EXEC_DEFAULT", filepath=item.path)


class MULTIPLANE_OT_history_open_folder(Operator, OnHistoryItem):
    """Open the stack's folder in the file manager"""

    bl_idname = "multiplane.history_open_folder"
    bl_label = "Open Folder"

    def execute(self, context):
        item = self.history_item(context)
        if item is None:
            return {"CANCELLED"}
        if not os.path.isdir(item.path):
            self.report({"ERROR"}, f"The folder {item.path} no longer exists")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=item.path)
        return {"FINISHED"}


def build_regenerate_request(layers: Sequence[LayerInfo], layer_index: int, prompt: str,
                             seed: Optional[int], tta_passes: int) -> dict:
    """The POST /v1/jobs/{id}/regenerate body; ValueError (artist-facing) for a layer that is
    not in the stack or an edit that changes nothing."""
    if not 0 <= layer_index < len(layers):
        raise ValueError(f"The stack has no layer {layer_index}: choose 0 (background) to {len(layers) - 1}")
    prompt = prompt.strip()
    if prompt and len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The new prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}")
    old_prompt = layers[layer_index].prompt.strip()
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


def same_server_or_report(operator, item, settings, otherwise: str) -> bool:
    """False (with an ERROR report) when the stack's job lives on another server than the one
    the preferences now point at (that one cannot edit it)."""
    here = server_identity(settings)
    if item.server and item.server != here:
        operator.report({"ERROR"}, f"This stack was made by {describe_server_identity(item.server)}, but "
                                   f"the add-on now uses {describe_server_identity(here)}, which does not "
                                   f"know its job: switch back in the Multiplane preferences, or {otherwise}")
        return False
    return True


def selected_job_poll(operator_class, context) -> bool:
    """Poll of the operators that edit the selected stack on its server: it needs a job id
    and a generated (not imported) stack (the greyed-out button's tooltip says why not)."""
    item = _selected_history_item(context)
    if item is None:
        operator_class.poll_message_set("Select a generated stack in the list first")
        return False
    if not item.job_id:
        operator_class.poll_message_set(NO_JOB_ID)
        return False
    if item.method == "imported":
        operator_class.poll_message_set(IMPORTED)
        return False
    return True


def _selected_history_item(context):
    settings = context.scene.multiplane
    if 0 <= settings.history_index < len(settings.history):
        return settings.history[settings.history_index]
    return None


class MULTIPLANE_OT_history_regenerate_layer(Operator, OnHistoryItem):
    """Regenerate one layer of this stack with a new prompt and/or seed, keeping the other layers exactly; the result is a new stack that replaces the backdrop's planes in place (the old one stays in the history)"""

    bl_idname = "multiplane.history_regenerate_layer"
    bl_label = "Regenerate Layer"

    layer: IntProperty(name="Layer", description="0 = background, 1.. = foregrounds (back to front)",
                       default=1, min=0, options={"SKIP_SAVE"})
    prompt: StringProperty(name="New Prompt", description="The layer's new prompt (empty: keep it)",
                           default="", options={"SKIP_SAVE"})
    seed_mode: EnumProperty(name="Seed", description="Which seed the regenerated layer gets",
                            items=REGENERATE_SEED_MODES, default="KEEP", options={"SKIP_SAVE"})
    seed: IntProperty(name="New Seed", description="The layer's seed when Seed is This Seed",
                      default=0, min=0, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        return selected_job_poll(cls, context)

    def execute(self, context):
        scene = context.scene
        item = self.history_item(context)
        if item is None:
            return {"CANCELLED"}
        if not item.job_id or item.method == "imported":
            self.report({"ERROR"}, IMPORTED if item.job_id else NO_JOB_ID)
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
            layers = read_stack(item.path, check_images=False).layers
            body = build_regenerate_request(layers, self.layer, self.prompt, seed,
                                            int(scene.multiplane.tta_passes))
        except ValueError as error:  # StackReadError included: the folder is gone or broken
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        settings = backend_settings_or_report(self, context)
        if settings is None:
            return {"CANCELLED"}
        if not same_server_or_report(self, item, settings, "change the layer's prompt and Generate again"):
            return {"CANCELLED"}
        # The engine gives the new stack its source's name and depths, so its import replaces
        # the same backdrop collection in place (the previous version stays in the history).
        history = {"prompt": item.prompt, "model": item.model, "method": item.method,
                   "request": json.dumps({"source": item.job_id, **body})}
        watcher.start(JobPlan(body=body, settings=settings, scene_name=scene.name, history_fields=history,
                              regenerate_from=item.job_id, source_folder=item.path))
        ensure_timer()
        what = "the background" if self.layer == 0 else f"layer {self.layer}"
        changes = " and ".join(part for part in (
            f"prompt {body['prompt']!r}" if "prompt" in body else "",
            f"seed {body['seed']}" if "seed" in body else "") if part)
        self.report({"INFO"}, f"Regenerating {what} of {item.name} with {changes}")
        return {"FINISHED"}


CLASSES = (
    MULTIPLANE_OT_history_import,
    MULTIPLANE_OT_history_open_folder,
    MULTIPLANE_OT_history_regenerate_layer,
)


# Blender's own helper: registers CLASSES in order and unregisters them in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
