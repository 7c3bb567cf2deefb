"""Model presets, resolving a model spec to files on disk, and loading it.

A *spec* is what a user types: a preset name (`sdxl`, `sd15`, `tiny`), a local diffusers
folder, or a single `.safetensors` checkpoint of an SDXL/SD 1.5 finetune. Resolution
turns it into local paths — downloading what is missing, or raising ONE MissingWeights
that lists every missing file — without touching torch weights; `load_model` then builds
the pipeline and the LayerDiffuse parts from those paths only (`local_files_only=True`).

Where the LayerDiffuse files come from: the family's preset (hub repos), unless the base
folder carries its own in `<folder>/layerdiffuse/` under the published file names (that
is how the tiny model ships its random-weight versions), or the user dropped them into
the models folder.

Single-file checkpoints: diffusers 0.42's `from_single_file` needs the base model's
*diffusers config folder* (model_index.json, */config.json, scheduler and tokenizer
files; a few MB, no weights) to build the pipeline. Given a hub id with
`local_files_only=True` and nothing cached it silently switches to downloading, so we
fetch those files ourselves (or report them missing) and always pass a local folder.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .errors import InvalidRequest, MultiplaneError, UnsafeCheckpoint
from .hub import (
    HubFile,
    acquire,
    cached_snapshot_dir,
    hf_cache_dir,
    locate_file,
    plan_snapshot,
)
from .progress import CancelToken, ProgressCallback
from .weights import PICKLE_SUFFIXES, file_sha256, refuse_pickle, safetensors_shapes

FAMILIES = ("sdxl", "sd15")
ROLES = ("unet_patch", "decoder", "encoder", "attention_sharing", "joint")

MB = 1_000_000
GB = 1_000_000_000


@dataclass(frozen=True)
class LayerDiffuseFile:
    """One published LayerDiffuse weight file and what it is for."""

    repo_id: str
    filename: str
    role: str  # one of ROLES
    approx_size: int  # bytes (fp16 file), for the UI
    optional: bool = False  # only fetched on demand (e.g. the SD1.5 joint model)
    # Used in place of its role's default file when found on disk (models folder, HF cache or
    # a base folder's layerdiffuse/); never downloaded on its own.
    alternative: bool = False
    # Offset encoders only: the factor their raw output is multiplied by, as the file's own
    # reference implementation runs it (../shared/reference/README.md, "Offset encoders").
    offset_scale: Optional[float] = None

    def hub_file(self) -> HubFile:
        return HubFile(self.repo_id, self.filename, self.approx_size, self.role)


@dataclass(frozen=True)
class ModelPreset:
    """A named model: base weights plus the LayerDiffuse files of its family."""

    name: str
    family: str  # "sdxl" or "sd15" ("tiny" is an SDXL-family model)
    base: str  # hub repo id of the base model ("" for tiny, which is built locally)
    description: str
    base_files: tuple[HubFile, ...] = ()  # what `from_pretrained` reads (fp16 variant)
    layerdiffuse: tuple[LayerDiffuseFile, ...] = ()
    default_size: int = 1024
    variant: Optional[str] = "fp16"

    @property
    def config_files(self) -> tuple[HubFile, ...]:
        """The base's non-weight files: enough for `from_single_file(config=folder)`."""
        return tuple(f for f in self.base_files if not f.filename.endswith(".safetensors"))

    def required_layerdiffuse(self) -> tuple[LayerDiffuseFile, ...]:
        return tuple(f for f in self.layerdiffuse if not (f.optional or f.alternative))

    def alternatives(self, role: str) -> tuple[LayerDiffuseFile, ...]:
        return tuple(f for f in self.layerdiffuse if f.alternative and f.role == role)

    @property
    def approx_download_size(self) -> int:
        return sum(f.approx_size for f in self.base_files) + sum(
            f.approx_size for f in self.required_layerdiffuse())


def _tokenizer_files(repo: str, folder: str) -> list[HubFile]:
    return [HubFile(repo, f"{folder}/{name}", size) for name, size in (
        ("merges.txt", 525_000), ("special_tokens_map.json", 500),
        ("tokenizer_config.json", 800), ("vocab.json", 1_060_000))]


def _component(repo: str, folder: str, weights: str, size: int) -> list[HubFile]:
    return [HubFile(repo, f"{folder}/config.json", 1_000), HubFile(repo, f"{folder}/{weights}", size)]


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LAYERDIFFUSE_REPO = "LayerDiffusion/layerdiffusion-v1"
LAYERDIFFUSE_DIFFUSERS_REPO = "lllyasviel/LayerDiffuse_Diffusers"

