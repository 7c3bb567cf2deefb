"""A scripted stand-in for addon.client.ServerClient and a local server that never gets
ready, so add-on tests can hold a job in any phase (queued, downloading weights, loading,
denoising, decoding, saving, fetching files) and press Cancel there.

A job walks through STAGES one step per `job()` poll and stays at `FakeServerClient.hold`
until it is cancelled; with `hold = None` it succeeds and its files are copied from
`FakeServerClient.stack_folder` (a stack written by blender_helpers.make_stack).
"""
from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path
from typing import Optional

STAGES = ("queued", "download", "load", "denoise", "decode", "save")
PREVIEW_LAYERS = ("layer_01", "blended", "background")  # as a server may list them


def _progress(stage: str) -> dict:
    progress = {"phase": stage, "fraction": (STAGES.index(stage)) / len(STAGES), "layer": None,
                "layers": 2, "step": 0, "total": 0}
    if stage == "denoise":
        progress.update(step=3, total=10)
    elif stage == "decode":
        progress.update(layer=1)
    elif stage == "download":
        progress.update(message="unet.safetensors 10%")
    return progress


class FakeServerClient:
    hold: Optional[str] = None  # a stage, "submit", "fetch", "die" (the worker thread ends silently)
    stack_folder: Optional[Path] = None
    cancelled_jobs: list = []

    def __init__(self, url: str, token: str = "", timeout: float = 5.0, **_tls):
        self.url, self.hold_here = url, type(self).hold
        self._stage = -1
        self._job_id = ""
        self._cancelled = False

    def health(self, timeout=None) -> dict:
        return {"status": "ok", "version": "fake", "device": {"device": "cpu"}, "queue_length": 0}

    def submit(self, body: dict) -> dict:
        if self.hold_here == "submit":
            threading.Event().wait(3.0)  # a slow answer: Cancel arrives while it waits
        self._job_id = uuid.uuid4().hex[:12]
        self._stage = 0
        return self._snapshot()

    def job(self, job_id: str) -> dict:
        if self.hold_here == "die":
            raise SystemExit  # not an Exception: the worker thread ends without posting anything
        if not self._cancelled and self._stage < len(STAGES) and STAGES[self._stage] != self.hold_here:
            self._stage += 1
        return self._snapshot()

    def cancel(self, job_id: str):
        self._cancelled = True
        type(self).cancelled_jobs.append(job_id)
        return None

    def _snapshot(self) -> dict:
        base = {"id": self._job_id, "version": self._stage + (100 if self._cancelled else 0)}
        if self._cancelled:
            return {**base, "status": "cancelled"}
        if self._stage >= len(STAGES):
            files = sorted(p.name for p in Path(self.stack_folder).iterdir())
            return {**base, "status": "succeeded", "stack": {"name": "Fake Stack", "files": files, "path": ""}}
        stage = STAGES[self._stage]
        status = "queued" if stage == "queued" else "running"
        snapshot = {**base, "status": status, "position": 1 if status == "queued" else None,
                    "progress": _progress(stage)}
        if STAGES.index(stage) >= STAGES.index("denoise"):
            snapshot["previews"] = {"step": 3, "version": self._stage, "layers": list(PREVIEW_LAYERS)}
        return snapshot

    def preview(self, job_id: str, name: str, timeout: float = 5.0) -> bytes:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), (10 * len(name), 80, 160)).save(buffer, format="PNG")
        return buffer.getvalue()

    def download_file(self, job_id: str, name: str, destination: Path, timeout: float = 60.0) -> Path:
        if self.hold_here == "fetch":
            threading.Event().wait(0.5)  # slow files: Cancel arrives between them
        shutil.copyfile(Path(self.stack_folder) / name, destination)
        return Path(destination)


class NeverReadyServer:
    """A local server that stays "starting" until the job is cancelled."""

    offline = False
    error = None

    def poll(self) -> str:
        return "starting"

    def wait_ready(self, timeout=None, cancelled: Optional[threading.Event] = None):
        from multiplane.addon import backend

        while not (cancelled is not None and cancelled.wait(0.05)):
            pass
        raise backend.BackendError("cancelled while the inference server was starting")
