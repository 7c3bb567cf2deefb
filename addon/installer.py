"""'Install inference environment': a managed venv with the engine, made from inside Blender.

torch cannot be shipped inside an extension, so the engine gets its own virtual environment
in the extension's user folder. Steps (as the Makefile's `setup`): create the venv, install
the pinned torch first (CPU wheels where there is no NVIDIA driver, so pip cannot pull a
multi-GB CUDA build), then the extension's bundled requirements.txt constrained to that
torch. pip runs in a subprocess read by a thread; its output goes to a log file and is
parsed for progress. Cancel kills pip. Standard library only (no bpy): the operator passes
`bpy.app.online_access`, and nothing touches the network when it is False.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .backend import child_process_options, engine_root, terminate_tree, venv_python

# Keep in step with the Makefile (TORCH_SPEC, OPEN_CLIP_SPEC).
TORCH_SPEC = "torch==2.13.0"
OPEN_CLIP_SPEC = "open_clip_torch==3.3.0"
TORCH_INDEX = "https://download.pytorch.org/whl/"
# CUDA builds of TORCH_SPEC, newest first, with the lowest driver CUDA version each needs.
CUDA_BUILDS = ((13.0, "cu130"), (12.8, "cu128"), (12.6, "cu126"))
COMPLETE_MARKER = "multiplane-installed.txt"  # written last: only a finished install has it


class InstallError(Exception):
    """Why the install cannot start or failed; for the artist."""


@dataclass(frozen=True)
class TorchChoice:
    """Which torch build the artist's machine gets, from where, and why (said in the panel)."""

    build: str  # "cpu", "cu128", … or "default" (macOS: PyPI's build, with Metal)
    index_url: Optional[str]  # None: pip's own sources (PyPI, or a local wheel it is pointed at)
    reason: str


def driver_cuda_version(nvidia_smi_output: str) -> Optional[float]:
    """The CUDA version the NVIDIA driver supports, from `nvidia-smi`'s banner."""
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return float(f"{found.group(1)}.{found.group(2)}") if found else None


def local_wheels(find_links: str) -> list[str]:
    """Wheel file names in the local folders of a PIP_FIND_LINKS value (URLs are skipped)."""
    names = []
    for entry in find_links.split():
        folder = Path(entry[len("file://"):] if entry.startswith("file://") else entry)
        if "://" not in entry or entry.startswith("file://"):
            try:
                names += [p.name for p in folder.iterdir() if p.suffix == ".whl"]
            except OSError:
                continue
    return names


def choose_torch(platform: str, nvidia_smi_output: Optional[str], find_links: str = "") -> TorchChoice:
    """The torch build for this machine: NVIDIA on Windows/Linux → the CUDA build the driver
    can run; macOS → PyPI's build (Apple Metal); otherwise the CPU build. When this machine's
    own package sources (PIP_FIND_LINKS folders) hold that build's wheel, pip takes it from
    there instead of PyTorch's index."""
    version = TORCH_SPEC.split("==", 1)[1]
    if platform == "darwin":
        return TorchChoice("default", None, "macOS: the standard build, which uses Apple Metal (MPS)")
    cuda = driver_cuda_version(nvidia_smi_output) if nvidia_smi_output else None
    build, reason = "cpu", "no NVIDIA GPU found: the CPU build (only the Tiny model is practical)"
    if nvidia_smi_output is not None:
        usable = [tag for needs, tag in CUDA_BUILDS if cuda is not None and cuda >= needs]
        if usable:
            build, reason = usable[0], f"NVIDIA driver with CUDA {cuda:g}: the {usable[0]} build"
        else:
            reason = (f"the NVIDIA driver (CUDA {cuda if cuda is not None else 'unknown'}) is older than "
                      f"any CUDA build of {TORCH_SPEC} needs (update it for GPU use): the CPU build")
    wheel = f"torch-{version}+{build}-"
    if any(name.startswith(wheel) for name in local_wheels(find_links)):
        return TorchChoice(build, None, f"{reason}, from this machine's package sources")
    return TorchChoice(build, TORCH_INDEX + build, reason)


