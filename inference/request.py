"""What a caller asks the engine for, and the limits every front end enforces.

The limits live here once; the CLI and the HTTP schemas read them from this module.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .errors import InvalidRequest
from .methods import METHODS

MAX_PROMPT_CHARS = 1000
MAX_FOREGROUNDS = 8
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 2048, 64
MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
MAX_SEED = 2**32 - 1
MIN_INTER_LAYER, MAX_INTER_LAYER = 0.0, 4.0
TTA_PASSES = (1, 2, 4, 8)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class LayerSpec:
    """One foreground layer: its own prompt, an optional seed and an optional layout box.

    `box` is (x0, y0, x1, y1) normalized to the image, origin top-left, y down.
    """

    prompt: str
    seed: Optional[int] = None
    box: Optional[Box] = None
    name: str = ""


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
    # joint/harmonized: weight of another layer's keys relative to an own key (0 = layers
    # do not attend to each other), and how strongly estimated masks confine foregrounds.
    inter_layer_strength: float = 0.3
    mask_guidance: float = 0.5

    def validated(self) -> "StackRequest":
        """Return self (with layers as a tuple) or raise InvalidRequest naming the field."""
        validate_prompt("prompt", self.prompt, required=True)
        validate_prompt("background", self.background)
        validate_prompt("negative_prompt", self.negative_prompt)
        if len(self.layers) > MAX_FOREGROUNDS:
            raise InvalidRequest("layers", f"at most {MAX_FOREGROUNDS} foreground layers, got {len(self.layers)}")
        for i, layer in enumerate(self.layers):
            validate_prompt(f"layers[{i}].prompt", layer.prompt, required=True)
            if layer.seed is not None:
                validate_seed(f"layers[{i}].seed", layer.seed)
            if layer.box is not None:
                validate_box(f"layers[{i}].box", layer.box)
        validate_size("width", self.width)
        validate_size("height", self.height)
        if not isinstance(self.steps, int) or not MIN_STEPS <= self.steps <= MAX_STEPS:
            raise InvalidRequest("steps", f"must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {self.steps!r}")
        if not MIN_GUIDANCE <= float(self.guidance) <= MAX_GUIDANCE:
            raise InvalidRequest("guidance", f"must be in {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g}, got {self.guidance!r}")
        validate_seed("seed", self.seed)
        if self.background_seed is not None:
            validate_seed("background_seed", self.background_seed)
        if self.method not in METHODS:
            raise InvalidRequest("method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "harmonized" and len(self.layers) != 1:
            raise InvalidRequest("layers", f"method 'harmonized' blends exactly one foreground layer, got {len(self.layers)}")
        validate_fraction("inter_layer_strength", self.inter_layer_strength, MIN_INTER_LAYER, MAX_INTER_LAYER)
        validate_fraction("mask_guidance", self.mask_guidance, 0.0, 1.0)
        if self.tta_passes not in TTA_PASSES:
            raise InvalidRequest("tta_passes", f"must be one of {TTA_PASSES}, got {self.tta_passes!r}")
        return replace(self, layers=tuple(self.layers))


def validate_prompt(field_name: str, text: str, required: bool = False) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(field_name, "must be text")
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


def validate_fraction(field_name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise InvalidRequest(field_name, f"must be a number in {lo:g}..{hi:g}, got {value!r}")


def validate_seed(field_name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise InvalidRequest(field_name, f"must be an integer in 0..{MAX_SEED}, got {value!r}")


def validate_box(field_name: str, box) -> None:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InvalidRequest(field_name, "must be four numbers x0, y0, x1, y1") from None
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise InvalidRequest(field_name, "coordinates must lie in [0, 1]")
    if not (x0 < x1 and y0 < y1):
        raise InvalidRequest(field_name, "needs x0 < x1 and y0 < y1")

