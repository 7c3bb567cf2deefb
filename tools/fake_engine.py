"""A stand-in for `inference.engine.Engine` with the same interface and no torch.

For fast tests of the queue and the HTTP layer (and API fuzzing), where a real model would
only add minutes. It reports progress like the engine, in the shape the request's method
declares (`inference.methods.work_plan`: denoise steps per layer or all layers at once,
decodes, save), honours the CancelToken at every step, and writes a small but valid stack folder
atomically (temp folder, then rename). Tests that need real pixels use the real engine
with the `tiny` model.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional

from inference.errors import Cancelled, InvalidRequest
from inference.methods import work_plan
from inference.progress import CancelToken, Progress, ignore_progress
from inference.request import StackRequest


FAKE_FRAME_COLOUR = (40, 80, 120)  # the fake background inside the camera frame
FAKE_MARGIN_COLOUR = (20, 40, 60)  # ... and in the margins around it


def frame_pixels(frame, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalized frame rectangle as whole pixels (x0, y0, x1, y1), rounded to the nearest."""
    x0, y0, x1, y1 = frame
    return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)


class FakeEngine:
    """`generate` sleeps `step_seconds` per denoising step; `fail_with` makes it raise."""

    def __init__(self, step_seconds: float = 0.0, fail_with: Optional[BaseException] = None):
        self.step_seconds = step_seconds
        self.fail_with = fail_with
        self.loaded_model: Optional[str] = None
        self.device = "cpu"
        self.calls: list[str] = []  # request prompts, in the order generated
        self._lock = threading.Lock()

    def unload(self) -> None:
        self.loaded_model = None

    def generate(self, request: StackRequest, model: str, out_dir: Path, *, progress=None,
                 cancel: Optional[CancelToken] = None, export_psd: bool = False,
                 export_ora: bool = False, export_exr: bool = False):
        request = request.validated()
        progress = progress or ignore_progress
        cancel = cancel or CancelToken()
        out_dir = Path(out_dir)
        if out_dir.exists():
            raise InvalidRequest("out", f"{out_dir} already exists")
        with self._lock:
            self.calls.append(request.prompt)
            if self.loaded_model != model:
                progress(Progress(phase="load", message=f"loading {model}"))
                self.loaded_model = model
            plan = work_plan(request)
            if plan.joint:
                self._denoise(plan.runs * plan.steps, None, plan.layers, progress, cancel)
            for layer in range(plan.layers):
                if not plan.joint:
                    self._denoise(plan.steps, layer, plan.layers, progress, cancel)
                progress(Progress(phase="decode", step=1, total=1, layer=layer, layers=plan.layers))
            cancel.raise_if_cancelled()
            progress(Progress(phase="save", layers=plan.layers))
            return self._write(request, model, out_dir, dict(export_psd=export_psd, export_ora=export_ora,
                                                                 export_exr=export_exr), cancel)

    def extend(self, stack_dir, margins, out_dir, *, model: Optional[str] = None, tta_passes: int = 8,
               progress=None, cancel: Optional[CancelToken] = None, **_settings):
        """`Engine.extend`'s shape: the planned larger canvas (margins refused as the engine
        refuses them), the old pixels pasted at their offset, the new margins flat-coloured."""
        import dataclasses

        import numpy as np

        from inference.methods import edit_plan
        from inference.request import extension_plan
        from inference.stack import load_layer_images, load_stack, write_stack

        progress = progress or ignore_progress
        cancel = cancel or CancelToken()
        out_dir = Path(out_dir)
        if out_dir.exists():
            raise InvalidRequest("out", f"{out_dir} already exists")
        source = load_stack(stack_dir)
        plan, (ox, oy) = extension_plan("margins", source.width, source.height, source.frame, margins)
        with self._lock:
            work = edit_plan(len(source.layers), source.steps)
            self._denoise(work.steps, None, work.layers, progress, cancel)
            progress(Progress(phase="save", layers=work.layers))
            images = []
            for image in load_layer_images(source, stack_dir):
                grown = np.zeros((plan.height, plan.width, image.shape[2]), np.uint8)
                grown[..., :3] = FAKE_MARGIN_COLOUR
                grown[oy:oy + source.height, ox:ox + source.width] = image
                images.append(grown)
            stack = dataclasses.replace(
                source, width=plan.width, height=plan.height, frame=plan.frame, created="", timings={},
                shot={"extended_from": {"name": source.name, "offset": [ox, oy]}, "margins": list(margins)})
            return write_stack(out_dir, stack, images[0], images[1:], cancel=cancel)

    def _denoise(self, steps: int, layer: Optional[int], layers: int, progress, cancel) -> None:
        """One denoising run, as the methods report it (layer None: all layers at once)."""
        progress(Progress(phase="denoise", step=0, total=steps, layer=layer, layers=layers))
        for step in range(steps):
            if self.step_seconds:
                time.sleep(self.step_seconds)
            if cancel.cancelled:
                raise Cancelled(cancel.reason)
            progress(Progress(phase="denoise", step=step + 1, total=steps, layer=layer, layers=layers))
        if self.fail_with is not None:
            raise self.fail_with

    def _write(self, request: StackRequest, model: str, out_dir: Path, exports: dict, cancel: CancelToken):
        """A flat-coloured but valid stack, through the real atomic writer. The request's
        frame is recorded and painted: the margins around it are a darker background."""
        import numpy as np

        from inference.engine import stack_manifest
        from inference.prompts import layer_seeds
        from inference.stack import write_stack

        h, w = request.height, request.width
        background = np.full((h, w, 3), FAKE_MARGIN_COLOUR, dtype=np.uint8)
        x0, y0, x1, y1 = frame_pixels(request.frame or (0.0, 0.0, 1.0, 1.0), w, h)
        background[y0:y1, x0:x1] = FAKE_FRAME_COLOUR
        foregrounds = [np.full((h, w, 4), (200, 50, 50, 128), dtype=np.uint8)
                       for _ in request.layers]
        stack = stack_manifest(request, out_dir, {"preset": model, "base": "fake", "files": {}},
                               layer_seeds(request), timings={})
        return write_stack(out_dir, stack, background, foregrounds, cancel=cancel, **exports)


class BrokenEngine(FakeEngine):
    """Raises an unexpected (non-Multiplane) error: the server must survive it."""

    def __init__(self):
        super().__init__(fail_with=RuntimeError("simulated crash"))