def detect_torch_choice() -> TorchChoice:
    """`choose_torch` for the machine Blender runs on."""
    smi, output = shutil.which("nvidia-smi"), None
    if smi:
        try:
            output = subprocess.run([smi], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            output = ""
    return choose_torch(sys.platform, output, os.environ.get("PIP_FIND_LINKS", ""))


def install_steps(venv: Path, base_python: str, requirements: Path,
                  torch: Optional[TorchChoice] = None) -> list[tuple[str, list[str]]]:
    """(label, command) for each step; the last three run the venv's own pip."""
    py = str(venv_python(venv))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    torch = torch or detect_torch_choice()
    constraints = venv / "constraints.txt"
    return [
        ("Creating the environment", [base_python, "-m", "venv", str(venv)]),
        (f"Installing torch ({torch.build})",
         pip + (["--index-url", torch.index_url] if torch.index_url else []) + [TORCH_SPEC]),
        ("Installing the engine", pip + ["-c", str(constraints), "-r", str(requirements)]),
        ("Installing the tokenizer vocabulary", pip + ["--no-deps", OPEN_CLIP_SPEC]),
    ]


def is_complete(venv: Path) -> bool:
    """Whether `venv` is a finished managed environment (a failed or cancelled install
    never leaves the marker, so it never looks usable)."""
    return (Path(venv) / COMPLETE_MARKER).is_file()


_COLLECTING = re.compile(r"^\s*Collecting (\S+)")
_DOWNLOADING = re.compile(r"^\s*Downloading (\S+)")
_INSTALLING = re.compile(r"^\s*Installing collected packages: (.*)")
_DONE = re.compile(r"^\s*Successfully installed (.*)")


class PipProgress:
    """Turns pip's output lines into a status text and a 0..1 fraction within one step.

    pip prints no overall percentage; it resolves ("Collecting x") then downloads then
    installs. Resolving and downloading take up to 80 % of the step, growing with every
    package seen (asymptotically), installing the rest.
    """

    def __init__(self):
        self.seen = 0
        self.fraction = 0.0
        self.text = ""

    def feed(self, line: str) -> None:
        if m := _COLLECTING.match(line):
            self.seen += 1
            self.text = f"collecting {m.group(1)}"
        elif m := _DOWNLOADING.match(line):
            self.seen += 1
            name = m.group(1).rsplit("/", 1)[-1]
            self.text = f"downloading {name}"
        elif m := _INSTALLING.match(line):
            count = len([p for p in m.group(1).split(",") if p.strip()])
            self.text = f"installing {count} packages"
            self.fraction = max(self.fraction, 0.85)
            return
        elif m := _DONE.match(line):
            self.text = "installed"
            self.fraction = 1.0
            return
        else:
            return
        self.fraction = max(self.fraction, 0.8 * (1.0 - 1.0 / (1.0 + 0.15 * self.seen)))


class InstallJob:
    """One run of the steps on a thread; read `status`, `fraction`, `error`, `done`."""

    def __init__(self, venv: Path, steps: list[tuple[str, list[str]]], log_path: Path,
                 before_step: Optional[Callable[[int], None]] = None, torch: Optional[TorchChoice] = None):
        self.venv = Path(venv)
        self.torch = torch
        self.steps = steps
        self.log_path = Path(log_path)
        self.status = "waiting"
        self.fraction = 0.0
        self.error: Optional[str] = None
        self.done = False
        self.cancelled = False
        self._before_step = before_step
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="multiplane-install", daemon=True)

    @property
    def running(self) -> bool:
        return not self.done

    def start(self) -> "InstallJob":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return self.done

    def cancel(self) -> None:
        """Stop the running step without holding the caller (Blender's UI thread): terminate
        now; a thread kills the step if it has not exited after a few seconds."""
        with self._lock:
            self.cancelled = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            terminate_tree(proc)  # pip's own build subprocesses too
            threading.Thread(target=_kill_if_still_running, args=(proc,), name="multiplane-install-kill",
                             daemon=True).start()

    def _run(self) -> None:
        try:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} installing into {self.venv}\n")
                for index, (label, command) in enumerate(self.steps):
                    if self.cancelled:
                        break
                    if self._before_step is not None:
                        self._before_step(index)
                    self._run_step(index, label, command, log)
                    if self.error or self.cancelled:
                        break
            if self.cancelled:
                self.status = "cancelled"
                self.error = "Install cancelled; click Install Inference Environment to start again"
            elif self.error is None:
                self._mark_complete()
                self.status = "installed"
                self.fraction = 1.0
        except OSError as error:
            self.error = f"Install failed: {error}"
        finally:
            self.done = True

    def _mark_complete(self) -> None:
        """The last act of a successful install: only now does the environment count."""
        self.venv.mkdir(parents=True, exist_ok=True)
        torch = f"torch build {self.torch.build}: {self.torch.reason}\n" if self.torch else ""
        (self.venv / COMPLETE_MARKER).write_text(f"installed {time.strftime('%Y-%m-%d %H:%M:%S')}\n{torch}",
                                                 encoding="utf-8")

    def _run_step(self, index: int, label: str, command: list[str], log) -> None:
        count = len(self.steps)
        self.status = f"{label} ({index + 1}/{count})"
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_NO_INPUT="1")
        for key in ("PYTHONHOME", "PYTHONPATH"):
            env.pop(key, None)
        with self._lock:
            if self.cancelled:
                return
            try:
                self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, text=True, errors="replace", env=env,
                                              **child_process_options())
            except OSError as error:
                self.error = f"{label} failed: cannot run {command[0]}: {error.strerror or error}"
                return
        progress = PipProgress()
        last = ""
        for line in self._proc.stdout:
            log.write(line)
            if line.strip():
                last = line.strip()
            progress.feed(line)
            if progress.text:
                self.status = f"{label} ({index + 1}/{count}): {progress.text}"
            self.fraction = (index + progress.fraction) / count
        code = self._proc.wait()
        log.flush()
        if code != 0 and not self.cancelled:
            self.error = f"{label} failed (exit code {code}): {last[:200]}. Full log: {self.log_path}"
        else:
            self.fraction = (index + 1) / count


