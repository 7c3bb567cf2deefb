"""The HTTP API's contract: request and response bodies of `/v1`.

Limits come from `inference.request` so the CLI, the engine and the API agree. Bodies are
strict (no "512" for 512, no true for 1) and closed (unknown fields are a 422), so a typo in
a client shows up as an error naming the field instead of a silently ignored setting.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference import request as limits
from inference.request import LayerSpec, StackRequest

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["generate", "regenerate", "download"]
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
DEFAULT_MODEL = "sdxl"
MAX_NAME_CHARS = 100


def known_presets() -> tuple[str, ...]:
    """Preset names the engine can load by name (from inference.models)."""
    from inference.models import preset_names

    return tuple(preset_names())


def check_model_name(value: str) -> str:
    """A preset name, or an absolute path to an existing diffusers folder / .safetensors file."""
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
        if not path.exists():
            raise ValueError(f"model path {value!r} does not exist")
        return str(path)
    raise ValueError(f"unknown model {value!r}; choose one of {', '.join(presets)} "
                     f"or give the absolute path of a diffusers folder or .safetensors file")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LayerIn(_Closed):
    """One foreground layer, back to front."""

    prompt: str = Field(min_length=1, max_length=limits.MAX_PROMPT_CHARS,
                        description="the layer's own prompt (combined with the global prompt)")
    seed: Optional[int] = Field(default=None, ge=0, le=limits.MAX_SEED,
                                description="default: derived from the request seed")
    box: Optional[list[float]] = Field(
        default=None, min_length=4, max_length=4,
        description="normalized layout box [x0, y0, x1, y1], origin top-left, y down")
    name: str = Field(default="", max_length=MAX_NAME_CHARS,
                      description="layer name in the stack (default layer_NN); unique")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("box")
    @classmethod
    def _box_inside_image(cls, box: Optional[list[float]]) -> Optional[list[float]]:
        if box is None:
            return None
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"box coordinates must lie in [0, 1], got {box}")
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box needs x0 < x1 and y0 < y1, got {box}")
        return box


class JobCreate(_Closed):
    """Body of POST /v1/jobs: one layer stack to generate."""

    prompt: str = Field(min_length=1, max_length=limits.MAX_PROMPT_CHARS,
                        description="the global scene prompt, shared by all layers")
    negative_prompt: str = Field(default="", max_length=limits.MAX_PROMPT_CHARS)
    background: str = Field(default="", max_length=limits.MAX_PROMPT_CHARS,
                            description="the background layer's own prompt")
    layers: list[LayerIn] = Field(default_factory=list, max_length=limits.MAX_FOREGROUNDS,
                                  description=f"0..{limits.MAX_FOREGROUNDS} foregrounds, back to front")
    method: str = Field(default=StackRequest.method, description=f"one of {', '.join(limits.METHODS)}")
    model: str = Field(default=DEFAULT_MODEL, max_length=4096,
                       description="a preset name (GET /v1/models) or an absolute model path")
    width: int = Field(default=StackRequest.width, ge=limits.MIN_SIZE, le=limits.MAX_SIZE,
                       description=f"pixels, a multiple of {limits.SIZE_MULTIPLE}")
    height: int = Field(default=StackRequest.height, ge=limits.MIN_SIZE, le=limits.MAX_SIZE,
                        description=f"pixels, a multiple of {limits.SIZE_MULTIPLE}")
    steps: int = Field(default=StackRequest.steps, ge=limits.MIN_STEPS, le=limits.MAX_STEPS)
    guidance: float = Field(default=StackRequest.guidance, ge=limits.MIN_GUIDANCE,
                            le=limits.MAX_GUIDANCE)
    seed: int = Field(default=StackRequest.seed, ge=0, le=limits.MAX_SEED)
    background_seed: Optional[int] = Field(default=None, ge=0, le=limits.MAX_SEED)
    inter_layer_strength: float = Field(
        default=StackRequest.inter_layer_strength, ge=limits.MIN_INTER_LAYER,
        le=limits.MAX_INTER_LAYER,
        description="joint/harmonized: how much layers attend to each other (0 = not at all)")
    mask_guidance: float = Field(default=StackRequest.mask_guidance, ge=0.0, le=1.0,
                                 description="joint/harmonized: how strongly estimated masks "
                                             "confine foregrounds")
    tta_passes: int = Field(default=StackRequest.tta_passes,
                            description=f"transparent decoder passes, one of {limits.TTA_PASSES}")
    name: str = Field(default="", max_length=MAX_NAME_CHARS, description="stack display name")
    export_psd: bool = False
    export_ora: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("width", "height")
    @classmethod
    def _size_multiple(cls, value: int) -> int:
        step = limits.SIZE_MULTIPLE
        if value % step:
            lower = value // step * step
            raise ValueError(f"must be a multiple of {step} (the transparent decoder works on "
                             f"{step}-pixel tiles), got {value}; try {lower} or {lower + step}")
        return value

    @field_validator("guidance", "inter_layer_strength", "mask_guidance")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in limits.METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of {', '.join(limits.METHODS)}")
        return value

    @field_validator("tta_passes")
    @classmethod
    def _tta_choice(cls, value: int) -> int:
        if value not in limits.TTA_PASSES:
            raise ValueError(f"must be one of {', '.join(map(str, limits.TTA_PASSES))}, got {value}")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("layers")
    @classmethod
    def _unique_layer_names(cls, layers: list[LayerIn]) -> list[LayerIn]:
        seen = {"background"}
        for i, layer in enumerate(layers):
            if layer.name and layer.name in seen:
                raise ValueError(f"layers[{i}].name {layer.name!r} is used twice (layer names "
                                 f"are unique in a stack; 'background' is taken)")
            seen.add(layer.name)
        return layers

    def to_stack_request(self) -> StackRequest:
        """The engine's request; `validated()` is the second, authoritative check."""
        layers = tuple(LayerSpec(prompt=l.prompt, seed=l.seed,
                                 box=tuple(l.box) if l.box is not None else None, name=l.name)
                       for l in self.layers)
        return StackRequest(prompt=self.prompt, background=self.background, layers=layers,
                            negative_prompt=self.negative_prompt, width=self.width,
                            height=self.height, steps=self.steps, guidance=float(self.guidance),
                            seed=self.seed, method=self.method, tta_passes=self.tta_passes,
                            background_seed=self.background_seed, name=self.name,
                            inter_layer_strength=float(self.inter_layer_strength),
                            mask_guidance=float(self.mask_guidance)).validated()


