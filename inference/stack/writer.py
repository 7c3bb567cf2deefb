"""Writing a stack folder all-or-nothing: files go into a hidden sibling temp folder that is
renamed into place at the end, so a folder holding a `stack.json` is always complete."""
from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import MultiplaneError
from ..progress import CancelToken
from .composite import alpha_over, check_image_array
from .exr import write_exr
from .export import write_ora, write_psd
from .files import fsync_dir, fsync_file, write_bytes, write_png
from .manifest import (
    BLENDED_FILE,
    COMPOSITE_FILE,
    EXR_FILE,
    MANIFEST_FILE,
    ORA_FILE,
    PSD_FILE,
    LayerStack,
    StackLayer,
    layer_file_name,
    layer_name,
    mask_file_name,
    scratch_path,
)


class StackExists(MultiplaneError, FileExistsError):
    """The destination folder of a new stack already exists (stacks are never replaced)."""


PNG_WRITERS = min(4, os.cpu_count() or 1)  # zlib releases the GIL: files encode in parallel


def _write_pngs(jobs: Sequence[tuple[Path, Callable[[], np.ndarray]]], checkpoint: Callable[[], None]) -> None:
    """Write each `(path, make_array)` as a PNG, several at once; the first error is raised.

    Each job checks `checkpoint` (cancellation) before it starts; after an error, jobs not
    yet started are dropped and running ones finish before this returns, so the caller may
    remove the folder safely.
    """
    failed = threading.Event()

    def write(path: Path, make: Callable[[], np.ndarray]) -> None:
        if failed.is_set():
            return
        try:
            checkpoint()
            write_png(path, make())
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max_workers=PNG_WRITERS, thread_name_prefix="multiplane-png")
    try:
        futures = [pool.submit(write, path, make) for path, make in jobs]
        for future in futures:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_stack(
    dest: str | Path,
    stack: LayerStack,
    background: np.ndarray,
    foregrounds: Sequence[np.ndarray],
    masks: Optional[Sequence[Optional[np.ndarray]]] = None,
    blended: Optional[np.ndarray] = None,
    export_psd: bool = False,
    export_ora: bool = False,
    cancel: Optional[CancelToken] = None,
    export_exr: bool = False,
) -> LayerStack:
    """Write a complete stack folder at `dest` atomically and return the manifest written.

    `stack` supplies the metadata; this fills in what the format fixes: layer `file` (and
    `name` when empty) as `background.png`, `layer_01.png`..., `mask` as `mask_NN.png`,
    `composite`, `blended`, `exports`, `created` (when empty), `name` (when empty: the
    folder name) and `timings["save"]` (measured here). `masks`, if given, has one entry per
    foreground (None for no mask). The caller's `stack` is not modified.

    Nothing is visible at `dest` until every file is written and synced; on any error or
    cancellation (checked between files) the temp folder is removed and the error re-raised.
    An existing `dest` raises StackExists: a stack is never replaced.
    """
    started = time.perf_counter()
    dest = Path(dest)
    if not dest.name or dest.name.startswith("."):
        raise ValueError(f"dest: the stack folder name must not be empty or hidden, got {dest.name!r}")

    # 1. validate everything before touching the disk
    foregrounds = list(foregrounds)
    masks = _check_inputs(stack, background, foregrounds, masks, blended)
    final = _final_manifest(stack, dest, masks, blended is not None, export_psd, export_ora, export_exr)
    _refuse_existing(dest)

    def checkpoint() -> None:
        if cancel is not None:
            cancel.raise_if_cancelled()

    # 2. write and sync every file into a hidden temp folder, the manifest last
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = scratch_path(dest)
    temp.mkdir()
    try:
        _write_files(temp, final, [background, *foregrounds], masks, blended, checkpoint)
        checkpoint()
        final.timings["save"] = round(time.perf_counter() - started, 4)
        write_bytes(temp / MANIFEST_FILE, final.to_json().encode("utf-8"))
        fsync_dir(temp)
        # 3. rename it into place: the only step visible at `dest`
        checkpoint()
        _commit(temp, dest)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def _check_inputs(stack: LayerStack, background: np.ndarray, foregrounds: list[np.ndarray],
                  masks: Optional[Sequence[Optional[np.ndarray]]],
                  blended: Optional[np.ndarray]) -> list[Optional[np.ndarray]]:
    """Types, counts and pixel arrays of a `write_stack` call; returns one mask entry per foreground."""
    if not isinstance(stack, LayerStack):
        raise ValueError(f"stack: expected a LayerStack, got {type(stack).__name__}")
    if len(stack.layers) != 1 + len(foregrounds):
        raise ValueError(f"stack.layers has {len(stack.layers)} entries but 1 background + "
                         f"{len(foregrounds)} foregrounds were given")
    size = (stack.height, stack.width)
    check_image_array(background, "background", size, 3)
    for i, image in enumerate(foregrounds, start=1):
        check_image_array(image, f"foregrounds[{i - 1}] ({layer_name(i)})", size, 4)
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(foregrounds):
            raise ValueError(f"masks has {len(masks)} entries, expected one per foreground ({len(foregrounds)})")
        for i, mask in enumerate(masks):
            if mask is not None:
                check_image_array(mask, f"masks[{i}]", size, None)
    else:
        masks = [None] * len(foregrounds)
    if blended is not None:
        check_image_array(blended, "blended", size, 3)
    return masks


