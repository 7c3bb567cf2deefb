"""Where the project's reference data lives (`../shared/reference`, see its README): one
home for the tests, the benchmarks and the full-size builder."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """`../shared/reference` beside the clone (CI layout), or $MULTIPLANE_REFERENCE.

    Raises FileNotFoundError naming the path and the variable when it is not there."""
    env = os.environ.get("MULTIPLANE_REFERENCE")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "reference"
    if not path.is_dir():
        raise FileNotFoundError(f"reference data not found at {path}; set MULTIPLANE_REFERENCE")
    return path
