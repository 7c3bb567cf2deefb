"""The history as a library of the stacks folder (the bpy side of library.py): list every
stack there in the panel, with thumbnails; put a stack's settings back into the panel; delete
a stack (after a confirmation).

The scene's `history` collection is the panel's list of the library: `sync_history()` fills it
from the stacks folder when a .blend is opened, when the add-on is enabled, and on Refresh,
so it survives across .blend files and Blender sessions. Thumbnails are `bpy.utils.previews`
icons of each stack's composite and layer images, loaded the first time they are drawn.
"""
from __future__ import annotations

from pathlib import Path

import bpy
from bpy.app.handlers import persistent
from bpy.types import Operator

from . import library, preferences
from .history import OnHistoryItem
from .layer_list import clamped_index
from .limits import MAX_FOREGROUNDS
from .properties import METHOD_ITEMS, MODELS
from .stack_reader import StackReadError, read_recipe

_previews = None  # bpy.utils.previews collection while registered


def thumbnail_preview(path: str):
    """The preview (bpy.types.ImagePreview) of an image file, loaded on first use; None when
    the file is gone or the add-on is not registered."""
    if _previews is None or not path:
        return None
    if path not in _previews:
        if not Path(path).is_file():
            return None
        _previews.load(path, path, "IMAGE")
    return _previews[path]


def thumbnail_icon(path: str) -> int:
    """The icon id of an image file's preview (0: none; also always 0 without a UI, where
    Blender makes no icons, and the panel then shows a plain icon)."""
    preview = thumbnail_preview(path)
    return preview.icon_id if preview is not None else 0


def sync_history(scene, stacks_dir) -> list[str]:
    """Make the scene's history list the stacks folder (newest first), keeping each listed
    item's request and any stack from elsewhere whose folder still exists; returns one line
    per folder that could not be read."""
    settings = scene.multiplane
    history = settings.history
    selected = history[settings.history_index].path if 0 <= settings.history_index < len(history) else ""
    entries, problems = library.scan_stacks(stacks_dir)
    listed = {str(entry.folder) for entry in entries}
    kept = {item.path: (item.request, item.job_id, item.server) for item in history}
    for path in kept:
        if path not in listed and Path(path).is_dir():  # an older stacks folder, or a test's
            try:
                entries.append(library.entry_for(Path(path)))
            except StackReadError:
                continue
    entries.sort(key=lambda entry: entry.recipe.created, reverse=True)
    history.clear()
    for entry in entries:
        item = history.add()
        request, job_id, server = kept.get(str(entry.folder), ("", "", ""))
        item.request, item.job_id, item.server = request, job_id, server
        library.fill_history_item(item, entry)
    paths = [item.path for item in history]
    settings.history_index = paths.index(selected) if selected in paths else 0
    return problems


def apply_panel_settings(scene, values: dict) -> list[str]:
    """Put a stack's settings (library.panel_settings) into the panel; returns notes on what
    could not be recalled."""
    settings, notes = scene.multiplane, []
    for key in ("stack_name", "prompt", "negative_prompt", "background_prompt", "seed", "steps", "guidance"):
        if key in values:
            setattr(settings, key, values[key])
    layers = values.get("layers", [])[:MAX_FOREGROUNDS]
    settings.layers.clear()
    for layer in layers:
        row = settings.layers.add()
        row.prompt, row.depth = layer["prompt"], layer["depth"]
        row.use_box = layer["box"] is not None
        if layer["box"] is not None:
            row.box = layer["box"]
    settings.layer_index = 0
    for key, items in (("method", METHOD_ITEMS), ("model", MODELS)):
        value = values.get(key, "")
        if value in {item[0] for item in items}:
            setattr(settings, key, value)
        elif value:
            notes.append(f"its {key} {value!r} is not one of the panel's: {key} left at {getattr(settings, key)!r}")
    if "size" in values:
        render = scene.render
        render.resolution_x, render.resolution_y = values["size"]
        render.resolution_percentage = 100
    return notes


