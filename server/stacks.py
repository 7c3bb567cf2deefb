"""What the job service reads from (and removes under) its output folder of stacks.

Moved as it was out of jobs.py; it is to be replaced by the stack package's own reader
(issue 8, part 3), so the server stops re-reading stack.json by hand.
"""
from __future__ import annotations

import json
import logging
import secrets
import shutil
from datetime import datetime
from pathlib import Path

log = logging.getLogger("multiplane.server")


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


def foreground_count(files: list[str]) -> int:
    """Foreground layers of a stack, from its file list."""
    return sum(1 for f in files if f.startswith("layer_") and f.endswith(".png"))


def stack_created(stack_dir: Path) -> float:
    try:
        created = json.loads((stack_dir / "stack.json").read_text(encoding="utf-8")).get("created")
        return datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
    except Exception:  # an old or hand-made manifest: the folder's time is good enough
        return (stack_dir / "stack.json").stat().st_mtime


def delete_stack(stack_dir: Path) -> None:
    # Renamed to a hidden temp name first: it leaves the listing at once, and a crash
    # half-way through the delete is cleaned up like any temp folder at the next start.
    doomed = stack_dir.with_name(f".{stack_dir.name}.tmp-{secrets.token_hex(4)}")
    try:
        stack_dir.rename(doomed)
    except OSError as exc:
        log.warning("could not remove expired stack %s: %s", stack_dir, exc)
        return
    shutil.rmtree(doomed, ignore_errors=True)
