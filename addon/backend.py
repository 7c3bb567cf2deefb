"""The inference server process the add-on starts and owns ("Start local process").

The engine needs torch, which cannot live in Blender's Python, so it runs as
`<python> -m server serve` from the extension folder in an environment of its own. Start-up
protocol (see server/process.py): a fresh token goes in through the environment
(MULTIPLANE_TOKEN), the server binds a free port and prints one JSON "ready" line on stdout.
The line is read on a thread, so Blender's UI thread never waits for the model imports.

The process dies with Blender three ways: stdin is a pipe we never write (it closes when
Blender exits, however it exits), `--parent-pid` (the server watches our pid), and an
explicit `stop()` from unregister() and atexit. Standard library only; no bpy, so the
demo and tests drive it the same way the add-on does.
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

READY_TIMEOUT = 120.0  # first start imports torch + diffusers: tens of seconds on a slow disk
STOP_TIMEOUT = 5.0
LOG_TAIL_CHARS = 1500


class BackendError(Exception):
    """The server could not be started or died; `str()` is for the artist."""


@dataclass(frozen=True)
class ServerReady:
    """What the server's ready line announced (and the token we gave it)."""

    url: str
    token: str
    pid: int
    version: str = ""


def engine_root() -> Path:
    """The folder holding `server/` and `inference/`: the extension's (or checkout's) root."""
    return Path(__file__).resolve().parents[1]


def venv_python(venv: Path, platform: Optional[str] = None) -> Path:
    """A virtual environment's interpreter: Scripts\\python.exe on Windows, bin/python elsewhere."""
    if (platform or sys.platform) == "win32":
        return Path(venv) / "Scripts" / "python.exe"
    return Path(venv) / "bin" / "python"


def child_process_options(platform: Optional[str] = None) -> dict:
    """subprocess.Popen options for a child the add-on owns: its own process group (so
    stopping it reaches whatever it starts), and no console window on Windows."""
    if (platform or sys.platform) == "win32":
        return {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
                | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)}
    return {"start_new_session": True}


def terminate_tree(proc: subprocess.Popen, platform: Optional[str] = None) -> None:
    """Ask a child made with child_process_options, and everything it started, to stop:
    taskkill /T on Windows (no process groups to signal there), SIGTERM to its group elsewhere."""
    if proc.poll() is not None:
        return
    try:
        if (platform or sys.platform) == "win32":
            subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"], capture_output=True, timeout=10)
        else:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
    except (OSError, subprocess.SubprocessError):
        proc.terminate()


MANAGED_COMPLETE_MARKER = "multiplane-installed.txt"  # installer.COMPLETE_MARKER (kept equal by a test)


