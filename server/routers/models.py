"""/v1/models: the presets and their downloads."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from ..jobs import JobManager
from ..presets import list_presets
from ..schemas import ErrorOut, JobOut, ModelList
from . import NOT_FOUND
from ..state import get_manager

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(manager: JobManager = Depends(get_manager)) -> ModelList:
    """Model presets and whether their weights are on disk."""
    return ModelList(models=list_presets(manager.models_dir))


@router.post("/{name}/download", status_code=202, response_model=JobOut,
             responses={**NOT_FOUND, 429: {"model": ErrorOut}})
def download_model(name: str, manager: JobManager = Depends(get_manager)) -> JobOut:
    """Start (or join) a download of a preset's weights: a job of kind `download`,
    followed with the same /v1/jobs endpoints."""
    return manager.submit_download(name)
