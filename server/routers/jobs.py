"""/v1/jobs: submit, follow, cancel and edit jobs, and fetch their stacks' files.

Job routes answer with the service's snapshots, `JobOut` models
(`response_model` validates and documents them).
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Path as PathParam, Query
from fastapi.responses import FileResponse, Response, StreamingResponse

from ..events import SnapshotQueue, status_stream
from ..jobs import JobManager
from ..schemas import ErrorOut, ExtendIn, JobCreate, JobList, JobOut, RegenerateIn
from . import NOT_FOUND
from ..state import get_keepalive_seconds, get_manager

router = APIRouter(prefix="/jobs", tags=["jobs"])

QUEUE_FULL = {429: {"model": ErrorOut, "description": "the queue is full"}}
MEDIA_TYPES = {"png": "image/png", "json": "application/json", "psd": "image/vnd.adobe.photoshop",
               "ora": "image/openraster", "exr": "image/x-exr"}


@router.post("", status_code=202, response_model=JobOut,
             responses={**QUEUE_FULL, 503: {"model": ErrorOut, "description": "shutting down"}})
def submit_job(body: JobCreate, manager: JobManager = Depends(get_manager)) -> JobOut:
    """Queue a layer stack; answers at once with the job's id and queue position."""
    return manager.submit(body)


@router.get("", response_model=JobList)
def list_jobs(limit: int = Query(100, ge=1, le=1000),
              manager: JobManager = Depends(get_manager)) -> JobList:
    """Recent jobs, newest first, including stacks finished before a restart."""
    return JobList(jobs=manager.list(limit))


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
def get_job(job_id: str, manager: JobManager = Depends(get_manager)) -> JobOut:
    return manager.get(job_id)


@router.delete("/{job_id}", response_model=JobOut,
               responses={**NOT_FOUND, 409: {"model": ErrorOut, "description": "the job already finished"}})
def cancel_job(job_id: str, manager: JobManager = Depends(get_manager)) -> JobOut:
    """Cancel: a queued job at once; a running one stops within one denoising step
    (its status turns `cancelled` when it has stopped; `cancel_requested` until then)."""
    return manager.cancel(job_id)


@router.post("/{job_id}/regenerate", status_code=202, response_model=JobOut,
             responses={**NOT_FOUND, 409: {"model": ErrorOut, "description": "no finished stack"},
                        **QUEUE_FULL})
def regenerate_layer(job_id: str, body: RegenerateIn, manager: JobManager = Depends(get_manager)) -> JobOut:
    """Regenerate one layer of a finished stack as a new job (kind `regenerate`): a new
    stack whose other layers are byte-identical copies, the new layer attending to them."""
    return manager.submit_regenerate(job_id, body)


@router.post("/{job_id}/extend", status_code=202, response_model=JobOut,
             responses={**NOT_FOUND, 409: {"model": ErrorOut, "description": "no finished stack"},
                        **QUEUE_FULL})
def extend_stack(job_id: str, body: ExtendIn, manager: JobManager = Depends(get_manager)) -> JobOut:
    """Extend a finished stack for a new shot as a new job (kind `extend`): every layer grows
    around the same frame until the margins fit, in one joint run; the old stack stays."""
    return manager.submit_extend(job_id, body)


@router.get("/{job_id}/events",
            responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {}}, "description": "status events"}})
async def job_events(job_id: str, manager: JobManager = Depends(get_manager),
                     keepalive_seconds: float = Depends(get_keepalive_seconds)):
    """Server-sent events: `event: status` with a JobOut as data, one per change,
    ending after the terminal status; `: keep-alive` comments while nothing happens."""
    updates = SnapshotQueue(asyncio.get_running_loop())
    first, unsubscribe = manager.subscribe(job_id, updates.push)
    return StreamingResponse(
        status_stream(first, updates.queue, unsubscribe, keepalive_seconds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/files/{name}",
            responses={**NOT_FOUND, 200: {"content": {"image/png": {}, "application/json": {},
                                                      "application/octet-stream": {}},
                                          "description": "the file"}})
def get_file(job_id: str, name: str = PathParam(max_length=255),
             manager: JobManager = Depends(get_manager)) -> FileResponse:
    """A file the job's stack.json lists (stack.json itself included); 404 otherwise."""
    path = manager.file_path(job_id, name)
    return FileResponse(path, media_type=media_type(path.name), filename=path.name)


@router.get("/{job_id}/previews/{name}",
            responses={**NOT_FOUND, 200: {"content": {"image/png": {}}, "description": "the preview"}})
def get_preview(job_id: str, name: str = PathParam(max_length=64),
                manager: JobManager = Depends(get_manager)) -> Response:
    """The latest live preview of one layer of a running job (names in its `previews`)."""
    return Response(manager.preview_png(job_id, name), media_type="image/png", headers={"Cache-Control": "no-store"})


def media_type(name: str) -> str:
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return MEDIA_TYPES.get(suffix, "application/octet-stream")