def find_python(managed_venv: Optional[Path] = None) -> Optional[Path]:
    """Auto-detect the engine's interpreter: the checkout's `.venv` next to the extension
    source (development), else the managed environment the installer finished (a failed or
    cancelled install has no marker), else None."""
    candidates = [venv_python(engine_root() / ".venv")]
    if managed_venv is not None and (Path(managed_venv) / MANAGED_COMPLETE_MARKER).is_file():
        candidates.append(venv_python(managed_venv))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def log_tail(path: Optional[Path], chars: int = LOG_TAIL_CHARS) -> str:
    """The end of the server's log, trimmed to whole lines (for error messages)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - chars))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = text.splitlines()
    if size > chars and len(lines) > 1:
        lines = lines[1:]
    return "\n".join(line for line in lines if line.strip()).strip()


def _last_error_line(text: str) -> str:
    """The most telling line of a log: the last line that reads like an error, else ""."""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("--- ")]  # our own start headers
    for line in reversed(lines):
        head = line.split(":", 1)[0].lower()
        if line.lower().startswith("error") or "error" in head or "exception" in head:
            return line
    return ""


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"killed by {signal.Signals(-code).name}"
        except (ValueError, AttributeError):
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ManagedServer:
    """One `python -m server serve` child process.

    `start()` returns at once; `poll()` says where it is ("starting", "ready", "failed",
    "stopped") without blocking; `wait_ready(timeout)` blocks (worker threads, demo).
    """

    def __init__(self, python: Path, *, device: str = "auto", models_dir: Optional[Path] = None,
                 output_root: Optional[Path] = None, log_path: Optional[Path] = None,
                 cwd: Optional[Path] = None, ready_timeout: float = READY_TIMEOUT,
                 extra_args: tuple[str, ...] = (), offline: bool = False):
        self.python = Path(python) if python else None
        self.device = device or "auto"
        self.models_dir = Path(models_dir) if models_dir else None
        self.output_root = Path(output_root) if output_root else None
        self.log_path = Path(log_path) if log_path else None
        self.cwd = Path(cwd) if cwd else engine_root()
        self.ready_timeout = ready_timeout
        self.extra_args = tuple(extra_args)
        # Blender's "Allow Online Access" off: the server must not fetch model weights.
        self.offline = offline
        self.token = secrets.token_urlsafe(32)
        self.info: Optional[ServerReady] = None
        self.error: Optional[str] = None
        self._proc: Optional[subprocess.Popen] = None
        self._log_handle = None
        self._ready = threading.Event()
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._stopped = False

    # ------------------------------------------------------------------ life cycle

    def command(self) -> list[str]:
        cmd = [str(self.python), "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0",
               "--parent-pid", str(os.getpid()), "--device", self.device]
        if self.models_dir:
            cmd += ["--models-dir", str(self.models_dir)]
        if self.output_root:
            cmd += ["--output-root", str(self.output_root)]
        return cmd + list(self.extra_args)

    def check(self) -> None:
        """Refuse a missing interpreter or engine folder with a sentence saying what to do."""
        if self.python is None:
            raise BackendError("no Python for the inference server: set one in the Multiplane "
                               "preferences, or click 'Install inference environment'")
        if not self.python.is_file():
            raise BackendError(f"the Python interpreter {self.python} does not exist: fix the path in "
                               f"the Multiplane preferences, or click 'Install inference environment'")
        if not os.access(self.python, os.X_OK):
            raise BackendError(f"{self.python} is not executable: choose a Python interpreter in the "
                               f"Multiplane preferences")
        if not (self.cwd / "server" / "__main__.py").is_file():
            raise BackendError(f"the inference server's code is missing from {self.cwd} "
                               f"(reinstall the Multiplane extension)")

    def start(self) -> None:
        """Spawn the process and a thread that waits for its ready line. Never blocks long."""
        with self._lock:
            if self._proc is not None:
                return
            self.check()
            env = dict(os.environ, MULTIPLANE_TOKEN=self.token, PYTHONUNBUFFERED="1")
            # Blender's own Python settings must not leak into the engine's interpreter.
            for key in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP"):
                env.pop(key, None)
            if self.offline:
                env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log_handle = open(self.log_path, "ab")
                self._log_handle.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: "
                                       f"{' '.join(self.command())}\n".encode())
                self._log_handle.flush()
            stderr = self._log_handle if self._log_handle is not None else subprocess.DEVNULL
            if self.output_root:
                self.output_root.mkdir(parents=True, exist_ok=True)
            try:
                self._proc = subprocess.Popen(self.command(), cwd=str(self.cwd), env=env,
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=stderr, **child_process_options())
            except OSError as error:
                self._close_log()
                raise BackendError(f"cannot run {self.python}: {error.strerror or error}") from None
            self._started_at = time.monotonic()
            _register(self)
            threading.Thread(target=self._read_ready_line, name="multiplane-server-ready",
                             daemon=True).start()

    def _read_ready_line(self) -> None:
        proc = self._proc
        try:
            line = proc.stdout.readline().decode("utf-8", "replace")
        except (OSError, ValueError):
            line = ""
        try:
            ready = json.loads(line) if line.strip() else None
        except ValueError:
            ready = None
        if isinstance(ready, dict) and ready.get("event") == "ready" and ready.get("url"):
            self.info = ServerReady(url=str(ready["url"]), token=self.token,
                                   pid=int(ready.get("pid") or proc.pid), version=str(ready.get("version", "")))
        else:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.error = self._death_message("could not start", line)
        self._ready.set()

    def _death_message(self, what: str, stdout_line: str = "") -> str:
        tail = log_tail(self.log_path)
        code = self._proc.poll() if self._proc else None
        reason = _last_error_line(tail) or stdout_line.strip()
        message = f"The inference server {what}"
        if code is not None:
            message += f" ({_exit_description(code)})"
        if reason:
            message += f": {reason}"
        if self.log_path:
            message += f". Full log: {self.log_path}"
        return message

    def poll(self) -> str:
        """'starting' | 'ready' | 'failed' | 'stopped' (a ready server that died: 'failed')."""
        if self._stopped:
            return "stopped"
        if self._proc is None:
            return "stopped"
        if not self._ready.is_set():
            if time.monotonic() - self._started_at > self.ready_timeout:
                self.error = (f"The inference server did not become ready within {self.ready_timeout:g} s. "
                              f"Full log: {self.log_path}")
                self._kill()
                return "failed"
            return "starting"
        if self.info is None:
            return "failed"
        if self._proc.poll() is not None:
            if self.error is None:
                self.error = (self._death_message("stopped unexpectedly")
                              + ". It is restarted on the next Generate.")
            return "failed"
        return "ready"

    def wait_ready(self, timeout: Optional[float] = None, cancelled: Optional[threading.Event] = None) -> ServerReady:
        """Block until ready (worker threads only); BackendError when it failed or timed out."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.ready_timeout)
        while True:
            state = self.poll()
            if state == "ready":
                return self.info
            if state in ("failed", "stopped"):
                raise BackendError(self.error or "The inference server stopped")
            if cancelled is not None and cancelled.is_set():
                raise BackendError("cancelled while the inference server was starting")
            if time.monotonic() > deadline:
                raise BackendError(f"The inference server did not become ready in time. Full log: {self.log_path}")
            self._ready.wait(0.05)

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def close_stdin(self) -> None:
        """The server's cue to cancel its jobs and exit (never blocks); `stop()` waits for it."""
        self._stopped = True
        proc = self._proc
        try:
            if proc is not None and proc.stdin:
                proc.stdin.close()
        except OSError:
            pass

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Close stdin (the server's cue to cancel jobs and exit), then terminate, then kill."""
        self.close_stdin()
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                # A server that never announced itself does not watch stdin yet: terminate now.
                proc.wait(timeout / 2 if self.info is not None else 0.05)
            except subprocess.TimeoutExpired:
                terminate_tree(proc)
                try:
                    proc.wait(timeout / 2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # stdout only once the ready-line thread is done with it (closing a pipe another
        # thread is reading blocks until that read returns).
        for stream in (proc.stdin, proc.stdout if self._ready.is_set() else None):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        self._close_log()
        _unregister(self)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            try:
                self._log_handle.close()
            except OSError:
                pass
            self._log_handle = None


# ---------------------------------------------------------------------- every process we started

_running: list[ManagedServer] = []
_running_lock = threading.Lock()


def _register(server: ManagedServer) -> None:
    with _running_lock:
        _running.append(server)


def _unregister(server: ManagedServer) -> None:
    with _running_lock:
        if server in _running:
            _running.remove(server)


def stop_all() -> None:
    """Stop every server this Blender started (unregister, quit, atexit)."""
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()


def stop_all_in_background() -> threading.Thread:
    """Stop every server without holding the caller (disabling the add-on runs on Blender's
    UI thread): each process gets its cue to exit (stdin closed) at once; the waiting, and
    terminating or killing one that does not exit, happen on a thread. Returns the thread."""
    with _running_lock:
        servers = [server for server in _running if not server._stopped]  # not already stopping
    for server in servers:
        server.close_stdin()
    thread = threading.Thread(target=lambda: [server.stop() for server in servers],
                              name="multiplane-server-stop", daemon=True)
    thread.start()
    return thread


atexit.register(stop_all)


# ---------------------------------------------------------------------- the add-on's one server

_current: Optional[ManagedServer] = None
_current_lock = threading.Lock()


def current_server() -> Optional[ManagedServer]:
    """The local server the add-on uses now (None before the first start)."""
    return _current


def ensure_server(make) -> ManagedServer:
    """The running managed server, or a new one from `make()` if there is none or it died
    (a crashed server is replaced here: "restarted on the next Generate")."""
    global _current
    with _current_lock:
        server = _current
        if server is not None and server.poll() in ("starting", "ready"):
            return server
        if server is not None:
            server.stop()
        server = make()
        _current = server
    server.start()
    return server


def stop_current_server() -> None:
    global _current
    with _current_lock:
        server, _current = _current, None
    if server is not None:
        server.stop()
