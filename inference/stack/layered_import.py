"""Layered files back in: a PSD or OpenRaster file becomes a stack (method "imported").

What a painting program's document becomes, bottom to top:
- the bottom visible layer is the background; where it is not opaque it is flattened over
  white (what Photoshop's "Flatten Image" does), with a warning;
- every other visible layer is a foreground, in order, with its name (unique: a repeat
  gets " 2", " 3"...), its pixels placed on the canvas at its offset (cropped where it
  leaves the canvas) and its `box` set to its bounds on the canvas;
- hidden layers and groups are skipped; a visible group is flattened into one layer (its
  children composited by psd-tools for a PSD, "over" for ORA);
- what a stack cannot hold is not silently wrong: blend modes other than normal (imported
  as normal), adjustment and fill layers (skipped), clipping, layer effects, non-RGB or
  16/32-bit documents become warnings, recorded in stack.json (`imported.warnings`).
The canvas size is kept as it is (no multiple of 64 needed: an import is not generated).
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

from ..errors import InvalidRequest
from ..request import MAX_NAME_CHARS
from .manifest import IMPORTED_METHOD, LayerStack, StackLayer, layer_name
from .writer import write_stack

SUFFIXES = {".psd": "psd", ".psb": "psd", ".ora": "ora"}
MAX_IMPORT_SIDE = 8192  # pixels per side: a full-canvas RGBA layer is then at most 256 MiB
MAX_IMPORT_LAYERS = 64
MAX_IMPORT_BYTES = 2 << 30  # the full-canvas RGBA layers held at once
FIELD = "path"  # the request field bad input is reported against (CLI argument, API body)


@dataclass
class ImportedLayer:
    """One layer of the document, bottom to top: straight RGBA on the whole canvas."""

    name: str
    pixels: np.ndarray  # (H, W, 4) uint8
    bounds: Optional[tuple[int, int, int, int]]  # left, top, right, bottom on the canvas; None = empty


@dataclass
class LayeredDocument:
    format: str  # "psd" or "ora"
    width: int
    height: int
    layers: list[ImportedLayer] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- placing pixels


def place_on_canvas(image: Image.Image, left: int, top: int, width: int, height: int) -> np.ndarray:
    """`image` (any mode) as straight RGBA pixels at (left, top) on a transparent canvas."""
    canvas = np.zeros((height, width, 4), np.uint8)
    pixels = np.asarray(image.convert("RGBA"))
    x0, y0 = max(0, left), max(0, top)
    x1, y1 = min(width, left + pixels.shape[1]), min(height, top + pixels.shape[0])
    if x0 < x1 and y0 < y1:
        canvas[y0:y1, x0:x1] = pixels[y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas


def alpha_bounds(pixels: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """The pixel box (left, top, right, bottom) holding every non-transparent pixel."""
    rows = np.flatnonzero(pixels[..., 3].any(axis=1))
    columns = np.flatnonzero(pixels[..., 3].any(axis=0))
    if rows.size == 0:
        return None
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def over(back: np.ndarray, front: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA "over" of two canvases (Pillow's alpha_composite)."""
    return np.asarray(Image.alpha_composite(Image.fromarray(back, "RGBA"), Image.fromarray(front, "RGBA")))


def with_opacity(pixels: np.ndarray, opacity: float) -> np.ndarray:
    if opacity >= 1.0:
        return pixels
    result = pixels.copy()
    result[..., 3] = np.floor(pixels[..., 3].astype(np.float64) * max(0.0, opacity) + 0.5).astype(np.uint8)
    return result


def _check_canvas(width: int, height: int) -> None:
    if not (1 <= width <= MAX_IMPORT_SIDE and 1 <= height <= MAX_IMPORT_SIDE):
        raise InvalidRequest(FIELD, f"the document is {width}x{height} pixels; layered imports take 1 to "
                                    f"{MAX_IMPORT_SIDE} pixels per side (scale it down in the editor)")


