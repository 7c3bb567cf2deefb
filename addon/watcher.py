"""The job watcher: Generate → server → finished stack → planes, without blocking Blender.

All waiting happens on one worker thread per job: starting the server (reading its ready
line), submitting, polling the job, copying or downloading the finished files. The worker
only puts small messages on a queue. The main thread calls `tick()` (a `bpy.app.timers`
timer in Blender; tests call it directly, since timers never fire in module mode): it
drains the queue, updates `watcher.state` (what the panel draws) and, when files are
ready, imports the planes and pushes an undo step for them — the only bpy work, which must
happen on the main thread. A tick without a finished stack touches no network and no disk
(≲ 1 ms).
"""
from __future__ import annotations

import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from . import backend, installer, library
from .client import ServerClient, ServerError
from .stack_reader import MANIFEST_FILE, StackReadError, read_stack, safe_folder_name

TICK_SECONDS = 0.1
POLL_SECONDS = 0.2
CANCEL_WAIT_SECONDS = 15.0
UNREACHABLE_RETRIES = 5

ACTIVE_PHASES = ("starting", "submitting", "queued", "running", "downloading", "importing")


@dataclass
class WatchState:
    """What the panel shows. Only the main thread writes it (in tick / start / cancel)."""

    phase: str = "idle"  # idle | starting | submitting | queued | running | downloading |
    # importing | succeeded | failed | cancelled (the install has its own state: installer.py)
    text: str = ""
    fraction: float = 0.0
    error: str = ""
    job_id: str = ""
    stack_dir: str = ""
    scene_name: str = ""
    started: float = 0.0
    imported: str = ""  # name of the backdrop collection made from the last stack
    previews: dict = field(default_factory=dict)  # live previews: layer name → PNG file (while running)
    preview_step: int = 0
    warnings: tuple = ()  # what a layered-file import could not carry over (shown in the panel)

    @property
    def busy(self) -> bool:
        return self.phase in ACTIVE_PHASES


@dataclass
class JobPlan:
    """Everything the worker needs, as plain values (no bpy objects cross threads)."""

    body: dict
    settings: Any  # preferences.BackendSettings
    scene_name: str
    history_fields: dict = field(default_factory=dict)
    # Regenerate one layer: the source job's id (then `body` is the /regenerate body).
    regenerate_from: str = ""
    source_folder: str = ""  # the source stack's copy, named in "the server forgot the job" errors
    # Import a layered file instead (then `body` is the POST /v1/imports body).
    import_file: bool = False
    # Extend for a new shot: the source job's id (then `body` is the /extend body).
    extend_from: str = ""


def server_identity(settings) -> str:
    """Which server a job id belongs to: the URL of a remote one, or the output folder of the
    local one (a local server knows the jobs whose stacks are in its output root)."""
    if settings.mode == "REMOTE":
        return f"REMOTE {str(settings.url).strip().rstrip('/')}"
    return f"LOCAL {settings.output_dir}"


def describe_server_identity(identity: str) -> str:
    mode, _, where = identity.partition(" ")
    return f"the server at {where}" if mode == "REMOTE" else f"the local server (output folder {where})"


def describe_progress(job: dict) -> tuple[str, float]:
    """A server job snapshot → (phase text for the artist, overall fraction)."""
    status = job.get("status")
    progress = job.get("progress") or {}
    fraction = float(progress.get("fraction") or 0.0)
    if status == "queued":
        position = job.get("position")
        return (f"Queued ({position} job(s) ahead)" if position else "Queued"), 0.0
    phase = progress.get("phase")
    layer, layers = progress.get("layer"), progress.get("layers") or 0
    step, total = progress.get("step") or 0, progress.get("total") or 0
    if phase == "download":
        text = "Downloading model weights"
        if progress.get("message"):
            text += f": {progress['message']}"
    elif phase == "load":
        text = "Loading model"
    elif phase == "denoise":
        text = f"Denoising step {step}/{total}" if total else "Denoising"
        if layer is not None and layers:
            text += f", layer {layer + 1} of {layers}"
    elif phase == "decode":
        text = f"Decoding layer {layer + 1} of {layers}" if layer is not None and layers else "Decoding layers"
    elif phase == "save":
        text = "Saving the stack"
    else:
        text = "Running"
    eta = progress.get("eta_seconds")
    if eta is not None and status == "running":
        text += f" — about {eta:.0f} s left" if eta >= 1 else ""
    return text, fraction


