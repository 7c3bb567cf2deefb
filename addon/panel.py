"""The sidebar panel: 3D Viewport › Sidebar (N) › Multiplane.

Drawing reads only the scene's settings, the watcher's state (plain Python values) and a
few file-existence checks for the status line; it never touches the network, so it is cheap
at every redraw. `draw_panel()` is a
plain function of (layout, context) so tests can draw it against a recording layout.
"""
from __future__ import annotations

import bpy
from bpy.types import Panel, UIList

from . import generate, history, history_library, installer, layer_list, library, preferences, shot, shot_operators
from .canvas import CANVAS_MAX_SIDE
from .watcher import WatchState, watcher

PHASE_ICONS = {
    "installing": "IMPORT", "starting": "SORTTIME", "submitting": "URL", "queued": "SORTTIME",
    "running": "RENDER_STILL", "downloading": "IMPORT", "importing": "IMAGE_PLANE",
}


class MULTIPLANE_UL_layers(UIList):
    """Foreground layers, back to front."""

    def draw_item(self, _context, layout, _data, item, _icon, _active_data, _active_property, index=0, _flt_flag=0):
        row = layout.row(align=True)
        row.label(text=f"{index + 1}", icon="IMAGE_RGB_ALPHA")
        row.prop(item, "prompt", text="", emboss=False)
        if item.use_box:
            row.label(text="", icon="SELECT_SET")


def history_search_text(item) -> str:
    """What the history's search field matches: name, prompts, model, method, size, date."""
    return " ".join([item.name, item.prompt, item.model, item.method, item.size, item.created,
                     *(layer.prompt for layer in item.layers)])


class MULTIPLANE_UL_history(UIList):
    """Every stack in the Stacks Folder, newest first; the search field matches any of its
    words in the name, prompts, model, method, size or date."""

    def draw_item(self, _context, layout, _data, item, _icon, _active_data, _active_property, index=0, _flt_flag=0):
        row = layout.row(align=True)
        icon = history_library.thumbnail_icon(item.thumbnail)
        if icon:
            row.label(text=item.name or item.path, icon_value=icon)
        else:
            row.label(text=item.name or item.path, icon="RENDERLAYERS")
        row.label(text=item.created)

    def filter_items(self, _context, data, propname):
        items = getattr(data, propname)
        keep = library.filter_flags((history_search_text(item) for item in items), self.filter_name)
        return [self.bitflag_filter_item if kept else 0 for kept in keep], []


def draw_progress(layout, state: WatchState, install) -> None:
    if install is not None and install.running:
        fraction, text, icon = install.fraction, f"Installing: {install.status}", "IMPORT"
    else:
        fraction, text, icon = state.fraction, state.text or state.phase.title(), PHASE_ICONS.get(state.phase, "INFO")
    row = layout.row(align=True)
    if hasattr(row, "progress"):  # Blender 4.2+
        row.progress(factor=max(0.0, min(1.0, fraction)), type="BAR", text=text)
    else:
        row.label(text=f"{text} ({fraction:.0%})", icon=icon)
    row.operator(generate.MULTIPLANE_OT_cancel.bl_idname, text="", icon="CANCEL")


def draw_live_previews(layout, state: WatchState) -> None:
    """The running job's live previews, one small picture per layer (bpy.utils.previews)."""
    if not state.previews:
        return
    box = layout.box()
    box.label(text=f"Preview (step {state.preview_step})", icon="RENDER_RESULT")
    row = box.row(align=True)
    for name, path in state.previews.items():
        column = row.column(align=True)
        icon = history_library.thumbnail_icon(path)
        if icon:
            column.template_icon(icon_value=icon, scale=3.0)
        column.label(text=name.replace("layer_", "#"))


def draw_error(layout, message: str) -> None:
    box = layout.box()
    header = box.row()
    header.label(text="Error", icon="ERROR")
    header.operator(generate.MULTIPLANE_OT_copy_error.bl_idname, text="", icon="COPYDOWN")
    header.operator(generate.MULTIPLANE_OT_clear_error.bl_idname, text="", icon="X")
    column = box.column(align=True)
    for line in wrap(message, 48):
        column.label(text=line)