def _check_layer_budget(visible: int, width: int, height: int, file_name: str) -> None:
    """Before any pixel is decoded: the visible top-level layers fit the limits."""
    if visible > MAX_IMPORT_LAYERS:
        raise InvalidRequest(FIELD, f"{file_name} has {visible} visible layers; at most {MAX_IMPORT_LAYERS} "
                                    "(merge or hide some in the editor)")
    if visible * width * height * 4 > MAX_IMPORT_BYTES:
        raise InvalidRequest(FIELD, f"{file_name}: {visible} layers of {width}x{height} pixels need "
                                    f"{visible * width * height * 4 / 2**30:.1f} GiB; at most "
                                    f"{MAX_IMPORT_BYTES / 2**30:.0f} GiB (fewer layers or a smaller canvas)")


# --------------------------------------------------------------------------- PSD


def read_psd(path: Path) -> LayeredDocument:
    """The visible layers of a PSD/PSB, bottom to top, read with psd-tools."""
    from psd_tools import PSDImage

    try:
        psd = PSDImage.open(path)
    except Exception as error:  # psd-tools raises many kinds on a damaged file
        raise InvalidRequest(FIELD, f"{path.name} is not a readable Photoshop file ({type(error).__name__}: "
                                    f"{error})") from None
    width, height = psd.width, psd.height
    _check_canvas(width, height)
    document = LayeredDocument("psd", width, height)
    mode = getattr(psd.color_mode, "name", str(psd.color_mode))
    if mode != "RGB":
        document.warnings.append(f"the document's colour mode is {mode}: converted to RGB (colours may shift)")
    if psd.depth != 8:
        document.warnings.append(f"the document has {psd.depth}-bit channels: reduced to 8 bits")
    _check_layer_budget(sum(1 for layer in psd if layer.visible), width, height, path.name)
    for layer in psd:  # top level, bottom to top
        try:
            _read_psd_layer(layer, document)
        except InvalidRequest:
            raise
        except Exception as error:  # a damaged layer: name it rather than fail with a traceback
            raise InvalidRequest(FIELD, f"{path.name}: layer {clean_name(layer.name)!r} cannot be read "
                                        f"({type(error).__name__}: {error})") from None
    return document


_PIXEL_KINDS = ("pixel", "type", "shape", "smartobject")


def _read_psd_layer(layer, document: LayeredDocument) -> None:
    name, warnings = clean_name(layer.name), document.warnings
    if not layer.visible:
        warnings.append(f"hidden layer {name!r} skipped")
        return
    blend = getattr(layer.blend_mode, "name", str(layer.blend_mode))
    if layer.is_group():
        warnings.append(f"group {name!r} ({len(layer)} layers) flattened into one layer")
        if blend not in ("NORMAL", "PASS_THROUGH"):
            warnings.append(f"group {name!r} uses blend mode {blend}; imported as normal")
    elif layer.kind not in _PIXEL_KINDS:
        warnings.append(f"{layer.kind} layer {name!r} skipped: adjustment and fill layers have no pixels "
                        "of their own, so the stack's composite differs from the editor's")
        return
    elif blend != "NORMAL":
        warnings.append(f"layer {name!r} uses blend mode {blend}; imported as normal (its own pixels)")
    if getattr(layer, "clipping", False):
        warnings.append(f"layer {name!r} is clipped to the layer below; imported unclipped")
    if layer.has_effects():
        warnings.append(f"layer effects of {name!r} (shadows, strokes...) may be missing")
    pixels = _psd_layer_pixels(layer, document.width, document.height)
    if pixels is None:
        warnings.append(f"layer {name!r} has no pixels; skipped")
        return
    document.layers.append(ImportedLayer(name, pixels, alpha_bounds(pixels)))


def _has_mask_pixels(layer) -> bool:
    """A layer mask that masks something (some writers store an empty 0x0 mask record)."""
    mask = layer.mask if layer.has_mask() else None
    if mask is None or mask.disabled:
        return False
    left, top, right, bottom = mask.bbox
    return right > left and bottom > top