class Watcher:
    def __init__(self):
        self.state = WatchState()
        self._queue: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._token = ""  # which job the queued messages belong to
        self._plan: Optional[JobPlan] = None
        self.changed = False

    # ------------------------------------------------------------------ main thread

    @property
    def busy(self) -> bool:
        """A job is being watched. Only the state says so: a thread left behind by Cancel
        (still telling the server to stop) never keeps the panel busy."""
        return self.state.busy

    def start(self, plan: JobPlan) -> None:
        if self.busy:
            raise RuntimeError("a generation is already running")
        self._cancel = threading.Event()
        self._token = uuid.uuid4().hex
        self._plan = plan
        self.state = WatchState(phase="starting" if plan.settings.mode == "LOCAL" else "submitting",
                                text="Starting the inference server" if plan.settings.mode == "LOCAL"
                                else "Contacting the server",
                                scene_name=plan.scene_name, started=time.monotonic())
        self._thread = threading.Thread(target=self._work, args=(plan, self._cancel, self._token),
                                        name="multiplane-job", daemon=True)
        self._thread.start()
        self.changed = True

    def cancel(self) -> str:
        """Cancel whatever runs; returns what was cancelled ("install", "job", or "" for
        nothing). Idempotent, and final at once in every phase: the job's worker is detached
        (its later messages are dropped) and, if the server has the job, goes on telling the
        server to stop it in the background, so a second Cancel or a Generate right after
        always finds the panel free."""
        job = installer.current_install()
        if job is not None and job.running and not job.cancelled:
            job.cancel()
            return "install"
        if not self.busy:
            return ""
        self._cancel.set()
        on_server = bool(self.state.job_id) and self.state.phase in ("queued", "running")
        self._detach("cancelled", f"Cancelled (the server stops job {self.state.job_id})" if on_server
                     else "Cancelled")
        return "job"

    def _detach(self, phase: str, text: str) -> None:
        """End the watched job on the add-on's side: forget its worker and its messages."""
        self._token = ""
        self._thread = None
        self.state.phase, self.state.text, self.state.previews = phase, text, {}
        self.changed = True

    def stop(self) -> None:
        """The add-on is being disabled: tell the worker to give up (it ends without touching
        Blender; a server job is cancelled) and end the watched job with a message, so after
        re-enabling the panel says what happened instead of showing a job nobody watches."""
        self._cancel.set()
        if self.busy:
            self._detach("cancelled", "Stopped: the add-on was disabled while this backdrop was being generated")

    def clear_error(self) -> None:
        self.state.error = ""
        if self.state.phase == "failed":
            self.state.phase = "idle"
        self.changed = True

    def tick(self) -> Optional[float]:
        """Apply the worker's messages; import a finished stack. Returns the next interval
        (None when there is nothing left to watch, which ends a bpy.app.timers timer)."""
        install = installer.current_install()
        if install is not None and install.running:
            self.changed = True
        worker_alive = self._thread is not None and self._thread.is_alive()  # before draining
        while True:
            try:
                token, kind, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if token != self._token:
                continue  # a job cancelled before it reached the server
            try:
                self._apply(kind, payload)
            except Exception as error:  # a bug must not kill Blender's timer and leave us "busy"
                self.state.phase = "failed"
                self.state.error = f"Unexpected error while {kind}: {type(error).__name__}: {error}"
        if self.busy and not worker_alive:
            # Every message the worker posted has been applied, and it still looks busy:
            # nothing will ever move it on, so never wait for a thread that is gone.
            self.state.error = "The job's worker stopped without a result; press Generate to try again"
            self._detach("failed", "Failed")
        if self.changed:
            self.changed = False
            _redraw()
        if self.busy or (install is not None and install.running):
            return TICK_SECONDS
        return None

    def _apply(self, kind: str, payload: Any) -> None:
        state = self.state
        self.changed = True
        if kind == "phase":
            state.phase, state.text = payload
        elif kind == "job":
            state.job_id = payload.get("id", state.job_id)
            text, fraction = describe_progress(payload)
            state.phase = "queued" if payload.get("status") == "queued" else "running"
            state.text, state.fraction = text, fraction
        elif kind == "previews":
            state.previews, state.preview_step = payload
        elif kind == "files":
            state.previews = {}
            state.phase, state.text, state.fraction = "importing", "Importing the planes", 1.0
            state.stack_dir = payload
            self._import(Path(payload))
        elif kind == "failed":
            state.phase, state.text, state.error, state.previews = "failed", "Failed", payload, {}
        elif kind == "cancelled":
            state.phase, state.text, state.previews = "cancelled", "Cancelled", {}

    def _import(self, folder: Path) -> None:
        import bpy

        from . import importer

        state = self.state
        scene = bpy.data.scenes.get(state.scene_name)
        if scene is None:
            state.phase, state.error = "failed", (f"The scene {state.scene_name!r} is gone; the stack is "
                                                   f"in {folder} (import it with File › Import)")
            return
        try:
            result = importer.import_stack(SimpleNamespace(scene=scene), str(folder), importer.ImportSettings())
        except importer.ImportFailed as error:
            state.phase, state.error = "failed", f"The stack was generated ({folder}) but not imported: {error}"
            return
        settings = scene.multiplane
        settings.backdrop = result.collection
        settings.stack_path = str(folder)
        fields = dict(self._plan.history_fields) if self._plan else {}
        if self._plan is not None:
            fields["server"] = server_identity(self._plan.settings)
        add_history(scene, folder, fields, state.job_id)
        try:
            state.warnings = read_stack(folder, check_images=False).import_warnings
        except StackReadError:
            state.warnings = ()
        # A timer is no operator, so nothing records the import for Ctrl+Z unless we do.
        if bpy.ops.ed.undo_push.poll():
            bpy.ops.ed.undo_push(message=f"Import Multiplane Stack {result.collection.name}")
        state.phase, state.text, state.imported = "succeeded", f"Imported {len(result.planes)} layers", result.collection.name

    # ------------------------------------------------------------------ worker thread

    def _post(self, token: str, kind: str, payload: Any = None) -> None:
        self._queue.put((token, kind, payload))

    def _work(self, plan: JobPlan, cancel: threading.Event, token: str) -> None:
        try:
            client, server = self._connect(plan, cancel, token)
            if cancel.is_set():
                self._post(token, "cancelled")
                return
            self._post(token, "phase", ("submitting", "Submitting the job"))
            job = self._submit(client, plan)
            self._post(token, "job", job)
            job = self._follow(client, server, job, cancel, token)
            shutil.rmtree(preview_folder(job["id"]), ignore_errors=True)  # the stack has the real images
            status = job.get("status")
            if cancel.is_set():  # detached by Cancel: the artist no longer wants the files
                self._post(token, "cancelled")
            elif status == "succeeded":
                self._post(token, "phase", ("downloading", "Fetching the layer files"))
                folder = fetch_stack(client, job, plan.settings, server is not None, cancel)
                self._post(token, "files", str(folder))
            elif status == "cancelled":
                self._post(token, "cancelled")
            else:
                message = f"The server could not generate the stack: {job.get('error') or status}"
                if server is not None and server.offline and any(word in message.lower() for word in ("weights", "missing model files")):
                    message += (". Blender's online access is disabled, so the model was not downloaded: "
                                "allow it in Preferences › System › Network, or choose the Tiny model")
                self._post(token, "failed", message)
        except (ServerError, backend.BackendError) as error:
            if cancel.is_set():
                self._post(token, "cancelled")
            else:
                self._post(token, "failed", str(error))
        except Exception as error:  # a bug: still a message, never a dead watcher
            self._post(token, "failed", f"Unexpected error: {type(error).__name__}: {error}")

    @staticmethod
    def _submit(client: ServerClient, plan: JobPlan) -> dict:
        if plan.import_file:
            return client.import_layers(plan.body)
        if plan.extend_from:
            return _submit_edit(lambda: client.extend(plan.extend_from, plan.body), plan.extend_from, plan,
                                "the stack to extend", "extend",
                                "Press Generate instead: it plans the margins for the shot.")
        if not plan.regenerate_from:
            return client.submit(plan.body)
        return _submit_edit(lambda: client.regenerate(plan.regenerate_from, plan.body), plan.regenerate_from, plan,
                            "the stack this layer belongs to", "edit",
                            "Change the layer's prompt in the panel and press Generate instead.")

    def _connect(self, plan: JobPlan, cancel: threading.Event, token: str):
        settings = plan.settings
        if settings.mode == "REMOTE":
            if not settings.url:
                raise ServerError("no server URL: enter the server's address in the Multiplane "
                                  "preferences (or choose Start Local Process)")
            self._post(token, "phase", ("submitting", f"Contacting {settings.url}"))
            client = settings.remote_client(timeout=5.0)
            client.health()
            return client, None
        server = backend.ensure_server(settings.make_server)
        if server.poll() == "starting":
            self._post(token, "phase", ("starting", "Starting the inference server (loading torch)"))
        info = server.wait_ready(cancelled=cancel)
        return ServerClient(info.url, info.token, timeout=10.0), server

    def _follow(self, client: ServerClient, server, job: dict, cancel: threading.Event, token: str) -> dict:
        job_id = job["id"]
        version = -1
        seen_previews = 0
        cancel_sent_at = None
        failures = 0
        while job.get("status") not in ("succeeded", "failed", "cancelled"):
            if cancel.is_set() and cancel_sent_at is None:
                client.cancel(job_id)
                cancel_sent_at = time.monotonic()
            if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > CANCEL_WAIT_SECONDS:
                return {**job, "status": "cancelled"}
            cancel.wait(POLL_SECONDS) if not cancel.is_set() else time.sleep(POLL_SECONDS / 2)
            try:
                job = client.job(job_id)
                failures = 0
            except ServerError as error:
                if not error.unreachable:
                    raise
                if server is not None and server.poll() == "failed":
                    raise backend.BackendError(server.error) from None
                failures += 1
                if failures >= UNREACHABLE_RETRIES:
                    raise
                continue
            if job.get("version", 0) != version:
                version = job.get("version", 0)
                self._post(token, "job", job)
                seen_previews = self._fetch_previews(client, job, seen_previews, token)
        return job

    def _fetch_previews(self, client: ServerClient, job: dict, seen: int, token: str) -> int:
        """Download a running job's new live previews (small PNGs) into a scratch folder and
        hand their paths to the panel; returns the preview version now shown. A failed fetch
        only skips this refresh."""
        previews = job.get("previews") or {}
        if not previews or previews.get("version", 0) == seen or job.get("status") != "running":
            return seen
        folder = preview_folder(job["id"])
        paths = {}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name in sorted(previews.get("layers") or (), key=lambda n: (n == "blended", n != "background", n)):
                if safe_folder_name(name) != name:
                    continue  # never a path from the server
                path = folder / f"{name}-{previews['version']}.png"
                path.write_bytes(client.preview(job["id"], name))
                paths[name] = str(path)
        except (ServerError, OSError):
            return seen
        self._post(token, "previews", (paths, int(previews.get("step") or 0)))
        return previews["version"]


