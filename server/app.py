"""The HTTP API (`/v1`): thin FastAPI routes over `jobs.JobManager`.

Build it with `create_app(manager, token=..., hosts=...)`; `process.run_server` does that
for the real process, tests do it with a fake engine. The OpenAPI description is at
/openapi.json (and /docs); the schemas in `schemas.py` are the contract.
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.errors import InvalidRequest

from .jobs import JobManager, ServiceError
from .schemas import (TERMINAL_STATES, ErrorOut, HealthOut, JobCreate, JobList, JobOut,
                      ModelList, ModelOut, RegenerateIn)
from .security import BearerAuth, HostGuard

API_PREFIX = "/v1"
SSE_KEEPALIVE_SECONDS = 15.0

_ERRORS = {401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
           421: {"model": ErrorOut, "description": "Host header is not this server"}}
_NOT_FOUND = {404: {"model": ErrorOut, "description": "no such job (or file)"}}


@dataclass
class ServerInfo:
    """Facts for /v1/health that do not change while the process runs."""

    version: str
    device: dict = field(default_factory=dict)
    torch: Optional[str] = None
    diffusers: Optional[str] = None


def create_app(manager: JobManager, *, token: str, hosts, info: ServerInfo,
               keepalive_seconds: float = SSE_KEEPALIVE_SECONDS) -> FastAPI:
    """The ASGI app: the Host guard outside, the bearer token on every route but health."""
    app = FastAPI(title="Multiplane inference server", version=info.version,
                  description="Generates layered scene backdrops (an RGB background plus RGBA "
                              "foregrounds) for the Multiplane Blender add-on. Every endpoint "
                              "but /v1/health needs `Authorization: Bearer <token>`.",
                  docs_url=None, redoc_url=None)
    app.state.manager = manager
    add_offline_docs(app)

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI answers 400 for a body it cannot even decode (e.g. not UTF-8); for the
        # client that is malformed JSON like any other: 422, in the usual shape.
        if exc.status_code == 400 and str(exc.detail).startswith("There was an error parsing the body"):
            return JSONResponse({"detail": [{"loc": ["body"], "type": "json_invalid",
                                             "msg": "the body is not valid JSON text"}]},
                                status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(InvalidRequest)
    async def _invalid_request(_request: Request, exc: InvalidRequest):
        # Same shape as FastAPI's own 422, so clients read one format.
        return JSONResponse({"detail": [{"loc": ["body", *field_path(exc.field)],
                                         "msg": exc.message, "type": "value_error"}]},
                            status_code=422)

    public = APIRouter(prefix=API_PREFIX)
    private = APIRouter(prefix=API_PREFIX, dependencies=[Depends(BearerAuth(token))],
                        responses=_ERRORS)

    @public.get("/health", response_model=HealthOut, tags=["server"],
                responses={421: _ERRORS[421]})
    def health() -> dict:
        """Liveness and what runs where; the only endpoint without a token."""
        return {"status": "ok", "version": info.version, "device": info.device,
                "torch": info.torch, "diffusers": info.diffusers,
                "loaded_model": getattr(manager.engine, "loaded_model", None),
                "queue_length": manager.queue_length(), "running": manager.running_id()}

    @private.post("/jobs", status_code=202, response_model=JobOut, tags=["jobs"],
                  responses={429: {"model": ErrorOut, "description": "the queue is full"},
                             503: {"model": ErrorOut, "description": "shutting down"}})
    def submit_job(body: JobCreate) -> dict:
        """Queue a layer stack; answers at once with the job's id and queue position."""
        return manager.submit(body)

    @private.get("/jobs", response_model=JobList, tags=["jobs"])
    def list_jobs(limit: int = Query(100, ge=1, le=1000)) -> dict:
        """Recent jobs, newest first, including stacks finished before a restart."""
        return {"jobs": manager.list(limit)}

    @private.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=_NOT_FOUND)
    def get_job(job_id: str) -> dict:
        return manager.get(job_id)

    @private.delete("/jobs/{job_id}", response_model=JobOut, tags=["jobs"],
                    responses={**_NOT_FOUND, 409: {"model": ErrorOut,
                                                   "description": "the job already finished"}})
    def cancel_job(job_id: str) -> dict:
        """Cancel: a queued job at once; a running one stops within one denoising step
        (its status turns `cancelled` when it has stopped; `cancel_requested` until then)."""
        return manager.cancel(job_id)

    @private.post("/jobs/{job_id}/regenerate", status_code=202, response_model=JobOut, tags=["jobs"],
                  responses={**_NOT_FOUND, 409: {"model": ErrorOut, "description": "no finished stack"},
                             429: {"model": ErrorOut, "description": "the queue is full"}})
    def regenerate_layer(job_id: str, body: RegenerateIn) -> dict:
        """Regenerate one layer of a finished stack as a new job (kind `regenerate`): a new
        stack whose other layers are byte-identical copies, the new layer attending to them."""
        return manager.submit_regenerate(job_id, body)

    @private.get("/jobs/{job_id}/events", tags=["jobs"],
                 responses={**_NOT_FOUND, 200: {"content": {"text/event-stream": {}},
                                                "description": "status events"}})
    async def job_events(job_id: str):
        """Server-sent events: `event: status` with a JobOut as data, one per change,
        ending after the terminal status; `: keep-alive` comments while nothing happens."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def push(snapshot: Optional[dict]) -> None:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, snapshot)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        first, unsubscribe = manager.subscribe(job_id, push)
        return StreamingResponse(
            status_stream(first, updates, unsubscribe, keepalive_seconds),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @private.get("/jobs/{job_id}/files/{name}", tags=["jobs"],
                 responses={**_NOT_FOUND, 200: {"content": {"image/png": {},
                                                            "application/json": {},
                                                            "application/octet-stream": {}},
                                                "description": "the file"}})
    def get_file(job_id: str, name: str = PathParam(max_length=255)):
        """A file the job's stack.json lists (stack.json itself included); 404 otherwise."""
        path = manager.file_path(job_id, name)
        return FileResponse(path, media_type=media_type(path.name), filename=path.name)

    @private.get("/models", response_model=ModelList, tags=["models"])
    def list_models() -> dict:
        """Model presets and whether their weights are on disk."""
        return {"models": model_list(manager)}

    @private.post("/models/{name}/download", status_code=202, response_model=JobOut,
                  tags=["models"], responses={**_NOT_FOUND, 429: {"model": ErrorOut}})
    def download_model(name: str) -> dict:
        """Start (or join) a download of a preset's weights: a job of kind `download`,
        followed with the same /v1/jobs endpoints."""
        return manager.submit_download(name)

    app.include_router(public)
    app.include_router(private)
    app.add_middleware(HostGuard, hosts=hosts)
    return app