def _psd_layer_pixels(layer, width: int, height: int) -> Optional[np.ndarray]:
    """A plain pixel layer's own stored pixels placed at its offset (exact), anything else
    (groups, masks, effects, type and shapes) rendered by psd-tools' compositor."""
    if layer.kind == "pixel" and not _has_mask_pixels(layer) and not layer.has_effects():
        image = layer.topil()
        if image is None:
            return None
        pixels = place_on_canvas(image, layer.left, layer.top, width, height)
        return with_opacity(pixels, layer.opacity / 255.0)
    image = layer.composite(viewport=(0, 0, width, height))
    if image is None:
        return None
    pixels = place_on_canvas(image, 0, 0, width, height)
    pixels[pixels[..., 3] == 0] = 0  # psd-tools fills transparent pixels with white
    return pixels


# --------------------------------------------------------------------------- OpenRaster


def read_ora(path: Path) -> LayeredDocument:
    """The visible layers of an OpenRaster file, bottom to top (stack.xml lists them top first)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise InvalidRequest(FIELD, f"{path.name} is not an OpenRaster file (not a zip archive: {error})") from None
    with archive:
        names = set(archive.namelist())
        if "stack.xml" not in names:
            raise InvalidRequest(FIELD, f"{path.name} is not an OpenRaster file: it has no stack.xml")
        document = LayeredDocument("ora", 0, 0)
        if "mimetype" not in names or archive.read("mimetype").strip() != b"image/openraster":
            document.warnings.append("the archive's mimetype is not image/openraster; read as OpenRaster anyway")
        try:
            root = ElementTree.fromstring(archive.read("stack.xml"))
        except ElementTree.ParseError as error:
            raise InvalidRequest(FIELD, f"{path.name}: stack.xml is not valid XML ({error})") from None
        document.width, document.height = _int_attribute(root, "w", path), _int_attribute(root, "h", path)
        _check_canvas(document.width, document.height)
        top = root.find("stack")
        if top is None:
            raise InvalidRequest(FIELD, f"{path.name}: stack.xml has no <stack> element")
        children = list(top)
        _check_layer_budget(sum(1 for child in children if child.get("visibility", "visible") != "hidden"),
                            document.width, document.height, path.name)
        for element in reversed(children):
            _read_ora_element(element, archive, document, 0, 0)
    return document


def _int_attribute(element, key: str, path: Path, default: Optional[int] = None) -> int:
    raw = element.get(key)
    if raw is None and default is not None:
        return default
    try:
        return int(round(float(raw)))
    except (TypeError, ValueError):
        raise InvalidRequest(FIELD, f"{path.name}: <{element.tag}> {key}={raw!r} is not a number") from None


def _opacity(element) -> float:
    try:
        return min(1.0, max(0.0, float(element.get("opacity", "1"))))
    except ValueError:
        return 1.0


def _read_ora_element(element, archive: zipfile.ZipFile, document: LayeredDocument, dx: int, dy: int) -> None:
    """One child of the top <stack>: a layer, or a nested stack flattened into one layer."""
    name = clean_name(element.get("name") or "")
    if element.tag not in ("layer", "stack"):
        document.warnings.append(f"<{element.tag}> element {name!r} skipped: only layers and stacks hold pixels")
        return
    if element.get("visibility", "visible") == "hidden":
        document.warnings.append(f"hidden {'group' if element.tag == 'stack' else 'layer'} {name!r} skipped")
        return
    operation = element.get("composite-op", "svg:src-over")
    if operation != "svg:src-over":
        what = "group" if element.tag == "stack" else "layer"
        document.warnings.append(f"{what} {name!r} uses composite-op {operation}; imported as normal")
    if element.tag == "stack":
        children = [child for child in element if child.tag in ("layer", "stack")]
        document.warnings.append(f"group {name!r} ({len(children)} layers) flattened into one layer")
        pixels = _ora_group_pixels(element, archive, document, dx, dy)
    else:
        pixels = _ora_layer_pixels(element, archive, document, dx, dy)
    pixels = with_opacity(pixels, _opacity(element))
    document.layers.append(ImportedLayer(name, pixels, alpha_bounds(pixels)))


def _ora_layer_pixels(element, archive: zipfile.ZipFile, document: LayeredDocument, dx: int, dy: int) -> np.ndarray:
    source = element.get("src") or ""
    where = archive.filename or "the archive"
    try:
        data = archive.read(source)
    except KeyError:
        raise InvalidRequest(FIELD, f"{Path(where).name}: layer {element.get('name')!r} names {source!r}, "
                                    "which is not in the archive") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) > MAX_IMPORT_SIDE:
                raise InvalidRequest(FIELD, f"{Path(where).name}: {source} is {image.size[0]}x{image.size[1]} "
                                            f"pixels; layers take at most {MAX_IMPORT_SIDE} per side")
            image.load()
            left = dx + _int_attribute(element, "x", Path(where), 0)
            top = dy + _int_attribute(element, "y", Path(where), 0)
            return place_on_canvas(image, left, top, document.width, document.height)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, InvalidRequest):
            raise
        raise InvalidRequest(FIELD, f"{Path(where).name}: {source} is not a readable image ({error})") from None


def _ora_group_pixels(element, archive: zipfile.ZipFile, document: LayeredDocument, dx: int, dy: int) -> np.ndarray:
    """A nested stack's visible children composited "over", bottom to top."""
    where = Path(archive.filename or "the archive")
    dx += _int_attribute(element, "x", where, 0)
    dy += _int_attribute(element, "y", where, 0)
    result = np.zeros((document.height, document.width, 4), np.uint8)
    for child in reversed(list(element)):
        if child.tag not in ("layer", "stack") or child.get("visibility", "visible") == "hidden":
            continue
        if child.get("composite-op", "svg:src-over") != "svg:src-over":
            document.warnings.append(f"layer {child.get('name', '')!r} in group {element.get('name', '')!r} "
                                     f"uses composite-op {child.get('composite-op')}; composited as normal")
        read = _ora_group_pixels if child.tag == "stack" else _ora_layer_pixels
        result = over(result, with_opacity(read(child, archive, document, dx, dy), _opacity(child)))
    return result


