"""Test helpers: layered files written the way other programs write them, independently of
Multiplane's own exporters (inference/stack/export.py uses psd-tools' writer).

- `pytoshop_psd`: a PSD written by pytoshop, a second PSD implementation that shares no code
  with psd-tools: layers with offsets, opacity, visibility, blend modes, Unicode names, and
  an adjustment layer (an Invert record without pixels).
- `openraster`: an OpenRaster zip built by hand from the spec (stack.xml, top layer first,
  PNGs placed with x/y, nested stacks, opacity, visibility, composite-op).
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from xml.etree import ElementTree

import numpy as np
from PIL import Image


@dataclass
class PsdLayer:
    """One layer record: straight RGBA `pixels` at (left, top) (None: an adjustment layer)."""

    name: str
    pixels: Optional[np.ndarray]
    left: int = 0
    top: int = 0
    opacity: int = 255
    visible: bool = True
    blend_mode: str = "normal"  # a pytoshop.enums.BlendMode member name
    adjustment: bool = False


def pytoshop_psd(path: Path, width: int, height: int, layers: list[PsdLayer]) -> Path:
    """Write `layers` (bottom to top) as an 8-bit RGB PSD with pytoshop; returns `path`."""
    import pytoshop
    from pytoshop import enums, tagged_block
    from pytoshop import layers as psd_layers

    records = []
    for layer in layers:
        blocks = [tagged_block.UnicodeLayerName(name=layer.name)]
        channels = {}
        if layer.adjustment:
            # An Invert adjustment ('nvrt'): the tagged block is its whole description (no data).
            blocks.append(tagged_block.GenericTaggedBlock(code=b"nvrt", data=b""))
            top = left = bottom = right = 0
        else:
            height_, width_ = layer.pixels.shape[:2]
            for index, channel in ((0, 0), (1, 1), (2, 2), (-1, 3)):
                channels[index] = psd_layers.ChannelImageData(
                    image=np.ascontiguousarray(layer.pixels[..., channel]), compression=enums.Compression.raw)
            top, left, bottom, right = layer.top, layer.left, layer.top + height_, layer.left + width_
        records.append(psd_layers.LayerRecord(
            top=top, left=left, bottom=bottom, right=right, name=layer.name.encode("ascii", "replace").decode(),
            opacity=layer.opacity, visible=layer.visible, blend_mode=enums.BlendMode[layer.blend_mode],
            channels=channels, blocks=blocks))
    document = pytoshop.core.PsdFile(num_channels=3, height=height, width=width,
                                     color_mode=enums.ColorMode.rgb, depth=8)
    document.layer_and_mask_info.layer_info.layer_records.extend(records)
    with open(path, "wb") as handle:
        document.write(handle)
    return path


@dataclass
class OraNode:
    """A <layer> (with `pixels`) or a <stack> (with `children`, top first), as stack.xml has them."""

    name: str
    pixels: Optional[np.ndarray] = None
    x: int = 0
    y: int = 0
    opacity: float = 1.0
    visible: bool = True
    composite_op: str = "svg:src-over"
    children: list["OraNode"] = field(default_factory=list)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def openraster(path: Path, width: int, height: int, top_first: list[OraNode]) -> Path:
    """Write an OpenRaster file whose root stack holds `top_first` (top layer first)."""
    files: dict[str, bytes] = {}

    def element(node: OraNode, parent) -> None:
        attributes = {"name": node.name, "x": str(node.x), "y": str(node.y), "opacity": f"{node.opacity:.3f}",
                      "visibility": "visible" if node.visible else "hidden", "composite-op": node.composite_op}
        if node.pixels is None:
            child = ElementTree.SubElement(parent, "stack", attributes)
            for grandchild in node.children:
                element(grandchild, child)
        else:
            source = f"data/layer{len(files)}.png"
            files[source] = _png(node.pixels)
            ElementTree.SubElement(parent, "layer", {**attributes, "src": source})

    root = ElementTree.Element("image", {"version": "0.0.5", "w": str(width), "h": str(height)})
    stack = ElementTree.SubElement(root, "stack")
    for node in top_first:
        element(node, stack)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo("mimetype"), b"image/openraster")  # stored, first
        archive.writestr("stack.xml", ElementTree.tostring(root, encoding="UTF-8", xml_declaration=True),
                         compress_type=zipfile.ZIP_DEFLATED)
        for name, data in files.items():
            archive.writestr(name, data)
    return path
