"""Model presets for GET /v1/models: `inference.models.preset_availability` in the API's
shape (`schemas.ModelOut`; file lists and other facts under `details`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .schemas import ModelOut


def list_presets(models_dir: Optional[Path]) -> list[ModelOut]:
    from inference.models import preset_availability

    return [model_out(facts) for facts in preset_availability(models_dir)]


def model_out(facts: dict) -> ModelOut:
    facts = dict(facts)
    files = facts.get("files") or []
    sizes = [int_or_none(f.get("size")) for f in files if isinstance(f, dict)]
    return ModelOut(
        name=str(facts.pop("name")), available=bool(facts.pop("available", False)),
        size_bytes=sum(sizes) if sizes and None not in sizes else (0 if not files else None),
        download_bytes=int_or_none(facts.pop("download_bytes", None)),
        missing=[str(m) for m in facts.pop("missing", []) or []],
        description=str(facts.pop("description", "") or ""),
        details=json.loads(json.dumps(facts, default=str)))


def int_or_none(value) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
