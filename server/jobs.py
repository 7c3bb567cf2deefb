"""Jobs: the queue between the HTTP routes and the engine (the job service).

One worker thread runs generation jobs one at a time (the device is the scarce thing and
the engine keeps one model warm); a second worker runs model downloads so a long download
does not hold up generation. Routes never touch the engine: they submit, read snapshots,
cancel and subscribe here; refusals are the domain errors of `errors.py`.

Every state change bumps the job's `version` and hands a snapshot (a `schemas.JobOut`) to
the job's subscribers, from whichever thread made the
change; the subscribers (server-sent event streams) must not block and must not modify it
(parts are shared).
"""
from __future__ import annotations

import functools
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from inference.errors import StackFormatError
from inference.models import preset_names
from inference.previews import PreviewCollector, collect_previews
from inference.progress import CancelToken, Progress, WorkPlan
from inference.request import StackRequest, extension_plan, validate_layer_edit, validate_layer_index
from inference.stack import IMPORTED_METHOD, cleanup_temp, list_stacks

from .errors import Conflict, NotFound, QueueFull, ShuttingDown
from .journal import JobJournal, interrupted
from .progress import download_fraction, eta_seconds, is_work, overall_fraction
from .schemas import (TERMINAL_STATES, ExtendIn, ImportIn, JobCreate, JobOut, PreviewsOut, ProgressOut,
                      RegenerateIn, StackOut, layered_path_problem, model_path_problem)
from .stacks import delete_stack, foreground_count, read_stack, stack_created, stack_files
from .worker import Lane, Worker, download_model, failure, generate_stack, generation_plan, is_out_of_memory

log = logging.getLogger("multiplane.server")