def wrap(text: str, width: int) -> list[str]:
    """Split a long message into label-sized lines (labels do not wrap)."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            while len(word) > width:  # paths have no spaces
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:width])
                word = word[width:]
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines[:12]


def draw_import_warnings(layout, warnings) -> None:
    """What the last layered-file import could not carry over (blend modes, adjustments...)."""
    box = layout.box()
    box.label(text=f"{len(warnings)} import warning(s)", icon="ERROR")
    column = box.column(align=True)
    for warning in warnings[:6]:
        for line in wrap(warning, 48)[:3]:
            column.label(text=line)
    if len(warnings) > 6:
        column.label(text=f"… and {len(warnings) - 6} more (stack.json, 'imported')")


def draw_regenerate(layout, settings, item, busy: bool) -> None:
    """Regenerate one layer of the selected stack: which layer, its new prompt and/or seed."""
    box = layout.box()
    box.enabled = not busy
    box.label(text="Regenerate One Layer", icon="FILE_REFRESH")
    if item.job_id:
        box.prop(settings, "regenerate_layer")
        box.prop(settings, "regenerate_prompt")
        row = box.row(align=True)
        row.prop(settings, "regenerate_seed_mode", text="")
        if settings.regenerate_seed_mode == "SET":
            row.prop(settings, "regenerate_seed", text="")
    else:  # the button stays, greyed out by the operator's poll, whose tooltip says why
        box.label(text="No server job id for this stack", icon="INFO")
    op = box.operator(history.MULTIPLANE_OT_history_regenerate_layer.bl_idname, icon="FILE_REFRESH")
    op.index = settings.history_index
    try:
        op.layer = int(settings.regenerate_layer)
    except (TypeError, ValueError):  # the enum has no valid value for this stack
        op.layer = 0
    op.prompt = settings.regenerate_prompt
    op.seed_mode = settings.regenerate_seed_mode
    op.seed = settings.regenerate_seed


def draw_stack_details(layout, item) -> None:
    """The selected stack: its composite and layer thumbnails, prompt, model, method, size, date."""
    box = layout.box()
    composite = history_library.thumbnail_icon(item.thumbnail)
    if composite:
        box.template_icon(icon_value=composite, scale=6.0)
    thumbnails = [(layer, history_library.thumbnail_icon(layer.file)) for layer in item.layers]
    if any(icon for _layer, icon in thumbnails):
        row = box.row(align=True)
        for layer, icon in thumbnails:
            column = row.column(align=True)
            column.template_icon(icon_value=icon, scale=2.0)
            column.label(text=layer.name)
    for line in wrap(item.prompt or "(no prompt)", 48)[:3]:
        box.label(text=line)
    box.label(text=" · ".join(part for part in (item.model, item.method, item.size, item.created) if part),
              icon="INFO")


def draw_canvas(layout, scene) -> None:
    """The canvas Generate will ask for: its size, the frame's effective resolution inside it,
    the margins of the shot as last read, and whether the size cap lowers detail."""
    settings = scene.multiplane
    margins = tuple(settings.shot_margins) if settings.use_shot_margins else shot.NO_MARGINS
    row = layout.row(align=True)
    row.prop(settings, "use_shot_margins")
    row.operator(shot_operators.MULTIPLANE_OT_read_shot.bl_idname, text="", icon="CAMERA_DATA")
    try:
        plan = shot.plan_for_scene(scene, settings.model, margins)
    except shot.ShotError as error:
        for line in wrap(str(error), 48):
            layout.label(text=line, icon="ERROR")
        return
    column = layout.column(align=True)
    column.label(text=f"Canvas: {plan.width} x {plan.height}", icon="IMAGE_DATA")
    column.label(text=f"Frame: {plan.frame_width:.0f} x {plan.frame_height:.0f} px (the render's aspect)")
    if settings.use_shot_margins:
        column.label(text=f"Margins: {shot.describe_margins(margins)}")
    if settings.shot_warning:
        box = layout.box()
        for line in wrap(settings.shot_warning, 48):
            box.label(text=line, icon="ERROR")
        box.operator(shot_operators.MULTIPLANE_OT_extend_for_shot.bl_idname, icon="FULLSCREEN_ENTER")
    if plan.capped:
        column.label(text=f"Capped at {CANVAS_MAX_SIDE} px a side: less detail than the model's native size",
                     icon="INFO")


def draw_history(layout, settings, busy: bool) -> None:
    """The library: every stack of the Stacks Folder, with its actions."""
    layout.separator()
    header = layout.row(align=True)
    header.label(text="Stacks Library")
    header.operator(history_library.MULTIPLANE_OT_history_refresh.bl_idname, text="", icon="FILE_REFRESH")
    if not len(settings.history):
        layout.label(text="No stacks yet: they appear here when generated", icon="INFO")
        return
    layout.template_list("MULTIPLANE_UL_history", "", settings, "history", settings, "history_index", rows=3)
    row = layout.row(align=True)
    row.operator(history.MULTIPLANE_OT_history_import.bl_idname, text="Import", icon="IMPORT")
    row.operator(history_library.MULTIPLANE_OT_history_use_settings.bl_idname, text="Use Settings",
                 icon="PASTEDOWN")
    row.operator(history.MULTIPLANE_OT_history_open_folder.bl_idname, text="", icon="FILE_FOLDER")
    row.operator(history_library.MULTIPLANE_OT_history_delete.bl_idname, text="", icon="TRASH")
    if 0 <= settings.history_index < len(settings.history):
        item = settings.history[settings.history_index]
        draw_stack_details(layout, item)
        draw_regenerate(layout, settings, item, busy)
        extend = layout.row()
        extend.enabled = not busy
        extend.operator(shot_operators.MULTIPLANE_OT_extend_for_shot.bl_idname, icon="FULLSCREEN_ENTER")


def draw_layer_list(column, settings) -> None:
    """The foreground layers, their buttons, and the selected layer's prompt, depth and box."""
    column.label(text="Foreground Layers (back to front)")
    row = column.row()
    row.template_list("MULTIPLANE_UL_layers", "", settings, "layers", settings, "layer_index", rows=3)
    side = row.column(align=True)
    side.operator(layer_list.MULTIPLANE_OT_layer_add.bl_idname, text="", icon="ADD")
    side.operator(layer_list.MULTIPLANE_OT_layer_remove.bl_idname, text="", icon="REMOVE")
    side.separator()
    side.operator(layer_list.MULTIPLANE_OT_layer_move.bl_idname, text="", icon="TRIA_UP").direction = "UP"
    side.operator(layer_list.MULTIPLANE_OT_layer_move.bl_idname, text="", icon="TRIA_DOWN").direction = "DOWN"
    side.separator()
    side.operator(shot_operators.MULTIPLANE_OT_layers_from_selected.bl_idname, text="", icon="OBJECT_DATA")
    if 0 <= settings.layer_index < len(settings.layers):
        layer = settings.layers[settings.layer_index]
        box = column.box()
        box.prop(layer, "prompt")
        box.prop(layer, "proxy")
        box.prop(layer, "depth")
        box.prop(layer, "use_box")
        if layer.use_box:
            box.prop(layer, "box", text="")
            box.prop(settings, "show_layout_boxes")


