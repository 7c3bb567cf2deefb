"""An output folder of stacks: listing the valid ones and cleaning up after interrupted writes."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from ..errors import StackFormatError
from .manifest import MANIFEST_FILE, SCRATCH_PATTERN, LayerStack, created_timestamp
from .reader import load_stack

logger = logging.getLogger(__name__)


def list_stacks(root: str | Path) -> list[tuple[Path, LayerStack]]:
    """Valid stacks directly under `root`, newest first; hidden and invalid folders are skipped.

    Invalid stack folders are logged (at warning level) rather than raised, so one broken
    folder does not hide the others.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir() or not (child / MANIFEST_FILE).is_file():
            continue
        try:
            found.append((child, load_stack(child)))
        except StackFormatError as error:
            logger.warning("skipping invalid stack: %s", error)
    found.sort(key=lambda item: item[0].name)
    found.sort(key=lambda item: created_timestamp(item[1].created), reverse=True)
    return found


def cleanup_temp(root: str | Path, min_age_seconds: float = 0.0) -> list[Path]:
    """Remove leftovers of interrupted writes under `root`; returns the paths handled.

    `.<name>.tmp-<hex>` folders (unfinished stacks) are deleted. Call it when no writer is
    running on `root` (e.g. at server start), or pass `min_age_seconds`.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    handled = []
    now = time.time()
    for child in sorted(root.iterdir()):
        match = SCRATCH_PATTERN.match(child.name)
        if not match or child.is_symlink() or not child.is_dir():
            continue
        try:
            if now - child.stat().st_mtime < min_age_seconds:
                continue
        except OSError:
            continue
        shutil.rmtree(child, ignore_errors=True)
        handled.append(child)
    return handled
