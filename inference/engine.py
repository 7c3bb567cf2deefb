"""The engine: keeps one model warm and turns a StackRequest into a layer stack on disk.

Front ends (CLI, HTTP server, benchmarks) all go through `Engine.generate`, `regenerate`,
`restyle` and `extend`; methods in `inference/methods/` produce pixels, this module owns
loading, timing and writing (one path for every job).
"""
from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .previews import use_family
from .progress import CancelToken, Progress, ProgressCallback, ignore_progress
from .request import StackRequest


@dataclass
class EngineSettings:
    """How the engine places and fetches models; set once per process."""

    device: str = "auto"
    models_dir: Optional[Path] = None
    allow_download: bool = True
    offload: bool = False
    vae_tiling: bool = False
    max_batch: Optional[int] = None  # rows per UNet call in layered runs; None = from free memory
    lean_activations: str = "auto"  # layered runs' UNet in lean activations: auto | on | off
    dtype: Optional[str] = None  # "float32", "bfloat16", "float16"; None = the device's default
    compile: bool = False  # torch.compile the UNet's attention-free blocks (inference/compilation.py)

    def __post_init__(self):
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            from .errors import InvalidRequest

            raise InvalidRequest("max_batch", f"must be a positive integer (UNet rows per call), "
                                              f"got {self.max_batch!r}; leave it unset to size chunks "
                                              "from the free memory")
        from .memory_model import LEAN_CHOICES

        if self.lean_activations not in LEAN_CHOICES:
            from .errors import InvalidRequest

            raise InvalidRequest("lean_activations", f"must be one of {', '.join(LEAN_CHOICES)}, got "
                                                     f"{self.lean_activations!r}; auto (the default) turns "
                                                     "it on on GPUs and on the CPU when memory is short")
        if not isinstance(self.compile, bool):
            from .errors import InvalidRequest

            raise InvalidRequest("compile", f"must be true or false, got {self.compile!r}")


