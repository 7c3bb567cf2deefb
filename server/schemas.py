"""The HTTP API's contract: request and response bodies of `/v1`.

Limits and their checks come from `inference.request`: every request field is checked by
the engine's own `validate_*` function (through `_engine_check`), so the API refuses what
the CLI and the engine refuse, with the same message, and `Field(...)` only *publishes*
those limits in the OpenAPI schema (`_published`), never enforces a copy of them. Bodies
are strict (no "512" for 512, no true for 1) and closed (unknown fields are a 422), so a typo
in a client shows up as an error naming the field instead of a silently ignored setting.
"""
from __future__ import annotations

import sys
import types
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Literal, Optional, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from inference import request as limits
from inference.canvas import MAX_MARGIN
from inference.errors import InvalidRequest
from inference.request import LayerSpec, StackRequest
from inference.stack.layered_import import MAX_IMPORT_LAYERS, SUFFIXES

LAYERED_SUFFIXES = tuple(SUFFIXES)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["generate", "regenerate", "extend", "download", "import"]
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
DEFAULT_MODEL = "sdxl"
MAX_NAME_CHARS = limits.MAX_NAME_CHARS


def known_presets() -> tuple[str, ...]:
    """Preset names the engine can load by name (from inference.models)."""
    from inference.models import preset_names

    return tuple(preset_names())


def check_model_name(value: str) -> str:
    """A preset name, or an absolute path (whether it exists on the server is the job
    service's check: `model_path_problem`, a 404, since a schema cannot know the disk)."""
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    presets = known_presets()
    if value.lower() in presets:
        return value.lower()
    looks_like_path = any(sep in value for sep in ("/", "\\")) or value.endswith(".safetensors")
    if looks_like_path:
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ValueError(f"model path {value!r} must be absolute (the server's working "
                             f"folder is not the client's)")
        return str(path)
    raise ValueError(f"unknown model {value!r}; choose one of {', '.join(presets)} "
                     f"or give the absolute path of a diffusers folder or .safetensors file")


def model_path_problem(model: str) -> Optional[str]:
    """Why a model path (not a preset) cannot be used on this machine, or None."""
    if model in known_presets():
        return None
    try:
        if Path(model).exists():
            return None
    except (OSError, ValueError) as error:  # too long, a NUL byte, unreadable
        return f"model path {model[:200]!r} cannot be read on the server ({type(error).__name__})"
    return f"model path {model!r} does not exist on the server"


# What `check_model_name` accepts, published: a preset, or an absolute path on the server's OS.
MODEL_SCHEMA = {"anyOf": [{"enum": list(known_presets())},
                          {"pattern": r"^([A-Za-z]:[\\/]|\\\\)" if sys.platform == "win32" else r"^(/|~/)"}]}


def _engine_check(check: Callable, *args):
    """Run one of the engine's validators inside a pydantic validator: the engine's message,
    in the same 422 shape the server gives an InvalidRequest raised later by the engine."""
    try:
        check(*args)
    except InvalidRequest as error:
        raise PydanticCustomError("value_error", error.message) from None


def _published(**constraints) -> dict:
    """`Field` keywords that put JSON-schema constraints into the OpenAPI document without
    pydantic enforcing a second copy of them (the engine's validator enforces them)."""
    return {"json_schema_extra": constraints}


PROMPT = _published(minLength=1, maxLength=limits.MAX_PROMPT_CHARS, pattern=r"\S")  # not blank
OPTIONAL_PROMPT = _published(maxLength=limits.MAX_PROMPT_CHARS)
NAME = _published(maxLength=limits.MAX_NAME_CHARS)
SEED = _published(minimum=0, maximum=limits.MAX_SEED)
SIZE = _published(minimum=limits.MIN_SIZE, maximum=limits.MAX_SIZE, multipleOf=limits.SIZE_MULTIPLE)
TTA = _published(enum=list(limits.TTA_PASSES))
REQUIRED_PROMPT_CHECK = partial(limits.validate_prompt, required=True)


