"""What the job service reads from (and removes under) its output folder, through the stack
package (`inference.stack`): the server never parses stack.json itself."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from inference.stack import MANIFEST_FILE, LayerStack, created_timestamp, load_stack, scratch_path

log = logging.getLogger("multiplane.server")


def read_stack(stack_dir: Path) -> LayerStack:
    """The validated manifest of a stack folder (images not opened); StackFormatError names
    the file and field of a bad one."""
    return load_stack(stack_dir, check_images=False)


def stack_files(stack: LayerStack) -> list[str]:
    """The files a client may fetch from a stack: the manifest and every file it names (the
    stack package only accepts plain file names there, so none can leave the folder)."""
    names = [MANIFEST_FILE]
    for layer in stack.layers:
        names += [layer.file] + ([layer.mask] if layer.mask else [])
    names += [stack.composite] + ([stack.blended] if stack.blended else []) + list(stack.exports)
    return list(dict.fromkeys(n for n in names if n))


def foreground_count(stack: LayerStack) -> int:
    return sum(1 for layer in stack.layers if layer.kind == "foreground")


def stack_created(stack: LayerStack, stack_dir: Path) -> float:
    """When the stack was made (POSIX seconds); the manifest's time, else the folder's."""
    try:
        return created_timestamp(stack.created)
    except (TypeError, ValueError):
        return (stack_dir / MANIFEST_FILE).stat().st_mtime


def delete_stack(stack_dir: Path) -> None:
    # Renamed to a hidden scratch name first: it leaves the listing at once, and a crash
    # half-way through the delete is cleaned up like any left-over scratch folder at the next start.
    doomed = scratch_path(stack_dir)
    try:
        stack_dir.rename(doomed)
    except OSError as exc:
        log.warning("could not remove expired stack %s: %s", stack_dir, exc)
        return
    shutil.rmtree(doomed, ignore_errors=True)
