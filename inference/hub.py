"""Finding model files on disk and downloading the ones that are not there.

Lookup order for every file: the user's models folder, then the Hugging Face cache, then a
download into that cache (resumable: huggingface_hub keeps a `.incomplete` file). When
files cannot be had (offline, no connection, repo gated) the caller gets ONE MissingWeights
listing every missing file of the model with its repo, approximate size and the exact
command that fetches it, instead of failing on the first file and again on the next.

The models folder layout, so files downloaded with `hf download ... --local-dir` land
where we look:
    <models_dir>/<file name>                         single files (LayerDiffuse weights)
    <models_dir>/<repo name>/<path in repo>          base models (a diffusers folder)

Environment is read at call time (not import time) so HF_HUB_OFFLINE / HF_HOME set by a
server, the CLI or a test take effect without re-importing huggingface_hub.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.std import tqdm as _tqdm

from .errors import Cancelled, MissingWeights
from .progress import CancelToken, Progress, ProgressCallback

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repository that a model needs, with its size for the UI."""

    repo_id: str
    filename: str  # path inside the repo, "/"-separated
    approx_size: int = 0  # bytes, approximate (display and error messages only)
    role: str = ""

    def describe(self) -> str:
        size = f" (~{format_size(self.approx_size)})" if self.approx_size else ""
        return f"{self.repo_id}: {self.filename}{size}"


def format_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # unreachable; keeps type checkers calm


# -- environment -------------------------------------------------------------------------
def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now; falls back to huggingface_hub's."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value is not None and value.strip() != "":
            return value.strip().lower() in _TRUE
    return bool(hf_constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder as the environment says now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


def repo_name(repo_id: str) -> str:
    return repo_id.rsplit("/", 1)[-1]


# -- looking on disk ---------------------------------------------------------------------
def find_in_models_dir(models_dir: Optional[Path], repo_id: str, filename: str) -> Optional[Path]:
    if models_dir is None:
        return None
    models_dir = Path(models_dir)
    candidates = [models_dir / repo_name(repo_id) / filename]
    if "/" not in filename:
        candidates.insert(0, models_dir / filename)
    for path in candidates:
        if path.is_file():
            return path
    return None


def find_in_hf_cache(repo_id: str, filename: str, cache_dir: Optional[Path] = None,
                     revision: Optional[str] = None) -> Optional[Path]:
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir or hf_cache_dir()),
                                   revision=revision)
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found)
    return None  # not cached, or cached as "does not exist" (_CACHED_NO_EXIST)


def locate_file(repo_id: str, filename: str, *, models_dir: Optional[Path] = None,
                cache_dir: Optional[Path] = None) -> Optional[Path]:
    """Where `filename` of `repo_id` is on disk (models folder first, then HF cache), or None."""
    return (find_in_models_dir(models_dir, repo_id, filename)
            or find_in_hf_cache(repo_id, filename, cache_dir))