DOCS_ASSETS = "/docs-assets"


def add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from files shipped in the `fastapi-offline` wheel.

    FastAPI's own page loads its script from a CDN, so on an offline machine (or a GPU box
    without internet) it stays blank. Falls back to that page if the wheel is missing.
    """
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        import fastapi_offline
    except ImportError:
        js, css = None, None
    else:
        from fastapi.staticfiles import StaticFiles

        static = Path(fastapi_offline.__file__).parent / "static"
        app.mount(DOCS_ASSETS, StaticFiles(directory=static), name="docs-assets")
        js, css = f"{DOCS_ASSETS}/swagger-ui-bundle.js", f"{DOCS_ASSETS}/swagger-ui.css"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        assets = {"swagger_js_url": js, "swagger_css_url": css,
                  "swagger_favicon_url": f"{DOCS_ASSETS}/favicon.png"} if js else {}
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API", **assets)


async def status_stream(first: dict, updates: asyncio.Queue, unsubscribe,
                        keepalive_seconds: float):
    """The SSE body: the current status, then one event per change, until terminal."""
    try:
        snapshot: Optional[dict] = first
        last_version = -1
        while True:
            if snapshot is None:  # the server is closing
                return
            if snapshot["version"] > last_version:
                last_version = snapshot["version"]
                yield f"id: {last_version}\nevent: status\ndata: {json.dumps(snapshot)}\n\n"
                if snapshot["status"] in TERMINAL_STATES:
                    return
            try:
                snapshot = await asyncio.wait_for(updates.get(), keepalive_seconds)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                snapshot = {"version": -1, "status": "keep-alive"}
    finally:
        unsubscribe()


def field_path(name: str) -> list[Any]:
    """"layers[2].box" → ["layers", 2, "box"] (the loc FastAPI would give)."""
    parts: list[Any] = []
    for piece in name.split("."):
        m = re.fullmatch(r"([^\[]*)((?:\[\d+\])*)", piece)
        if not m:
            parts.append(piece)
            continue
        if m.group(1):
            parts.append(m.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return parts


def media_type(name: str) -> str:
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"png": "image/png", "json": "application/json", "psd": "image/vnd.adobe.photoshop",
            "ora": "image/openraster"}.get(suffix, "application/octet-stream")


def model_list(manager: JobManager) -> list[dict]:
    """inference.models.preset_availability, in the API's shape (file lists under details)."""
    from inference.models import preset_availability

    out = []
    for facts in preset_availability(manager.models_dir):
        facts = dict(facts)
        files = facts.get("files") or []
        sizes = [_int_or_none(f.get("size")) for f in files if isinstance(f, dict)]
        out.append(ModelOut(
            name=str(facts.pop("name")), available=bool(facts.pop("available", False)),
            size_bytes=sum(sizes) if sizes and None not in sizes else (0 if not files else None),
            download_bytes=_int_or_none(facts.pop("download_bytes", None)),
            missing=[str(m) for m in facts.pop("missing", []) or []],
            description=str(facts.pop("description", "") or ""),
            details=json.loads(json.dumps(facts, default=str))).model_dump())
    return out


def _int_or_none(value) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
