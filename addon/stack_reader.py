"""Read a Multiplane layer stack folder (docs/stack-format.md) with the standard library only.

The add-on never imports the engine (`inference/` needs torch), so it has its own small
reader. It checks exactly what the add-on relies on - the manifest's identity and
version, the layer list, the file names and the PNG sizes - and says precisely what is
wrong when something is, so the operator can report it instead of failing half-way.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .geometry import WHOLE_FRAME, frame_margins

FORMAT = "multiplane.stack"
FORMAT_VERSION = 1
MANIFEST_FILE = "stack.json"
EXR_FILE = "stack.exr"
EXR_COMPOSITE_LAYER = "Composite"
KINDS = ("background", "foreground")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA.
_PNG_ALPHA_COLOR_TYPES = (4, 6)


class StackReadError(ValueError):
    """The folder is not a stack this add-on can read; the message says why and where."""


@dataclass(frozen=True)
class LayerInfo:
    """One layer as the add-on uses it."""

    index: int
    name: str
    kind: str
    file: str
    path: Path
    depth: float | None
    prompt: str = ""

    @property
    def is_background(self) -> bool:
        return self.kind == "background"


@dataclass(frozen=True)
class StackInfo:
    """A checked stack: layers back to front (index 0 is the background)."""

    folder: Path
    name: str
    width: int
    height: int
    layers: tuple[LayerInfo, ...]
    composite: Path
    format_version: int
    exports: tuple[str, ...] = ()  # extra files in the folder (stack.psd, stack.ora, stack.exr)
    import_warnings: tuple[str, ...] = ()  # what a layered-file import could not carry over
    # The camera frame at the shot's start inside the canvas: x0, y0, x1, y1, normalized,
    # origin top-left, y down. The rest of the canvas is margin for a moving camera.
    frame: tuple[float, float, float, float] = WHOLE_FRAME

    @property
    def exr_path(self) -> Path | None:
        """The stack's multilayer OpenEXR, when it was written with one."""
        return self.folder / EXR_FILE if EXR_FILE in self.exports else None

    @property
    def margins(self) -> tuple[float, float, float, float]:
        """The margins the canvas has around the frame: left, top, right, bottom, as
        fractions of the frame's width (left/right) and height (top/bottom)."""
        return frame_margins(self.frame)


def manifest_path(path: str | os.PathLike) -> Path:
    """The stack.json for `path`, which may be the stack folder or the manifest itself."""
    raw = os.fspath(path)
    if not raw.strip():
        raise StackReadError("no stack given: choose a stack folder or its stack.json")
    candidate = Path(raw).expanduser()
    if candidate.is_dir():
        candidate = candidate / MANIFEST_FILE
    elif candidate.name != MANIFEST_FILE:
        if candidate.exists():
            raise StackReadError(f"{candidate} is not a stack: choose a stack folder or its {MANIFEST_FILE}")
        raise StackReadError(f"{candidate} does not exist")
    if not candidate.is_file():
        raise StackReadError(f"{candidate.parent} is not a stack folder: it has no {MANIFEST_FILE}")
    return candidate