def cached_snapshot_dir(repo_id: str, cache_dir: Optional[Path] = None,
                        revision: str = "main") -> Optional[Path]:
    """The HF cache snapshot folder `revision` (a branch) points to, if the cache has one."""
    repo_cache = Path(cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    ref = repo_cache / "refs" / revision
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    folder = repo_cache / "snapshots" / commit
    return folder if folder.is_dir() else None


# -- downloading -------------------------------------------------------------------------
def progress_bar_class(filename: str, progress: Optional[ProgressCallback],
                       cancel: Optional[CancelToken], min_interval: float = 0.1) -> type:
    """A tqdm class for huggingface_hub's `tqdm_class` that reports bytes as Progress.

    huggingface_hub drives it for both transports: plain HTTP calls `update(bytes)` per
    chunk (plus `update_transfer`); Xet, seeing `update_transfer`, uses one bar and calls
    `update(bytes written)`. Counting only `update` therefore counts every byte once. It
    draws nothing (the server and the add-on show their own progress) and raises Cancelled
    from `update` so a cancel stops the transfer; the partial file stays for resuming.
    """

    class ReportingBar(_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)
            self.done = int(kwargs.get("initial") or 0)
            self._last_report = 0.0
            self._report(force=True)

        def _report(self, force: bool = False) -> None:
            total = int(self.total or 0)
            now = time.monotonic()
            if progress is not None and (force or now - self._last_report >= min_interval
                                         or (total and self.done >= total)):
                self._last_report = now
                progress(Progress(phase="download", step=self.done, total=total, message=filename))

        def update(self, n=1):
            if cancel is not None and cancel.cancelled:
                raise Cancelled(cancel.reason)
            self.done += int(n or 0)
            self._report()
            return True

        def update_transfer(self, n=1) -> None:
            """Network bytes (may differ from file bytes with Xet); not counted."""

        def set_transfer_postfix_str(self, *args, **kwargs) -> None:
            pass

    return ReportingBar


class _Unreachable(Exception):
    """The hub cannot be reached at all: stop trying further files."""


def _download(file: HubFile, *, cache_dir: Path, local_dir: Optional[Path], revision: Optional[str],
              progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> Path:
    """hf_hub_download one file; translate hub errors into a reason string or _Unreachable."""
    try:
        path = hf_hub_download(
            file.repo_id, file.filename, revision=revision, cache_dir=str(cache_dir),
            local_dir=str(local_dir) if local_dir else None,
            tqdm_class=progress_bar_class(file.filename, progress, cancel),
        )
    except Cancelled:
        raise
    except GatedRepoError as exc:
        raise LookupError(f"{file.repo_id} is gated: accept its license on huggingface.co and log in "
                          f"with `hf auth login`") from exc
    except (RepositoryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError) as exc:
        raise LookupError(f"not found on the Hub ({type(exc).__name__})") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as exc:
        raise _Unreachable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    except HfHubHTTPError as exc:
        raise LookupError(f"Hub error: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # httpx transport errors after huggingface_hub's own retries
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
        raise
    return Path(path)


def missing_weights_error(missing: Sequence[HubFile], *, reason: str,
                          models_dir: Optional[Path] = None,
                          notes: Optional[dict[HubFile, str]] = None) -> MissingWeights:
    """One MissingWeights naming every file, with commands that fetch exactly those files."""
    notes = notes or {}
    entries = [f.describe() + (f" — {notes[f]}" if f in notes else "") for f in missing]
    folder = str(models_dir) if models_dir else "<models folder>"
    by_repo: dict[str, list[str]] = {}
    for f in missing:
        by_repo.setdefault(f.repo_id, []).append(f.filename)
    commands = []
    for repo, names in by_repo.items():
        nested = any("/" in n for n in names)
        target = f"{folder}/{repo_name(repo)}" if nested else folder
        commands.append(f"    hf download {repo} {' '.join(names)} --local-dir {target}")
    total = sum(f.approx_size for f in missing)
    hint = (
        f"{reason}\n"
        f"About {format_size(total)} in total. Provide the files in one of these ways:\n"
        f"  - download them on a connected machine into the models folder:\n" + "\n".join(commands) + "\n"
        f"    (without --local-dir they go to the Hugging Face cache, which is searched too)\n"
        f"  - or copy them by hand: single files flat into {folder}/, base-model files into "
        f"{folder}/<repo name>/ keeping their sub-folders\n"
        f"  - or pass a local diffusers folder or a .safetensors checkpoint as the model"
    )
    return MissingWeights(entries, hint)


def fetch_files(files: Sequence[HubFile], *, models_dir: Optional[Path] = None,
                cache_dir: Optional[Path] = None, local_dir: Optional[Path] = None,
                allow_download: bool = True, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> dict[HubFile, Path]:
    """Paths of all `files`, downloading the missing ones; one MissingWeights for all failures.

    `local_dir`, if given, is searched and is where downloads go instead of the HF cache
    (huggingface_hub's meaning); `models_dir` is only searched.
    """
    return acquire([], files, models_dir=models_dir, cache_dir=cache_dir, local_dir=local_dir,
                   allow_download=allow_download, progress=progress, cancel=cancel)


def fetch_file(repo_id: str, filename: str, *, models_dir: Optional[Path] = None,
               cache_dir: Optional[Path] = None, local_dir: Optional[Path] = None,
               allow_download: bool = True, progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None, approx_size: int = 0) -> Path:
    """Path of one Hub file: models folder, then HF cache, then download (see fetch_files)."""
    f = HubFile(repo_id, filename, approx_size)
    return fetch_files([f], models_dir=models_dir, cache_dir=cache_dir, local_dir=local_dir,
                       allow_download=allow_download, progress=progress, cancel=cancel)[f]


# -- whole base models (diffusers folders) -----------------------------------------------
@dataclass
class SnapshotPlan:
    """Where a base model's files are, before anything is downloaded."""

    repo_id: str
    files: tuple[HubFile, ...]
    folder: Optional[Path]  # complete folder on disk, if any
    missing: tuple[HubFile, ...]
    cache_dir: Path


def plan_snapshot(repo_id: str, files: Sequence[HubFile], *, models_dir: Optional[Path] = None,
                  cache_dir: Optional[Path] = None) -> SnapshotPlan:
    """Is `repo_id` complete in <models_dir>/<repo name>/ or in one HF cache snapshot?"""
    cache_dir = Path(cache_dir) if cache_dir else hf_cache_dir()
    files = tuple(files)
    if models_dir is not None:
        local = Path(models_dir) / repo_name(repo_id)
        if all((local / f.filename).is_file() for f in files):
            return SnapshotPlan(repo_id, files, local, (), cache_dir)
    snapshot = cached_snapshot_dir(repo_id, cache_dir)
    if snapshot is None:
        return SnapshotPlan(repo_id, files, None, files, cache_dir)
    missing = tuple(f for f in files if not (snapshot / f.filename).is_file())
    return SnapshotPlan(repo_id, files, None if missing else snapshot, missing, cache_dir)


def complete_snapshot(plan: SnapshotPlan, *, progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelToken] = None) -> Path:
    """Download a plan's missing files into one cache snapshot; return the diffusers folder.

    The first download pins the commit, the others use that commit so the files all land
    in the same snapshot folder even if the branch moves meanwhile. Raises _Unreachable /
    LookupError (see fetch_snapshot, which turns them into MissingWeights).
    """
    if plan.folder is not None:
        return plan.folder
    snapshot = cached_snapshot_dir(plan.repo_id, plan.cache_dir)
    revision = snapshot.name if snapshot is not None else None
    folder = snapshot
    for f in plan.missing:
        if cancel is not None:
            cancel.raise_if_cancelled()
        path = _download(f, cache_dir=plan.cache_dir, local_dir=None, revision=revision,
                         progress=progress, cancel=cancel)
        if revision is None:
            # <cache>/models--org--name/snapshots/<commit>/<filename>
            folder = Path(str(path)[: -len(f.filename)].rstrip("/\\"))
            revision = folder.name
    assert folder is not None
    absent = [f.filename for f in plan.files if not (folder / f.filename).is_file()]
    if absent:
        raise LookupError(f"snapshot {folder} is still missing {', '.join(absent)}")
    return folder


def fetch_snapshot(repo_id: str, files: Sequence[HubFile], *, models_dir: Optional[Path] = None,
                   cache_dir: Optional[Path] = None, allow_download: bool = True,
                   progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> Path:
    """A local diffusers folder holding exactly `files` of `repo_id` (downloading what's missing).

    We fetch a fixed list (fp16 safetensors weights, configs, tokenizer files) rather than
    `snapshot_download(allow_patterns=...)`: the list also tells an offline user precisely
    what is missing and how big it is, progress is per file with its name, and pickle
    weights (.bin/.ckpt) can never be selected by a pattern.
    """
    plan = plan_snapshot(repo_id, files, models_dir=models_dir, cache_dir=cache_dir)
    if plan.folder is not None:
        return plan.folder
    acquire([plan], (), models_dir=models_dir, cache_dir=cache_dir, allow_download=allow_download,
            progress=progress, cancel=cancel)
    assert plan.folder is not None
    return plan.folder


def acquire(plans: Iterable[SnapshotPlan], extra: Sequence[HubFile] = (), *,
            models_dir: Optional[Path] = None, cache_dir: Optional[Path] = None,
            local_dir: Optional[Path] = None, allow_download: bool = True,
            progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None) -> dict[HubFile, Path]:
    """Complete base-model snapshot plans and fetch single files, failing once for all.

    Returns the paths of `extra`; each completed plan gets its `folder`. Used to resolve a
    model (base + LayerDiffuse files) so an offline user learns every missing file at once.
    A connection failure stops further attempts (they would fail the same way) and every
    file not yet on disk is reported.
    """
    plans = list(plans)
    cache_dir = Path(cache_dir) if cache_dir else hf_cache_dir()
    # 1. What is on disk already.
    found: dict[HubFile, Path] = {}
    extra_missing: list[HubFile] = []
    for f in extra:
        path = locate_file(f.repo_id, f.filename, models_dir=models_dir, cache_dir=cache_dir)
        if path is None and local_dir is not None and (Path(local_dir) / f.filename).is_file():
            path = Path(local_dir) / f.filename
        if path is None:
            extra_missing.append(f)
        else:
            found[f] = path
    all_missing = [f for p in plans for f in p.missing] + extra_missing
    if not all_missing:
        return found
    # 2. Whether downloading is allowed at all.
    if not allow_download:
        raise missing_weights_error(all_missing, reason="Downloading is turned off (allow_download is false).",
                                    models_dir=models_dir)
    if offline_mode():
        raise missing_weights_error(all_missing, reason="Offline mode is on (HF_HUB_OFFLINE=1), so nothing "
                                                        "can be downloaded.", models_dir=models_dir)
    # 3. Download, and report every file still missing in one error.
    run = _DownloadRun(cache_dir, local_dir, progress, cancel)
    for plan in plans:
        if plan.missing:
            run.complete(plan)
    for f in extra_missing:
        if cancel is not None:
            cancel.raise_if_cancelled()
        path = run.fetch(f)
        if path is not None:
            found[f] = path
    if run.failed:
        reason = (f"The Hugging Face Hub could not be reached ({run.unreachable})." if run.unreachable
                  else "Some files could not be downloaded.")
        raise missing_weights_error(run.failed, reason=reason, models_dir=models_dir, notes=run.notes)
    return found


class _DownloadRun:
    """The downloads of one `acquire`: what failed and why; after the first connection
    failure nothing else is tried (it would fail the same way)."""

    def __init__(self, cache_dir: Path, local_dir: Optional[Path], progress, cancel):
        self.cache_dir, self.local_dir, self.progress, self.cancel = cache_dir, local_dir, progress, cancel
        self.notes: dict[HubFile, str] = {}
        self.failed: list[HubFile] = []
        self.unreachable: Optional[str] = None

    def complete(self, plan: SnapshotPlan) -> None:
        if self.unreachable is not None:
            self.failed.extend(plan.missing)
            return
        try:
            plan.folder = complete_snapshot(plan, progress=self.progress, cancel=self.cancel)
            plan.missing = ()
        except _Unreachable as exc:
            self.unreachable = str(exc)
            self.failed.extend(f for f in plan.missing if not _in_any_snapshot(plan, f))
        except LookupError as exc:
            for f in plan.missing:
                self.notes[f] = str(exc)
            self.failed.extend(plan.missing)

    def fetch(self, f: HubFile) -> Optional[Path]:
        if self.unreachable is not None:
            self.failed.append(f)
            return None
        try:
            return _download(f, cache_dir=self.cache_dir, local_dir=self.local_dir, revision=None,
                             progress=self.progress, cancel=self.cancel)
        except _Unreachable as exc:
            self.unreachable = str(exc)
        except LookupError as exc:
            self.notes[f] = str(exc)
        self.failed.append(f)
        return None


def _in_any_snapshot(plan: SnapshotPlan, f: HubFile) -> bool:
    snapshot = cached_snapshot_dir(plan.repo_id, plan.cache_dir)
    return snapshot is not None and (snapshot / f.filename).is_file()
