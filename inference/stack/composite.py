"""Compositing stack layers: the one `alpha_over` behind composite.png and the exports.

Also the pixel-array check that every writer of stack images applies to its inputs.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def srgb_to_linear(encoded: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] → linear light (IEC 61966-2-1, the piecewise curve)."""
    v = np.asarray(encoded, np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] → sRGB-encoded values in [0, 1] (clipped first)."""
    v = np.clip(np.asarray(linear, np.float64), 0.0, 1.0)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1.0 / 2.4) - 0.055)


# The 256 possible 8-bit values decoded once: a lookup is exact and cheaper than the curve.
_DECODE = srgb_to_linear(np.arange(256) / 255.0)


def alpha_over(layers_back_to_front: Sequence[np.ndarray]) -> np.ndarray:
    """Composite an opaque RGB background and straight-alpha RGBA foregrounds, back to front,
    in linear light — what Blender renders from the imported planes.

    The sRGB-encoded colours are decoded to linear light, then with a = A/255 (alpha is
    linear already) for each foreground in turn every channel becomes
        C <- Cf * a + C * (1 - a)
    (the Porter-Duff "over" of a straight-alpha layer onto an opaque backdrop: the result
    stays opaque), and the result is encoded back to sRGB and rounded to the nearest uint8
    once at the end (float64 throughout). Opaque and fully transparent pixels are those of
    the layer seen; partly transparent ones blend like light does (50 % red over green:
    about 188, 188, 0 — an editor blending the encoded values gives 128, 127, 0). The PSD/ORA
    exports keep their layers as they are; their merged image is this composite.
    """
    if len(layers_back_to_front) == 0:
        raise ValueError("alpha_over needs at least the background")
    background = layers_back_to_front[0]
    check_image_array(background, "layers_back_to_front[0] (background)", None, 3)
    height, width = background.shape[:2]
    result = _DECODE[background]
    for i, layer in enumerate(layers_back_to_front[1:], start=1):
        check_image_array(layer, f"layers_back_to_front[{i}]", (height, width), 4)
        alpha = layer[..., 3:4].astype(np.float64) / 255.0
        result = _DECODE[layer[..., :3]] * alpha + result * (1.0 - alpha)
    return np.clip(np.floor(linear_to_srgb(result) * 255.0 + 0.5), 0, 255).astype(np.uint8)


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