class _Closed(BaseModel):
    """A strict, closed body whose fields are checked by the engine's validators.

    `engine_checks` maps a field to its check in inference.request, called as
    `check(field_name, value)` on every value given (None = absent optional field)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    engine_checks: ClassVar[dict[str, Callable]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value, info: ValidationInfo):
        """JSON has one number type: 512.0 is the integer 512 (JSON Schema's "integer" says
        so too), so an integer field takes it; 512.5, "512" and true stay refused."""
        if isinstance(value, float) and value.is_integer() and _is_integer_field(cls, info.field_name):
            return int(value)
        return value

    @field_validator("*")
    @classmethod
    def _engine_limits(cls, value, info: ValidationInfo):
        if isinstance(value, str):  # every text field, checked or not: writable as UTF-8
            _engine_check(limits.validate_text, info.field_name, value)
        check = cls.engine_checks.get(info.field_name)
        if check is not None and value is not None:
            _engine_check(check, info.field_name, value)
        return value


def _is_integer_field(model: type[BaseModel], name: str) -> bool:
    annotation = model.model_fields[name].annotation
    return annotation is int or (get_origin(annotation) in (Union, types.UnionType) and int in get_args(annotation))


class LayerIn(_Closed):
    """One foreground layer, back to front."""

    prompt: str = Field(description="the layer's own prompt (combined with the global prompt)", **PROMPT)
    seed: Optional[int] = Field(default=None, description="default: derived from the request seed", **SEED)
    box: Optional[list[float]] = Field(
        default=None, min_length=4, max_length=4,
        description="normalized layout box [x0, y0, x1, y1], origin top-left, y down; "
                    "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1",
        json_schema_extra={"items": {"type": "number", "minimum": 0.0, "maximum": 1.0}})
    name: str = Field(default="", description="layer name in the stack (default layer_NN); unique", **NAME)
    depth: Optional[float] = Field(
        default=None, description="distance from the camera in scene units, written into the stack "
                                  "for importers (default: spread between the importer's Near and Far)",
        **_published(exclusiveMinimum=0))

    engine_checks = {"prompt": REQUIRED_PROMPT_CHECK, "seed": limits.validate_seed,
                     "box": limits.validate_box, "name": limits.validate_name, "depth": limits.validate_depth}


class JobCreate(_Closed):
    """Body of POST /v1/jobs: one layer stack to generate."""

    # Published like the engine's one rule across fields: 'harmonized' blends exactly one
    # foreground. (Unique layer names cannot be said in JSON Schema; the description does.)
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"method": {"not": {"const": "harmonized"}}}},
        {"required": ["layers"], "properties": {"layers": {"minItems": 1, "maxItems": 1}}},
    ]})

    prompt: str = Field(description="the global scene prompt, shared by all layers", **PROMPT)
    negative_prompt: str = Field(default="", **OPTIONAL_PROMPT)
    background: str = Field(default="", description="the background layer's own prompt", **OPTIONAL_PROMPT)
    layers: list[LayerIn] = Field(default_factory=list,
                                  description=f"0..{limits.MAX_FOREGROUNDS} foregrounds, back to front",
                                  **_published(maxItems=limits.MAX_FOREGROUNDS))
    method: str = Field(default=StackRequest.method, description=f"one of {', '.join(limits.METHODS)}",
                        **_published(enum=list(limits.METHODS)))
    model: str = Field(default=DEFAULT_MODEL, max_length=4096, json_schema_extra=MODEL_SCHEMA,
                       description="a preset name (GET /v1/models) or an absolute model path "
                                   "on the server (404 when it is not there)")
    width: int = Field(default=StackRequest.width, description="pixels", **SIZE)
    height: int = Field(default=StackRequest.height, description="pixels", **SIZE)
    steps: int = Field(default=StackRequest.steps,
                       **_published(minimum=limits.MIN_STEPS, maximum=limits.MAX_STEPS))
    guidance: float = Field(default=StackRequest.guidance,
                            **_published(minimum=limits.MIN_GUIDANCE, maximum=limits.MAX_GUIDANCE))
    seed: int = Field(default=StackRequest.seed, **SEED)
    background_seed: Optional[int] = Field(default=None, **SEED)
    inter_layer_strength: float = Field(
        default=StackRequest.inter_layer_strength,
        description="joint/harmonized: how much layers attend to each other (0 = not at all)",
        **_published(minimum=limits.MIN_INTER_LAYER, maximum=limits.MAX_INTER_LAYER))
    mask_guidance: float = Field(
        default=StackRequest.mask_guidance,
        description="joint/harmonized: how strongly estimated masks confine foregrounds",
        **_published(minimum=limits.MIN_MASK_GUIDANCE, maximum=limits.MAX_MASK_GUIDANCE))
    tta_passes: int = Field(default=StackRequest.tta_passes, description="transparent decoder passes", **TTA)
    name: str = Field(default="", description="stack display name", **NAME)
    frame: Optional[list[float]] = Field(
        default=None, min_length=4, max_length=4,
        description="the camera frame inside the width x height canvas, normalized [x0, y0, x1, y1] "
                    "(origin top-left, y down; 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1); null = the whole "
                    "image. Layer boxes are in frame coordinates. Recorded in stack.json",
        json_schema_extra={"items": {"type": "number", "minimum": 0.0, "maximum": 1.0}})
    export_psd: bool = False
    export_ora: bool = False
    export_exr: bool = Field(default=False, description="also write stack.exr: one multilayer OpenEXR "
                                                        "(a linear, premultiplied layer per stack layer "
                                                        "and the composite) for compositors")

    engine_checks = {
        "prompt": REQUIRED_PROMPT_CHECK, "negative_prompt": limits.validate_prompt,
        "background": limits.validate_prompt, "method": limits.validate_method,
        "width": limits.validate_size, "height": limits.validate_size, "steps": limits.validate_steps,
        "guidance": partial(limits.validate_number, lo=limits.MIN_GUIDANCE, hi=limits.MAX_GUIDANCE),
        "seed": limits.validate_seed, "background_seed": limits.validate_seed,
        "inter_layer_strength": partial(limits.validate_number, lo=limits.MIN_INTER_LAYER,
                                        hi=limits.MAX_INTER_LAYER),
        "mask_guidance": partial(limits.validate_number, lo=limits.MIN_MASK_GUIDANCE,
                                 hi=limits.MAX_MASK_GUIDANCE),
        "tta_passes": limits.validate_tta_passes, "name": limits.validate_name,
        "frame": limits.validate_frame,
    }

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[LayerIn]) -> list[LayerIn]:
        _engine_check(limits.validate_layer_count, "layers", layers)
        _engine_check(limits.validate_layer_names, "layers", [layer.name for layer in layers])
        return layers

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_model_name(value)

    def to_stack_request(self) -> StackRequest:
        """The engine's request; `validated()` is the second, authoritative check (and the
        only one of rules across fields, such as harmonized's single foreground)."""
        layers = tuple(LayerSpec(prompt=l.prompt, seed=l.seed,
                                 box=tuple(l.box) if l.box is not None else None, name=l.name,
                                 depth=float(l.depth) if l.depth is not None else None)
                       for l in self.layers)
        return StackRequest(prompt=self.prompt, background=self.background, layers=layers,
                            negative_prompt=self.negative_prompt, width=self.width,
                            height=self.height, steps=self.steps, guidance=float(self.guidance),
                            seed=self.seed, method=self.method, tta_passes=self.tta_passes,
                            background_seed=self.background_seed, name=self.name,
                            inter_layer_strength=float(self.inter_layer_strength),
                            mask_guidance=float(self.mask_guidance),
                            frame=tuple(float(v) for v in self.frame) if self.frame is not None else None,
                            ).validated()


