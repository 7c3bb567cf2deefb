"""The layer stack on disk: manifest dataclasses, compositing, atomic writing, strict reading.

A stack folder is the contract between the engine (writer) and the Blender add-on (reader);
`docs/stack-format.md` is its specification. This module needs only numpy and Pillow so
that the server can list, validate and serve stacks without importing torch.

Writing is all-or-nothing: files go into a hidden sibling temp folder that is renamed into
place at the end, so a folder holding a `stack.json` is always complete. Reading checks
everything a reader depends on and names the file and field of the first problem found.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from .errors import InvalidRequest, MultiplaneError, StackFormatError
from .progress import CancelToken
from .request import validate_box

logger = logging.getLogger(__name__)

FORMAT = "multiplane.stack"
FORMAT_VERSION = 1
MANIFEST_FILE = "stack.json"
BACKGROUND_NAME = "background"
BACKGROUND_FILE = "background.png"
COMPOSITE_FILE = "composite.png"
BLENDED_FILE = "blended.png"
PSD_FILE = "stack.psd"
ORA_FILE = "stack.ora"
KINDS = ("background", "foreground")
TIMING_PHASES = ("load", "denoise", "decode", "save", "total")

# Hidden siblings used while writing (`.tmp-`) and while replacing an old stack (`.old-`).
_SCRATCH_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<role>tmp|old)-(?P<token>[0-9a-f]{8})$")
_SHA256_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")

Box = tuple[float, float, float, float]


class StackExists(MultiplaneError, FileExistsError):
    """The destination folder of a new stack already exists and overwriting was not asked for."""


def layer_name(index: int) -> str:
    """Canonical layer name: `background` for index 0, then `layer_01`, `layer_02`, ..."""
    return BACKGROUND_NAME if index == 0 else f"layer_{index:02d}"


def layer_file_name(index: int) -> str:
    return f"{layer_name(index)}.png"


def mask_file_name(index: int) -> str:
    """Mask of foreground `index` (1-based, like its layer): `mask_01.png`, ..."""
    return f"mask_{index:02d}.png"


# --------------------------------------------------------------------------- manifest


@dataclass
class StackLayer:
    """One layer of a stack, as recorded in `stack.json` (pixels live in `file`)."""

    name: str
    kind: str
    prompt: str = ""
    seed: int = 0
    file: str = ""
    box: Optional[Box] = None
    mask: Optional[str] = None
    depth: Optional[float] = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "prompt": self.prompt,
            "seed": self.seed,
            "file": self.file,
            "box": None if self.box is None else list(self.box),
            "mask": self.mask,
            "depth": self.depth,
        }


def _default_model() -> dict:
    return {"preset": "", "base": "", "files": {}}


@dataclass(kw_only=True)
class LayerStack:
    """The manifest of one stack folder. `layers` run back to front; item 0 is the background."""

    format_version: int = FORMAT_VERSION
    name: str = ""
    created: str = ""
    method: str = "independent"
    width: int
    height: int
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 0
    guidance: float = 0.0
    model: dict = field(default_factory=_default_model)
    layers: list[StackLayer] = field(default_factory=list)
    composite: str = COMPOSITE_FILE
    blended: Optional[str] = None
    timings: dict = field(default_factory=dict)
    exports: list[str] = field(default_factory=list)

    @property
    def foregrounds(self) -> list[StackLayer]:
        return self.layers[1:]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "name": self.name,
            "created": self.created,
            "method": self.method,
            "width": self.width,
            "height": self.height,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "model": copy.deepcopy(self.model),
            "layers": [layer.to_dict() for layer in self.layers],
            "composite": self.composite,
            "blended": self.blended,
            "timings": copy.deepcopy(self.timings),
            "exports": list(self.exports),
        }

    def to_json(self) -> str:
        """Pretty, UTF-8-safe JSON; NaN/Infinity are refused rather than written."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_FILE) -> "LayerStack":
        """Validate a parsed manifest (no file checks); errors name `source` and the field."""
        return _manifest_from_dict(data, source)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_FILE) -> "LayerStack":
        return _manifest_from_dict(_parse_json(text, source), source)