def _kill_if_still_running(proc: subprocess.Popen, grace: float = 5.0) -> None:
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


_current: Optional[InstallJob] = None


def current_install() -> Optional[InstallJob]:
    """The install started last (running or finished), None before the first."""
    return _current


def cancel_current_install() -> None:
    if _current is not None and _current.running:
        _current.cancel()


def start_install(venv: Path, online_access: bool, base_python: Optional[str] = None,
                  requirements: Optional[Path] = None,
                  steps: Optional[list[tuple[str, list[str]]]] = None) -> InstallJob:
    """Start installing into `venv`; InstallError if offline access is off or it runs already."""
    global _current
    if not online_access:
        raise InstallError("Installing needs to download packages (torch, diffusers: several GB), but "
                           "Blender's online access is disabled. Allow it in Preferences › System › "
                           "Network, or install the engine yourself and set its Python in the "
                           "Multiplane preferences")
    if _current is not None and _current.running:
        raise InstallError("An install is already running")
    requirements = Path(requirements) if requirements else engine_root() / "requirements.txt"
    if steps is None and not requirements.is_file():
        raise InstallError(f"{requirements} is missing (reinstall the Multiplane extension)")
    venv = Path(venv)
    torch = detect_torch_choice() if steps is None else None
    # Blender's own Python makes the venv (sys.executable is the bundled interpreter in 4.2+).
    steps = steps if steps is not None else install_steps(venv, base_python or sys.executable, requirements, torch)
    constraints = venv / "constraints.txt"
    (venv / COMPLETE_MARKER).unlink(missing_ok=True)  # a re-install counts only once it finished

    def before(index: int) -> None:
        if index == 2 and not constraints.exists():  # pin the engine to the torch just installed
            constraints.write_text(TORCH_SPEC + "\n", encoding="utf-8")

    _current = InstallJob(venv, steps, venv.parent / "install.log", before_step=before, torch=torch).start()
    return _current