class RegenerateIn(_Closed):
    """Regenerate one layer of a finished stack; the other layers stay byte-identical.

    A new prompt, a new seed, or both: the schema says so with `anyOf`."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["seed"], "properties": {"seed": {"type": "integer"}}},
    ]})

    layer_index: int = Field(description="0 = background, 1.. = foregrounds (back to front)",
                             **_published(minimum=0, maximum=limits.MAX_FOREGROUNDS))
    prompt: Optional[str] = Field(default=None, description="the layer's new prompt (kept when absent)",
                                  **PROMPT)
    seed: Optional[int] = Field(default=None, description="the layer's new seed (kept when absent)", **SEED)
    tta_passes: int = Field(default=StackRequest.tta_passes, description="transparent decoder passes", **TTA)

    # layer_index: what any stack could hold; the job manager checks it against the stack.
    engine_checks = {"layer_index": partial(limits.validate_layer_index, foregrounds=limits.MAX_FOREGROUNDS),
                     "tta_passes": limits.validate_tta_passes}

    @model_validator(mode="after")
    def _prompt_or_seed(self) -> "RegenerateIn":
        try:
            limits.validate_layer_edit(self.prompt, self.seed, prompt_field="prompt", seed_field="seed")
        except InvalidRequest as error:
            # Named by the field, like every other 422 (a model validator's error has no field).
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError("value_error", error.message), loc=(error.field,),
                input=getattr(self, error.field))]) from None
        return self


# What `ImportIn.path` accepts, published: an absolute path on the server's OS ending in a
# layered file's suffix (whether it exists is the job service's check: a 404).
IMPORT_PATH_SCHEMA = {"pattern": (r"^([A-Za-z]:[\\/]|\\\\)" if sys.platform == "win32" else r"^/")
                      + r".*\.([Pp][Ss][DdBb]|[Oo][Rr][Aa])$"}


def layered_path_problem(path: str) -> Optional[str]:
    """Why a layered file cannot be read on this machine, or None."""
    try:
        if Path(path).is_file():
            return None
    except (OSError, ValueError) as error:  # too long, a NUL byte, unreadable
        return f"path {path[:200]!r} cannot be read on the server ({type(error).__name__})"
    return f"path {path!r} does not exist on the server (or is not a file)"


class ImportIn(_Closed):
    """Body of POST /v1/imports: a layered file on the server's machine to import as a stack."""

    path: str = Field(max_length=4096, description="absolute path of a .psd, .psb or .ora file on the "
                                                   "server's machine (bottom layer = background)",
                      json_schema_extra=IMPORT_PATH_SCHEMA)
    name: str = Field(default="", description="the stack's display name (default: the file's name)", **NAME)
    export_exr: bool = Field(default=False, description="also write the multilayer OpenEXR stack.exr")
    depths: Optional[dict[str, float]] = Field(
        default=None, description="layer name → depth to keep (the backdrop this import replaces); layers "
                                  "not named get depths between their neighbours'",
        **_published(maxProperties=MAX_IMPORT_LAYERS,
                     propertyNames={"maxLength": limits.MAX_NAME_CHARS},
                     additionalProperties={"type": "number", "exclusiveMinimum": 0}))

    engine_checks = {"name": limits.validate_name}

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if depths is not None and len(depths) > MAX_IMPORT_LAYERS:
            raise PydanticCustomError("value_error", f"at most {MAX_IMPORT_LAYERS} layers, got {len(depths)}")
        for name, depth in (depths or {}).items():
            try:
                limits.validate_name("depths", name)
                limits.validate_depth("depths", depth)
            except InvalidRequest as error:  # named by the layer, in the usual 422 shape
                raise PydanticCustomError("value_error", f"layer {name[:40]!r}: {error.message}") from None
        return depths

    @field_validator("path")
    @classmethod
    def _layered_file_path(cls, value: str) -> str:
        if not Path(value).is_absolute():
            raise ValueError(f"path {value!r} must be absolute (the server's working folder is not the client's)")
        if not value.lower().endswith(LAYERED_SUFFIXES):
            raise ValueError(f"path {value!r} must name a .psd, .psb or .ora file")
        return value