def preview_folder(job_id: str) -> Path:
    """Where a job's live previews are kept while it runs (a scratch folder, never a stack)."""
    import tempfile

    return Path(tempfile.gettempdir()) / "multiplane-previews" / safe_folder_name(job_id)


def _submit_edit(submit, source: str, plan: JobPlan, what: str, verb: str, instead: str) -> dict:
    """Submit an edit of job `source`'s stack, with a forgotten job (404) or one without a
    finished stack (409) said for the artist: where its files still are, what to do instead."""
    try:
        return submit()
    except ServerError as error:
        where = f" Its files are still in {plan.source_folder}." if plan.source_folder else ""
        if error.status == 404:
            raise ServerError(
                f"The server no longer knows job {source}, {what} (it was restarted with another output "
                f"folder, its outputs were deleted, or the stack came from another server).{where} {instead}",
                404) from None
        if error.status == 409:
            raise ServerError(f"Job {source} on the server has no finished stack to {verb}.{where}", 409) from None
        raise


def fetch_stack(client: ServerClient, job: dict, settings, local: bool,
                cancelled: Optional[threading.Event] = None) -> Path:
    """Copy (local server: straight from its output root) or download the job's files into
    the add-on's own stacks folder, as the engine wrote them: the artist's depths and the
    stack's name travelled in the request, so nothing is patched in here. Cancel stops
    between files and leaves no folder behind (ServerError "cancelled")."""
    stack = job.get("stack") or {}
    name = stack.get("name") or "Multiplane stack"
    files = list(stack.get("files") or [])
    if MANIFEST_FILE not in files:
        files.append(MANIFEST_FILE)
    destination = Path(settings.stacks_dir) / f"{safe_folder_name(name)}-{safe_folder_name(job['id'])}"
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    source = Path(stack.get("path") or "")
    for file_name in files:
        if cancelled is not None and cancelled.is_set():
            shutil.rmtree(partial, ignore_errors=True)
            raise ServerError("cancelled while fetching the layer files")
        if Path(file_name).name != file_name:
            raise ServerError(f"the server listed an unsafe file name {file_name!r}")
        if local and (source / file_name).is_file():
            shutil.copyfile(source / file_name, partial / file_name)
        else:
            client.download_file(job["id"], file_name, partial / file_name)
    library.write_job_record(partial, job["id"], server_identity(settings))  # regenerate from any .blend
    shutil.rmtree(destination, ignore_errors=True)
    partial.replace(destination)
    return destination


