"""Shared test fixtures: where the reference data lives, temp output folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def reference_dir() -> Path:
    """`../shared/reference` beside the clone (CI layout), or $MULTIPLANE_REFERENCE."""
    from tools.reference import reference_dir as find

    try:
        return find()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()


@pytest.fixture(scope="session")
def weight_manifest(reference) -> dict:
    return json.loads((reference / "layerdiffuse_weight_manifest.json").read_text())


def pytest_assertrepr_compare(op, left, right):
    """Large bytes/str comparisons: say where they differ instead of a quadratic difflib diff
    (a failing PNG-bytes assertion otherwise takes minutes to report)."""
    if op in ("==", "!=") and isinstance(left, (bytes, str)) and isinstance(right, type(left)) \
            and max(len(left), len(right)) > 4096:
        first = next((i for i, (a, b) in enumerate(zip(left, right)) if a != b), min(len(left), len(right)))
        return [f"{type(left).__name__} of length {len(left)} {op} length {len(right)}",
                f"first difference at index {first}"]
    return None