class ExtendIn(_Closed):
    """Extend a finished stack for a new shot (outpainting): every layer's canvas grows so the
    margins fit around the same frame; a new stack, whose old pixels are the source's (a
    feathered seam of a few pixels aside). The new canvas: `inference.canvas.plan_extension`."""

    margins: list[float] = Field(
        min_length=4, max_length=4,
        description="[left, top, right, bottom] the new shot needs around the same frame, fractions of "
                    "the frame's width (left, right) and height (top, bottom); the canvas grows where "
                    "it lacks them (multiples of 64, at most 2048 per side; more is refused)",
        json_schema_extra={"items": {"type": "number", "minimum": 0.0, "maximum": MAX_MARGIN}})
    tta_passes: int = Field(default=StackRequest.tta_passes, description="transparent decoder passes", **TTA)

    engine_checks = {"margins": limits.validate_margins, "tta_passes": limits.validate_tta_passes}


class ProgressOut(BaseModel):
    """Where a job is. `fraction` is the whole job's share done (see progress.overall_fraction)."""

    phase: Optional[str] = Field(default=None, description="download, load, denoise, decode, save")
    step: int = 0
    total: int = 0
    layer: Optional[int] = Field(default=None, description="0 = background, 1.. = foregrounds")
    layers: int = 0
    message: str = ""
    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    eta_seconds: Optional[float] = Field(default=None, description="null until it can be estimated")