def add_history(scene, folder: Path, fields: dict, job_id: str) -> None:
    """Remember a generated stack on the scene (newest first in the panel)."""
    history = scene.multiplane.history
    for index in reversed(range(len(history))):  # the same folder again (the library listed it)
        if history[index].path == str(folder):
            history.remove(index)
    item = history.add()
    item.path = str(folder)
    item.job_id = job_id
    item.created = time.strftime("%Y-%m-%d %H:%M")
    for key, value in fields.items():
        if hasattr(item, key):
            setattr(item, key, value)
    try:
        library.fill_history_item(item, library.entry_for(folder))
    except StackReadError:  # just imported, so not expected: the item then lists no layers
        item.name = item.name or folder.name
    history.move(len(history) - 1, 0)
    scene.multiplane.history_index = 0


def _redraw() -> None:
    try:
        import bpy

        wm = bpy.context.window_manager
        for window in getattr(wm, "windows", ()):
            for area in window.screen.areas:
                if area.type in ("VIEW_3D", "PREFERENCES"):
                    area.tag_redraw()
    except (AttributeError, ReferenceError, ImportError):
        pass


# ---------------------------------------------------------------------- the one watcher + timer

watcher = Watcher()


def tick() -> Optional[float]:
    """One watcher tick: what the timer calls (and tests, where timers never fire)."""
    return watcher.tick()


def ensure_timer() -> None:
    """Make sure a bpy.app.timers timer ticks the watcher (it stops itself when idle)."""
    import bpy

    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=TICK_SECONDS, persistent=True)


def register() -> None:
    pass


def unregister() -> None:
    import bpy

    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    watcher.stop()
    installer.cancel_current_install()
    backend.stop_all_in_background()  # disabling must not hold Blender while processes exit
