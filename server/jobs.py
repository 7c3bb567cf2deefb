"""Jobs: the queue between the HTTP handlers and the engine.

One worker thread runs generation jobs one at a time (the device is the scarce thing and
the engine keeps one model warm); a second worker runs model downloads so a long download
does not hold up generation. Handlers never touch the engine: they submit, read snapshots,
cancel and subscribe here.

Every state change bumps the job's `version` and hands a snapshot (a plain dict shaped like
`schemas.JobOut`) to the job's subscribers, from whichever thread made the change; the
subscribers (server-sent event streams) must not block and must not modify it (parts are shared).
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import re
import secrets
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from inference.errors import Cancelled, MultiplaneError
from inference.progress import CancelToken, Progress

from .schemas import TERMINAL_STATES, JobCreate, RegenerateIn

log = logging.getLogger("multiplane.server")

DEFAULT_MAX_QUEUE = 32
DEFAULT_RETENTION = 100
DEFAULT_HISTORY = 200

# Overall progress of a generation job (`fraction`): every layer (background and each
# foreground) gets an equal share of the work; denoising counts DENOISE_SHARE of it and
# decoding the rest. Methods that denoise layer by layer (`independent`) report a `layer`
# with each step; methods that denoise all layers together (`joint`, `harmonized`) report
# steps with layer None, then decode layer by layer. Loading counts nothing (once per
# model, not per job); saving starts at SAVE_START; 1.0 only once the job has succeeded.
DENOISE_SHARE = 0.85
SAVE_START = 0.97

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ServiceError(Exception):
    """An error the API answers with `status_code` and `detail` as is."""

    status_code = 400

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code = 404


class QueueFull(ServiceError):
    status_code = 429


class Conflict(ServiceError):
    status_code = 409


class ShuttingDown(ServiceError):
    status_code = 503


def iso_time(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def overall_fraction(p: Progress, joint: bool = False) -> float:
    """The whole generation job's share done, 0..1, for one progress report.

    `joint`: the job's denoising covers all layers at once (it reported a step with layer
    None), so decoding layer k comes after every layer's denoising.
    """
    if p.phase == "save":
        return SAVE_START
    if p.phase not in ("denoise", "decode"):
        return 0.0
    layers = max(p.layers, 1)
    part = min(max((p.step / p.total) if p.total else 0.0, 0.0), 1.0)
    if p.phase == "denoise" and p.layer is None:
        return SAVE_START * DENOISE_SHARE * part
    layer = min(max(p.layer or 0, 0), layers - 1)
    if joint:  # decode after a joint denoise
        value = DENOISE_SHARE + (1 - DENOISE_SHARE) * (layer + part) / layers
    elif p.phase == "denoise":
        value = (layer + DENOISE_SHARE * part) / layers
    else:
        value = (layer + DENOISE_SHARE + (1 - DENOISE_SHARE) * part) / layers
    return min(SAVE_START * value, SAVE_START)


class GenerationFraction:
    """`overall_fraction` for one job, remembering whether its denoising was joint."""

    def __init__(self) -> None:
        self.joint = False

    def __call__(self, p: Progress) -> float:
        if p.phase == "denoise" and p.layer is None:
            self.joint = True
        return overall_fraction(p, joint=self.joint)


def download_fraction(p: Progress) -> float:
    return min(max(p.step / p.total, 0.0), 1.0) if p.total else 0.0


def stack_manifest(stack_dir: Path) -> tuple[str, list[str]]:
    """(display name, file names) of a stack folder, from its stack.json.

    Only plain file names are returned; anything with a path separator or a leading dot is
    left out, so the file endpoint can never be steered outside the folder by a manifest.
    """
    data = json.loads((stack_dir / "stack.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != "multiplane.stack":
        raise ValueError(f"{stack_dir / 'stack.json'} is not a multiplane stack manifest")
    names = ["stack.json"]
    for layer in data.get("layers") or []:
        if isinstance(layer, dict):
            names += [layer.get("file"), layer.get("mask")]
    names += [data.get("composite"), data.get("blended")]
    names += list(data.get("exports") or [])
    files: list[str] = []
    for name in names:
        if isinstance(name, str) and is_plain_file_name(name) and name not in files:
            files.append(name)
    return str(data.get("name") or stack_dir.name), files


def is_plain_file_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name \
        and "\x00" not in name and name not in (".", "..")


def _stack_created(stack_dir: Path) -> float:
    try:
        created = json.loads((stack_dir / "stack.json").read_text(encoding="utf-8")).get("created")
        return datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
    except Exception:  # an old or hand-made manifest: the folder's time is good enough
        return (stack_dir / "stack.json").stat().st_mtime


def _cleanup_temp(root: Path) -> None:
    """Remove half-written stacks (the engine's hidden temp folders) under `root`."""
    from inference.stack import cleanup_temp

    cleanup_temp(root)


@dataclass(eq=False)
class Job:
    id: str
    kind: str  # "generate", "regenerate" or "download"
    created: float
    body: Optional[JobCreate] = None
    edit: Optional[RegenerateIn] = None
    source: Optional[str] = None  # regenerate: the job whose stack is edited
    model: Optional[str] = None
    status: str = "queued"
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    progress: Optional[Progress] = None
    fraction: float = 0.0
    eta_seconds: Optional[float] = None
    cancel: CancelToken = field(default_factory=CancelToken)
    stack_dir: Optional[Path] = None
    stack_name: Optional[str] = None
    files: list[str] = field(default_factory=list)
    version: int = 0
    position: Optional[int] = None
    # the first moment real work (denoise/decode/download bytes) was reported, for the ETA
    work_start: Optional[tuple[float, float]] = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATES

    @functools.cached_property
    def request_dump(self) -> Optional[dict]:
        """The request as JSON-ready data, built once (it never changes; snapshots are many)."""
        if self.body is not None:
            return self.body.model_dump()
        if self.edit is not None:
            return {"source": self.source, **self.edit.model_dump()}
        return None


Subscriber = Callable[[Optional[dict]], None]


class _ByteCounter:
    """Per-file byte reports (the hub reports each file from 0) → one running total."""

    def __init__(self, expected: int, forward: Callable[[Progress], None]):
        self.expected = expected
        self.forward = forward
        self.done: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def __call__(self, p: Progress) -> None:
        if p.phase != "download":
            self.forward(p)
            return
        self.done[p.message] = p.step
        self.totals[p.message] = p.total
        total = max(self.expected, sum(self.totals.values()))
        self.forward(Progress(phase="download", step=sum(self.done.values()), total=total,
                              message=p.message))


class _Lane:
    """A FIFO of jobs and the thread that runs them one at a time."""

    def __init__(self, name: str, lock: threading.Lock, run: Callable[[Job], None]):
        self.name = name
        self.queue: collections.deque[Job] = collections.deque()
        self.current: Optional[Job] = None
        self.cond = threading.Condition(lock)
        self.run = run
        self.thread = threading.Thread(target=self._loop, name=f"multiplane-{name}", daemon=True)
        self.closing = False

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if self.closing:
                    return
                job = self.queue.popleft()
                self.current = job
            try:
                self.run(job)
            finally:
                with self.cond:
                    self.current = None


class JobManager:
    """Owns every job, the two lanes (generation, downloads) and the output folder."""

    def __init__(self, engine, output_root: Path, *, models_dir: Optional[Path] = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, retention: int = DEFAULT_RETENTION,
                 history: int = DEFAULT_HISTORY):
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if retention < 1:
            raise ValueError("retention must be at least 1")
        self.engine = engine
        self.output_root = Path(output_root)
        self.models_dir = Path(models_dir) if models_dir else None
        self.max_queue = max_queue
        self.retention = retention
        self.history = history
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._generate = _Lane("generate", self._lock, self._run_generate)
        self._download = _Lane("download", self._lock, self._run_download)
        self._closing = False
        self._started = False
        self._last_created = 0.0

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Clean half-written stacks, list the finished ones as jobs, start the workers."""
        self.output_root.mkdir(parents=True, exist_ok=True)
        _cleanup_temp(self.output_root)
        self.restore()
        self._apply_retention()  # the limit may have been lowered since the last run
        self._generate.thread.start()
        self._download.thread.start()
        self._started = True

    def restore(self) -> int:
        """Finished stacks already under the output root become succeeded jobs (id = folder)."""
        from inference.stack import list_stacks

        restored = 0
        for entry, stack in list_stacks(self.output_root):  # valid stacks only
            if not JOB_ID_PATTERN.match(entry.name) or entry.name in self._jobs:
                continue
            try:
                name, files = stack_manifest(entry)
                created = _stack_created(entry)
            except (OSError, ValueError) as exc:
                log.warning("not listing %s: %s", entry, exc)
                continue
            job = Job(id=entry.name, kind="generate", created=created, status="succeeded",
                      started=created, finished=created, fraction=1.0, stack_dir=entry,
                      stack_name=name or stack.name, files=files)
            self._jobs[job.id] = job
            restored += 1
        return restored

    def begin_shutdown(self, reason: str = "server shutting down") -> None:
        """Refuse new jobs, cancel queued ones and ask the running ones to stop."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            for lane in (self._generate, self._download):
                while lane.queue:
                    job = lane.queue.pop()
                    self._finish(job, "cancelled", error=reason)
                if lane.current is not None:
                    lane.current.cancel.cancel(reason)
                    self._changed(lane.current)
                lane.closing = True
                lane.cond.notify_all()

    def close(self, timeout: float = 1.5) -> bool:
        """Shut down and wait up to `timeout` s for the workers; True when both stopped."""
        self.begin_shutdown()
        deadline = time.monotonic() + timeout
        stopped = True
        for lane in (self._generate, self._download):
            if lane.thread.is_alive():
                lane.thread.join(max(0.0, deadline - time.monotonic()))
                stopped = stopped and not lane.thread.is_alive()
        with self._lock:
            subscribers = [cb for cbs in self._subscribers.values() for cb in cbs]
        for cb in subscribers:  # streams still open end now
            cb(None)
        return stopped

    # -- submitting ---------------------------------------------------------------------
    def submit(self, body: JobCreate) -> dict:
        """Queue a generation job; raises InvalidRequest (bad body) or QueueFull."""
        body.to_stack_request()  # the engine's own validation, before anything is queued
        with self._lock:
            self._check_open()
            if len(self._generate.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); "
                                f"wait for a job to finish or cancel one")
            job = Job(id=self._new_id(), kind="generate", created=self._now(), body=body,
                      model=body.model)
            return self._enqueue(self._generate, job)

    def submit_regenerate(self, source_id: str, edit: RegenerateIn) -> dict:
        """Queue regenerating one layer of a finished stack (a new job, a new stack folder)."""
        from inference.errors import InvalidRequest

        if edit.prompt is None and edit.seed is None:
            raise InvalidRequest("prompt", "give a new prompt and/or a new seed for the layer")
        with self._lock:
            self._check_open()
            source = self._job(source_id)
            if source.status != "succeeded" or source.stack_dir is None:
                raise Conflict(f"job {source_id} has no finished stack to edit (status {source.status})")
            foregrounds = sum(1 for f in source.files if f.startswith("layer_") and f.endswith(".png"))
            if edit.layer_index > foregrounds:
                raise InvalidRequest("layer_index", f"must be 0 (background) .. {foregrounds} for this "
                                                    f"stack, got {edit.layer_index}")
            if len(self._generate.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); "
                                f"wait for a job to finish or cancel one")
            job = Job(id=self._new_id(), kind="regenerate", created=self._now(), edit=edit,
                      source=source_id, model=source.model)
            return self._enqueue(self._generate, job)

    def submit_download(self, model: str) -> dict:
        """Queue a download of a preset's weights; raises NotFound for an unknown preset."""
        from inference.models import preset_names

        if model not in preset_names():
            raise NotFound(f"unknown model {model!r}; choose one of {', '.join(preset_names())}")
        with self._lock:
            self._check_open()
            if len(self._download.queue) >= self.max_queue:
                raise QueueFull(f"the download queue is full ({self.max_queue} waiting)")
            for other in (*self._download.queue, self._download.current):
                if other is not None and other.model == model:
                    return self._snapshot(other)  # already on its way
            job = Job(id=self._new_id(), kind="download", created=self._now(), model=model)
            return self._enqueue(self._download, job)

    def _check_open(self) -> None:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if not self._started:
            raise ShuttingDown("the server is not started yet")

    def _now(self) -> float:
        """Creation time, strictly increasing (so sorting by it is sorting by arrival)."""
        self._last_created = max(time.time(), self._last_created + 2e-6)
        return self._last_created

    def _new_id(self) -> str:
        while True:
            job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
            if job_id not in self._jobs and not (self.output_root / job_id).exists():
                return job_id

    def _enqueue(self, lane: _Lane, job: Job) -> dict:
        self._jobs[job.id] = job
        lane.queue.append(job)
        job.position = len(lane.queue) - 1 + (1 if lane.current is not None else 0)
        self._changed(job)
        lane.cond.notify()
        self._prune_history()
        return self._snapshot(job)

    # -- reading ------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        with self._lock:
            return self._snapshot(self._job(job_id))

    def list(self, limit: int = 100) -> list[dict]:
        """Newest first."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: (j.created, j.id), reverse=True)
            return [self._snapshot(j) for j in jobs[:limit]]

    def queue_length(self) -> int:
        with self._lock:
            return len(self._generate.queue)

    def running_id(self) -> Optional[str]:
        with self._lock:
            job = self._generate.current
            return job.id if job is not None and job.status == "running" else None

    def file_path(self, job_id: str, name: str) -> Path:
        """The path of a file the job's stack lists; NotFound for anything else."""
        with self._lock:
            job = self._job(job_id)
            if job.status != "succeeded" or job.stack_dir is None:
                raise NotFound(f"job {job_id} has no stack (status {job.status})")
            if name not in job.files:
                raise NotFound(f"stack {job_id} has no file {name!r}")
            stack_dir = job.stack_dir
        path = stack_dir / name
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise NotFound(f"file {name!r} of stack {job_id} is gone from disk") from None
        if resolved.parent != stack_dir.resolve() or not resolved.is_file():
            raise NotFound(f"stack {job_id} has no file {name!r}")
        return resolved

    def subscribe(self, job_id: str, callback: Subscriber) -> tuple[dict, Callable[[], None]]:
        """(current snapshot, unsubscribe); `callback` gets every later snapshot, then None
        if the server closes first. It runs on the changing thread and must not block."""
        with self._lock:
            job = self._job(job_id)
            self._subscribers.setdefault(job_id, []).append(callback)
            snapshot = self._snapshot(job)

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._subscribers.get(job_id, [])
                if callback in callbacks:
                    callbacks.remove(callback)
                if not callbacks:
                    self._subscribers.pop(job_id, None)

        return snapshot, unsubscribe

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id) if JOB_ID_PATTERN.match(job_id or "") else None
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    # -- cancelling ---------------------------------------------------------------------
    def cancel(self, job_id: str) -> dict:
        """Cancel a queued job at once, or ask the running one to stop (within one step)."""
        with self._lock:
            job = self._job(job_id)
            if job.terminal:
                raise Conflict(f"job {job_id} already {job.status}")
            lane = self._download if job.kind == "download" else self._generate
            if job.status == "queued":
                # still waiting (or just taken by the worker, which then skips it)
                if job in lane.queue:
                    lane.queue.remove(job)
                self._finish(job, "cancelled", error="cancelled by the client")
                self._update_positions(lane)
            else:
                job.cancel.cancel("cancelled by the client")
                self._changed(job)
            return self._snapshot(job)

    # -- running (worker threads) -------------------------------------------------------
    def _start(self, job: Job, lane: _Lane) -> bool:
        with self._lock:
            if job.terminal:
                return False
            job.status = "running"
            job.started = time.time()
            job.position = 0
            self._changed(job)
            self._update_positions(lane)
            return True

    def _progress_callback(self, job: Job, fraction_of: Callable[[Progress], float]):
        def on_progress(p: Progress) -> None:
            now = time.monotonic()
            with self._lock:
                job.progress = p
                job.fraction = max(job.fraction, min(fraction_of(p), 1.0))
                working = p.phase in ("denoise", "decode") or (p.phase == "download" and p.total)
                if working and job.work_start is None:
                    job.work_start = (now, job.fraction)
                if job.work_start is not None:
                    t0, f0 = job.work_start
                    done = job.fraction - f0
                    job.eta_seconds = round((1.0 - job.fraction) * (now - t0) / done, 2) \
                        if done > 0.005 and now > t0 else None
                self._changed(job)
        return on_progress

    def _run_generate(self, job: Job) -> None:
        if not self._start(job, self._generate):
            return
        out_dir = self.output_root / job.id
        progress = self._progress_callback(job, GenerationFraction())
        try:
            if job.kind == "regenerate":
                edit = job.edit
                assert edit is not None and job.source is not None
                self.engine.regenerate(self.output_root / job.source, edit.layer_index, out_dir,
                                       new_prompt=edit.prompt, new_seed=edit.seed, tta_passes=edit.tta_passes,
                                       progress=progress, cancel=job.cancel)
            else:
                body = job.body
                assert body is not None
                self.engine.generate(body.to_stack_request(), body.model, out_dir, progress=progress,
                                     cancel=job.cancel, export_psd=body.export_psd,
                                     export_ora=body.export_ora)
            name, files = stack_manifest(out_dir)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a job state
            self._fail(job, exc)
            if out_dir.exists() and not (out_dir / "stack.json").is_file():
                shutil.rmtree(out_dir, ignore_errors=True)  # never leave half a stack
            if not isinstance(exc, Exception):
                raise
            return
        # Make room first, so that when a client sees `succeeded` the folder is in its final
        # state (the oldest stacks beyond the limit are gone).
        self._apply_retention(keep=self.retention - 1)
        with self._lock:
            job.stack_dir, job.stack_name, job.files = out_dir, name, files
            job.fraction, job.eta_seconds = 1.0, 0.0
            self._finish(job, "succeeded")

    def _run_download(self, job: Job) -> None:
        if not self._start(job, self._download):
            return
        try:
            from inference.models import preset_availability, resolve_model

            expected = next((int(m.get("download_bytes") or 0)
                             for m in preset_availability(self.models_dir)
                             if m.get("name") == job.model), 0)
            # Resolving a preset with downloads allowed fetches whatever is missing (and
            # builds the tiny model); loading is left to the next generation job.
            resolve_model(job.model, models_dir=self.models_dir, allow_download=True,
                          progress=_ByteCounter(expected, self._progress_callback(job, download_fraction)),
                          cancel=job.cancel)
        except BaseException as exc:  # noqa: BLE001
            self._fail(job, exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            job.fraction, job.eta_seconds = 1.0, 0.0
            self._finish(job, "succeeded")

    def _fail(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, Cancelled) or (job.cancel.cancelled and not isinstance(exc, MultiplaneError)):
            status, message = "cancelled", job.cancel.reason
        elif isinstance(exc, MultiplaneError):
            status, message = "failed", str(exc)
        elif isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__:
            status = "failed"
            message = (f"out of memory ({type(exc).__name__}: {str(exc)[:300]}); try a smaller "
                       f"size, fewer layers or fewer steps")
            self._free_memory()
        else:
            status, message = "failed", f"internal error: {type(exc).__name__}: {exc}"
            log.error("job %s failed unexpectedly:\n%s", job.id, "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)))
        with self._lock:
            self._finish(job, status, error=message)

    def _free_memory(self) -> None:
        try:
            self.engine.unload()
        except Exception:  # noqa: BLE001 - best effort after an out-of-memory
            log.exception("unloading the model after an out-of-memory error failed")

    # -- bookkeeping (lock held) --------------------------------------------------------
    def _finish(self, job: Job, status: str, error: Optional[str] = None) -> None:
        job.status = status
        job.error = error
        job.finished = time.time()
        job.position = None
        if status != "succeeded":
            job.eta_seconds = None
        self._changed(job)

    def _update_positions(self, lane: _Lane) -> None:
        ahead = 1 if lane.current is not None and not lane.current.terminal else 0
        for i, queued in enumerate(lane.queue):
            if queued.position != i + ahead:
                queued.position = i + ahead
                self._changed(queued)

    def _changed(self, job: Job) -> None:
        job.version += 1
        callbacks = self._subscribers.get(job.id)
        if callbacks:
            snapshot = self._snapshot(job)
            for cb in list(callbacks):
                try:
                    cb(snapshot)
                except Exception:  # noqa: BLE001 - one broken stream must not stop the job
                    log.exception("a status subscriber of job %s failed", job.id)

    def _snapshot(self, job: Job) -> dict:
        p = job.progress
        progress: dict[str, Any] = {
            "phase": p.phase if p else None, "step": p.step if p else 0,
            "total": p.total if p else 0, "layer": p.layer if p else None,
            "layers": p.layers if p else 0, "message": p.message if p else "",
            "fraction": round(job.fraction, 4), "eta_seconds": job.eta_seconds,
        }
        stack = None
        if job.status == "succeeded" and job.stack_dir is not None:
            stack = {"name": job.stack_name or job.id, "path": str(job.stack_dir),
                     "files": list(job.files)}
        return {
            "id": job.id, "kind": job.kind, "status": job.status, "position": job.position,
            "model": job.model, "progress": progress, "error": job.error,
            "cancel_requested": job.cancel.cancelled and not job.terminal,
            "created": iso_time(job.created), "started": iso_time(job.started),
            "finished": iso_time(job.finished), "stack": stack,
            "request": job.request_dump,  # shared by all snapshots: they are read-only
            "version": job.version,
        }

    def _prune_history(self) -> None:
        """Forget the oldest failed/cancelled/download records beyond `history`."""
        finished = [j for j in self._jobs.values()
                    if j.terminal and not (j.status == "succeeded" and j.stack_dir is not None)]
        if len(finished) <= self.history:
            return
        finished.sort(key=lambda j: j.finished or j.created)
        for job in finished[:len(finished) - self.history]:
            if job.id not in self._subscribers:
                del self._jobs[job.id]

    def _apply_retention(self, keep: Optional[int] = None) -> None:
        """Delete the oldest finished stacks beyond `keep` (default: `retention`), folders
        and records."""
        keep = self.retention if keep is None else keep
        with self._lock:
            stacks = [j for j in self._jobs.values()
                      if j.status == "succeeded" and j.stack_dir is not None]
            if len(stacks) <= keep:
                return
            stacks.sort(key=lambda j: (j.finished or j.created, j.id))
            expired = stacks[:len(stacks) - keep]
            for job in expired:
                del self._jobs[job.id]
        for job in expired:
            self._delete_stack(job.stack_dir)

    def _delete_stack(self, stack_dir: Path) -> None:
        # Renamed to a hidden temp name first: it leaves the listing at once, and a crash
        # half-way through the delete is cleaned up like any temp folder at the next start.
        doomed = stack_dir.with_name(f".{stack_dir.name}.tmp-{secrets.token_hex(4)}")
        try:
            stack_dir.rename(doomed)
        except OSError as exc:
            log.warning("could not remove expired stack %s: %s", stack_dir, exc)
            return
        shutil.rmtree(doomed, ignore_errors=True)
