"""Compositing stack layers: the one `alpha_over` behind composite.png and the exports.

Also the pixel-array check that every writer of stack images applies to its inputs.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def alpha_over(layers_back_to_front: Sequence[np.ndarray]) -> np.ndarray:
    """Composite an opaque RGB background and straight-alpha RGBA foregrounds, back to front.

    With a = A/255 for each foreground in turn, every channel becomes
        C <- Cf * a + C * (1 - a)
    which is the Porter-Duff "over" of a straight-alpha layer onto an opaque backdrop (the
    result stays opaque, so no division by the result alpha is needed). It is what a
    premultiplied over, Photoshop/GIMP "Normal" and Pillow's `alpha_composite` compute on
    the sRGB-encoded values — so composite.png matches the PSD/ORA exports in any editor.
    Blender composites in linear light instead: opaque pixels agree exactly, partly
    transparent ones differ (50 % red over green: 128 here, about 188 in Blender). The sum
    is kept in float64 across all layers and rounded to the nearest uint8 once at the end.
    """
    if len(layers_back_to_front) == 0:
        raise ValueError("alpha_over needs at least the background")
    background = layers_back_to_front[0]
    check_image_array(background, "layers_back_to_front[0] (background)", None, 3)
    height, width = background.shape[:2]
    result = background.astype(np.float64)
    for i, layer in enumerate(layers_back_to_front[1:], start=1):
        check_image_array(layer, f"layers_back_to_front[{i}]", (height, width), 4)
        alpha = layer[..., 3:4].astype(np.float64) / 255.0
        result = layer[..., :3].astype(np.float64) * alpha + result * (1.0 - alpha)
    return np.clip(np.floor(result + 0.5), 0, 255).astype(np.uint8)


def check_image_array(array: Any, what: str, size_hw: tuple[int, int] | None, channels: int | None) -> None:
    """Raise ValueError unless `array` is uint8 of shape (H, W, channels) or (H, W) for None."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8, got {array.dtype}")
    expected_ndim = 2 if channels is None else 3
    if array.ndim != expected_ndim or (channels is not None and array.shape[2] != channels):
        layout = "(H, W)" if channels is None else f"(H, W, {channels})"
        raise ValueError(f"{what}: expected shape {layout}, got {array.shape}")
    if size_hw is not None and tuple(array.shape[:2]) != tuple(size_hw):
        raise ValueError(f"{what}: expected height x width {size_hw[0]}x{size_hw[1]}, "
                         f"got {array.shape[0]}x{array.shape[1]}")