def read_stack(path: str | os.PathLike, check_images: bool = True) -> StackInfo:
    """Read and check the stack at `path` (folder or stack.json).

    With `check_images`, every PNG the add-on loads must exist and have the manifest's
    size (read from the PNG header; the pixels are not decoded), and foregrounds must
    carry an alpha channel.
    """
    manifest, data = _load_manifest(path)
    folder = manifest.parent
    source = str(manifest)
    if data.get("format") != FORMAT:
        raise StackReadError(f"{source}: 'format' must be {FORMAT!r}, got {data.get('format')!r} "
                             "(not a Multiplane layer stack)")
    version = _int_field(data, "format_version", source, minimum=1)
    if version > FORMAT_VERSION:
        raise StackReadError(f"{source}: this stack uses format version {version}, but this add-on reads "
                             f"only up to version {FORMAT_VERSION}; update the Multiplane add-on")
    name = _str_field(data, "name", source)
    width = _int_field(data, "width", source, minimum=1)
    height = _int_field(data, "height", source, minimum=1)

    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise StackReadError(f"{source}: 'layers' must be a non-empty list")
    layers = tuple(_read_layer(item, i, folder, source) for i, item in enumerate(raw_layers))
    if layers[0].kind != "background":
        raise StackReadError(f"{source}: layers[0] must be the background (layers are back to front), "
                             f"got kind {layers[0].kind!r}")
    for layer in layers[1:]:
        if layer.kind != "foreground":
            raise StackReadError(f"{source}: layers[{layer.index}] is a second background; "
                                 "a stack has exactly one, first")
    seen: dict[str, int] = {}
    for layer in layers:
        if layer.name in seen:
            raise StackReadError(f"{source}: layers[{layer.index}].name {layer.name!r} repeats "
                                 f"layers[{seen[layer.name]}].name; layer names must be unique")
        seen[layer.name] = layer.index

    composite = folder / _file_name(data.get("composite"), f"{source}: 'composite'")
    exports = data.get("exports") or []
    if not isinstance(exports, list):
        raise StackReadError(f"{source}: 'exports' must be a list of file names, got {exports!r}")
    stack = StackInfo(folder=folder, name=name, width=width, height=height, layers=layers,
                      composite=composite, format_version=version,
                      exports=tuple(_file_name(v, f"{source}: exports[{i}]") for i, v in enumerate(exports)),
                      import_warnings=_import_warnings(data.get("imported")),
                      frame=_frame_field(data.get("frame"), source))
    if check_images:
        for layer in layers:
            check_png(layer.path, width, height, need_alpha=not layer.is_background,
                      what=f"layer {layer.name!r}")
    return stack


def _load_manifest(path: str | os.PathLike) -> tuple[Path, dict]:
    manifest = manifest_path(path)
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise StackReadError(f"{manifest}: cannot read it ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise StackReadError(f"{manifest}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise StackReadError(f"{manifest}: the manifest must be a JSON object")
    return manifest, data


@dataclass(frozen=True)
class LayerRecipe:
    """What made one layer: its prompt, seed, layout box (left, top, right, bottom) and depth."""

    prompt: str
    seed: int | None
    box: tuple[float, float, float, float] | None
    depth: float | None


@dataclass(frozen=True)
class StackRecipe:
    """A stack's request as its manifest records it (the history shows it and "Use these
    settings" puts it back into the panel). Informational fields a manifest lacks or has in
    an unexpected type read as empty, never as an error: the stack itself is `read_stack`'s."""

    stack: StackInfo
    prompt: str
    negative_prompt: str
    method: str
    model: str  # the preset name ("sdxl", "sd15", "tiny") or the model's base, "" if unknown
    created: str
    seed: int | None
    steps: int | None
    guidance: float | None
    layers: tuple[LayerRecipe, ...]  # background first, as stack.layers


def read_recipe(path: str | os.PathLike) -> StackRecipe:
    """The stack at `path` with what made it; StackReadError if it is not a readable stack."""
    stack = read_stack(path, check_images=False)
    _manifest, data = _load_manifest(path)

    def text(mapping: dict, key: str) -> str:
        value = mapping.get(key)
        return value if isinstance(value, str) else ""

    def number(mapping: dict, key: str, kind):
        value = mapping.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return kind(value) if ok and (kind is float or float(value).is_integer()) else None

    model = data.get("model")
    model = (text(model, "preset") or text(model, "base")) if isinstance(model, dict) else ""
    layers = []
    for layer, raw in zip(stack.layers, data.get("layers") or ()):
        box = raw.get("box")
        box = (tuple(float(v) for v in box) if isinstance(box, list) and len(box) == 4
               and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box) else None)
        layers.append(LayerRecipe(prompt=layer.prompt, seed=number(raw, "seed", int), box=box, depth=layer.depth))
    return StackRecipe(stack=stack, prompt=text(data, "prompt"), negative_prompt=text(data, "negative_prompt"),
                       method=text(data, "method"), model=model, created=text(data, "created"),
                       seed=number(data, "seed", int), steps=number(data, "steps", int),
                       guidance=number(data, "guidance", float), layers=tuple(layers))