# --------------------------------------------------------------------------- the stack


def read_layered(path: str | Path) -> LayeredDocument:
    """Read a .psd/.psb or .ora file; InvalidRequest (field "path") names what is wrong."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InvalidRequest(FIELD, f"{path.name}: choose a .psd or .ora file (got {path.suffix or 'no suffix'})")
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name the file system cannot even look up
        is_file = False
    if not is_file:
        raise InvalidRequest(FIELD, f"{path} does not exist (or is not a file)")
    document = read_psd(path) if kind == "psd" else read_ora(path)
    for layer in [layer for layer in document.layers if layer.bounds is None]:
        document.warnings.append(f"layer {layer.name!r} is fully transparent; skipped")
        document.layers.remove(layer)
    if not document.layers:
        raise InvalidRequest(FIELD, f"{path.name} has no visible pixel layer to import")
    return document


def clean_name(name: str) -> str:
    """A layer name as the editor showed it: Photoshop ends some Unicode names with a NUL, and
    control characters and runs of white space never belong in a name."""
    printable = "".join(ch for ch in name if ch.isprintable() or ch.isspace())
    return " ".join(printable.split())


def unique_names(names: list[str]) -> list[str]:
    """Layer names as a stack needs them: non-empty, at most MAX_NAME_CHARS, unique."""
    taken: set[str] = set()
    result = []
    for index, name in enumerate(names):
        base = clean_name(name)[:MAX_NAME_CHARS] or layer_name(index)
        candidate, count = base, 1
        while candidate in taken:
            count += 1
            suffix = f" {count}"
            candidate = base[:MAX_NAME_CHARS - len(suffix)] + suffix
        taken.add(candidate)
        result.append(candidate)
    return result


def flatten_background(layer: ImportedLayer, warnings: list[str]) -> np.ndarray:
    """The bottom layer as opaque RGB: over white where it is not opaque (with a warning)."""
    alpha = layer.pixels[..., 3]
    if (alpha == 255).all():
        return np.ascontiguousarray(layer.pixels[..., :3])
    share = float((alpha < 255).mean())
    warnings.append(f"the bottom layer {layer.name!r} is the background but {share:.1%} of its pixels are not "
                    "opaque: flattened over white")
    white = np.full_like(layer.pixels, 255)
    return np.ascontiguousarray(over(white, layer.pixels)[..., :3])


def carried_depths(names: list[str], known: dict[str, float]) -> tuple[list[Optional[float]], list[str]]:
    """Each layer's depth (back to front) from `known` (name → depth, e.g. the planes of the
    backdrop this import replaces), so kept layers stay where they were. Layers not in
    `known` get a depth between their neighbours' (even in 1/distance, like the add-on's
    defaults), or halve/double beyond the nearest/farthest one. Known depths that are no
    longer back to front are all dropped, with a warning."""
    depths = [known.get(name) for name in names]
    positions = [i for i, depth in enumerate(depths) if depth is not None]
    if not positions:
        return depths, []
    if any(not depths[b] < depths[a] for a, b in zip(positions, positions[1:])):
        return [None] * len(names), ["the replaced backdrop's depths were not kept: its layers are in another "
                                     "order in the file (the importer spreads them between Near and Far)"]
    filled: list[Optional[float]] = list(depths)
    for i in range(len(names)):
        if filled[i] is not None:
            continue
        farther = max((p for p in positions if p < i), default=None)
        nearer = min((p for p in positions if p > i), default=None)
        if farther is not None and nearer is not None:
            share = (i - farther) / (nearer - farther)
            filled[i] = 1.0 / (1.0 / depths[farther] + (1.0 / depths[nearer] - 1.0 / depths[farther]) * share)
        elif farther is not None:
            filled[i] = depths[farther] / 2.0 ** (i - farther)
        else:
            filled[i] = depths[nearer] * 2.0 ** (nearer - i)
    return filled, []


def _normalized_box(bounds, width: int, height: int):
    if bounds is None:
        return None
    left, top, right, bottom = bounds
    return (left / width, top / height, right / width, bottom / height)


def import_layered(path: str | Path, out_dir: str | Path, name: str = "", export_exr: bool = False,
                   depths: Optional[dict[str, float]] = None, cancel=None) -> LayerStack:
    """Import the layered file at `path` as a new stack folder `out_dir` (written atomically);
    returns the manifest written, whose `imported.warnings` say what did not carry over.

    `depths`: layer name → depth to keep (`carried_depths`); None: no depths."""
    path = Path(path)
    document = read_layered(path)
    warnings = list(document.warnings)
    names = unique_names([layer.name for layer in document.layers])
    background = flatten_background(document.layers[0], warnings)
    layer_depths, depth_warnings = carried_depths(names, dict(depths or {}))
    warnings += depth_warnings
    layers = [StackLayer(name=names[0], kind="background", depth=layer_depths[0])]
    for layer, layer_name_, depth in zip(document.layers[1:], names[1:], layer_depths[1:]):
        layers.append(StackLayer(name=layer_name_, kind="foreground", depth=depth,
                                 box=_normalized_box(layer.bounds, document.width, document.height)))
    stack = LayerStack(name=name or path.stem, method=IMPORTED_METHOD, width=document.width,
                       height=document.height, layers=layers,
                       imported={"source": path.name, "format": document.format, "warnings": warnings})
    return write_stack(out_dir, stack, background, [layer.pixels for layer in document.layers[1:]],
                       export_exr=export_exr, cancel=cancel)
