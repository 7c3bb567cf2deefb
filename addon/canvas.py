"""The generation canvas, mirrored for the add-on: its size in pixels and where the camera
frame sits inside it.

The add-on cannot import the engine, so this is a copy of inference/canvas.py (the
engine plans the same way for the CLI); tests/test_addon_canvas.py proves the two plans
equal over a grid. The panel and Generate plan the canvas here from the render's exact
aspect, the shot's margins and the model's pixel budget (`MODEL_DEFAULT_SIZES`, the
presets' `default_size`, also kept equal by that test) - never from the render percentage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .limits import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE

# Per side: the request's size limits (addon/limits.py, itself the engine's mirror).
CANVAS_MULTIPLE = SIZE_MULTIPLE
CANVAS_MIN_SIDE = MIN_SIZE
CANVAS_MAX_SIDE = MAX_SIZE
MAX_MARGIN = 4.0  # a margin is at most 4 frame widths/heights on one side
MIN_ASPECT, MAX_ASPECT = 0.1, 10.0

Margins = tuple[float, float, float, float]  # left, top, right, bottom: fractions of the frame's width/height
Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 normalized to the canvas, origin top-left, y down


@dataclass(frozen=True)
class CanvasPlan:
    """A canvas of `width` x `height` pixels holding the camera frame at `frame`.

    `frame_width`/`frame_height` are the frame's effective resolution in (fractional)
    pixels; `capped` says the per-side cap lowered detail below the model's pixel budget.
    """

    width: int
    height: int
    frame: Rect
    frame_width: float
    frame_height: float
    capped: bool

    @property
    def whole(self) -> bool:
        """True when the frame is the whole canvas (no margins)."""
        return self.frame == (0.0, 0.0, 1.0, 1.0)


def check_aspect(aspect: float) -> float:
    if not isinstance(aspect, (int, float)) or isinstance(aspect, bool) or not math.isfinite(aspect):
        raise ValueError("frame aspect must be a finite number (width / height of the camera frame)")
    if not MIN_ASPECT <= aspect <= MAX_ASPECT:
        raise ValueError(f"frame aspect {aspect:g} is outside {MIN_ASPECT:g}..{MAX_ASPECT:g}")
    return float(aspect)


def check_margins(margins: Margins) -> Margins:
    values = tuple(margins)
    if len(values) != 4:
        raise ValueError("margins must be four numbers: left, top, right, bottom (fractions of the frame)")
    for side, value in zip(("left", "top", "right", "bottom"), values):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"margins.{side} must be a finite number")
        if not 0.0 <= value <= MAX_MARGIN:
            raise ValueError(f"margins.{side} = {value:g} is outside 0..{MAX_MARGIN:g} (fractions of the frame)")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _round_side(value: float) -> int:
    side = math.ceil(value / CANVAS_MULTIPLE - 1e-9) * CANVAS_MULTIPLE
    return int(min(CANVAS_MAX_SIDE, max(CANVAS_MIN_SIDE, side)))


def _snap(value: float) -> float:
    """Float noise at the canvas edges becomes exactly 0 or 1 (a frame never leaves its canvas)."""
    if abs(value) < 1e-9:
        return 0.0
    if abs(value - 1.0) < 1e-9:
        return 1.0
    return value


def plan_canvas(aspect: float, margins: Margins = (0.0, 0.0, 0.0, 0.0), pixel_budget: int = 1024 * 1024) -> CanvasPlan:
    """The canvas for a frame of `aspect` (width / height) with `margins` around it.

    The frame gets about `pixel_budget` pixels (the model's native size squared); the
    canvas is the frame plus its margins, rounded up to multiples of 64 per side and capped
    at 2048 per side (then the whole plan shrinks uniformly and `capped` is set). The frame
    is then scaled up to fill the canvas on its tight axis, so rounding never stretches it;
    the leftover on the other axis is split evenly between both margins.
    """
    aspect = check_aspect(aspect)
    left, top, right, bottom = check_margins(margins)
    if not isinstance(pixel_budget, int) or isinstance(pixel_budget, bool) or pixel_budget <= 0:
        raise ValueError("pixel budget must be a positive integer (pixels of the frame)")
    frame_h = math.sqrt(pixel_budget / aspect)
    frame_w = aspect * frame_h
    span_x, span_y = 1.0 + left + right, 1.0 + top + bottom  # canvas size in frames
    shrink = min(1.0, CANVAS_MAX_SIDE / (frame_w * span_x), CANVAS_MAX_SIDE / (frame_h * span_y))
    width = _round_side(frame_w * span_x * shrink)
    height = _round_side(frame_h * span_y * shrink)
    # Fill: the largest frame whose margined extent fits the canvas on both axes.
    fit = min(width / (aspect * span_x), height / span_y)  # the frame's height in pixels
    fw, fh = aspect * fit, fit
    x0 = (left * fw + (width - fw * span_x) / 2.0) / width
    y0 = (top * fh + (height - fh * span_y) / 2.0) / height
    frame = tuple(_snap(v) for v in (x0, y0, x0 + fw / width, y0 + fh / height))
    capped = fw * fh < pixel_budget * (1.0 - 1e-9)
    return CanvasPlan(width, height, frame, fw, fh, capped)


def frame_to_canvas(box: Rect, frame: Rect) -> Rect:
    """A box given in frame coordinates ([0, 1] = the camera frame) in canvas coordinates."""
    fx0, fy0, fx1, fy1 = frame
    x0, y0, x1, y1 = box
    return (fx0 + x0 * (fx1 - fx0), fy0 + y0 * (fy1 - fy0), fx0 + x1 * (fx1 - fx0), fy0 + y1 * (fy1 - fy0))



EXTENSION_ALIGN = 8  # the old canvas lands on whole latent cells (the VAE's 8 pixels per cell)


def _extend_axis(size: int, f0: float, f1: float, before: float, after: float, axis: str) -> tuple[int, int]:
    """(new size, offset of the old canvas) on one axis for margins `before`/`after` (fractions
    of the frame's extent f1 - f0, in pixels of the old canvas)."""
    extent = f1 - f0
    need_before = max(0, math.ceil(before * extent - f0 - 1e-6))
    need_after = max(0, math.ceil(after * extent - (size - f1) - 1e-6))
    new = math.ceil((size + need_before + need_after) / CANVAS_MULTIPLE - 1e-9) * CANVAS_MULTIPLE
    while True:
        if new > CANVAS_MAX_SIDE:
            raise ValueError(f"margins: extending the {size}-pixel {axis} canvas needs {new} pixels, more than "
                             f"the cap of {CANVAS_MAX_SIDE} per side; ask for smaller margins")
        low, high = need_before, new - size - need_after  # where the old canvas may start
        if need_before == 0:
            return new, 0  # the leftover goes to the side that grows
        if need_after == 0:
            return new, new - size  # a multiple of 64, so of EXTENSION_ALIGN
        offset = (low + high) // 2 // EXTENSION_ALIGN * EXTENSION_ALIGN
        offset = max(offset, math.ceil(low / EXTENSION_ALIGN) * EXTENSION_ALIGN)
        if offset <= high:
            return new, offset
        new += CANVAS_MULTIPLE  # no aligned start between both needs: one more row of tiles


def _extension(width: int, height: int, frame: Rect | None, margins: Margins):
    left, top, right, bottom = check_margins(margins)
    fx0, fy0, fx1, fy1 = frame if frame is not None else (0.0, 0.0, 1.0, 1.0)
    x = _extend_axis(width, fx0 * width, fx1 * width, left, right, "horizontal")
    y = _extend_axis(height, fy0 * height, fy1 * height, top, bottom, "vertical")
    return x, y, (fx0, fy0, fx1, fy1)


def plan_extension(width: int, height: int, frame: Rect | None, margins: Margins) -> CanvasPlan:
    """The canvas that extends a `width` x `height` canvas holding `frame` (None = the whole
    canvas) so that `margins` fit around the same frame, for outpainting.

    The old pixels keep their scale (no resampling): each side grows by the pixels the
    margins still lack, the canvas rounds up to multiples of 64 (the leftover goes to the
    growing side, split evenly when both grow) and the old canvas starts on a multiple of
    EXTENSION_ALIGN pixels (`extension_offset`). More than 2048 pixels on a side is refused
    (ValueError starting "margins:"); margins that already fit give the same canvas back.
    """
    (new_w, ox), (new_h, oy), (fx0, fy0, fx1, fy1) = _extension(width, height, frame, margins)
    rect = tuple(_snap(v) for v in ((ox + fx0 * width) / new_w, (oy + fy0 * height) / new_h,
                                    (ox + fx1 * width) / new_w, (oy + fy1 * height) / new_h))
    return CanvasPlan(new_w, new_h, rect, (fx1 - fx0) * width, (fy1 - fy0) * height, False)


def extension_offset(width: int, height: int, frame: Rect | None, margins: Margins) -> tuple[int, int]:
    """Where the old canvas's top-left pixel lands in `plan_extension`'s canvas (x, y)."""
    (_w, ox), (_h, oy), _frame = _extension(width, height, frame, margins)
    return ox, oy

# The model presets' native side (inference/models.py PRESETS[...].default_size): a model's
# pixel budget is its square. A model the table does not know (a custom diffusers folder)
# gets SDXL's.
MODEL_DEFAULT_SIZES = {"sdxl": 1024, "sd15": 512, "tiny": MIN_SIZE}  # tiny: the smallest canvas


def model_pixel_budget(model: str) -> int:
    """The frame's pixel budget for a model preset: its native size squared."""
    side = MODEL_DEFAULT_SIZES.get(model, MODEL_DEFAULT_SIZES["sdxl"])
    return side * side