_SDXL_FILES = tuple(
    [HubFile(SDXL_BASE, "model_index.json", 600), HubFile(SDXL_BASE, "scheduler/scheduler_config.json", 500)]
    + _component(SDXL_BASE, "text_encoder", "model.fp16.safetensors", 246 * MB)
    + _component(SDXL_BASE, "text_encoder_2", "model.fp16.safetensors", 1_390 * MB)
    + _tokenizer_files(SDXL_BASE, "tokenizer") + _tokenizer_files(SDXL_BASE, "tokenizer_2")
    + _component(SDXL_BASE, "unet", "diffusion_pytorch_model.fp16.safetensors", 5_140 * MB)
    + _component(SDXL_BASE, "vae", "diffusion_pytorch_model.fp16.safetensors", 167 * MB)
)
_SD15_FILES = tuple(
    [HubFile(SD15_BASE, "model_index.json", 600), HubFile(SD15_BASE, "scheduler/scheduler_config.json", 500)]
    + _component(SD15_BASE, "text_encoder", "model.fp16.safetensors", 246 * MB)
    + _tokenizer_files(SD15_BASE, "tokenizer")
    + _component(SD15_BASE, "unet", "diffusion_pytorch_model.fp16.safetensors", 1_720 * MB)
    + _component(SD15_BASE, "vae", "diffusion_pytorch_model.fp16.safetensors", 167 * MB)
)

# Sizes: the fp16 tensors of each file's published layout (shared/reference manifest).
# Offset-encoder scales: the v1 files are run on their raw output (the author's Forge extension,
# the rootonchair diffusers port); only the LayerDiffuse_Diffusers SDXL encoder is run x300
# (LayerDiffuse_DiffusersCLI). The three files share one layout, so the scale cannot be read off
# a file: it belongs to the file's name here, and nowhere else.
_SDXL_LAYERDIFFUSE = (
    LayerDiffuseFile(LAYERDIFFUSE_DIFFUSERS_REPO, "ld_diffusers_sdxl_attn.safetensors", "unet_patch", 1_910 * MB),
    LayerDiffuseFile(LAYERDIFFUSE_REPO, "vae_transparent_decoder.safetensors", "decoder", 208 * MB),
    LayerDiffuseFile(LAYERDIFFUSE_REPO, "vae_transparent_encoder.safetensors", "encoder", 2_400_000,
                     offset_scale=1.0),
    LayerDiffuseFile(LAYERDIFFUSE_DIFFUSERS_REPO, "ld_diffusers_sdxl_vae_transparent_encoder.safetensors",
                     "encoder", 2_400_000, alternative=True, offset_scale=300.0),
)
_SD15_LAYERDIFFUSE = (
    LayerDiffuseFile(LAYERDIFFUSE_REPO, "layer_sd15_transparent_attn.safetensors", "attention_sharing", 359 * MB),
    LayerDiffuseFile(LAYERDIFFUSE_REPO, "layer_sd15_joint.safetensors", "joint", 579 * MB, optional=True),
    LayerDiffuseFile(LAYERDIFFUSE_REPO, "layer_sd15_vae_transparent_decoder.safetensors", "decoder", 208 * MB),
    LayerDiffuseFile(LAYERDIFFUSE_REPO, "layer_sd15_vae_transparent_encoder.safetensors", "encoder", 2_400_000,
                     offset_scale=1.0),
)

PRESETS: dict[str, ModelPreset] = {
    "sdxl": ModelPreset(
        name="sdxl", family="sdxl", base=SDXL_BASE,
        description="Stable Diffusion XL 1.0 + LayerDiffuse (best quality; ~8 GB VRAM in fp16)",
        base_files=_SDXL_FILES, layerdiffuse=_SDXL_LAYERDIFFUSE, default_size=1024),
    "sd15": ModelPreset(
        name="sd15", family="sd15", base=SD15_BASE,
        description="Stable Diffusion 1.5 + LayerDiffuse attention sharing (lighter; 512 px)",
        base_files=_SD15_FILES, layerdiffuse=_SD15_LAYERDIFFUSE, default_size=512),
    "tiny": ModelPreset(
        name="tiny", family="sdxl", base="",
        description="Tiny random-weight SDXL-shaped model built locally (tests and demos; noise images)",
        default_size=256, variant=None),
}

