"""Reading weight files safely and checking their layout strictly.

Only safetensors are ever loaded: a pickle checkpoint can run arbitrary code, so it is
refused with a message that says how to convert it. Every published file we load is
checked name-by-name and shape-by-shape before any tensor is used, so a wrong or truncated
download fails loudly instead of generating noise.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

from .errors import MissingWeights, UnsafeCheckpoint, WeightMismatch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def refuse_pickle(path: str | Path) -> None:
    """Raise UnsafeCheckpoint for pickle-based checkpoint files."""
    name = Path(path).name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise UnsafeCheckpoint(
            f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can execute code when loaded "
            "and are refused; convert it to .safetensors (e.g. with the safetensors "
            "convert tool) or download the .safetensors release of the model"
        )


def load_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """Load a .safetensors file into a dict of tensors (refusing anything else)."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise MissingWeights([str(path)], "check the path, or let Multiplane download the file")
    if path.suffix.lower() != ".safetensors":
        raise UnsafeCheckpoint(f"{path}: only .safetensors weight files are supported")
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # truncated download, not a safetensors file, ...
        raise WeightMismatch(f"{path.name} (unreadable: {exc})") from exc


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header without reading any tensor data."""
    path = Path(path)
    refuse_pickle(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise WeightMismatch(f"{path.name} (not a safetensors file)")
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_state_dict(
    shapes: Mapping[str, Iterable[int]],
    expected: Mapping[str, Iterable[int]],
    what: str,
    optional: Iterable[str] = (),
) -> None:
    """Raise WeightMismatch unless `shapes` has exactly the `expected` names and shapes.

    `shapes` and `expected` map tensor names to shapes (tensors or torch.Size are fine as
    values via `.shape`). Names in `optional` may be absent, but if present must match.
    """
    got = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    want = {k: tuple(getattr(v, "shape", v)) for k, v in expected.items()}
    optional = set(optional)
    missing = [k for k in want if k not in got and k not in optional]
    unexpected = [k for k in got if k not in want]
    mismatched = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
    if missing or unexpected or mismatched:
        raise WeightMismatch(what, missing, unexpected, mismatched)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """`sha256:<hex>` of a file, streamed (weight files are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()