def _parse_json(text: str | bytes, source: str) -> Any:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise StackFormatError(f"{source}: not UTF-8 text ({error})") from None

    def refuse_constant(name: str) -> None:
        raise StackFormatError(f"{source}: {name} is not allowed in a stack manifest")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as error:
        raise StackFormatError(
            f"{source}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None


# Field checkers: each returns the cleaned value or raises StackFormatError("<source>: <field>: ...").


def _fail(source: str, field_name: str, message: str) -> StackFormatError:
    return StackFormatError(f"{source}: {field_name}: {message}")


def _require(data: dict, key: str, source: str, prefix: str = "") -> Any:
    if key not in data:
        raise _fail(source, prefix + key, "missing")
    return data[key]


def _check_str(value: Any, source: str, field_name: str, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(source, field_name, f"must be a string, got {type(value).__name__}")
    if non_empty and not value.strip():
        raise _fail(source, field_name, "must not be empty")
    return value


def _check_int(value: Any, source: str, field_name: str, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(source, field_name, f"must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise _fail(source, field_name, f"must be >= {minimum}, got {value}")
    return value


def _check_number(value: Any, source: str, field_name: str, minimum: float | None = None,
                  exclusive: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _fail(source, field_name, f"must be a finite number, got {value!r} ({type(value).__name__})")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise _fail(source, field_name, f"must be {'>' if exclusive else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _check_file_name(value: Any, source: str, field_name: str, suffix: str | None = ".png") -> str:
    """A plain file name inside the stack folder: no directories, no '..', nothing hidden."""
    name = _check_str(value, source, field_name, non_empty=True)
    if "/" in name or "\\" in name or ":" in name or "\x00" in name:
        raise _fail(source, field_name, f"{name!r} must be a plain file name without path separators")
    if name.startswith(".") or ".." in name:
        raise _fail(source, field_name, f"{name!r} must not start with '.' or contain '..'")
    if suffix is not None and not name.lower().endswith(suffix):
        raise _fail(source, field_name, f"{name!r} must be a {suffix} file")
    return name


def _check_box(value: Any, source: str, field_name: str) -> Optional[Box]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise _fail(source, field_name, f"must be null or [x0, y0, x1, y1], got {value!r}")
    box = tuple(_check_number(v, source, f"{field_name}[{i}]") for i, v in enumerate(value))
    try:
        validate_box(field_name, box)  # the same rule as for a request's layout box
    except InvalidRequest as error:
        raise _fail(source, field_name, f"{error.message}, got {list(value)}") from None
    return box


def _check_model(value: Any, source: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(source, "model", f"must be an object, got {type(value).__name__}")
    preset = _check_str(_require(value, "preset", source, "model."), source, "model.preset")
    base = _check_str(_require(value, "base", source, "model."), source, "model.base")
    files = _require(value, "files", source, "model.")
    if not isinstance(files, dict):
        raise _fail(source, "model.files", f"must be an object, got {type(files).__name__}")
    for file_name, digest in files.items():
        if digest is not None and (not isinstance(digest, str) or not _SHA256_PATTERN.match(digest)):
            raise _fail(source, f"model.files[{file_name!r}]",
                        f"must be null or 'sha256:<64 lowercase hex>', got {digest!r}")
    return {"preset": preset, "base": base, "files": dict(files)}


def _check_layer(value: Any, source: str, index: int) -> StackLayer:
    prefix = f"layers[{index}]"
    if not isinstance(value, dict):
        raise _fail(source, prefix, f"must be an object, got {type(value).__name__}")

    def get(key: str) -> Any:
        return _require(value, key, source, prefix + ".")

    kind = _check_str(get("kind"), source, f"{prefix}.kind")
    if kind not in KINDS:
        raise _fail(source, f"{prefix}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    mask = get("mask")
    depth = get("depth")
    return StackLayer(
        name=_check_str(get("name"), source, f"{prefix}.name", non_empty=True),
        kind=kind,
        prompt=_check_str(get("prompt"), source, f"{prefix}.prompt"),
        seed=_check_int(get("seed"), source, f"{prefix}.seed", minimum=0),
        file=_check_file_name(get("file"), source, f"{prefix}.file"),
        box=_check_box(get("box"), source, f"{prefix}.box"),
        mask=None if mask is None else _check_file_name(mask, source, f"{prefix}.mask"),
        depth=None if depth is None else _check_number(depth, source, f"{prefix}.depth", 0.0, exclusive=True),
    )


def _manifest_from_dict(data: Any, source: str) -> LayerStack:
    """The single place that decides whether a manifest is valid (used by reader and writer)."""
    if not isinstance(data, dict):
        raise StackFormatError(f"{source}: the manifest must be a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise _fail(source, "format", f"must be {FORMAT!r}, got {fmt!r} (not a Multiplane layer stack)")
    version = _check_int(_require(data, "format_version", source), source, "format_version", minimum=1)
    if version > FORMAT_VERSION:
        raise _fail(source, "format_version",
                    f"this stack uses format version {version}, but this reader understands only up to "
                    f"{FORMAT_VERSION}; update Multiplane to read it")

    def get(key: str) -> Any:
        return _require(data, key, source)

    created = _check_str(get("created"), source, "created", non_empty=True)
    try:
        datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(source, "created", f"must be an ISO 8601 time, got {created!r}") from None

    raw_layers = get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise _fail(source, "layers", "must be a non-empty list (the background first)")
    layers = [_check_layer(item, source, i) for i, item in enumerate(raw_layers)]
    if layers[0].kind != "background":
        raise _fail(source, "layers[0].kind", f"the first layer must be the background, got {layers[0].kind!r}")
    for i, layer in enumerate(layers[1:], start=1):
        if layer.kind != "foreground":
            raise _fail(source, f"layers[{i}].kind", "exactly one background is allowed, and only first")

    composite = _check_file_name(get("composite"), source, "composite")
    blended = get("blended")
    blended = None if blended is None else _check_file_name(blended, source, "blended")

    # Names and files must be unique: readers key objects by name and a shared file would
    # mean one layer silently showing another's pixels.
    seen_names: dict[str, int] = {}
    seen_files: dict[str, str] = {}
    for i, layer in enumerate(layers):
        if layer.name in seen_names:
            raise _fail(source, f"layers[{i}].name",
                        f"duplicate name {layer.name!r} (also layers[{seen_names[layer.name]}])")
        seen_names[layer.name] = i
        for key, file_name in (("file", layer.file), ("mask", layer.mask)):
            if file_name is None:
                continue
            here = f"layers[{i}].{key}"
            if file_name.lower() in seen_files:
                raise _fail(source, here, f"{file_name!r} is already used by {seen_files[file_name.lower()]}")
            seen_files[file_name.lower()] = here
    for key, file_name in (("composite", composite), ("blended", blended)):
        if file_name is not None:
            if file_name.lower() in seen_files:
                raise _fail(source, key, f"{file_name!r} is already used by {seen_files[file_name.lower()]}")
            seen_files[file_name.lower()] = key

    timings = get("timings")
    if not isinstance(timings, dict):
        raise _fail(source, "timings", f"must be an object, got {type(timings).__name__}")
    timings = {k: _check_number(v, source, f"timings.{k}", 0.0) for k, v in timings.items()}

    exports = get("exports")
    if not isinstance(exports, list):
        raise _fail(source, "exports", f"must be a list, got {type(exports).__name__}")
    exports = [_check_file_name(v, source, f"exports[{i}]", suffix=None) for i, v in enumerate(exports)]

    return LayerStack(
        format_version=version,
        name=_check_str(get("name"), source, "name"),
        created=created,
        method=_check_str(get("method"), source, "method", non_empty=True),
        width=_check_int(get("width"), source, "width", minimum=1),
        height=_check_int(get("height"), source, "height", minimum=1),
        prompt=_check_str(get("prompt"), source, "prompt"),
        negative_prompt=_check_str(get("negative_prompt"), source, "negative_prompt"),
        seed=_check_int(get("seed"), source, "seed", minimum=0),
        steps=_check_int(get("steps"), source, "steps", minimum=0),
        guidance=_check_number(get("guidance"), source, "guidance"),
        model=_check_model(get("model"), source),
        layers=layers,
        composite=composite,
        blended=blended,
        timings=timings,
        exports=exports,
    )


# --------------------------------------------------------------------------- compositing


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
    _check_array(background, "layers_back_to_front[0] (background)", None, 3)
    height, width = background.shape[:2]
    result = background.astype(np.float64)
    for i, layer in enumerate(layers_back_to_front[1:], start=1):
        _check_array(layer, f"layers_back_to_front[{i}]", (height, width), 4)
        alpha = layer[..., 3:4].astype(np.float64) / 255.0
        result = layer[..., :3].astype(np.float64) * alpha + result * (1.0 - alpha)
    return np.clip(np.floor(result + 0.5), 0, 255).astype(np.uint8)


def _check_array(array: Any, what: str, size_hw: tuple[int, int] | None, channels: int | None) -> None:
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


# --------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    """Persist a directory entry change (rename, new file); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# zlib's run-length strategy on PNG-filtered rows: about half the encoding time of the
# default strategy for files of about the same size (1024² RGB: 65 vs 133 ms).
PNG_SAVE_OPTIONS = dict(format="PNG", compress_level=6, compress_type=zlib.Z_RLE)


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write an 8-bit PNG with no ancillary chunks (no time, text or dpi) and fsync it.

    Only IHDR, IDAT and IEND are written, so equal arrays give equal bytes.
    """
    image = Image.fromarray(np.ascontiguousarray(array))
    with open(path, "wb") as handle:
        image.save(handle, **PNG_SAVE_OPTIONS)
        handle.flush()
        os.fsync(handle.fileno())


PNG_WRITERS = min(4, os.cpu_count() or 1)  # zlib releases the GIL: files encode in parallel


def _write_pngs(jobs: Sequence[tuple[Path, Callable[[], np.ndarray]]], checkpoint: Callable[[], None]) -> None:
    """Write each `(path, make_array)` as a PNG, several at once; the first error is raised.

    Each job checks `checkpoint` (cancellation) before it starts; after an error, jobs not
    yet started are dropped and running ones finish before this returns, so the caller may
    remove the folder safely.
    """
    failed = threading.Event()

    def write(path: Path, make: Callable[[], np.ndarray]) -> None:
        if failed.is_set():
            return
        try:
            checkpoint()
            _write_png(path, make())
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max_workers=PNG_WRITERS, thread_name_prefix="multiplane-png")
    try:
        futures = [pool.submit(write, path, make) for path, make in jobs]
        for future in futures:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _scratch_path(dest: Path, role: str) -> Path:
    return dest.parent / f".{dest.name}.{role}-{secrets.token_hex(4)}"


def write_stack(
    dest: str | Path,
    stack: LayerStack,
    background: np.ndarray,
    foregrounds: Sequence[np.ndarray],
    masks: Optional[Sequence[Optional[np.ndarray]]] = None,
    blended: Optional[np.ndarray] = None,
    export_psd: bool = False,
    export_ora: bool = False,
    cancel: Optional[CancelToken] = None,
    overwrite: bool = False,
) -> LayerStack:
    """Write a complete stack folder at `dest` atomically and return the manifest written.

    `stack` supplies the metadata; this fills in what the format fixes: layer `file` (and
    `name` when empty) as `background.png`, `layer_01.png`..., `mask` as `mask_NN.png`,
    `composite`, `blended`, `exports`, `created` (when empty), `name` (when empty: the
    folder name) and `timings["save"]` (measured here). `masks`, if given, has one entry per
    foreground (None for no mask). The caller's `stack` is not modified.

    Nothing is visible at `dest` until every file is written and synced; on any error or
    cancellation (checked between files) the temp folder is removed and the error re-raised.
    An existing `dest` raises StackExists unless `overwrite=True`, in which case the old
    stack is first renamed aside (so a crash leaves it recoverable by `cleanup_temp`).
    """
    started = time.perf_counter()
    dest = Path(dest)
    if not dest.name or dest.name.startswith("."):
        raise ValueError(f"dest: the stack folder name must not be empty or hidden, got {dest.name!r}")

    # ---- validate everything before touching the disk
    foregrounds = list(foregrounds)
    if not isinstance(stack, LayerStack):
        raise ValueError(f"stack: expected a LayerStack, got {type(stack).__name__}")
    if len(stack.layers) != 1 + len(foregrounds):
        raise ValueError(f"stack.layers has {len(stack.layers)} entries but 1 background + "
                         f"{len(foregrounds)} foregrounds were given")
    size = (stack.height, stack.width)
    _check_array(background, "background", size, 3)
    for i, image in enumerate(foregrounds, start=1):
        _check_array(image, f"foregrounds[{i - 1}] ({layer_name(i)})", size, 4)
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(foregrounds):
            raise ValueError(f"masks has {len(masks)} entries, expected one per foreground ({len(foregrounds)})")
        for i, mask in enumerate(masks):
            if mask is not None:
                _check_array(mask, f"masks[{i}]", size, None)
    else:
        masks = [None] * len(foregrounds)
    if blended is not None:
        _check_array(blended, "blended", size, 3)

    layers = []
    for i, layer in enumerate(stack.layers):
        if not isinstance(layer, StackLayer):
            raise ValueError(f"stack.layers[{i}]: expected a StackLayer, got {type(layer).__name__}")
        layers.append(replace(
            layer,
            name=layer.name or layer_name(i),
            file=layer_file_name(i),
            mask=mask_file_name(i) if i > 0 and masks[i - 1] is not None else None,
        ))
    exports = ([PSD_FILE] if export_psd else []) + ([ORA_FILE] if export_ora else [])
    described = replace(
        stack,
        name=stack.name or dest.name,
        created=stack.created or _utc_now(),
        layers=layers,
        composite=COMPOSITE_FILE,
        blended=BLENDED_FILE if blended is not None else None,
        exports=exports,
    )
    # The same rules the reader applies (raises StackFormatError naming the field); the
    # result is also normalized (boxes as float tuples, numbers as floats).
    final = _manifest_from_dict(described.to_dict(), "stack")

    if dest.exists() or dest.is_symlink():
        _check_replaceable(dest, overwrite)

    def checkpoint() -> None:
        if cancel is not None:
            cancel.raise_if_cancelled()

    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = _scratch_path(dest, "tmp")
    temp.mkdir()
    try:
        images = [background, *foregrounds]
        jobs = [(temp / COMPOSITE_FILE, lambda: alpha_over(images))]
        jobs += [(temp / layer.file, lambda image=image: image) for layer, image in zip(final.layers, images)]
        jobs += [(temp / layer.mask, lambda mask=mask: mask)
                 for layer, mask in zip(final.layers[1:], masks) if mask is not None]
        if blended is not None:
            jobs.append((temp / BLENDED_FILE, lambda: blended))
        _write_pngs(jobs, checkpoint)
        if export_psd or export_ora:
            from . import stack_export

            if export_psd:
                checkpoint()
                stack_export.write_psd(temp / PSD_FILE, final.layers, images, stack.width, stack.height)
                _fsync_file(temp / PSD_FILE)
            if export_ora:
                checkpoint()
                stack_export.write_ora(temp / ORA_FILE, final.layers, images, stack.width, stack.height)
                _fsync_file(temp / ORA_FILE)
        checkpoint()
        final.timings["save"] = round(time.perf_counter() - started, 4)
        _write_bytes(temp / MANIFEST_FILE, final.to_json().encode("utf-8"))
        _fsync_dir(temp)
        checkpoint()
        _commit(temp, dest, overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def _check_replaceable(dest: Path, overwrite: bool) -> None:
    if not overwrite:
        raise StackExists(f"{dest} already exists; choose another name or pass overwrite=True to replace it")
    if dest.is_symlink() or not dest.is_dir():
        raise StackExists(f"{dest} exists and is not a folder; refusing to replace it")
    if not (dest / MANIFEST_FILE).is_file() and any(dest.iterdir()):
        raise StackExists(f"{dest} is a non-empty folder without {MANIFEST_FILE} (not a layer stack); "
                          "refusing to replace it")


def _commit(temp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished temp folder into place, moving an existing stack aside first."""
    if not (dest.exists() or dest.is_symlink()):
        try:
            os.rename(temp, dest)
        except OSError as error:
            if dest.exists():
                raise StackExists(f"{dest} appeared while the stack was being written; "
                                  "choose another name") from error
            raise
        _fsync_dir(dest.parent)
        return
    _check_replaceable(dest, overwrite)
    aside = _scratch_path(dest, "old")
    os.rename(dest, aside)
    try:
        os.rename(temp, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    _fsync_dir(dest.parent)
    shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- output roots


def list_stacks(root: str | Path) -> list[tuple[Path, LayerStack]]:
    """Valid stacks directly under `root`, newest first; hidden and invalid folders are skipped.

    Invalid stack folders are logged (at warning level) rather than raised, so one broken
    folder does not hide the others.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir() or not (child / MANIFEST_FILE).is_file():
            continue
        try:
            found.append((child, load_stack(child)))
        except StackFormatError as error:
            logger.warning("skipping invalid stack: %s", error)
    found.sort(key=lambda item: item[0].name)
    found.sort(key=lambda item: _created_sort_key(item[1].created), reverse=True)
    return found


def _created_sort_key(created: str) -> float:
    moment = datetime.fromisoformat(created.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def cleanup_temp(root: str | Path, min_age_seconds: float = 0.0) -> list[Path]:
    """Remove leftovers of interrupted writes under `root`; returns the paths handled.

    `.<name>.tmp-<hex>` folders (unfinished stacks) are deleted. `.<name>.old-<hex>`
    folders (a stack being replaced) are deleted when `<name>` exists, and renamed back to
    `<name>` when it does not (the crash happened between the two renames). Call it when
    no writer is running on `root` (e.g. at server start), or pass `min_age_seconds`.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    handled = []
    now = time.time()
    for child in sorted(root.iterdir()):
        match = _SCRATCH_PATTERN.match(child.name)
        if not match or child.is_symlink() or not child.is_dir():
            continue
        try:
            if now - child.stat().st_mtime < min_age_seconds:
                continue
        except OSError:
            continue
        target = root / match.group("name")
        if match.group("role") == "old" and not (target.exists() or target.is_symlink()):
            os.rename(child, target)
            logger.warning("restored %s from an interrupted replacement", target)
        else:
            shutil.rmtree(child, ignore_errors=True)
        handled.append(child)
    return handled