class RegenerateIn(_Closed):
    """Regenerate one layer of a finished stack; the other layers stay byte-identical."""

    layer_index: int = Field(ge=0, le=limits.MAX_FOREGROUNDS,
                             description="0 = background, 1.. = foregrounds (back to front)")
    prompt: Optional[str] = Field(default=None, min_length=1, max_length=limits.MAX_PROMPT_CHARS,
                                  description="the layer's new prompt (kept when absent)")
    seed: Optional[int] = Field(default=None, ge=0, le=limits.MAX_SEED,
                                description="the layer's new seed (kept when absent)")
    tta_passes: int = Field(default=StackRequest.tta_passes,
                            description=f"transparent decoder passes, one of {limits.TTA_PASSES}")

    @field_validator("tta_passes")
    @classmethod
    def _tta_choice(cls, value: int) -> int:
        return JobCreate._tta_choice(value)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value


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
    request: Optional[dict] = Field(default=None, description="the submitted body (generate jobs)")
    version: int = Field(default=0, description="bumped on every change of this job")


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


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    device: dict
    torch: Optional[str] = None
    diffusers: Optional[str] = None
    loaded_model: Optional[str] = None
    queue_length: int = Field(description="generate jobs waiting (the running one not counted)")
    running: Optional[str] = Field(default=None, description="id of the running generate job")


class ErrorOut(BaseModel):
    detail: str
