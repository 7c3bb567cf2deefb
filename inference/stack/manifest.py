"""The stack format: names, the manifest dataclasses and the one manifest validator.

`docs/stack-format.md` is the specification; every reader and writer of `stack.json` in the
engine goes through `LayerStack.from_dict`.
"""
from __future__ import annotations

import copy
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from ..errors import InvalidRequest, StackFormatError
from ..request import validate_box, validate_frame

FORMAT = "multiplane.stack"
FORMAT_VERSION = 1
MANIFEST_FILE = "stack.json"
BACKGROUND_NAME = "background"
COMPOSITE_FILE = "composite.png"
BLENDED_FILE = "blended.png"
PSD_FILE = "stack.psd"
ORA_FILE = "stack.ora"
EXR_FILE = "stack.exr"
KINDS = ("background", "foreground")
IMPORTED_METHOD = "imported"  # `method` of a stack made from a layered file, not generated
IMPORTED_FORMATS = ("psd", "ora")

# The hidden sibling a stack (or an export) is written into before it is renamed into place.
SCRATCH_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<token>[0-9a-f]{8})$")
_SHA256_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")

Box = tuple[float, float, float, float]


def layer_name(index: int) -> str:
    """Canonical layer name: `background` for index 0, then `layer_01`, `layer_02`, ..."""
    return BACKGROUND_NAME if index == 0 else f"layer_{index:02d}"


def layer_file_name(index: int) -> str:
    return f"{layer_name(index)}.png"


def mask_file_name(index: int) -> str:
    """Mask of foreground `index` (1-based, like its layer): `mask_01.png`, ..."""
    return f"mask_{index:02d}.png"


def scratch_path(dest: Path) -> Path:
    """A fresh hidden sibling of `dest` (`.<name>.tmp-<8 hex>`): listers skip it and
    `cleanup_temp` deletes it when it is left over (SCRATCH_PATTERN)."""
    return dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"


def parse_created(created: str) -> datetime:
    """The manifest's `created` time (ISO 8601, `Z` allowed); ValueError when it is not one."""
    return datetime.fromisoformat(created.replace("Z", "+00:00"))


def created_timestamp(created: str) -> float:
    """`created` as POSIX seconds, for sorting stacks; a time without a zone counts as UTC."""
    moment = parse_created(created)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


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
    # Optional: where an imported stack came from and what did not carry over (see _check_imported).
    imported: Optional[dict] = None
    # Optional keys (absent in older stacks): the camera frame inside the canvas (None = the
    # whole image) and the engine's provenance of the shot (readers must not depend on it).
    frame: Optional[Box] = None
    shot: Optional[dict] = None

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
            **({} if self.imported is None else {"imported": copy.deepcopy(self.imported)}),
            "frame": None if self.frame is None else list(self.frame),
            "shot": copy.deepcopy(self.shot),
        }

    @property
    def frame_rect(self) -> Box:
        """The camera frame inside the canvas, the whole image when the stack has none."""
        return self.frame if self.frame is not None else (0.0, 0.0, 1.0, 1.0)

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