DEFAULT_MAX_QUEUE = 32
DEFAULT_RETENTION = 100
DEFAULT_HISTORY = 200

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def iso_time(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(eq=False)
class Job:
    id: str
    kind: str  # "generate", "regenerate", "extend", "download" or "import"
    created: float
    body: Optional[JobCreate] = None
    request: Optional[StackRequest] = None  # generate: the body as the engine's request
    edit: Optional[RegenerateIn | ExtendIn] = None
    source: Optional[str] = None  # regenerate, extend: the job whose stack is edited
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
    foregrounds: int = 0  # of the finished stack (what a regenerate may pick from)
    version: int = 0
    position: Optional[int] = None
    # the first moment real work (denoise/decode/download bytes) was reported, for the ETA
    work_start: Optional[tuple[float, float]] = None
    restored_request: Optional[dict] = None  # the request of a job read back from the journal
    device: Optional[str] = None  # the device of the worker that runs (ran) it
    warnings: list[str] = field(default_factory=list)  # import: what the file could not carry over
    # live previews while it runs: {name: PNG} (inference/previews.py), and their step/version
    previews: dict = field(default_factory=dict)
    preview_step: int = 0
    preview_version: int = 0

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
        return self.restored_request

    def journal_record(self) -> dict:
        """What the journal keeps of the job (`journal.py`): enough to list it again."""
        return {"id": self.id, "kind": self.kind, "status": self.status, "created": self.created,
                "started": self.started, "finished": self.finished, "error": self.error,
                "model": self.model, "source": self.source, "request": self.request_dump}

    @classmethod
    def from_journal(cls, record: dict) -> "Job":
        return cls(id=record["id"], kind=record.get("kind", "generate"), created=float(record["created"]),
                   status=record["status"], started=record.get("started"), finished=record.get("finished"),
                   error=record.get("error"), model=record.get("model"), source=record.get("source"),
                   restored_request=record.get("request"), fraction=1.0 if record["status"] == "succeeded" else 0.0)

    def snapshot(self) -> JobOut:
        """The job as the API shows it (`schemas.JobOut`); snapshots are read-only."""
        p = self.progress
        progress = ProgressOut(fraction=round(self.fraction, 4), eta_seconds=self.eta_seconds)
        if p is not None:
            progress = ProgressOut(phase=p.phase, step=p.step, total=p.total, layer=p.layer, layers=p.layers,
                                   message=p.message, fraction=progress.fraction, eta_seconds=progress.eta_seconds)
        stack = None
        if self.status == "succeeded" and self.stack_dir is not None:
            stack = StackOut(name=self.stack_name or self.id, path=str(self.stack_dir), files=list(self.files))
        previews = None
        if self.previews and not self.terminal:
            previews = PreviewsOut(step=self.preview_step, version=self.preview_version, layers=sorted(self.previews))
        return JobOut(id=self.id, kind=self.kind, status=self.status, position=self.position, model=self.model,
                      progress=progress, error=self.error, previews=previews,
                      cancel_requested=self.cancel.cancelled and not self.terminal,
                      created=iso_time(self.created), started=iso_time(self.started),
                      finished=iso_time(self.finished), stack=stack,
                      request=self.request_dump,  # shared by all snapshots: they are read-only
                      device=self.device, version=self.version, warnings=list(self.warnings))


Subscriber = Callable[[Optional[JobOut]], None]


class JobManager:
    """Owns every job, the two lanes (generation, downloads) and the output folder.

    `engine`: one engine, or a list of engines, one per device (`--devices`): generation
    gets one worker per engine, each with its own warm model, fed from one FIFO queue."""

    def __init__(self, engine, output_root: Path, *, models_dir: Optional[Path] = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, retention: int = DEFAULT_RETENTION,
                 history: int = DEFAULT_HISTORY):
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if retention < 1:
            raise ValueError("retention must be at least 1")
        self.engines = list(engine) if isinstance(engine, (list, tuple)) else [engine]
        self.engine = self.engines[0]
        self.output_root = Path(output_root)
        self.models_dir = Path(models_dir) if models_dir else None
        self.max_queue = max_queue
        self.retention = retention
        self.history = history
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._generate = Lane("generate", self._lock, self._run_generate, self.engines)
        self._download = Lane("download", self._lock, self._run_download)
        self._closing = False
        self._started = False
        self._last_created = 0.0
        self._journal: Optional[JobJournal] = None

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Clean half-written stacks, list the finished ones as jobs, start the workers."""
        self.output_root.mkdir(parents=True, exist_ok=True)
        cleanup_temp(self.output_root)
        self.restore()
        self._journal = JobJournal(self.output_root)
        self._restore_journal()
        self._apply_retention()  # the limit may have been lowered since the last run
        self._generate.start()
        self._download.start()
        self._started = True

    def restore(self) -> int:
        """Finished stacks already under the output root become succeeded jobs (id = folder)."""
        restored = 0
        for entry, stack in list_stacks(self.output_root):  # valid stacks only
            if not JOB_ID_PATTERN.match(entry.name) or entry.name in self._jobs:
                continue
            try:
                created = stack_created(stack, entry)
            except OSError as exc:
                log.warning("not listing %s: %s", entry, exc)
                continue
            imported = stack.method == IMPORTED_METHOD
            job = Job(id=entry.name, kind="import" if imported else "generate", created=created,
                      status="succeeded", started=created, finished=created, fraction=1.0, stack_dir=entry,
                      stack_name=stack.name or entry.name, files=stack_files(stack),
                      foregrounds=foreground_count(stack),
                      warnings=list((stack.imported or {}).get("warnings", [])) if imported else [])
            self._jobs[job.id] = job
            restored += 1
        return restored

    def _restore_journal(self) -> None:
        """Jobs of the last run that left no stack: as they ended, or failed as interrupted
        (`journal.interrupted`); a stack folder with the same id wins (it finished)."""
        with self._lock:
            for record in self._journal.load():
                if record["id"] in self._jobs or not JOB_ID_PATTERN.match(record["id"]):
                    continue
                try:
                    job = Job.from_journal(interrupted(record))
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("skipping a jobs journal record %r: %s", record.get("id"), exc)
                    continue
                self._jobs[job.id] = job
                self._last_created = max(self._last_created, job.created)
            self._journal_changed()

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
                for running in lane.running():
                    running.cancel.cancel(reason)
                    self._changed(running)
                lane.closing = True
                lane.cond.notify_all()

    def close(self, timeout: float = 1.5) -> bool:
        """Shut down and wait up to `timeout` s for the workers; True when both stopped."""
        self.begin_shutdown()
        deadline = time.monotonic() + timeout
        stopped = True
        for worker in (*self._generate.workers, *self._download.workers):
            if worker.thread.is_alive():
                worker.thread.join(max(0.0, deadline - time.monotonic()))
                stopped = stopped and not worker.thread.is_alive()
        with self._lock:
            subscribers = [cb for cbs in self._subscribers.values() for cb in cbs]
        for cb in subscribers:  # streams still open end now
            cb(None)
        if self._journal is not None:
            self._journal.close()  # the last states (cancelled by the shutdown) on disk
        return stopped

    # -- submitting ---------------------------------------------------------------------
    def submit(self, body: JobCreate) -> JobOut:
        """Queue a generation job; raises InvalidRequest (bad body), NotFound (no such model
        path here) or QueueFull."""
        request = body.to_stack_request()  # the engine's own validation, before queueing
        missing = model_path_problem(body.model)
        if missing:
            raise NotFound(missing)
        with self._lock:
            self._check_open()
            self._check_room()
            job = Job(id=self._new_id(), kind="generate", created=self._now(), body=body,
                      request=request, model=body.model)
            snapshot = self._enqueue(self._generate, job)
        return self._recorded(snapshot)

    def submit_regenerate(self, source_id: str, edit: RegenerateIn) -> JobOut:
        """Queue regenerating one layer of a finished stack (a new job, a new stack folder)."""
        validate_layer_edit(edit.prompt, edit.seed, prompt_field="prompt", seed_field="seed",
                            prompt_required=edit.layer_index > 0)
        with self._lock:
            self._check_open()
            source = self._job(source_id)
            if source.status != "succeeded" or source.stack_dir is None:
                raise Conflict(f"job {source_id} has no finished stack to edit (status {source.status})")
            if source.kind == "import":
                raise Conflict(f"job {source_id} is an imported layered file: it has no model or prompts to "
                               f"regenerate a layer from; edit it in the painting program and import it again")
            validate_layer_index("layer_index", edit.layer_index, source.foregrounds)
            self._check_room()
            job = Job(id=self._new_id(), kind="regenerate", created=self._now(), edit=edit,
                      source=source_id, model=source.model)
            snapshot = self._enqueue(self._generate, job)
        return self._recorded(snapshot)

    def import_layers(self, body: ImportIn) -> JobOut:
        """Import a layered PSD/ORA file as a new stack, right away (no model, no queue: it
        takes seconds at most): a finished job of kind "import"; InvalidRequest for a bad file."""
        from inference.stack.layered_import import import_layered

        missing = layered_path_problem(body.path)
        if missing:
            raise NotFound(missing)
        with self._lock:
            self._check_open()
            job = Job(id=self._new_id(), kind="import", created=self._now(), status="running")
            job.started = job.created
            self._jobs[job.id] = job  # reserves the id (and its folder name)
        out_dir = self.output_root / job.id
        try:
            written = import_layered(body.path, out_dir, name=body.name, export_exr=body.export_exr,
                                     depths=body.depths)
        except BaseException:
            with self._lock:
                del self._jobs[job.id]  # refused (422) or failed: no job to list, now or after a restart
                self._journal_changed()
            raise
        self._apply_retention(keep=self.retention - 1)
        with self._lock:
            job.stack_dir, job.stack_name, job.files = out_dir, written.name, stack_files(written)
            job.foregrounds, job.warnings = foreground_count(written), list(written.imported["warnings"])
            job.fraction = 1.0
            self._finish(job, "succeeded")
            return job.snapshot()
    def submit_extend(self, source_id: str, body: ExtendIn) -> JobOut:
        """Queue extending a finished stack (a new job, a new stack folder). The new canvas is
        planned now, so bad or too large margins are refused before anything is queued."""
        with self._lock:
            self._check_open()
            source = self._job(source_id)
            if source.status != "succeeded" or source.stack_dir is None:
                raise Conflict(f"job {source_id} has no finished stack to extend (status {source.status})")
            if source.kind == "import":
                raise Conflict(f"job {source_id} is an imported layered file: it has no model or prompts to "
                               f"grow its margins from; paint the larger canvas and import it again")
            stack_dir = source.stack_dir
        try:
            stack = read_stack(stack_dir)  # outside the lock: a file read
        except (StackFormatError, OSError) as exc:
            raise Conflict(f"the stack of job {source_id} cannot be read: {exc}") from None
        extension_plan("margins", stack.width, stack.height, stack.frame, body.margins)
        with self._lock:
            self._check_open()
            self._check_room()
            job = Job(id=self._new_id(), kind="extend", created=self._now(), edit=body,
                      source=source_id, model=source.model)
            snapshot = self._enqueue(self._generate, job)
        return self._recorded(snapshot)

    def submit_download(self, model: str) -> JobOut:
        """Queue a download of a preset's weights; raises NotFound for an unknown preset."""
        if model not in preset_names():
            raise NotFound(f"unknown model {model!r}; choose one of {', '.join(preset_names())}")
        with self._lock:
            self._check_open()
            if len(self._download.queue) >= self.max_queue:
                raise QueueFull(f"the download queue is full ({self.max_queue} waiting)")
            for other in (*self._download.queue, *self._download.running()):
                if other is not None and other.model == model:
                    return other.snapshot()  # already on its way
            job = Job(id=self._new_id(), kind="download", created=self._now(), model=model)
            snapshot = self._enqueue(self._download, job)
        return self._recorded(snapshot)

    def _recorded(self, snapshot: JobOut) -> JobOut:
        """`snapshot` once the journal has its job on disk (the lock is not held)."""
        if not self._journal.flush():
            log.warning("the jobs journal is slow to write; job %s is queued anyway", snapshot.id)
        return snapshot

    def _check_open(self) -> None:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if not self._started:
            raise ShuttingDown("the server is not started yet")

    def _check_room(self) -> None:
        if len(self._generate.queue) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); "
                            f"wait for a job to finish or cancel one")

    def _now(self) -> float:
        """Creation time, strictly increasing (so sorting by it is sorting by arrival)."""
        self._last_created = max(time.time(), self._last_created + 2e-6)
        return self._last_created

    def _new_id(self) -> str:
        while True:
            job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
            if job_id not in self._jobs and not (self.output_root / job_id).exists():
                return job_id

    def _enqueue(self, lane: Lane, job: Job) -> JobOut:
        self._jobs[job.id] = job
        lane.queue.append(job)
        job.position = len(lane.queue) - 1 + len(lane.running())
        self._changed(job)
        lane.cond.notify()
        self._prune_history()
        self._journal_changed()
        return job.snapshot()

    # -- reading ------------------------------------------------------------------------
    def get(self, job_id: str) -> JobOut:
        with self._lock:
            return self._job(job_id).snapshot()

    def list(self, limit: int = 100) -> list[JobOut]:
        """Newest first."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: (j.created, j.id), reverse=True)
            return [j.snapshot() for j in jobs[:limit]]

    def queue_length(self) -> int:
        with self._lock:
            return len(self._generate.queue)

    def running_id(self) -> Optional[str]:
        with self._lock:
            running = [j for j in self._generate.running() if j.status == "running"]
            return running[0].id if running else None

    def devices(self) -> list[dict]:
        """Each generation worker's device, its warm model and the job it runs (or None)."""
        with self._lock:
            return [{"device": w.device, "loaded_model": getattr(w.engine, "loaded_model", None),
                     "running": w.current.id if w.current is not None and w.current.status == "running" else None}
                    for w in self._generate.workers]

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

    def subscribe(self, job_id: str, callback: Subscriber) -> tuple[JobOut, Callable[[], None]]:
        """(current snapshot, unsubscribe); `callback` gets every later snapshot, then None
        if the server closes first. It runs on the changing thread and must not block."""
        with self._lock:
            job = self._job(job_id)
            self._subscribers.setdefault(job_id, []).append(callback)
            snapshot = job.snapshot()

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
    def cancel(self, job_id: str) -> JobOut:
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
            return job.snapshot()

    # -- running (worker threads) -------------------------------------------------------
    def _start(self, job: Job, lane: Lane, worker: Worker) -> bool:
        with self._lock:
            if job.terminal:
                return False
            job.device = worker.device or None
            job.status = "running"
            job.started = time.time()
            job.position = 0
            self._changed(job)
            self._journal_changed()
            self._update_positions(lane)
            return True

    def _progress_callback(self, job: Job, fraction_of: Callable[[Progress], float]):
        def on_progress(p: Progress) -> None:
            now = time.monotonic()
            with self._lock:
                job.progress = p
                job.fraction = max(job.fraction, min(fraction_of(p), 1.0))
                if is_work(p) and job.work_start is None:
                    job.work_start = (now, job.fraction)
                job.eta_seconds = eta_seconds(job.fraction, job.work_start, now)
                self._changed(job)
        return on_progress

    def _preview_collector(self, job: Job) -> PreviewCollector:
        """Keeps the latest preview of each layer on the job (shown while it runs)."""
        def publish(step: int, _total: int, pngs: dict) -> None:
            with self._lock:
                job.previews = {**job.previews, **pngs}
                job.preview_step, job.preview_version = step, job.preview_version + 1
                self._changed(job)
        return PreviewCollector(publish)

    def preview_png(self, job_id: str, name: str) -> bytes:
        """The latest live preview of one layer of a running job; NotFound otherwise."""
        with self._lock:
            job = self._job(job_id)
            png = job.previews.get(name) if not job.terminal else None
        if png is None:
            raise NotFound(f"job {job_id} has no live preview {name!r} (previews exist while it runs: "
                           f"see its 'previews' field)")
        return png

    def _run_generate(self, job: Job, worker: Worker) -> None:
        if not self._start(job, self._generate, worker):
            return
        try:
            plan: WorkPlan = generation_plan(job, self.output_root)
            progress = self._progress_callback(job, functools.partial(overall_fraction, plan))
            with collect_previews(self._preview_collector(job)):
                out_dir = generate_stack(worker.engine, job, self.output_root, progress)
            written = read_stack(out_dir)
            name, files = written.name or out_dir.name, stack_files(written)
            foregrounds = foreground_count(written)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a job state
            self._fail(job, exc, worker.engine)
            if not isinstance(exc, Exception):
                raise
            return
        # Make room first, so that when a client sees `succeeded` the folder is in its final
        # state (the oldest stacks beyond the limit are gone).
        self._apply_retention(keep=self.retention - 1)
        with self._lock:
            job.stack_dir, job.stack_name, job.files, job.foregrounds = out_dir, name, files, foregrounds
            job.fraction, job.eta_seconds = 1.0, 0.0
            self._finish(job, "succeeded")

    def _run_download(self, job: Job, worker: Worker) -> None:
        if not self._start(job, self._download, worker):
            return
        try:
            download_model(job.model, self.models_dir, self._progress_callback(job, download_fraction),
                           job.cancel)
        except BaseException as exc:  # noqa: BLE001
            self._fail(job, exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            job.fraction, job.eta_seconds = 1.0, 0.0
            self._finish(job, "succeeded")

    def _fail(self, job: Job, exc: BaseException, engine=None) -> None:
        status, message = failure(job.id, job.cancel, exc)
        if status == "failed" and is_out_of_memory(exc) and engine is not None:
            self._free_memory(engine)
        with self._lock:
            self._finish(job, status, error=message)

    def _free_memory(self, engine) -> None:
        try:
            engine.unload()
        except Exception:  # noqa: BLE001 - best effort after an out-of-memory
            log.exception("unloading the model after an out-of-memory error failed")

    # -- bookkeeping (lock held) --------------------------------------------------------
    def _finish(self, job: Job, status: str, error: Optional[str] = None) -> None:
        job.status = status
        job.error = error
        job.finished = time.time()
        job.position = None
        job.previews = {}  # live previews end with the job (the stack has the real images)
        if status != "succeeded":
            job.eta_seconds = None
        self._changed(job)
        self._journal_changed()

    def _journal_changed(self) -> None:
        """Hand the journal every job a stack folder does not record (lock held)."""
        if self._journal is not None:
            self._journal.record([j.journal_record() for j in self._jobs.values()
                                  if not (j.status == "succeeded" and j.stack_dir is not None)])

    def _update_positions(self, lane: Lane) -> None:
        ahead = sum(1 for running in lane.running() if not running.terminal)
        for i, queued in enumerate(lane.queue):
            if queued.position != i + ahead:
                queued.position = i + ahead
                self._changed(queued)

    def _changed(self, job: Job) -> None:
        job.version += 1
        callbacks = self._subscribers.get(job.id)
        if callbacks:
            snapshot = job.snapshot()
            for cb in list(callbacks):
                try:
                    cb(snapshot)
                except Exception:  # noqa: BLE001 - one broken stream must not stop the job
                    log.exception("a status subscriber of job %s failed", job.id)

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
            delete_stack(job.stack_dir)
