"""Layered exports of a stack for painting programs: Photoshop PSD and OpenRaster (ORA).

Both carry the background and every foreground as a named, full-canvas pixel layer with its
own alpha, bottom to top in stack order, plus a flattened image. psd-tools is imported only
when a PSD is written, so importing this module stays cheap.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Optional, Sequence
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from .composite import alpha_over, check_image_array
from .files import PNG_SAVE_OPTIONS, fsync_dir, fsync_file
from .manifest import LayerStack, StackLayer, scratch_path
from .reader import load_layer_images, load_stack

ORA_MIMETYPE = b"image/openraster"
ORA_THUMBNAIL_MAX = 256
PSD_MAX_NAME_CHARS = 255
# Fixed zip entry time: the archive bytes depend only on the pixels and names.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _check_layers(layers: Sequence[StackLayer], images: Sequence[np.ndarray], width: int, height: int) -> None:
    if len(layers) != len(images) or not layers:
        raise ValueError(f"{len(layers)} layers but {len(images)} images; need one image per layer")
    for i, image in enumerate(images):
        check_image_array(image, f"images[{i}] ({layers[i].name})", (height, width), 3 if i == 0 else 4)


def _replace_atomically(out_path: Path, write) -> None:
    """Call write(temp_path) then rename over out_path, so no half-written export is left."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp = scratch_path(out_path)
    try:
        write(temp)
        fsync_file(temp)
        os.replace(temp, out_path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(out_path.parent)


def write_psd(out_path: str | Path, layers: Sequence[StackLayer], images: Sequence[np.ndarray],
              width: int, height: int) -> None:
    """Write an 8-bit RGB PSD with one pixel layer per stack layer (transparency channel kept).

    The document is created in psd-tools' "RGBA" mode so each layer's alpha is stored as
    the layer transparency channel (not as a mask); the merged image is the composite.
    """
    from psd_tools import PSDImage

    _check_layers(layers, images, width, height)
    document = PSDImage.new("RGBA", (width, height))
    for layer, image in zip(layers, images):
        pixel_layer = document.create_pixel_layer(Image.fromarray(np.ascontiguousarray(image)))
        # The setter stores the full Unicode name ("luni" block) next to a Mac Roman legacy
        # name; passing the name at creation would fail on characters Mac Roman lacks.
        pixel_layer.name = layer.name[:PSD_MAX_NAME_CHARS]
    document.save(Path(out_path))


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, **PNG_SAVE_OPTIONS)
    return buffer.getvalue()


def _opaque_rgba(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)


def _zip_entry(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info


def ora_bytes(layers: Sequence[StackLayer], images: Sequence[np.ndarray], width: int, height: int) -> bytes:
    """An OpenRaster archive: `mimetype` first and stored, `stack.xml` (top layer first),
    `data/<layer>.png` (RGBA), `mergedimage.png` and `Thumbnails/thumbnail.png` (<= 256 px)."""
    _check_layers(layers, images, width, height)
    composite = alpha_over(list(images))
    root = ElementTree.Element("image", {"version": "0.0.6", "w": str(width), "h": str(height),
                                         "xres": "72", "yres": "72"})
    stack_element = ElementTree.SubElement(root, "stack")
    for layer in reversed(layers):
        ElementTree.SubElement(stack_element, "layer", {
            "name": layer.name,
            "src": f"data/{layer.file}",
            "x": "0",
            "y": "0",
            "opacity": "1.000",
            "visibility": "visible",
            "composite-op": "svg:src-over",
        })
    stack_xml = ElementTree.tostring(root, encoding="UTF-8", xml_declaration=True)

    thumbnail = Image.fromarray(_opaque_rgba(composite))
    scale = min(1.0, ORA_THUMBNAIL_MAX / max(width, height))
    thumb_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if thumb_size != (width, height):
        thumbnail = thumbnail.resize(thumb_size, Image.Resampling.LANCZOS)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        # OpenRaster readers sniff the type from an uncompressed `mimetype` at offset 30.
        archive.writestr(_zip_entry("mimetype", zipfile.ZIP_STORED), ORA_MIMETYPE)
        archive.writestr(_zip_entry("stack.xml", zipfile.ZIP_DEFLATED), stack_xml)
        for i, (layer, image) in enumerate(zip(layers, images)):
            pixels = _opaque_rgba(image) if i == 0 else image
            archive.writestr(_zip_entry(f"data/{layer.file}", zipfile.ZIP_STORED), _png_bytes(pixels))
        archive.writestr(_zip_entry("mergedimage.png", zipfile.ZIP_STORED), _png_bytes(_opaque_rgba(composite)))
        archive.writestr(_zip_entry("Thumbnails/thumbnail.png", zipfile.ZIP_STORED),
                         _png_bytes(np.asarray(thumbnail)))
    return buffer.getvalue()


def write_ora(out_path: str | Path, layers: Sequence[StackLayer], images: Sequence[np.ndarray],
              width: int, height: int) -> None:
    data = ora_bytes(layers, images, width, height)
    with open(out_path, "wb") as handle:
        handle.write(data)


def _resolve(source: str | Path | LayerStack, folder: Optional[str | Path]) -> tuple[LayerStack, list[np.ndarray]]:
    if isinstance(source, LayerStack):
        if folder is None:
            raise ValueError("folder: required when the source is a LayerStack (the pixels live there)")
        stack = source
    else:
        stack = load_stack(source)
        path = Path(source)
        folder = path.parent if path.is_file() else path
    return stack, load_layer_images(stack, folder)


def export_psd(source: str | Path | LayerStack, out_path: str | Path,
               folder: Optional[str | Path] = None) -> Path:
    """Write a layered PSD of an existing stack (a folder / stack.json, or a LayerStack and
    its `folder`) to `out_path`, atomically. The stack folder itself is not modified."""
    stack, images = _resolve(source, folder)
    out_path = Path(out_path)
    _replace_atomically(out_path, lambda temp: write_psd(temp, stack.layers, images, stack.width, stack.height))
    return out_path


def export_ora(source: str | Path | LayerStack, out_path: str | Path,
               folder: Optional[str | Path] = None) -> Path:
    """Write an OpenRaster file of an existing stack to `out_path`, atomically."""
    stack, images = _resolve(source, folder)
    out_path = Path(out_path)
    _replace_atomically(out_path, lambda temp: write_ora(temp, stack.layers, images, stack.width, stack.height))
    return out_path


def export_exr(source: str | Path | LayerStack, out_path: str | Path,
               folder: Optional[str | Path] = None) -> Path:
    """Write the multilayer OpenEXR of an existing stack (see `exr.py`) to `out_path`,
    atomically, with the stack's frame rectangle (the whole canvas when it has none)."""
    from .exr import write_exr

    stack, images = _resolve(source, folder)
    out_path = Path(out_path)
    _replace_atomically(out_path, lambda temp: write_exr(temp, stack.layers, images, stack.width, stack.height,
                                                          stack.frame_rect))
    return out_path
