"""Reading a stack strictly: everything a reader depends on is checked, and the error names the
file and field of the first problem found."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import StackFormatError
from .manifest import MANIFEST_FILE, LayerStack


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / MANIFEST_FILE
    return path


_EXPECTED_MODES = {"background": "RGB", "foreground": "RGBA"}


def _check_png(path: Path, field_name: str, mode: str, width: int, height: int) -> None:
    if not path.is_file():
        raise StackFormatError(f"{path} ({field_name}): file is missing")
    try:
        with Image.open(path) as image:
            image_format, image_mode, image_size = image.format, image.mode, image.size
    except (OSError, ValueError) as error:
        raise StackFormatError(f"{path} ({field_name}): not a readable image ({error})") from None
    if image_format != "PNG":
        raise StackFormatError(f"{path} ({field_name}): expected a PNG file, got {image_format}")
    if image_mode != mode:
        raise StackFormatError(f"{path} ({field_name}): image mode is {image_mode}, expected {mode} (8 bit)")
    if image_size != (width, height):
        raise StackFormatError(f"{path} ({field_name}): image is {image_size[0]}x{image_size[1]}, "
                               f"but the stack's width x height is {width}x{height}")


def load_stack(path: str | Path, check_images: bool = True) -> LayerStack:
    """Read and validate a stack from its folder (or its `stack.json`).

    Checks the manifest completely and, with `check_images`, that every PNG it names exists
    with the right mode and size (headers only: cheap enough for listing many stacks).
    Raises StackFormatError naming the file and the field of the first problem.
    """
    manifest = _manifest_path(path)
    if not manifest.is_file():
        raise StackFormatError(f"{manifest}: missing (not a layer stack folder)")
    stack = LayerStack.from_json(manifest.read_bytes(), source=str(manifest))
    if check_images:
        folder = manifest.parent
        for i, layer in enumerate(stack.layers):
            _check_png(folder / layer.file, f"layers[{i}].file", _EXPECTED_MODES[layer.kind],
                       stack.width, stack.height)
            if layer.mask is not None:
                _check_png(folder / layer.mask, f"layers[{i}].mask", "L", stack.width, stack.height)
        _check_png(folder / stack.composite, "composite", "RGB", stack.width, stack.height)
        if stack.blended is not None:
            _check_png(folder / stack.blended, "blended", "RGB", stack.width, stack.height)
        for i, export in enumerate(stack.exports):
            if not (folder / export).is_file():
                raise StackFormatError(f"{folder / export} (exports[{i}]): file is missing")
    return stack


def load_png(path: str | Path, mode: str, width: int, height: int, field_name: str = "image") -> np.ndarray:
    """Decode one stack PNG fully into a uint8 array after checking mode and size."""
    path = Path(path)
    _check_png(path, field_name, mode, width, height)
    try:
        with Image.open(path) as image:
            image.load()
            return np.array(image)
    except (OSError, ValueError) as error:
        raise StackFormatError(f"{path} ({field_name}): cannot decode ({error})") from None


def load_layer_images(stack: LayerStack, folder: str | Path) -> list[np.ndarray]:
    """Pixels of every layer, back to front: (H, W, 3) background, then (H, W, 4) foregrounds.

    The list is exactly what `alpha_over` takes.
    """
    folder = Path(folder)
    if folder.name == MANIFEST_FILE and folder.is_file():
        folder = folder.parent
    return [
        load_png(folder / layer.file, _EXPECTED_MODES[layer.kind], stack.width, stack.height,
                 f"layers[{i}].file")
        for i, layer in enumerate(stack.layers)
    ]
