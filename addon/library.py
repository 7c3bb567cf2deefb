"""The stacks folder as a library: every stack the add-on keeps, whatever .blend or Blender
session made it. No bpy: the history operators (history.py) and tests use it the same way.

A stack folder holds the engine's files as the server wrote them (never edited) plus one small
file of the add-on's own, `multiplane-job.json`: which server job made the stack, so that
"regenerate one layer" still works from another .blend.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .stack_reader import MANIFEST_FILE, StackReadError, StackRecipe, read_recipe

JOB_RECORD_FILE = "multiplane-job.json"


class LibraryError(Exception):
    """An action on the library that cannot go ahead; the message is for the artist."""


@dataclass(frozen=True)
class LibraryEntry:
    """One stack of the stacks folder, as the history lists it."""

    folder: Path
    recipe: StackRecipe
    job_id: str = ""
    server: str = ""

    @property
    def name(self) -> str:
        return self.recipe.stack.name

    @property
    def size(self) -> str:
        return f"{self.recipe.stack.width} x {self.recipe.stack.height}"

    @property
    def date(self) -> str:
        """The manifest's creation time as "YYYY-MM-DD HH:MM" (UTC, as the engine writes it)."""
        created = self.recipe.created
        return created[:16].replace("T", " ") if len(created) >= 16 else created

    def search_text(self) -> str:
        recipe = self.recipe
        return " ".join([self.name, recipe.prompt, recipe.model, recipe.method, self.size, self.date,
                         *(layer.prompt for layer in recipe.layers)])


def write_job_record(folder: Path, job_id: str, server: str) -> None:
    """Remember which server job made the stack in `folder` (the add-on's copy)."""
    Path(folder, JOB_RECORD_FILE).write_text(json.dumps({"job_id": job_id, "server": server}), encoding="utf-8")


def read_job_record(folder: Path) -> tuple[str, str]:
    """(job id, server identity) of a stack, ("", "") for one the add-on did not fetch."""
    try:
        data = json.loads(Path(folder, JOB_RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    return str(data.get("job_id") or ""), str(data.get("server") or "")


def entry_for(folder: Path) -> LibraryEntry:
    """The library entry of one stack folder; StackReadError when it is not a readable stack."""
    job_id, server = read_job_record(folder)
    return LibraryEntry(folder=Path(folder), recipe=read_recipe(folder), job_id=job_id, server=server)


def fill_history_item(item, entry: LibraryEntry) -> None:
    """Write `entry` into a history item (a MultiplaneHistoryItem; plain attribute writes, so
    this module stays bpy-free). The request and a job id already on the item are kept."""
    recipe, stack = entry.recipe, entry.recipe.stack
    item.name = entry.name
    item.path = str(entry.folder)
    item.prompt = recipe.prompt
    item.model = recipe.model
    item.method = recipe.method
    item.size = entry.size
    item.created = entry.date
    item.thumbnail = str(stack.composite)
    if entry.job_id:
        item.job_id, item.server = entry.job_id, entry.server
    item.layers.clear()
    for layer in stack.layers:
        row = item.layers.add()
        row.name, row.prompt, row.file = layer.name, layer.prompt, str(layer.path)


def scan_stacks(stacks_dir: Optional[Path]) -> tuple[list[LibraryEntry], list[str]]:
    """Every readable stack directly inside `stacks_dir`, newest first, and one line per
    folder that looks like a stack but cannot be read (shown, not fatal)."""
    entries, problems = [], []
    if stacks_dir is None or not Path(stacks_dir).is_dir():
        return entries, problems
    for folder in sorted(Path(stacks_dir).iterdir()):
        if not folder.is_dir() or folder.name.endswith(".partial") or not (folder / MANIFEST_FILE).is_file():
            continue
        try:
            entries.append(entry_for(folder))
        except StackReadError as error:
            problems.append(str(error))
    entries.sort(key=lambda entry: (entry.recipe.created, _mtime(entry.folder)), reverse=True)
    return entries, problems


def _mtime(folder: Path) -> float:
    try:
        return (folder / MANIFEST_FILE).stat().st_mtime
    except OSError:
        return 0.0


def matches(text: str, haystack: str) -> bool:
    """The history's search: every word of `text` appears in `haystack`, case-insensitively."""
    words = text.lower().split()
    lowered = haystack.lower()
    return all(word in lowered for word in words)


def filter_flags(texts: Iterable[str], query: str) -> list[bool]:
    """Which rows the search keeps (all of them for an empty query)."""
    return [matches(query, text) for text in texts]


def delete_stack(folder: Path, stacks_dir: Path) -> None:
    """Delete one stack folder of the library and nothing else: it must be a stack directly
    inside the stacks folder (never a path outside it, never a folder that is no stack)."""
    folder, root = Path(folder), Path(stacks_dir)
    try:
        inside = folder.resolve().parent == root.resolve()
    except OSError:
        inside = False
    if not inside:
        raise LibraryError(f"{folder} is not in the stacks folder {root}: the add-on deletes only its own stacks")
    if not (folder / MANIFEST_FILE).is_file():
        raise LibraryError(f"{folder} has no {MANIFEST_FILE}: not a stack, nothing was deleted")
    try:
        shutil.rmtree(folder)
    except OSError as error:
        raise LibraryError(f"could not delete {folder}: {error.strerror or error}") from None


def panel_settings(recipe: StackRecipe) -> dict:
    """The panel's settings that remake `recipe` ("Use these settings"): the scene's prompt,
    negative, background prompt, foreground layers (prompt, box, depth), seed, steps,
    guidance, method, model and size, as plain values. Missing values are left out."""
    stack = recipe.stack
    layers = recipe.layers
    values = {
        "stack_name": stack.name,
        "prompt": recipe.prompt,
        "negative_prompt": recipe.negative_prompt,
        "background_prompt": layers[0].prompt if layers else "",
        "layers": [{"prompt": layer.prompt, "box": layer.box, "depth": layer.depth or 0.0} for layer in layers[1:]],
        "size": (stack.width, stack.height),
        "method": recipe.method,
        "model": recipe.model,
        "seed": recipe.seed,
        "steps": recipe.steps,
        "guidance": recipe.guidance,
    }
    return {key: value for key, value in values.items() if value not in (None, "")}
