"""The operators about the shot: read the camera's motion (the margins it needs), lay
layers out from blockout proxies, keep proxy layers in step with their objects, and extend
a generated stack for a new camera move. Thin: the sampling is `shot`'s, the maths
`geometry`'s, the job is the watcher's.

User mistakes (no camera, nothing selected, a proxy behind the camera) are one ERROR
report and CANCELLED, never a traceback.
"""
from __future__ import annotations

import json

import bpy
from bpy.props import BoolProperty
from bpy.types import Operator

from . import importer, shot
from .canvas import plan_extension
from .geometry import missing_margins
from .limits import MAX_FOREGROUNDS, MAX_NAME_CHARS
from .stack_reader import StackReadError, read_stack

BACKGROUND_NAME = "background"  # taken by the stack's background: a proxy so named keeps the default layer name


def refresh_proxy_layers(scene: bpy.types.Scene) -> int:
    """Read every proxy layer's box and depth again from its object at the shot's start
    (the proxy moved: the layer follows). Returns how many were read; ValueError (artist-
    facing) for a proxy the camera cannot see there."""
    settings = scene.multiplane
    linked = [(index, layer) for index, layer in enumerate(settings.layers, start=1) if layer.proxy is not None]
    if not linked or scene.camera is None:
        return 0
    layouts = []
    for index, layer in linked:
        try:
            layouts.append(shot.layouts_at_start(scene, [layer.proxy])[0])
        except shot.ShotError as error:
            raise ValueError(f"Foreground layer {index}'s proxy: {error}. Move it into the camera's view at "
                             f"frame {scene.frame_start}, or clear the layer's Proxy") from None
    for (_index, layer), (box, depth) in zip(linked, layouts):
        layer.use_box = True
        layer.box = box
        layer.depth = depth
    return len(linked)


def proxy_layer_name(obj: bpy.types.Object) -> str:
    """The stack layer name for a proxy: the object's (the background's name stays the background's)."""
    name = obj.name[:MAX_NAME_CHARS]
    return "" if name == BACKGROUND_NAME else name


class MULTIPLANE_OT_read_shot(Operator):
    """Sample the active camera over the scene's frame range: the margins the move needs (and what the current backdrop lacks)"""

    bl_idname = "multiplane.read_shot"
    bl_label = "Read Shot"

    def execute(self, context):
        scene = context.scene
        settings = scene.multiplane
        try:
            take = shot.read_shot(scene)
            distances = shot.generation_distances([layer.depth for layer in settings.layers])
            margins = shot.margins_for(take, distances)
            plan = shot.plan_for_scene(scene, settings.model, margins)
        except shot.ShotError as error:
            self.report({"ERROR"}, f"Cannot read the shot: {error}")
            return {"CANCELLED"}
        settings.shot_margins = margins
        settings.shot_warning = ""
        self.report({"INFO"}, f"Frames {take.frame_start}-{take.frame_end}: margins "
                              f"{shot.describe_margins(margins)}; canvas {plan.width} x {plan.height}")
        backdrop = importer.find_backdrop(scene)
        if backdrop is not None:
            try:
                shortfall = shot.backdrop_shortfall(scene, backdrop, take)
            except shot.ShotError as error:
                settings.shot_warning = f"The backdrop cannot fill this shot: {error}"
                self.report({"WARNING"}, settings.shot_warning)
                return {"FINISHED"}
            if shortfall.lacking:
                settings.shot_warning = f"{backdrop.name}: {shot.describe_shortfall(shortfall)}"
                self.report({"WARNING"}, settings.shot_warning)
        return {"FINISHED"}


class MULTIPLANE_OT_layers_from_selected(Operator):
    """One foreground layer per selected object, laid out from its place in the camera frame at the shot's first frame (box and depth follow the object on every Generate)"""

    bl_idname = "multiplane.layers_from_selected"
    bl_label = "Layers from Selected"
    bl_options = {"REGISTER", "UNDO"}

    hide_proxies: BoolProperty(
        name="Hide Proxies in Render",
        description="Keep the blockout objects out of the render (they stay visible in the viewport)",
        default=True,
    )

    def execute(self, context):
        scene = context.scene
        settings = scene.multiplane
        objects = [obj for obj in context.selected_objects
                   if obj.type != "CAMERA" and obj.get(importer.PROP_LAYER) is None]
        if not objects:
            self.report({"ERROR"}, "Select the blockout objects to lay layers out from (cameras and "
                                   "backdrop planes do not count)")
            return {"CANCELLED"}
        linked = {layer.proxy.name: layer for layer in settings.layers if layer.proxy is not None}
        new = [obj for obj in objects if obj.name not in linked]
        if len(settings.layers) + len(new) > MAX_FOREGROUNDS:
            self.report({"ERROR"}, f"At most {MAX_FOREGROUNDS} foreground layers: there are "
                                   f"{len(settings.layers)}, and {len(new)} more would not fit")
            return {"CANCELLED"}
        try:
            layouts = shot.layouts_at_start(scene, objects)
        except shot.ShotError as error:
            self.report({"ERROR"}, f"Cannot lay out the layers: {error}")
            return {"CANCELLED"}
        for obj, (box, depth) in zip(objects, layouts):
            layer = linked.get(obj.name) or settings.layers.add()
            layer.proxy, layer.name = obj, proxy_layer_name(obj)
            layer.use_box, layer.box, layer.depth = True, box, depth
            if self.hide_proxies:
                obj.hide_render = True
        _sort_back_to_front(settings)
        self.report({"INFO"}, f"{len(objects)} layer(s) from {', '.join(obj.name for obj in objects)} "
                              f"({len(new)} new); write each layer's prompt")
        return {"FINISHED"}