def _final_manifest(stack: LayerStack, dest: Path, masks: Sequence[Optional[np.ndarray]], has_blended: bool,
                    export_psd: bool, export_ora: bool, export_exr: bool = False) -> LayerStack:
    """A copy of `stack` with what the format fixes filled in, checked like the reader checks it."""
    layers = []
    for i, layer in enumerate(stack.layers):
        if not isinstance(layer, StackLayer):
            raise ValueError(f"stack.layers[{i}]: expected a StackLayer, got {type(layer).__name__}")
        layers.append(replace(
            layer,
            name=layer.name or layer_name(i),
            file=layer_file_name(i),
            mask=mask_file_name(i) if i > 0 and masks[i - 1] is not None else None,
        ))
    exports = ([PSD_FILE] if export_psd else []) + ([ORA_FILE] if export_ora else []) + \
        ([EXR_FILE] if export_exr else [])
    described = replace(
        stack,
        name=stack.name or dest.name,
        created=stack.created or _utc_now(),
        layers=layers,
        composite=COMPOSITE_FILE,
        blended=BLENDED_FILE if has_blended else None,
        exports=exports,
    )
    # The same rules the reader applies (raises StackFormatError naming the field); the
    # result is also normalized (boxes as float tuples, numbers as floats).
    return LayerStack.from_dict(described.to_dict(), "stack")


def _write_files(folder: Path, final: LayerStack, images: list[np.ndarray],
                  masks: Sequence[Optional[np.ndarray]], blended: Optional[np.ndarray],
                  checkpoint: Callable[[], None]) -> None:
    """Every PNG `final` names (several at once), then the exports it lists, each synced."""
    jobs = [(folder / COMPOSITE_FILE, lambda: alpha_over(images))]
    jobs += [(folder / layer.file, lambda image=image: image) for layer, image in zip(final.layers, images)]
    jobs += [(folder / layer.mask, lambda mask=mask: mask)
             for layer, mask in zip(final.layers[1:], masks) if mask is not None]
    if blended is not None:
        jobs.append((folder / BLENDED_FILE, lambda: blended))
    _write_pngs(jobs, checkpoint)
    def write_frame_exr(path, layers, images, width, height):
        write_exr(path, layers, images, width, height, final.frame_rect)

    for name, write in ((PSD_FILE, write_psd), (ORA_FILE, write_ora), (EXR_FILE, write_frame_exr)):
        if name in final.exports:
            checkpoint()
            write(folder / name, final.layers, images, final.width, final.height)
            fsync_file(folder / name)


def _refuse_existing(dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        raise StackExists(f"{dest} already exists; choose another name")


def _commit(temp: Path, dest: Path) -> None:
    """Rename the finished temp folder into place (never over an existing one)."""
    _refuse_existing(dest)
    try:
        os.rename(temp, dest)
    except OSError as error:
        if dest.exists():
            raise StackExists(f"{dest} appeared while the stack was being written; "
                              "choose another name") from error
        raise
    fsync_dir(dest.parent)
