"""What a caller asks the engine for, and the limits every front end enforces.

The limits and their checks live here once: `StackRequest.validated()` runs them, the CLI
reads the constants, and the HTTP schemas (server/schemas.py) call these same `validate_*`
functions, so every front end refuses the same input with the same message. The add-on
cannot import the engine; it mirrors the constants in addon/limits.py, and
tests/test_addon_limits.py proves the copy equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from .errors import InvalidRequest
from .methods import METHODS

MAX_PROMPT_CHARS = 1000
MAX_NAME_CHARS = 100
MAX_FOREGROUNDS = 8
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 2048, 64
MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
MAX_SEED = 2**32 - 1
MIN_INTER_LAYER, MAX_INTER_LAYER = 0.0, 4.0
MIN_MASK_GUIDANCE, MAX_MASK_GUIDANCE = 0.0, 1.0
TTA_PASSES = (1, 2, 4, 8)
BACKGROUND_NAME = "background"  # the background layer's name in a stack: no foreground may take it

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class LayerSpec:
    """One foreground layer: its own prompt, an optional seed, layout box and depth.

    `box` is (x0, y0, x1, y1) normalized to the image, origin top-left, y down. `depth` is
    the suggested distance from the camera (scene units) that the stack records for
    importers; it does not change the pixels.
    """

    prompt: str
    seed: Optional[int] = None
    box: Optional[Box] = None
    name: str = ""
    depth: Optional[float] = None


@dataclass(frozen=True)
class StackRequest:
    """A whole layer-stack request: one background and 0..8 foregrounds (back to front)."""

    prompt: str
    background: str = ""
    layers: tuple[LayerSpec, ...] = ()
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance: float = 5.0
    seed: int = 0
    method: str = "joint"
    tta_passes: int = 8
    background_seed: Optional[int] = None
    name: str = ""
    background_depth: Optional[float] = None  # like LayerSpec.depth; edits keep the source's
    # joint/harmonized: weight of another layer's keys relative to an own key (0 = layers
    # do not attend to each other), and how strongly estimated masks confine foregrounds.
    inter_layer_strength: float = 0.3
    mask_guidance: float = 0.5
    # The camera frame inside the width x height canvas (x0, y0, x1, y1 normalized to the
    # canvas); None = the whole canvas. Layer boxes are given in frame coordinates.
    frame: Optional[Box] = None

    def validated(self) -> "StackRequest":
        """Return self (with layers as a tuple) or raise InvalidRequest naming the field."""
        validate_prompt("prompt", self.prompt, required=True)
        validate_prompt("background", self.background)
        validate_prompt("negative_prompt", self.negative_prompt)
        validate_layer_count("layers", self.layers)
        for i, layer in enumerate(self.layers):
            validate_prompt(f"layers[{i}].prompt", layer.prompt, required=True)
            if layer.seed is not None:
                validate_seed(f"layers[{i}].seed", layer.seed)
            if layer.box is not None:
                validate_box(f"layers[{i}].box", layer.box)
            validate_name(f"layers[{i}].name", layer.name)
            if layer.depth is not None:
                validate_depth(f"layers[{i}].depth", layer.depth)
        validate_layer_names("layers", [layer.name for layer in self.layers])
        validate_size("width", self.width)
        validate_size("height", self.height)
        validate_steps("steps", self.steps)
        validate_number("guidance", self.guidance, MIN_GUIDANCE, MAX_GUIDANCE)
        validate_seed("seed", self.seed)
        if self.background_seed is not None:
            validate_seed("background_seed", self.background_seed)
        if self.background_depth is not None:
            validate_depth("background_depth", self.background_depth)
        validate_method("method", self.method)
        if self.method == "harmonized" and len(self.layers) != 1:
            raise InvalidRequest("layers", f"method 'harmonized' blends exactly one foreground layer, got {len(self.layers)}")
        validate_number("inter_layer_strength", self.inter_layer_strength, MIN_INTER_LAYER, MAX_INTER_LAYER)
        validate_number("mask_guidance", self.mask_guidance, MIN_MASK_GUIDANCE, MAX_MASK_GUIDANCE)
        validate_tta_passes("tta_passes", self.tta_passes)
        if self.frame is not None:
            validate_frame("frame", self.frame)
        frame = None if self.frame is None else tuple(float(v) for v in self.frame)
        return replace(self, layers=tuple(self.layers), frame=frame)

    def canvas_box(self, box: Optional[Box]) -> Optional[Box]:
        """A layer's layout box (frame coordinates, as the user gave it) in canvas
        coordinates, where the sampler's masks live; None stays None (no box)."""
        if box is None or self.frame is None:
            return box
        from .canvas import frame_to_canvas

        return frame_to_canvas(box, self.frame)


# Each check raises InvalidRequest(field_name, message) and returns nothing; the message
# says what is allowed, so it reads the same from the CLI, the engine and the HTTP API.