def _sort_back_to_front(settings) -> None:
    """Order the layers far to near by depth (layers without one keep their place among them)."""
    layers = settings.layers
    for end in range(len(layers) - 1, 0, -1):  # a bubble sort with CollectionProperty.move
        for i in range(end):
            if 0 < layers[i].depth < layers[i + 1].depth:
                layers.move(i + 1, i)


def extension_margins(scene: bpy.types.Scene, stack) -> tuple:
    """The margins the current shot needs around `stack`'s frame, for its planes at the depths
    the importer gives them (ShotError: the shot cannot be read or served)."""
    try:
        distances = importer.layer_depths(stack, importer.ImportSettings())
    except importer.ImportFailed as error:
        raise shot.ShotError(str(error)) from None
    return shot.margins_for(shot.read_shot(scene), distances)


class MULTIPLANE_OT_extend_for_shot(Operator):
    """Outpaint this generated stack so the current camera move shows no plane edge: every layer grows around the same frame, the old pixels stay; the result is a new stack that replaces the backdrop's planes in place (the old one stays in the history)"""

    bl_idname = "multiplane.extend_for_shot"
    bl_label = "Extend for Shot"

    @classmethod
    def poll(cls, context):
        from .history import selected_job_poll

        return selected_job_poll(cls, context)

    def execute(self, context):
        from .generate import backend_settings_or_report, ready_to_start_or_report
        from .history import NO_JOB_ID, _selected_history_item, same_server_or_report
        from .watcher import JobPlan, ensure_timer, watcher

        scene = context.scene
        item = _selected_history_item(context)
        if item is None or not item.job_id:
            self.report({"ERROR"}, NO_JOB_ID if item is not None else "No generated stack selected")
            return {"CANCELLED"}
        if not ready_to_start_or_report(self, scene):
            return {"CANCELLED"}
        try:
            stack = read_stack(item.path, check_images=False)
            margins = extension_margins(scene, stack)
        except (StackReadError, shot.ShotError) as error:
            self.report({"ERROR"}, f"Cannot extend {item.name}: {error}")
            return {"CANCELLED"}
        if not any(missing_margins(margins, stack.margins)):
            self.report({"INFO"}, f"{item.name} already has the margins this shot needs "
                                  f"({shot.describe_margins(margins)}): nothing to extend")
            return {"CANCELLED"}
        try:
            plan = plan_extension(stack.width, stack.height, stack.frame, margins)
        except ValueError as error:
            self.report({"ERROR"}, f"Cannot extend {item.name} for this shot: {error} (a smaller move, or "
                                   "layers farther away)")
            return {"CANCELLED"}
        settings = backend_settings_or_report(self, context)
        if settings is None or not same_server_or_report(self, item, settings, "press Generate for this shot"):
            return {"CANCELLED"}
        body = {"margins": [float(m) for m in margins], "tta_passes": int(scene.multiplane.tta_passes)}
        history = {"prompt": item.prompt, "model": item.model, "method": item.method,
                   "request": json.dumps({"source": item.job_id, "extend": True, **body})}
        watcher.start(JobPlan(body=body, settings=settings, scene_name=scene.name, history_fields=history,
                              extend_from=item.job_id, source_folder=item.path))
        scene.multiplane.shot_warning = ""  # the extended stack is made for this shot
        ensure_timer()
        self.report({"INFO"}, f"Extending {item.name} from {stack.width} x {stack.height} to {plan.width} x "
                              f"{plan.height} for margins {shot.describe_margins(margins)}")
        return {"FINISHED"}


CLASSES = (MULTIPLANE_OT_read_shot, MULTIPLANE_OT_layers_from_selected, MULTIPLANE_OT_extend_for_shot)

# Blender's own helper: registers CLASSES in order and unregisters them in reverse.
register, unregister = bpy.utils.register_classes_factory(CLASSES)
