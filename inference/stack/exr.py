"""The multilayer OpenEXR export of a stack, for compositors (Blender, Nuke, After Effects).

One single-part scanline file, half float, ZIP-compressed, linear Rec.709 light with
premultiplied alpha as EXR expects. Every stack layer is one EXR layer named after it
(channels `<layer>.R/G/B/A`), followed by the linear-light composite; Blender opens it as a
multilayer image whose passes are those layers (its compositor's Image node gets one output
per layer). The frame rectangle and the stack's own layer names go in as header attributes.
Written with the `OpenEXR` bindings, imported only when an EXR is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .composite import check_image_array, srgb_to_linear
from .manifest import Box, StackLayer

COMPOSITE_LAYER = "Composite"
FULL_FRAME: Box = (0.0, 0.0, 1.0, 1.0)
CHANNELS = "RGBA"
# Header attributes (camelCase like OpenEXR's standard attributes).
FRAME_ATTRIBUTE = "multiplaneFrame"  # box2f: canvas-normalized (x0, y0)-(x1, y1), origin top-left
FRAME_PIXELS_ATTRIBUTE = "multiplaneFramePixels"  # box2i: the same in pixels, max inclusive
LAYERS_ATTRIBUTE = "multiplaneLayers"  # stringvector: the stack's layer names, back to front
EXR_LAYERS_ATTRIBUTE = "multiplaneExrLayers"  # stringvector: their EXR layer names, same order
COMPOSITE_ATTRIBUTE = "multiplaneComposite"  # string: the EXR layer holding the composite


def exr_layer_names(names: Sequence[str]) -> list[str]:
    """EXR layer names for the stack layer `names` (back to front), plus the composite's last.

    A '.' separates layer from channel in an EXR channel name, so it becomes '_'; a name
    that then equals an earlier one, or the composite's, gets " 2", " 3", ... Mirrored by
    `addon/stack_reader.exr_layer_names` (tests/test_exr.py keeps the two equal).
    """
    taken = {COMPOSITE_LAYER}
    result = []
    for name in names:
        base = name.replace(".", "_").strip() or "layer"
        candidate, count = base, 1
        while candidate in taken:
            count += 1
            candidate = f"{base} {count}"
        taken.add(candidate)
        result.append(candidate)
    return [*result, COMPOSITE_LAYER]


# The sRGB transfer function inverted (composite.py's curve) for each 8-bit code: a table
# lookup keeps the per-pixel work (and memory) small.
SRGB_TO_LINEAR = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)


def linear_premultiplied(image: np.ndarray) -> np.ndarray:
    """An 8-bit stack layer (RGB opaque or straight RGBA, sRGB-encoded) as float32 linear
    premultiplied RGBA."""
    height, width = image.shape[:2]
    result = np.empty((height, width, 4), np.float32)
    result[..., :3] = SRGB_TO_LINEAR[image[..., :3]]
    if image.shape[2] == 4:
        result[..., 3] = image[..., 3] * np.float32(1.0 / 255.0)
        result[..., :3] *= result[..., 3:4]
    else:
        result[..., 3] = 1.0
    return result


def over_in_place(result: np.ndarray, front: np.ndarray) -> None:
    """result <- front over result, both premultiplied (the Porter-Duff "over")."""
    result *= 1.0 - front[..., 3:4]
    result += front


def linear_composite(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Premultiplied "over" in linear light, back to front: what Blender's compositor and a
    renderer compute from the layers (float32 linear RGBA, opaque)."""
    result = linear_premultiplied(layers[0])
    for layer in layers[1:]:
        over_in_place(result, linear_premultiplied(layer))
    return result


def frame_pixels(frame: Box, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The normalized frame as an inclusive pixel box ((x_min, y_min), (x_max, y_max))."""
    x0, y0, x1, y1 = frame
    left, top = int(round(x0 * width)), int(round(y0 * height))
    right, bottom = max(left + 1, int(round(x1 * width))), max(top + 1, int(round(y1 * height)))
    return (left, top), (right - 1, bottom - 1)


def _add_channels(channels: dict, name: str, plane: np.ndarray) -> None:
    half = plane.astype(np.float16)
    for index, channel in enumerate(CHANNELS):
        channels[f"{name}.{channel}"] = np.ascontiguousarray(half[..., index])


def write_exr(out_path: str | Path, layers: Sequence[StackLayer], images: Sequence[np.ndarray],
              width: int, height: int, frame: Optional[Box] = None) -> None:
    """Write the multilayer EXR of `layers` (their 8-bit `images`, back to front) to `out_path`.

    `frame`: the frame rectangle (canvas-normalized [x0, y0, x1, y1]); None = the whole canvas.
    """
    import OpenEXR

    if len(layers) != len(images) or not layers:
        raise ValueError(f"{len(layers)} layers but {len(images)} images; need one image per layer")
    for i, image in enumerate(images):
        check_image_array(image, f"images[{i}] ({layers[i].name})", (height, width), 3 if i == 0 else 4)
    frame = tuple(float(v) for v in (frame or FULL_FRAME))
    names = exr_layer_names([layer.name for layer in layers])
    # One layer at a time (float32, kept only as half), the composite built alongside.
    channels = {}
    composite = None
    for name, image in zip(names, images):
        plane = linear_premultiplied(image)
        _add_channels(channels, name, plane)
        if composite is None:
            composite = plane
        else:
            over_in_place(composite, plane)
    _add_channels(channels, names[-1], composite)
    header = {
        "compression": OpenEXR.ZIP_COMPRESSION,
        "type": OpenEXR.scanlineimage,
        FRAME_ATTRIBUTE: ((frame[0], frame[1]), (frame[2], frame[3])),
        FRAME_PIXELS_ATTRIBUTE: tuple(np.array(corner, np.int32) for corner in frame_pixels(frame, width, height)),
        LAYERS_ATTRIBUTE: [layer.name for layer in layers],
        EXR_LAYERS_ATTRIBUTE: names[:-1],
        COMPOSITE_ATTRIBUTE: names[-1],
    }
    with OpenEXR.File(header, channels) as document:
        document.write(str(out_path))