def draw_panel(layout, context) -> None:
    scene = context.scene
    settings = scene.multiplane
    state = watcher.state
    install = installer.current_install()
    busy = watcher.busy or (install is not None and install.running)

    column = layout.column()
    column.enabled = not busy
    column.prop(settings, "stack_name")
    column.prop(settings, "prompt")
    column.prop(settings, "negative_prompt")
    column.prop(settings, "background_prompt")

    draw_layer_list(column, settings)

    column.separator()
    column.prop(settings, "method")
    column.prop(settings, "model")
    draw_canvas(column, scene)
    column.prop(settings, "steps")
    column.prop(settings, "guidance")
    seed_row = column.row(align=True)
    seed_row.prop(settings, "seed")
    seed_row.operator(generate.MULTIPLANE_OT_randomize_seed.bl_idname, text="", icon="FILE_REFRESH")
    column.prop(settings, "randomize_seed")
    column.prop(settings, "tta_passes")
    row = column.row(align=True)
    row.prop(settings, "export_psd")
    row.prop(settings, "export_exr")

    layout.separator()
    if busy:
        draw_progress(layout, state, install)
        draw_live_previews(layout, state)
    else:
        row = layout.row()
        row.scale_y = 1.5
        row.operator(generate.MULTIPLANE_OT_generate.bl_idname, icon="RENDER_STILL")
        if state.phase == "succeeded" and state.imported:
            layout.label(text=f"Done: {state.imported}", icon="CHECKMARK")
            if state.warnings:
                draw_import_warnings(layout, state.warnings)
        elif state.phase == "cancelled":
            layout.label(text=state.text or "Cancelled", icon="CANCEL")

    error = state.error or (install.error if install is not None and install.done and not install.cancelled else "")
    if error:
        draw_error(layout, error)

    text, icon = preferences.status_text(context)
    layout.label(text=text, icon=icon)

    draw_history(layout, settings, busy)

    layout.separator()
    row = layout.row(align=True)
    row.operator("multiplane.import_stack", text="Import Stack…", icon="FILE_IMAGE")
    row.operator("multiplane.build_compositor", text="Compositor", icon="NODE_COMPOSITING")
    layout.operator("multiplane.import_layered_file", text="Import Layered File (PSD/ORA)…", icon="FILE_IMAGE")
    row = layout.row(align=True)
    row.operator("multiplane.parallax_move", icon="CAMERA_DATA")
    row.operator("multiplane.show_layers_in_solid_mode", text="Solid Mode", icon="SHADING_TEXTURE")


class VIEW3D_PT_multiplane(Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Multiplane"
    bl_label = "Multiplane"

    def draw(self, context):
        draw_panel(self.layout, context)


CLASSES = (MULTIPLANE_UL_layers, MULTIPLANE_UL_history, VIEW3D_PT_multiplane)


# Blender's own helper: registers CLASSES in order and unregisters them in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