def png_header(path: Path) -> tuple[int, int, int]:
    """(width, height, colour type) from a PNG's IHDR chunk, without decoding pixels."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
    except FileNotFoundError:
        raise StackReadError(f"{path} is missing") from None
    except OSError as error:
        raise StackReadError(f"{path}: cannot read it ({error})") from None
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise StackReadError(f"{path} is not a PNG image")
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[25]


def check_png(path: Path, width: int, height: int, need_alpha: bool, what: str) -> None:
    """Raise StackReadError unless `path` is a PNG of exactly width x height (with alpha if asked)."""
    found_w, found_h, color_type = png_header(path)
    if (found_w, found_h) != (width, height):
        raise StackReadError(f"{what}: {path.name} is {found_w}x{found_h} pixels, "
                             f"but the stack is {width}x{height}")
    if need_alpha and color_type not in _PNG_ALPHA_COLOR_TYPES:
        raise StackReadError(f"{what}: {path.name} has no alpha channel; foreground layers are RGBA")


def exr_layer_names(names) -> list[str]:
    """The EXR layer (Blender: pass) name of each stack layer name, then the composite's:
    '.' becomes '_', and a repeat gets " 2", " 3"... (the engine's `inference.stack.exr.
    exr_layer_names`, mirrored here because the add-on cannot import the engine)."""
    taken = {EXR_COMPOSITE_LAYER}
    result = []
    for name in names:
        base = name.replace(".", "_").strip() or "layer"
        candidate, count = base, 1
        while candidate in taken:
            count += 1
            candidate = f"{base} {count}"
        taken.add(candidate)
        result.append(candidate)
    return [*result, EXR_COMPOSITE_LAYER]


def _import_warnings(imported: object) -> tuple[str, ...]:
    """The warnings a layered import recorded (`imported.warnings`); () for generated stacks."""
    warnings = imported.get("warnings") if isinstance(imported, dict) else None
    return tuple(w for w in warnings if isinstance(w, str)) if isinstance(warnings, list) else ()


def safe_folder_name(name: str) -> str:
    """A file-system-safe folder name for a stack's display name (for //multiplane/<name>/)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return cleaned[:64] or "stack"


def _read_layer(item: object, index: int, folder: Path, source: str) -> LayerInfo:
    where = f"{source}: layers[{index}]"
    if not isinstance(item, dict):
        raise StackReadError(f"{where} must be an object")
    name = _str_field(item, "name", where)
    kind = item.get("kind")
    if kind not in KINDS:
        raise StackReadError(f"{where}.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    file_name = _file_name(item.get("file"), f"{where}.file")
    depth = item.get("depth")
    if depth is not None:
        if (isinstance(depth, bool) or not isinstance(depth, (int, float))
                or not math.isfinite(depth) or depth <= 0):
            raise StackReadError(f"{where}.depth must be null or a positive number, got {depth!r}")
        depth = float(depth)
    prompt = item.get("prompt")
    return LayerInfo(index=index, name=name, kind=kind, file=file_name, path=folder / file_name,
                     depth=depth, prompt=prompt if isinstance(prompt, str) else "")


def _frame_field(value: object, source: str) -> tuple[float, float, float, float]:
    """The manifest's optional 'frame' (absent or null: the whole image), checked."""
    if value is None:
        return WHOLE_FRAME
    rule = ("'frame' must be null or [x0, y0, x1, y1]: the camera frame inside the image, "
            "normalized, with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    if not isinstance(value, list) or len(value) != 4 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        raise StackReadError(f"{source}: {rule}, got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise StackReadError(f"{source}: {rule}, got {value!r}")
    return x0, y0, x1, y1


def _str_field(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise StackReadError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _int_field(data: dict, key: str, where: str, minimum: int) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StackReadError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _file_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or value in (".", ".."):
        raise StackReadError(f"{where} must be a file name, got {value!r}")
    if "/" in value or "\\" in value or value != os.path.basename(value):
        raise StackReadError(f"{where} must be a plain file name inside the stack folder, got {value!r}")
    return value