def quiet_libraries() -> None:
    """Our own progress events replace the libraries' progress bars and log chatter."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


class Engine:
    """One warm model per process; `generate` is safe to call from one worker thread."""

    def __init__(self, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self._loaded = None
        self._loaded_spec: Optional[str] = None
        # Held while a job uses the warm model: generate here, edits in methods/editing.py.
        self.lock = threading.Lock()
        self._device = None
        self.compile_seconds: Optional[float] = None  # the last load's compile warm-up (--compile)
        if self.settings.compile:  # fail at start-up, not at the first job's first step
            from .compilation import check_compile_support

            check_compile_support(self.device)

    # -- models -------------------------------------------------------------------------
    @property
    def device(self):
        if self._device is None:
            from .devices import select_device

            self._device = select_device(self.settings.device)
        return self._device

    @property
    def loaded_model(self) -> Optional[str]:
        return self._loaded_spec

    def load(self, model: str, progress: ProgressCallback = ignore_progress,
             cancel: CancelToken | None = None):
        """Return the loaded model for `model`, loading it (and freeing the previous) if needed."""
        if self._loaded is not None and self._loaded_spec == model:
            return self._loaded
        from .devices import run_dtype
        from .models import load_model, resolve_model

        self.unload()
        quiet_libraries()
        resolved = resolve_model(model, models_dir=self.settings.models_dir,
                                 allow_download=self.settings.allow_download,
                                 progress=progress, cancel=cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
        progress(Progress(phase="load", message=f"loading {model}"))
        self._loaded = load_model(resolved, self.device, run_dtype(self.device, self.settings.dtype),
                                  offload=self.settings.offload, vae_tiling=self.settings.vae_tiling)
        self._loaded.max_batch = self.settings.max_batch
        self._loaded.lean_activations = self.settings.lean_activations
        if self.settings.compile:
            from .compilation import compile_loaded_unet

            self.compile_seconds = compile_loaded_unet(self._loaded.pipeline.unet, self.device, progress)
        self._loaded_spec = model
        return self._loaded

    def unload(self) -> None:
        """Free the warm model before another is loaded (GPU memory is the scarce thing)."""
        if self._loaded is None:
            return
        self._loaded = None
        self._loaded_spec = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- generation and editing ----------------------------------------------------------
    def generate(self, request: StackRequest, model: str, out_dir: Path, *,
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                 export_psd: bool = False, export_ora: bool = False, export_exr: bool = False):
        """Generate `request` with `model` and write the stack to `out_dir` (must not exist).

        Returns the written LayerStack. On cancel or error nothing is left at `out_dir`.
        """
        from .methods import run_method

        request = request.validated()
        out_dir = _new_stack_dir(out_dir)
        return self._run(request, model, out_dir, lambda loaded, progress, cancel: run_method(
            loaded, request, progress=progress, cancel=cancel), progress, cancel,
            exports=dict(export_psd=export_psd, export_ora=export_ora, export_exr=export_exr))

    def regenerate(self, stack_dir, layer_index: int, out_dir, *, new_prompt: Optional[str] = None,
                   new_seed: Optional[int] = None, model: Optional[str] = None, tta_passes: int = 8,
                   inter_layer_strength: float = 0.3, mask_guidance: float = 0.5,
                   progress: ProgressCallback | None = None, cancel: CancelToken | None = None):
        """Regenerate layer `layer_index` (0 = background) of the stack at `stack_dir` into the
        new stack `out_dir`; the other layers' files are byte-identical copies."""
        from .methods.editing import SourceStack, keep_byte_identical, regenerate_layers, regenerate_request

        out_dir = _new_stack_dir(out_dir)
        source = SourceStack.load(stack_dir)
        request = regenerate_request(source, layer_index, new_prompt, new_seed, tta_passes=tta_passes,
                                     inter_layer_strength=inter_layer_strength, mask_guidance=mask_guidance)
        written = self._run(request, model or source.model_spec(), out_dir,
                            lambda loaded, progress, cancel: regenerate_layers(
                                loaded, source, request, layer_index, progress=progress, cancel=cancel),
                            progress, cancel, source=source.stack)
        kept = [layer.file for i, layer in enumerate(written.layers) if i != layer_index]
        kept += [layer.mask for i, layer in enumerate(written.layers)
                 if i not in (0, layer_index) and layer.mask is not None]
        keep_byte_identical(source.folder, out_dir, kept)
        return written

    def restyle(self, stack_dir, style: str, out_dir, *, model: Optional[str] = None, tta_passes: int = 8,
                inter_layer_strength: float = 0.3, mask_guidance: float = 0.8,
                progress: ProgressCallback | None = None, cancel: CancelToken | None = None):
        """Every layer of the stack again with `style` added to its prompt, same layout, into
        the new stack `out_dir`."""
        from .methods.editing import SourceStack, restyle_layers, restyle_request
        from .request import validate_prompt

        validate_prompt("style", style, required=True)
        out_dir = _new_stack_dir(out_dir)
        source = SourceStack.load(stack_dir)
        request = restyle_request(source, style, tta_passes=tta_passes,
                                  inter_layer_strength=inter_layer_strength, mask_guidance=mask_guidance)
        return self._run(request, model or source.model_spec(), out_dir,
                         lambda loaded, progress, cancel: restyle_layers(
                             loaded, source, request, progress=progress, cancel=cancel),
                         progress, cancel, source=source.stack)

    def extend(self, stack_dir, margins, out_dir, *, model: Optional[str] = None, tta_passes: int = 8,
               inter_layer_strength: float = 0.3, mask_guidance: float = 0.5,
               progress: ProgressCallback | None = None, cancel: CancelToken | None = None):
        """Grow every layer of the stack at `stack_dir` so that `margins` (left, top, right,
        bottom: fractions of its frame) fit around the same frame, into the new stack
        `out_dir` (outpainting, one joint run); the old pixels stay as they were."""
        from .methods.editing import SourceStack, extend_layers, extend_request

        out_dir = _new_stack_dir(out_dir)
        source = SourceStack.load(stack_dir)
        request, offset = extend_request(source, margins, tta_passes=tta_passes,
                                         inter_layer_strength=inter_layer_strength, mask_guidance=mask_guidance)
        shot = {"extended_from": {"name": source.stack.name, "created": source.stack.created,
                                  "width": source.stack.width, "height": source.stack.height,
                                  "offset": list(offset)},
                "margins": [float(m) for m in margins]}
        return self._run(request, model or source.model_spec(), out_dir,
                         lambda loaded, progress, cancel: extend_layers(
                             loaded, source, request, offset, progress=progress, cancel=cancel),
                         progress, cancel, source=source.stack, shot=shot)

    def _run(self, request: StackRequest, model: str, out_dir: Path, make_layers, progress, cancel, *,
             exports: Optional[dict] = None, source=None, shot: Optional[dict] = None):
        """Load `model`, make the layers, write the stack: the one path every job takes.

        `source` (edits): the stack edited, whose background name carries over (its depths,
        foreground names and stack name come through the request, like a new stack's);
        `shot`: provenance recorded in the stack (an extension's source and margins).
        """
        progress = progress or ignore_progress
        cancel = cancel or CancelToken()
        with self.lock:
            t0 = time.perf_counter()
            loaded = self.load(model, progress, cancel)
            use_family(loaded.family)  # the live previews' latent → RGB map
            t_load = time.perf_counter() - t0
            cancel.raise_if_cancelled()
            result = make_layers(loaded, progress, cancel)
            cancel.raise_if_cancelled()
            progress(Progress(phase="save", layers=1 + len(request.layers)))
            timings = {"load": t_load, **result.timings, "total": time.perf_counter() - t0}
            stack = stack_manifest(request, out_dir, loaded.describe(), result.seeds, timings, source, shot)
            from .stack import write_stack

            return write_stack(out_dir, stack, result.background, result.foregrounds, masks=result.masks,
                               blended=result.blended, cancel=cancel, **(exports or {}))


def _new_stack_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        from .errors import InvalidRequest

        raise InvalidRequest("out", f"{out_dir} already exists; choose a new folder")
    return out_dir


def stack_manifest(request: StackRequest, out_dir: Path, model: dict, seeds: list[int], timings: dict,
                   source=None, shot: Optional[dict] = None):
    """The LayerStack to write for `request` (file names are the stack writer's to fill in):
    names, depths, boxes (frame coordinates) and the frame come from the request, so what a
    client asks for is what the stack says. `source`: the stack an edit started from (its
    background's name carries over); `shot`: provenance recorded as the stack's `shot`."""
    from .stack import LayerStack, StackLayer, layer_name

    background = source.layers[0].name if source is not None else layer_name(0)
    layers = [StackLayer(name=background, kind="background", prompt=request.background,
                         seed=seeds[0], depth=request.background_depth)]
    for i, spec in enumerate(request.layers, start=1):
        layers.append(StackLayer(name=spec.name or layer_name(i), kind="foreground", prompt=spec.prompt,
                                 seed=seeds[i], box=list(spec.box) if spec.box else None,
                                 depth=spec.depth))
    return LayerStack(name=request.name or out_dir.name, method=request.method, width=request.width,
                      height=request.height, prompt=request.prompt, negative_prompt=request.negative_prompt,
                      seed=request.seed, steps=request.steps, guidance=float(request.guidance), model=model,
                      layers=layers, timings={k: round(v, 4) for k, v in timings.items()},
                      frame=request.frame, shot=shot)
