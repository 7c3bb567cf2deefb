"""The layout-box overlay: in camera view, the 3D Viewport draws each foreground layer's box
(the panel's Box) over the camera frame, with the layer's number and prompt, so the artist
sees where a layer will be confined before generating.

The rectangle maths is pure (`frame_rect`, `box_region_rect`, `outline_segments`) and is
tested without Blender; `_draw()` only projects the camera frame and hands the rectangles to
Blender's gpu and blf modules. One draw handler, added on register and removed on unregister;
the scene's "Show Boxes in Camera View" switches it off.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in region pixels, y up, x0 < x1, y0 < y1

BOX_COLOR = (1.0, 0.8, 0.1, 0.9)
ACTIVE_COLOR = (0.3, 0.9, 1.0, 1.0)
LABEL_SIZE = 12
LABEL_CHARS = 32

_handle = None


def frame_rect(corners: Iterable[Sequence[float]]) -> Optional[Rect]:
    """The camera frame's rectangle in region pixels from its projected corners (None when a
    corner is behind the view, which location_3d_to_region_2d reports as None)."""
    points = list(corners)
    if not points or any(point is None for point in points):
        return None
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    rect = (min(xs), min(ys), max(xs), max(ys))
    return rect if rect[0] < rect[2] and rect[1] < rect[3] else None


def box_region_rect(frame: Rect, box: Sequence[float]) -> Optional[Rect]:
    """A layout box (left, top, right, bottom as fractions of the image, top-left origin, as
    the request has it) → its rectangle in region pixels (bottom-left origin). None for an
    empty or inside-out box, which Generate refuses anyway."""
    left, top, right, bottom = (float(v) for v in box)
    if not (left < right and top < bottom):
        return None
    x0, y0, x1, y1 = frame
    width, height = x1 - x0, y1 - y0
    return (x0 + left * width, y1 - bottom * height, x0 + right * width, y1 - top * height)


def outline_segments(rect: Rect) -> list[tuple[float, float]]:
    """The rectangle's four edges as LINES vertex pairs (gpu has no line loop on every backend)."""
    x0, y0, x1, y1 = rect
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return [point for index in range(4) for point in (corners[index], corners[(index + 1) % 4])]


def layer_label(index: int, prompt: str) -> str:
    text = prompt.strip()
    if len(text) > LABEL_CHARS:
        text = text[:LABEL_CHARS - 1] + "…"
    return f"{index + 1}: {text}" if text else f"Layer {index + 1}"


# ---------------------------------------------------------------------- Blender side


def _camera_frame_in_region(context) -> Optional[Rect]:
    from bpy_extras.view3d_utils import location_3d_to_region_2d

    scene, region, view = context.scene, context.region, context.region_data
    camera = scene.camera
    if camera is None or view is None or view.view_perspective != "CAMERA":
        return None
    matrix = camera.matrix_world
    corners = [location_3d_to_region_2d(region, view, matrix @ corner)
               for corner in camera.data.view_frame(scene=scene)]
    return frame_rect(corners)


def _draw() -> None:
    import bpy

    context = bpy.context
    settings = getattr(context.scene, "multiplane", None)
    if settings is None or not settings.show_layout_boxes:
        return
    boxes = [(index, layer) for index, layer in enumerate(settings.layers) if layer.use_box]
    frame = _camera_frame_in_region(context) if boxes else None
    if frame is None:
        return
    import blf
    import gpu
    from gpu_extras.batch import batch_for_shader

    shader = gpu.shader.from_builtin("UNIFORM_COLOR")
    gpu.state.blend_set("ALPHA")
    gpu.state.line_width_set(2.0)
    for index, layer in boxes:
        rect = box_region_rect(frame, layer.box)
        if rect is None:
            continue
        color = ACTIVE_COLOR if index == settings.layer_index else BOX_COLOR
        shader.uniform_float("color", color)
        batch_for_shader(shader, "LINES", {"pos": outline_segments(rect)}).draw(shader)
        blf.size(0, LABEL_SIZE)
        blf.color(0, *color)
        blf.position(0, rect[0] + 4, rect[3] - LABEL_SIZE - 2, 0)
        blf.draw(0, layer_label(index, layer.prompt))
    gpu.state.line_width_set(1.0)
    gpu.state.blend_set("NONE")


def is_registered() -> bool:
    return _handle is not None


def register() -> None:
    global _handle
    import bpy

    if _handle is None:
        _handle = bpy.types.SpaceView3D.draw_handler_add(_draw, (), "WINDOW", "POST_PIXEL")


def unregister() -> None:
    global _handle
    import bpy

    if _handle is not None:
        bpy.types.SpaceView3D.draw_handler_remove(_handle, "WINDOW")
        _handle = None
