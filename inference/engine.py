"""The engine: keeps one model warm and turns a StackRequest into a layer stack on disk.

Front ends (CLI, HTTP server, benchmarks) all go through `Engine.generate`; methods in
`inference/methods/` produce pixels, this module owns loading, timing and writing.
"""
from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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


@dataclass
class GeneratedLayers:
    """What a method returns: uint8 arrays, back to front, plus per-layer facts."""

    background: "object"  # np.ndarray (H, W, 3) uint8
    foregrounds: list = field(default_factory=list)  # np.ndarray (H, W, 4) uint8, straight alpha
    seeds: list[int] = field(default_factory=list)  # background first
    masks: Optional[list] = None
    blended: Optional[object] = None
    timings: dict = field(default_factory=dict)


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
        from .devices import default_dtype
        from .models import load_model, resolve_model

        self.unload()
        quiet_libraries()
        resolved = resolve_model(model, models_dir=self.settings.models_dir,
                                 allow_download=self.settings.allow_download,
                                 progress=progress, cancel=cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
        progress(Progress(phase="load", message=f"loading {model}"))
        self._loaded = load_model(resolved, self.device, default_dtype(self.device),
                                  offload=self.settings.offload, vae_tiling=self.settings.vae_tiling)
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

    # -- generation ---------------------------------------------------------------------
    def generate(self, request: StackRequest, model: str, out_dir: Path, *,
                 progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                 export_psd: bool = False, export_ora: bool = False):
        """Generate `request` with `model` and write the stack to `out_dir` (must not exist).

        Returns the written LayerStack. On cancel or error nothing is left at `out_dir`.
        """
        from .methods import run_method
        from .stack import LayerStack, StackLayer, write_stack

        request = request.validated()
        progress = progress or ignore_progress
        cancel = cancel or CancelToken()
        out_dir = Path(out_dir)
        if out_dir.exists():
            from .errors import InvalidRequest

            raise InvalidRequest("out", f"{out_dir} already exists; choose a new folder")
        with self.lock:
            t0 = time.perf_counter()
            loaded = self.load(model, progress, cancel)
            t_load = time.perf_counter() - t0
            cancel.raise_if_cancelled()
            result = run_method(loaded, request, progress=progress, cancel=cancel)
            cancel.raise_if_cancelled()

            progress(Progress(phase="save", layers=1 + len(request.layers)))
            layers = [StackLayer(name="background", kind="background", prompt=request.background,
                                 seed=result.seeds[0], file="background.png")]
            for i, spec in enumerate(request.layers, start=1):
                layers.append(StackLayer(
                    name=spec.name or f"layer_{i:02d}", kind="foreground", prompt=spec.prompt,
                    seed=result.seeds[i], file=f"layer_{i:02d}.png",
                    box=list(spec.box) if spec.box else None,
                    mask=f"mask_{i:02d}.png" if result.masks else None))
            timings = {"load": t_load, **result.timings, "total": time.perf_counter() - t0}
            timings = {k: round(v, 4) for k, v in timings.items()}
            stack = LayerStack(
                name=request.name or out_dir.name, method=request.method,
                width=request.width, height=request.height, prompt=request.prompt,
                negative_prompt=request.negative_prompt, seed=request.seed, steps=request.steps,
                guidance=float(request.guidance), model=loaded.describe(), layers=layers,
                timings=timings)
            stack = write_stack(out_dir, stack, result.background, result.foregrounds,
                                masks=result.masks, blended=result.blended,
                                export_psd=export_psd, export_ora=export_ora, cancel=cancel)
            return stack
