"""Shared test fixtures: where the reference data lives, temp output folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """`../shared/reference` beside the clone (CI layout), or $MULTIPLANE_REFERENCE."""
    env = os.environ.get("MULTIPLANE_REFERENCE")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "reference"
    if not path.is_dir():
        pytest.fail(f"reference data not found at {path}; set MULTIPLANE_REFERENCE")
    return path


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()


@pytest.fixture(scope="session")
def weight_manifest(reference) -> dict:
    return json.loads((reference / "layerdiffuse_weight_manifest.json").read_text())