TINY_SEED = 0


def preset_names() -> list[str]:
    return list(PRESETS)


def family_preset(family: str) -> ModelPreset:
    """The preset whose LayerDiffuse files serve a base of `family`."""
    return PRESETS[family]


def layerdiffuse_file(family: str, filename: str) -> LayerDiffuseFile:
    """The published LayerDiffuse file of `family` called `filename` (what it is, how it is run)."""
    for f in family_preset(family).layerdiffuse:
        if f.filename == filename:
            return f
    raise InvalidRequest("model", f"{filename} is not a LayerDiffuse file of the {family} family "
                                  f"(known: {', '.join(f.filename for f in family_preset(family).layerdiffuse)})")


# -- where generated / cached things live ---------------------------------------------------
def default_cache_dir() -> Path:
    """Multiplane's own cache (tiny model builds, hash cache): $MULTIPLANE_CACHE_DIR or
    $XDG_CACHE_HOME/multiplane or ~/.cache/multiplane."""
    if os.environ.get("MULTIPLANE_CACHE_DIR"):
        return Path(os.path.expanduser(os.environ["MULTIPLANE_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "multiplane"


def tiny_model_dir() -> Path:
    return default_cache_dir() / f"tiny-seed{TINY_SEED}"


# -- resolved models ------------------------------------------------------------------------
@dataclass
class ResolvedModel:
    """A model spec turned into local paths; nothing is loaded yet.

    `base` is a diffusers folder (`base_kind == "diffusers"`) or a single checkpoint
    (`"single_file"`, then `base_config` is the diffusers config folder to build it with).
    `files` maps roles (unet_patch, decoder, encoder, attention_sharing, joint) to paths.
    """

    spec: str
    preset: str
    family: str
    base: Path
    base_kind: str
    base_label: str  # for stack.json: hub id for presets, the path otherwise
    files: dict[str, Path]
    base_config: Optional[Path] = None
    variant: Optional[str] = None
    decoder_config: dict = field(default_factory=dict)  # overrides for TransparentDecoder
    encoder_config: dict = field(default_factory=dict)

    def file_hashes(self, cache_file: Optional[Path] = None) -> dict[str, str]:
        """`{file name: "sha256:<hex>"}` of the LayerDiffuse files, for stack.json.

        Hashes are cached by (path, size, mtime) in a small JSON file so gigabyte files are
        hashed once, not on every load.
        """
        cache = HashCache(cache_file or default_cache_dir() / "file_hashes.json")
        return {path.name: cache.sha256(path) for _, path in sorted(self.files.items())}

    @property
    def encoder_offset_scale(self) -> Optional[float]:
        """How the resolved offset encoder's output is scaled (None: no encoder)."""
        path = self.files.get("encoder")
        return None if path is None else layerdiffuse_file(self.family, Path(path).name).offset_scale


class HashCache:
    """sha256 of files keyed by resolved path + size + mtime_ns, persisted as JSON."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def sha256(self, file: Path) -> str:
        file = Path(file).resolve()
        stat = file.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        entries = self._read()
        entry = entries.get(str(file))
        if isinstance(entry, dict) and entry.get("stamp") == stamp and str(entry.get("sha256", "")).startswith("sha256:"):
            return entry["sha256"]
        digest = file_sha256(file)
        entries = self._read()  # re-read: another process may have added entries meanwhile
        entries[str(file)] = {"stamp": stamp, "sha256": digest}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs time
        return digest


# -- inspecting local bases -------------------------------------------------------------------
def family_from_unet_config(config: dict, where: str) -> str:
    """sdxl or sd15 from a diffusers UNet config; InvalidRequest for anything else."""
    if config.get("in_channels", 4) != 4:
        raise InvalidRequest("model", f"{where}: the UNet takes {config.get('in_channels')} input channels "
                                      "(an inpainting or other special model); LayerDiffuse needs a plain "
                                      "text-to-image SDXL or SD 1.5 model")
    cross = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time" or cross == 2048:
        return "sdxl"
    if cross == 768:
        return "sd15"
    raise InvalidRequest("model", f"{where}: unsupported model (UNet cross_attention_dim {cross}); "
                                  "LayerDiffuse exists only for SDXL and SD 1.5 models")


_WEIGHT_DIRS = ("unet", "vae", "text_encoder", "text_encoder_2")


def inspect_diffusers_folder(folder: Path) -> tuple[str, Optional[str]]:
    """(family, variant) of a diffusers folder; refuses folders whose weights are pickles."""
    index = folder / "model_index.json"
    try:
        model_index = json.loads(index.read_text())
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
    except FileNotFoundError as exc:
        raise InvalidRequest("model", f"{folder} is not a complete diffusers folder: {Path(exc.filename).name} "
                                      f"missing in {Path(exc.filename).parent}") from None
    except ValueError as exc:
        raise InvalidRequest("model", f"{folder}: unreadable config ({exc})") from None
    family = family_from_unet_config(unet_config, str(folder))
    pipeline_class = model_index.get("_class_name", "")
    expected = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}[family]
    if pipeline_class and pipeline_class != expected:
        raise InvalidRequest("model", f"{folder}: a {pipeline_class} folder; expected {expected} for its "
                                      f"{family} UNet")
    components = [n for n in _WEIGHT_DIRS if (model_index.get(n) or [None])[0] is not None]
    fp16, full = set(), set()
    for name in components:
        sub = folder / name
        weights = [p.name for p in sub.glob("*.safetensors")]
        if not weights:
            pickles = sorted(p.name for p in sub.glob("*") if p.name.lower().endswith(PICKLE_SUFFIXES))
            if pickles:
                raise UnsafeCheckpoint(f"{sub}: only pickle weights ({', '.join(pickles)}); convert them to "
                                       ".safetensors, or download the safetensors release of the model")
            raise InvalidRequest("model", f"{folder}: no weights in {name}/")
        if any(".fp16." in w for w in weights):
            fp16.add(name)
        if any(".fp16." not in w for w in weights):
            full.add(name)
    # diffusers loads one variant for all components: fp16 only if every component has it.
    if fp16 == set(components):
        variant = "fp16"
    elif full == set(components):
        variant = None
    else:
        raise InvalidRequest("model", f"{folder}: {', '.join(sorted(set(components) - full))} only have fp16 "
                                      f"weights and {', '.join(sorted(set(components) - fp16))} only "
                                      "full-precision ones; diffusers needs one kind for all components")
    return family, variant


def inspect_checkpoint(path: Path) -> str:
    """Family of a single-file (original layout) checkpoint from its tensor names."""
    try:
        names = safetensors_shapes(path)
    except Exception as exc:
        raise InvalidRequest("model", f"{path}: not a readable .safetensors file ({exc})") from None
    first_conv = names.get("model.diffusion_model.input_blocks.0.0.weight")
    if first_conv is None:
        raise InvalidRequest("model", f"{path}: not a full Stable Diffusion checkpoint (no "
                                      "model.diffusion_model.* UNet tensors); LoRAs and single "
                                      "components cannot be used as a model")
    if len(first_conv) == 4 and first_conv[1] != 4:
        raise InvalidRequest("model", f"{path}: the UNet takes {first_conv[1]} input channels (an "
                                      "inpainting or other special model); use a text-to-image checkpoint")
    has = lambda prefix: any(n.startswith(prefix) for n in names)  # noqa: E731
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        return "sdxl"
    if has("cond_stage_model.transformer."):
        return "sd15"
    if has("conditioner.embedders.0.model."):
        raise InvalidRequest("model", f"{path}: an SDXL refiner checkpoint; use a base (text-to-image) model")
    raise InvalidRequest("model", f"{path}: neither an SDXL nor an SD 1.5 checkpoint (SD 2.x and other "
                                  "families have no LayerDiffuse weights)")


def bundled_layerdiffuse(folder: Path, preset: ModelPreset) -> dict[str, Path]:
    """LayerDiffuse files a base folder carries in `layerdiffuse/` (published names; a role's
    default file before its alternatives)."""
    sub = folder / "layerdiffuse"
    found: dict[str, Path] = {}
    for f in sorted(preset.layerdiffuse, key=lambda f: f.alternative):
        if f.role not in found and (sub / f.filename).is_file():
            found[f.role] = sub / f.filename
    return found


def _looks_like_path(spec: str) -> bool:
    return (os.sep in spec or "/" in spec or spec.startswith((".", "~"))
            or spec.lower().endswith((".safetensors", *PICKLE_SUFFIXES)))


def unknown_model_error(spec: str) -> InvalidRequest:
    return InvalidRequest(
        "model", f"unknown model {spec!r}; choose {', '.join(PRESETS)} or a path to a diffusers folder "
                 "(with model_index.json) or to an SDXL/SD 1.5 .safetensors checkpoint")


def pixel_budget(spec: str) -> int:
    """The model's native pixel budget for the camera frame: its preset's `default_size`
    squared (a local base: the preset of its family, read from its config or tensor names
    without loading it). What `inference.canvas.plan_canvas` sizes a frame by."""
    name = spec.strip().lower()
    if name in PRESETS:
        return PRESETS[name].default_size ** 2
    if not _looks_like_path(spec):
        raise unknown_model_error(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        family = inspect_diffusers_folder(path)[0]
    elif path.is_file():
        family = inspect_checkpoint(path)
    else:
        raise InvalidRequest("model", f"{path} does not exist")
    return family_preset(family).default_size ** 2


# -- resolution ------------------------------------------------------------------------------
def resolve_model(spec: str, *, models_dir: Optional[Path] = None, allow_download: bool = True,
                  progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> ResolvedModel:
    """Turn a model spec into local paths (downloading if allowed); see the module docstring.

    Raises InvalidRequest("model", ...) for unknown names and unsupported files,
    UnsafeCheckpoint for pickle checkpoints, MissingWeights (listing every missing file) when
    files are neither on disk nor downloadable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidRequest("model", "must name a model: " + ", ".join(PRESETS) + " or a path")
    spec = spec.strip()
    models_dir = Path(models_dir).expanduser() if models_dir else None
    key = spec.lower()

    if key == "tiny":
        from .tiny import build_tiny_model

        folder = build_tiny_model(tiny_model_dir(), seed=TINY_SEED)
        return _resolve_folder(spec, folder, preset=PRESETS["tiny"], models_dir=models_dir,
                               allow_download=allow_download, progress=progress, cancel=cancel,
                               base_label="tiny")
    if key in PRESETS:
        return _resolve_preset(PRESETS[key], models_dir=models_dir, allow_download=allow_download,
                               progress=progress, cancel=cancel)

    path = Path(os.path.expanduser(spec))
    if path.exists() or _looks_like_path(spec):
        refuse_pickle(path)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise InvalidRequest("model", f"{path} is a folder without model_index.json; pass a diffusers "
                                              "model folder or a .safetensors checkpoint file")
            return _resolve_folder(spec, path.resolve(), preset=None, models_dir=models_dir,
                                   allow_download=allow_download, progress=progress, cancel=cancel,
                                   base_label=str(path.resolve()))
        if path.is_file():
            if path.suffix.lower() != ".safetensors":
                raise UnsafeCheckpoint(f"{path}: only .safetensors checkpoints are supported")
            return _resolve_single_file(spec, path.resolve(), models_dir=models_dir,
                                        allow_download=allow_download, progress=progress, cancel=cancel)
        raise InvalidRequest("model", f"{path}: no such file or folder")
    raise unknown_model_error(spec)


def _layerdiffuse_needed(preset: ModelPreset, have: dict[str, Path], models_dir: Optional[Path]
                         ) -> tuple[list[LayerDiffuseFile], dict[str, Path]]:
    """(required files still to fetch, optional or alternative files already on disk).

    A required file missing from disk whose role has an alternative on disk is not fetched:
    the alternative serves (e.g. LayerDiffuse_Diffusers' SDXL encoder instead of v1's).
    """
    needed, extras = [], {}
    for f in preset.required_layerdiffuse():
        if f.role in have:
            continue
        alternative = next((p for p in (locate_file(a.repo_id, a.filename, models_dir=models_dir)
                                        for a in preset.alternatives(f.role)) if p is not None), None)
        if alternative is not None and locate_file(f.repo_id, f.filename, models_dir=models_dir) is None:
            extras[f.role] = alternative
        else:
            needed.append(f)
    for f in preset.layerdiffuse:
        if f.optional and f.role not in have:
            path = locate_file(f.repo_id, f.filename, models_dir=models_dir)
            if path is not None:
                extras[f.role] = path
    return needed, extras


def _fetch_with_layerdiffuse(plans: list, source: ModelPreset, bundled: dict[str, Path], *, models_dir,
                             allow_download, progress, cancel) -> dict[str, Path]:
    """Role → path: the `bundled` LayerDiffuse files, the rest of `source`'s fetched (with the
    base `plans`, in one acquire so one error lists everything missing), optional ones found."""
    needed, extras = _layerdiffuse_needed(source, bundled, models_dir)
    found = acquire(plans, [f.hub_file() for f in needed], models_dir=models_dir,
                    allow_download=allow_download, progress=progress, cancel=cancel)
    return {**bundled, **{f.role: found[f.hub_file()] for f in needed}, **extras}


def _resolve_preset(preset: ModelPreset, *, models_dir, allow_download, progress, cancel) -> ResolvedModel:
    plan = plan_snapshot(preset.base, preset.base_files, models_dir=models_dir)
    files = _fetch_with_layerdiffuse([plan], preset, {}, models_dir=models_dir, allow_download=allow_download,
                                     progress=progress, cancel=cancel)
    assert plan.folder is not None
    return ResolvedModel(spec=preset.name, preset=preset.name, family=preset.family, base=plan.folder,
                         base_kind="diffusers", base_label=preset.base, files=files,
                         variant=preset.variant)


def _resolve_folder(spec: str, folder: Path, *, preset: Optional[ModelPreset], models_dir, allow_download,
                    progress, cancel, base_label: str) -> ResolvedModel:
    family, variant = inspect_diffusers_folder(folder)
    source = family_preset(family)
    files = _fetch_with_layerdiffuse([], source, bundled_layerdiffuse(folder, source), models_dir=models_dir,
                                     allow_download=allow_download, progress=progress, cancel=cancel)
    decoder_config, encoder_config = {}, {}
    tiny_config = folder / "layerdiffuse" / "tiny_config.json"
    if tiny_config.is_file():
        configs = json.loads(tiny_config.read_text())
        decoder_config, encoder_config = configs.get("decoder", {}), configs.get("encoder", {})
    return ResolvedModel(spec=spec, preset=(preset or source).name, family=family, base=folder,
                         base_kind="diffusers", base_label=base_label, files=files, variant=variant,
                         decoder_config=decoder_config, encoder_config=encoder_config)


def _resolve_single_file(spec: str, path: Path, *, models_dir, allow_download, progress, cancel) -> ResolvedModel:
    family = inspect_checkpoint(path)
    source = family_preset(family)
    # Configs only: a complete local copy of the base (weights too) works just as well.
    plan = plan_snapshot(source.base, source.config_files, models_dir=models_dir)
    files = _fetch_with_layerdiffuse([plan], source, {}, models_dir=models_dir, allow_download=allow_download,
                                     progress=progress, cancel=cancel)
    assert plan.folder is not None
    return ResolvedModel(spec=spec, preset=source.name, family=family, base=path, base_kind="single_file",
                         base_label=str(path), files=files, base_config=plan.folder)


# -- availability (for /v1/models) --------------------------------------------------------------
def preset_availability(models_dir: Optional[Path] = None) -> list[dict]:
    """Per preset: which files are on disk (models folder or HF cache), sizes, what is missing.

    Looks only; never downloads or builds. JSON-able.
    """
    models_dir = Path(models_dir).expanduser() if models_dir else None
    out = []
    for preset in PRESETS.values():
        if preset.name == "tiny":
            from .tiny import read_tiny_key, tiny_model_key

            out.append(dict(name=preset.name, family=preset.family, base=preset.base,
                            description=preset.description, default_size=preset.default_size,
                            pixel_budget=preset.default_size ** 2, available=True,
                            built=read_tiny_key(tiny_model_dir()) == tiny_model_key(TINY_SEED),
                            files=[], missing=[], download_bytes=0))
            continue
        plan = plan_snapshot(preset.base, preset.base_files, models_dir=models_dir)
        base_dir = plan.folder or cached_snapshot_dir(preset.base, hf_cache_dir())
        entries = []
        for f in preset.base_files:
            path = (base_dir / f.filename) if base_dir is not None else None
            entries.append(_file_entry(f, "base", path if path is not None and path.is_file() else None))
        for ld in preset.layerdiffuse:
            entries.append(_file_entry(ld.hub_file(), ld.role,
                                       locate_file(ld.repo_id, ld.filename, models_dir=models_dir),
                                       optional=ld.optional or ld.alternative))
        served = {e["role"] for e in entries if e["present"] and e["role"] != "base"}
        missing = [e for e in entries if not e["present"] and not e["optional"]
                   and (e["role"] == "base" or e["role"] not in served)]
        out.append(dict(name=preset.name, family=preset.family, base=preset.base,
                        description=preset.description, default_size=preset.default_size,
                        pixel_budget=preset.default_size ** 2, available=not missing, files=entries,
                        missing=[f"{e['repo']}: {e['filename']}" for e in missing],
                        download_bytes=sum(e["size"] for e in missing)))
    return out


def _file_entry(f: HubFile, role: str, path: Optional[Path], optional: bool = False) -> dict:
    present = path is not None
    return dict(repo=f.repo_id, filename=f.filename, role=role, optional=optional, present=present,
                path=str(path) if present else None,
                size=path.stat().st_size if present else f.approx_size)


# -- loading ---------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """Everything a generation method needs, on its device.

    `unet_patch` is a `TransparencyPatch` (SDXL family) or an `AttentionSharingAdapter`
    (SD 1.5); `transparency(unet)` turns it on for a `with` block either way.
    """

    pipeline: object
    decoder: object
    encoder: Optional[object]
    unet_patch: object
    family: str
    resolved: ResolvedModel
    device: object
    dtype: object
    offloaded: bool = False
    max_batch: Optional[int] = None  # rows per UNet call of a layered run; None = what fits
    lean_activations: str = "auto"  # layered runs' UNet in lean activations (auto | on | off)
    load_seconds: dict = field(default_factory=dict)  # per load step (pipeline, patch, decoders)
    _description: Optional[dict] = None
    _adapters: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def transparency(self, unet=None) -> Iterator[object]:
        """The UNet generating in LayerDiffuse's transparent latent space for the block."""
        unet = unet if unet is not None else self.pipeline.unet
        if self.family == "sdxl":
            with self.unet_patch.applied(unet, rebind_moved=self.offloaded):
                yield unet
        else:
            with self.unet_patch.installed(unet):
                yield unet

    def attention_sharing(self, role: str):
        """SD 1.5 only: the attention-sharing adapter of `role` ("joint"), loaded on first use."""
        if self.family != "sd15":
            raise InvalidRequest("method", "attention sharing models exist only for SD 1.5")
        if role == "attention_sharing":
            return self.unet_patch
        if role not in self._adapters:
            path = self.resolved.files.get(role)
            if path is None:
                f = next(f for f in PRESETS["sd15"].layerdiffuse if f.role == role)
                raise InvalidRequest("method", f"needs {f.filename} from {f.repo_id}; download it "
                                               f"(hf download {f.repo_id} {f.filename}) or put it in the models folder")
            from .sd15_attention_sharing import LAYER_SD15_FILES, load_attention_sharing

            frames, control = LAYER_SD15_FILES[Path(path).stem]
            self._adapters[role] = load_attention_sharing(path, self.pipeline.unet, frames, control)
        return self._adapters[role]

    def describe(self) -> dict:
        """The stack.json `model` object: preset, base, LayerDiffuse file hashes."""
        if self._description is None:
            self._description = {"preset": self.resolved.preset, "base": self.resolved.base_label,
                                 "files": self.resolved.file_hashes()}
        return dict(self._description)


HOST = "cpu"  # where model offload parks the transparent decoder and encoder between uses
_CODEC_USERS: dict[int, int] = {}  # id(loaded) → open codecs_on_device blocks


@contextlib.contextmanager
def codecs_on_device(loaded) -> Iterator[None]:
    """The transparent decoder and offset encoder of `loaded` on its device for the block.

    Under model offload they wait in host memory while the UNet runs (so an 8 GiB card
    holds only the UNet, the transparency factors and the activations when denoising) and
    come over only to decode or encode, then go back; without offload they live on the
    device and nothing moves. Nested blocks move them once.
    """
    parked = [m for m in (loaded.decoder, loaded.encoder) if m is not None] \
        if getattr(loaded, "offloaded", False) else []
    depth = _CODEC_USERS.get(id(loaded), 0)
    if depth == 0:
        for module in parked:
            module.to(loaded.device)
    _CODEC_USERS[id(loaded)] = depth + 1
    try:
        yield
    finally:
        _CODEC_USERS[id(loaded)] = depth
        if depth == 0:
            del _CODEC_USERS[id(loaded)]
            for module in parked:
                module.to(HOST)


def load_model(resolved: ResolvedModel, device, dtype, *, offload: bool = False,
               vae_tiling: bool = False) -> LoadedModel:
    """Build the pipeline and the LayerDiffuse parts from a ResolvedModel (local files only).

    Safety checker off (SD 1.5). `offload` uses diffusers' model CPU offload on an
    accelerator and is ignored on the CPU (nothing to offload to); `vae_tiling` tiles the
    VAE for large images. The transparency patch is built against the UNet's tensors after
    they reached their final dtype/device.
    """
    import time

    import torch

    from .transparent_vae import TransparentDecoder, TransparentEncoder, fast_memory_format

    device = torch.device(device)
    seconds, t = {}, time.perf_counter()
    # 1. The base pipeline, from local files only.
    pipeline = _load_pipeline(resolved, dtype)
    _check_all_weights_loaded(pipeline, resolved)
    pipeline.set_progress_bar_config(disable=True)

    # 2. On its device, then the transparency patch against the UNet's final tensors.
    offloaded = bool(offload and device.type != "cpu")
    if not offloaded:
        pipeline.to(device)
    seconds["pipeline"], t = time.perf_counter() - t, time.perf_counter()
    if resolved.family == "sdxl":
        from .sdxl_transparency import TransparencyPatch

        unet_patch = TransparencyPatch.from_file(resolved.files["unet_patch"], pipeline.unet,
                                                 factor_cache=transparency_factor_cache())
    else:
        from .sd15_attention_sharing import LAYER_SD15_FILES, load_attention_sharing

        path = resolved.files["attention_sharing"]
        frames, control = LAYER_SD15_FILES[Path(path).stem]
        unet_patch = load_attention_sharing(path, pipeline.unet, frames, control)

    if offloaded:
        pipeline.enable_model_cpu_offload(device=device)
    if vae_tiling:
        pipeline.vae.enable_tiling()
    seconds["transparency_patch"], t = time.perf_counter() - t, time.perf_counter()

    # 3. The transparent decoder and (when the family has one) the offset encoder at its file's
    #    scale; under model offload they wait in host memory (`codecs_on_device`).
    home = torch.device(HOST) if offloaded else device
    decoder = fast_memory_format(TransparentDecoder.from_single_file(
        resolved.files["decoder"], dtype=dtype, device=home, **resolved.decoder_config), device)
    encoder = None
    if "encoder" in resolved.files:
        encoder = TransparentEncoder.from_single_file(resolved.files["encoder"], dtype=dtype, device=home,
                                                      offset_scale=resolved.encoder_offset_scale,
                                                      **resolved.encoder_config)
    seconds["transparent_vae"] = time.perf_counter() - t
    return LoadedModel(pipeline=pipeline, decoder=decoder, encoder=encoder, unet_patch=unet_patch,
                       family=resolved.family, resolved=resolved, device=device, dtype=dtype,
                       offloaded=offloaded, load_seconds=seconds)


def transparency_factor_cache():
    """Where the SDXL patch's low-rank factors are kept between loads (`FactorCache`):
    `<cache>/transparency-factors/`, keyed by the delta file's sha256 (the hash cache)."""
    from .sdxl_transparency import FactorCache

    return FactorCache(default_cache_dir() / "transparency-factors",
                       HashCache(default_cache_dir() / "file_hashes.json").sha256)


def _load_pipeline(resolved: ResolvedModel, dtype):
    """The diffusers pipeline of the base (safety checker off for SD 1.5); InvalidRequest naming
    the base when its files cannot be loaded."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if resolved.family == "sdxl" else StableDiffusionPipeline
    kwargs: dict = dict(dtype=dtype, local_files_only=True)
    if resolved.family == "sd15":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        if resolved.base_kind == "single_file":
            pipeline = pipeline_class.from_single_file(str(resolved.base), config=str(resolved.base_config),
                                                       **kwargs)
        else:
            pipeline = pipeline_class.from_pretrained(str(resolved.base), variant=resolved.variant,
                                                      use_safetensors=True, **kwargs)
    except MultiplaneError:
        raise
    except Exception as exc:  # truncated download, edited config, checkpoint without text encoders...
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise InvalidRequest("model", f"{resolved.base_label}: the base model could not be loaded "
                                      f"({type(exc).__name__}: {first_line}); its files may be incomplete "
                                      "or corrupt — delete them and download again, or check the path") from exc
    return pipeline


def _check_all_weights_loaded(pipeline, resolved: ResolvedModel) -> None:
    """Single-file loading leaves tensors the checkpoint lacks on the meta device (no data);
    name them instead of failing later with "Cannot copy out of meta tensor"."""
    for name, component in pipeline.components.items():
        if not hasattr(component, "named_parameters"):
            continue
        empty = [n for n, t in [*component.named_parameters(), *component.named_buffers()] if t.is_meta]
        if empty:
            shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
            raise InvalidRequest("model", f"{resolved.base_label}: no weights for {name} tensors {shown}; "
                                          "the checkpoint is incomplete or not a standard SDXL/SD 1.5 file")