class StackOut(BaseModel):
    """A finished stack: its folder on this machine and the files GET .../files/{name} serves."""

    name: str
    path: str
    files: list[str]


class PreviewsOut(BaseModel):
    """Live previews of a running job: GET .../previews/{name} serves each as a small PNG
    (latent resolution, a cheap latent → RGB map; foregrounds over a checkerboard)."""

    step: int = Field(description="the denoising step they show (of the progress' total)")
    version: int = Field(description="bumped whenever any preview changes")
    layers: list[str] = Field(description="names: background, layer_01…, blended")


class JobOut(BaseModel):
    id: str
    kind: JobKind
    status: JobState
    position: Optional[int] = Field(
        default=None, description="jobs that run before this one starts (the running one "
                                  "included); 0 = running or next; null when finished")
    model: Optional[str] = None
    progress: ProgressOut = Field(default_factory=ProgressOut)
    error: Optional[str] = None
    cancel_requested: bool = False
    created: str = Field(description="ISO 8601 UTC")
    started: Optional[str] = None
    finished: Optional[str] = None
    stack: Optional[StackOut] = None
    previews: Optional[PreviewsOut] = Field(default=None, description="while it runs, once the first exists")
    request: Optional[dict] = Field(default=None, description="the submitted body (generate jobs)")
    device: Optional[str] = Field(default=None, description="the device that runs (ran) it; null "
                                                            "until it starts, and for downloads")
    version: int = Field(default=0, description="bumped on every change of this job")
    warnings: list[str] = Field(default_factory=list,
                                description="import jobs: what the stack could not carry over from the file")


class JobList(BaseModel):
    jobs: list[JobOut]


class ModelOut(BaseModel):
    name: str
    available: bool = Field(description="every file it needs is on disk")
    size_bytes: Optional[int] = Field(default=None, description="all its files together")
    download_bytes: Optional[int] = Field(default=None, description="what is still to download")
    missing: list[str] = Field(default_factory=list)
    description: str = ""
    details: dict = Field(default_factory=dict)


class ModelList(BaseModel):
    models: list[ModelOut]


class DeviceOut(BaseModel):
    """One generation worker: its device, its warm model and the job it runs."""

    device: str
    type: Optional[str] = Field(default=None, description="cuda, mps, cpu (or test)")
    name: Optional[str] = Field(default=None, description="e.g. the GPU's name")
    total_memory_bytes: Optional[int] = None
    loaded_model: Optional[str] = None
    running: Optional[str] = Field(default=None, description="id of the job it runs")


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    device: dict
    torch: Optional[str] = None
    diffusers: Optional[str] = None
    loaded_model: Optional[str] = None
    queue_length: int = Field(description="generate jobs waiting (the running one not counted)")
    running: Optional[str] = Field(default=None, description="id of the running generate job "
                                                             "(the first one, with several devices)")
    devices: list[DeviceOut] = Field(default_factory=list,
                                     description="one entry per generation worker (--devices)")


class ErrorOut(BaseModel):
    detail: str