def _check_frame(value: Any, source: str) -> Optional[Box]:
    """Optional: absent or null = the whole image; else a normalized rectangle like a box."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise _fail(source, "frame", f"must be null or [x0, y0, x1, y1] (the camera frame inside the "
                                     f"canvas, normalized), got {value!r}")
    frame = tuple(_check_number(v, source, f"frame[{i}]") for i, v in enumerate(value))
    try:
        validate_frame("frame", frame)
    except InvalidRequest as error:
        raise _fail(source, "frame", f"{error.message}, got {list(value)}") from None
    return frame


def _check_shot(value: Any, source: str) -> Optional[dict]:
    """Optional provenance object; only its type is checked (readers must not rely on it)."""
    if value is not None and not isinstance(value, dict):
        raise _fail(source, "shot", f"must be null or an object, got {type(value).__name__}")
    return None if value is None else copy.deepcopy(value)


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
    """The single place that decides whether a manifest is valid (used by reader and writer).

    Fields are checked in a fixed order, so the first problem reported is always the same.
    """
    # 1. what this is: a Multiplane manifest of a version this reader understands
    version = _check_header(data, source)

    def get(key: str) -> Any:
        return _require(data, key, source)

    # 2. when, what and which files
    created = _check_created(get("created"), source)
    layers = _check_layers(get("layers"), source)
    composite = _check_file_name(get("composite"), source, "composite")
    blended = get("blended")
    blended = None if blended is None else _check_file_name(blended, source, "blended")
    _check_unique(layers, composite, blended, source)
    timings = _check_timings(get("timings"), source)
    exports = _check_exports(get("exports"), source)

    # 3. the scalar settings, in the order they are written
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
        imported=_check_imported(data.get("imported"), source),
        frame=_check_frame(data.get("frame"), source),
        shot=_check_shot(data.get("shot"), source),
    )


def _check_header(data: Any, source: str) -> int:
    """`format` and `format_version`; returns the version."""
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
    return version


def _check_created(value: Any, source: str) -> str:
    created = _check_str(value, source, "created", non_empty=True)
    try:
        parse_created(created)
    except ValueError:
        raise _fail(source, "created", f"must be an ISO 8601 time, got {created!r}") from None
    return created


def _check_layers(value: Any, source: str) -> list[StackLayer]:
    """Every layer checked; exactly one background, and it comes first."""
    if not isinstance(value, list) or not value:
        raise _fail(source, "layers", "must be a non-empty list (the background first)")
    layers = [_check_layer(item, source, i) for i, item in enumerate(value)]
    if layers[0].kind != "background":
        raise _fail(source, "layers[0].kind", f"the first layer must be the background, got {layers[0].kind!r}")
    for i, layer in enumerate(layers[1:], start=1):
        if layer.kind != "foreground":
            raise _fail(source, f"layers[{i}].kind", "exactly one background is allowed, and only first")
    return layers


def _check_unique(layers: list[StackLayer], composite: str, blended: Optional[str], source: str) -> None:
    """Names and files must be unique: readers key objects by name and a shared file would
    mean one layer silently showing another's pixels."""
    seen_names: dict[str, int] = {}
    seen_files: dict[str, str] = {}

    def claim(file_name: str, here: str) -> None:
        if file_name.lower() in seen_files:
            raise _fail(source, here, f"{file_name!r} is already used by {seen_files[file_name.lower()]}")
        seen_files[file_name.lower()] = here

    for i, layer in enumerate(layers):
        if layer.name in seen_names:
            raise _fail(source, f"layers[{i}].name",
                        f"duplicate name {layer.name!r} (also layers[{seen_names[layer.name]}])")
        seen_names[layer.name] = i
        for key, file_name in (("file", layer.file), ("mask", layer.mask)):
            if file_name is not None:
                claim(file_name, f"layers[{i}].{key}")
    for key, file_name in (("composite", composite), ("blended", blended)):
        if file_name is not None:
            claim(file_name, key)


def _check_timings(value: Any, source: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(source, "timings", f"must be an object, got {type(value).__name__}")
    return {k: _check_number(v, source, f"timings.{k}", 0.0) for k, v in value.items()}


def _check_exports(value: Any, source: str) -> list[str]:
    if not isinstance(value, list):
        raise _fail(source, "exports", f"must be a list, got {type(value).__name__}")
    return [_check_file_name(v, source, f"exports[{i}]", suffix=None) for i, v in enumerate(value)]


def _check_imported(value: Any, source: str) -> Optional[dict]:
    """The optional `imported` key of a stack made from a layered file: the file's name, its
    format and the warnings of the import (what it could not carry over), in order."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(source, "imported", f"must be null or an object, got {type(value).__name__}")
    file_name = _check_str(_require(value, "source", source, "imported."), source, "imported.source")
    fmt = _check_str(_require(value, "format", source, "imported."), source, "imported.format")
    if fmt not in IMPORTED_FORMATS:
        raise _fail(source, "imported.format", f"must be one of {', '.join(IMPORTED_FORMATS)}, got {fmt!r}")
    warnings = _require(value, "warnings", source, "imported.")
    if not isinstance(warnings, list):
        raise _fail(source, "imported.warnings", f"must be a list, got {type(warnings).__name__}")
    return {"source": file_name, "format": fmt,
            "warnings": [_check_str(w, source, f"imported.warnings[{i}]") for i, w in enumerate(warnings)]}
