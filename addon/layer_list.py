"""The foreground layer list of the panel: add, remove and reorder layers (back to front)."""
from __future__ import annotations

import bpy
from bpy.props import EnumProperty
from bpy.types import Operator

from .limits import MAX_FOREGROUNDS


def clamped_index(index: int, length: int) -> int:
    """The active row after a removal: `index` kept inside a list of `length` (0 when empty)."""
    return max(0, min(index, length - 1))


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

    direction: EnumProperty(name="Direction", description="Which way the layer moves in the list",
                            items=(("UP", "Up", "Further back (earlier in the list)"),
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


CLASSES = (
    MULTIPLANE_OT_layer_add,
    MULTIPLANE_OT_layer_remove,
    MULTIPLANE_OT_layer_move,
)


# Blender's own helper: registers CLASSES in order and unregisters them in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