def _sync_scene(context, operator=None) -> None:
    problems = sync_history(context.scene, preferences.backend_settings(context).stacks_dir)
    if operator is not None:
        for problem in problems[:5]:
            operator.report({"WARNING"}, f"Skipped a stack that cannot be read: {problem}")


class MULTIPLANE_OT_history_refresh(Operator):
    """List every stack in the Stacks Folder again (stacks made in other .blend files and sessions included)"""

    bl_idname = "multiplane.history_refresh"
    bl_label = "Refresh Stacks"

    def execute(self, context):
        _sync_scene(context, self)
        self.report({"INFO"}, f"{len(context.scene.multiplane.history)} stack(s) in the library")
        return {"FINISHED"}


class MULTIPLANE_OT_history_use_settings(Operator, OnHistoryItem):
    """Put this stack's prompt, layers (with boxes and depths), seed, steps, guidance, method, model and size back into the panel"""

    bl_idname = "multiplane.history_use_settings"
    bl_label = "Use These Settings"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        item = self.history_item(context)
        if item is None:
            return {"CANCELLED"}
        try:
            values = library.panel_settings(read_recipe(item.path))
        except StackReadError as error:
            self.report({"ERROR"}, f"Cannot read the stack's settings: {error}")
            return {"CANCELLED"}
        notes = apply_panel_settings(context.scene, values)
        self.report({"INFO"}, f"The panel now has the settings of {item.name} "
                              f"({len(values.get('layers', []))} foreground layer(s))")
        for note in notes:
            self.report({"WARNING"}, f"{item.name}: {note}")
        return {"FINISHED"}


class MULTIPLANE_OT_history_delete(Operator, OnHistoryItem):
    """Delete this stack's folder from the Stacks Folder, after asking (planes already imported keep their images)"""

    bl_idname = "multiplane.history_delete"
    bl_label = "Delete Stack"

    def invoke(self, context, event):
        item = self.history_item(context)
        if item is None:
            return {"CANCELLED"}
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context):
        settings = context.scene.multiplane
        item = self.history_item(context)
        if item is None:
            return {"CANCELLED"}
        name, folder = item.name, Path(item.path)
        try:
            library.delete_stack(folder, preferences.backend_settings(context).stacks_dir)
        except library.LibraryError as error:
            self.report({"ERROR"}, f"Cannot delete {name}: {error}")
            return {"CANCELLED"}
        settings.history.remove(list(settings.history).index(item))
        settings.history_index = clamped_index(settings.history_index, len(settings.history))
        self.report({"INFO"}, f"Deleted {name} ({folder})")
        return {"FINISHED"}


@persistent
def _sync_after_load(*_args) -> None:
    """A .blend was opened: its history lists the stacks folder as it is now."""
    try:
        _sync_scene(bpy.context)
    except (AttributeError, RuntimeError):  # no scene yet (factory startup without one)
        pass


def _sync_once():
    _sync_after_load()
    return None  # a one-shot timer


CLASSES = (MULTIPLANE_OT_history_refresh, MULTIPLANE_OT_history_use_settings, MULTIPLANE_OT_history_delete)

_register_classes, _unregister_classes = bpy.utils.register_classes_factory(CLASSES)


def register() -> None:
    global _previews
    import bpy.utils.previews

    _register_classes()
    _previews = bpy.utils.previews.new()
    bpy.app.handlers.load_post.append(_sync_after_load)
    bpy.app.timers.register(_sync_once, first_interval=0.5)  # enabled in a running Blender


def unregister() -> None:
    global _previews
    import bpy.utils.previews

    if bpy.app.timers.is_registered(_sync_once):
        bpy.app.timers.unregister(_sync_once)
    if _sync_after_load in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_sync_after_load)
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
    _unregister_classes()