def validate_text(field_name: str, text: str) -> None:
    """Text that can be written as UTF-8: JSON's \\u escapes (and undecodable command-line
    bytes) can carry a lone surrogate, which no file, JSON answer or tokenizer accepts."""
    if not isinstance(text, str):
        raise InvalidRequest(field_name, "must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = f"U+{ord(text[error.start]):04X}"
        raise InvalidRequest(field_name, f"is not valid Unicode text: a lone surrogate ({bad}) at "
                                         f"character {error.start}; send UTF-8 text (a \\ud800-style "
                                         f"escape needs its pair)") from None


def validate_prompt(field_name: str, text: str, required: bool = False) -> None:
    validate_text(field_name, text)
    if required and not text.strip():
        raise InvalidRequest(field_name, "must not be empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(field_name, f"at most {MAX_PROMPT_CHARS} characters, got {len(text)}")


def validate_size(field_name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(field_name, f"must be an integer, got {value!r}")
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise InvalidRequest(field_name, f"must be in {MIN_SIZE}..{MAX_SIZE} pixels, got {value}")
    if value % SIZE_MULTIPLE:
        lower = value // SIZE_MULTIPLE * SIZE_MULTIPLE
        raise InvalidRequest(
            field_name,
            f"must be a multiple of {SIZE_MULTIPLE} (the transparent decoder works on 64-pixel tiles), "
            f"got {value}; try {lower} or {lower + SIZE_MULTIPLE}",
        )


def validate_number(field_name: str, value, lo: float, hi: float) -> None:
    """A finite number in lo..hi (NaN fails the comparison, so it is refused too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise InvalidRequest(field_name, f"must be a number in {lo:g}..{hi:g}, got {value!r}")


def validate_steps(field_name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_STEPS <= value <= MAX_STEPS:
        raise InvalidRequest(field_name, f"must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {value!r}")


def validate_method(field_name: str, value: str) -> None:
    if value not in METHODS:
        raise InvalidRequest(field_name, f"unknown method {value!r}; choose one of {', '.join(METHODS)}")


def validate_tta_passes(field_name: str, value: int) -> None:
    if isinstance(value, bool) or value not in TTA_PASSES:
        raise InvalidRequest(field_name, f"must be one of {', '.join(map(str, TTA_PASSES))}, got {value!r}")


def validate_name(field_name: str, value: str) -> None:
    """A stack or layer display name ("" = the default name). The engine checks layer names;
    a stack's name is checked where a client gives it (the HTTP API), since a CLI stack is
    named after its output folder."""
    validate_text(field_name, value)
    if len(value) > MAX_NAME_CHARS:
        raise InvalidRequest(field_name, f"at most {MAX_NAME_CHARS} characters, got {len(value)}")


def validate_layer_count(field_name: str, layers) -> None:
    if len(layers) > MAX_FOREGROUNDS:
        raise InvalidRequest(field_name, f"at most {MAX_FOREGROUNDS} foreground layers, got {len(layers)}")


def validate_layer_names(field_name: str, names) -> None:
    """Foreground names (back to front; "" = the default layer_NN) are unique in a stack."""
    seen = {BACKGROUND_NAME}
    for i, name in enumerate(names):
        if name and name in seen:
            raise InvalidRequest(field_name, f"layers[{i}].name {name!r} is used twice (layer names are "
                                             f"unique in a stack; {BACKGROUND_NAME!r} is taken)")
        seen.add(name)


def validate_layer_index(field_name: str, value: int, foregrounds: int) -> None:
    """A layer of a stack with `foregrounds` foregrounds: 0 is the background."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= foregrounds:
        raise InvalidRequest(field_name, f"must be 0 (background) .. {foregrounds}, got {value!r}")


def validate_layer_edit(prompt: Optional[str], seed: Optional[int], prompt_field: str = "new_prompt",
                        seed_field: str = "new_seed", prompt_required: bool = True) -> None:
    """Regenerating one layer changes its prompt, its seed or both; at least one is given.

    `prompt_required`: a foreground's new prompt must not be blank (the background's may be).
    """
    if prompt is None and seed is None:
        raise InvalidRequest(prompt_field, "give a new prompt and/or a new seed for the layer")
    if prompt is not None:
        validate_prompt(prompt_field, prompt, required=prompt_required)
    if seed is not None:
        validate_seed(seed_field, seed)


def validate_seed(field_name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise InvalidRequest(field_name, f"must be an integer in 0..{MAX_SEED}, got {value!r}")


def validate_depth(field_name: str, value: float) -> None:
    """A layer's distance from the camera: a finite number of scene units > 0 (None, where a
    field is optional, leaves it to the importer's Near/Far spread)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        raise InvalidRequest(field_name, f"must be a finite number > 0 (the distance from the camera in scene "
                                         f"units), got {value!r}; leave it out to spread the layer between "
                                         f"the importer's Near and Far")


def validate_frame(field_name: str, frame) -> None:
    """The camera frame inside the canvas: a normalized rectangle, the same rule as a layout
    box (finite, 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1); any aspect is allowed."""
    validate_box(field_name, frame)


def validate_margins(field_name: str, margins) -> None:
    """Margins around the frame (left, top, right, bottom; fractions of the frame's width
    and height), as `inference.canvas.check_margins` allows them."""
    from .canvas import check_margins

    try:
        check_margins(tuple(margins))
    except (TypeError, ValueError) as error:
        raise InvalidRequest(field_name, str(error)) from None


def extension_plan(field_name: str, width: int, height: int, frame: Optional[Box], margins):
    """(CanvasPlan, offset of the old canvas) for extending a `width` x `height` stack holding
    `frame` so that `margins` fit; InvalidRequest naming `field_name` for bad margins, a
    canvas past the cap, or margins the canvas already holds (nothing to extend)."""
    from .canvas import extension_offset, plan_extension

    validate_margins(field_name, margins)
    margins = tuple(margins)
    try:
        plan = plan_extension(width, height, frame, margins)
    except ValueError as error:
        raise InvalidRequest(field_name, str(error).removeprefix("margins: ")) from None
    if (plan.width, plan.height) == (width, height):
        raise InvalidRequest(field_name, f"the {width}x{height} canvas already holds these margins around its "
                                         f"frame; nothing to extend")
    return plan, extension_offset(width, height, frame, margins)


def validate_box(field_name: str, box) -> None:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InvalidRequest(field_name, "must be four numbers x0, y0, x1, y1") from None
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise InvalidRequest(field_name, "coordinates must lie in [0, 1]")
    if not (x0 < x1 and y0 < y1):
        raise InvalidRequest(field_name, "needs x0 < x1 and y0 < y1")

