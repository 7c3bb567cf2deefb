"""The worker side of the job service: a lane (a FIFO of jobs and the thread that runs them
one at a time) and what running a job means for the engine, the model store and the output
folder. `jobs.JobManager` owns the lanes and all bookkeeping; nothing here takes its lock.
"""
from __future__ import annotations

import collections
import logging
import shutil
import threading
import traceback
from pathlib import Path
from typing import Callable, Optional

from inference.errors import Cancelled, MultiplaneError
from inference.progress import CancelToken, ProgressCallback, WorkPlan

from .progress import ByteCounter

log = logging.getLogger("multiplane.server")


class Lane:
    """A FIFO of jobs and the worker threads that run them, one job per worker at a time.

    One worker per engine (one engine per device, each with its own warm model): the head of
    the queue goes to the first free worker (lowest index), so jobs start in arrival order.
    `run(job, worker)` runs a job; the lane's condition shares the job service's lock.
    """

    def __init__(self, name: str, lock: threading.Lock, run: Callable, engines=(None,)):
        self.name = name
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition(lock)
        self.run = run
        self.closing = False
        self.workers = [Worker(self, i, engine) for i, engine in enumerate(engines)]

    def start(self) -> None:
        for worker in self.workers:
            worker.thread.start()

    def running(self) -> list:
        """The jobs the workers are on now (lock held)."""
        return [w.current for w in self.workers if w.current is not None]

    def first_free(self) -> Optional["Worker"]:
        return next((w for w in self.workers if w.current is None), None)


class Worker:
    """One thread of a lane, bound to one engine (and so to one device)."""

    def __init__(self, lane: Lane, index: int, engine):
        self.lane = lane
        self.index = index
        self.engine = engine
        self.device = str(getattr(engine, "device", "")) if engine is not None else ""
        self.current = None  # the job being run
        self.thread = threading.Thread(target=self._loop, name=f"multiplane-{lane.name}-{index}", daemon=True)

    def _loop(self) -> None:
        lane = self.lane
        while True:
            with lane.cond:
                while not lane.closing and not (lane.queue and lane.first_free() is self):
                    lane.cond.wait()
                if lane.closing:
                    return
                job = lane.queue.popleft()
                self.current = job
                lane.cond.notify_all()  # the next free worker may take the next job
            try:
                lane.run(job, self)
            finally:
                with lane.cond:
                    self.current = None
                    lane.cond.notify_all()


def generation_plan(job, output_root: Path) -> WorkPlan:
    """The declared work of a generate, regenerate or extend job (`jobs.Job`), for its
    fraction (an extension decodes every layer, like a restyle)."""
    from inference.methods import edit_plan, work_plan

    if job.kind not in ("regenerate", "extend"):
        return work_plan(job.request)
    from inference.stack import load_stack

    source = load_stack(output_root / job.source, check_images=False)
    return edit_plan(len(source.layers), source.steps, job.edit.layer_index if job.kind == "regenerate" else None)


def generate_stack(engine, job, output_root: Path, progress: ProgressCallback) -> Path:
    """Run a generate, regenerate or extend job (`jobs.Job`) on the engine; returns its new stack
    folder. On failure no half-written folder is left behind."""
    out_dir = output_root / job.id
    try:
        if job.kind == "regenerate":
            edit = job.edit
            engine.regenerate(output_root / job.source, edit.layer_index, out_dir, new_prompt=edit.prompt,
                              new_seed=edit.seed, tta_passes=edit.tta_passes, progress=progress,
                              cancel=job.cancel)
        elif job.kind == "extend":
            engine.extend(output_root / job.source, tuple(job.edit.margins), out_dir,
                          tta_passes=job.edit.tta_passes, progress=progress, cancel=job.cancel)
        else:
            engine.generate(job.request, job.model, out_dir, progress=progress, cancel=job.cancel,
                            export_psd=job.body.export_psd, export_ora=job.body.export_ora,
                            export_exr=job.body.export_exr)
    except BaseException:
        if out_dir.exists() and not (out_dir / "stack.json").is_file():
            shutil.rmtree(out_dir, ignore_errors=True)  # never leave half a stack
        raise
    return out_dir


def download_model(model: str, models_dir: Optional[Path], progress: ProgressCallback,
                   cancel: CancelToken) -> None:
    """Fetch whatever a preset still misses (and build the tiny model); loading is left to
    the next generation job."""
    from inference.models import preset_availability, resolve_model

    expected = next((int(m.get("download_bytes") or 0) for m in preset_availability(models_dir)
                     if m.get("name") == model), 0)
    resolve_model(model, models_dir=models_dir, allow_download=True,
                  progress=ByteCounter(expected, progress), cancel=cancel)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__


def failure(job_id: str, cancel: CancelToken, exc: BaseException) -> tuple[str, str]:
    """(status, error message) of a job that raised `exc`; unexpected errors are logged."""
    if isinstance(exc, Cancelled) or (cancel.cancelled and not isinstance(exc, MultiplaneError)):
        return "cancelled", cancel.reason
    if isinstance(exc, MultiplaneError):
        return "failed", str(exc)
    if is_out_of_memory(exc):
        return "failed", (f"out of memory ({type(exc).__name__}: {str(exc)[:300]}); try a smaller "
                          f"size, fewer layers or fewer steps")
    log.error("job %s failed unexpectedly:\n%s", job_id, "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return "failed", f"internal error: {type(exc).__name__}: {exc}"
