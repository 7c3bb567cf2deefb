"""The HTTP API (`/v1`): the routers of `routers/` over the job service (`jobs.JobManager`).

Build it with `create_app(manager, token=..., hosts=..., info=...)`; `process.run_server`
does that for the real process, tests do it with a fake engine. The OpenAPI description is
at /openapi.json (and /docs); the schemas in `schemas.py` are the contract. The service's
refusals (`errors.py`, and `InvalidRequest` from the engine's validation) become HTTP
answers here, in one place.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.errors import InvalidRequest

from .errors import Conflict, NotFound, QueueFull, ServiceError, ShuttingDown
from .events import SSE_KEEPALIVE_SECONDS
from .jobs import JobManager
from .routers import health, imports, jobs, models
from .schemas import ErrorOut
from .security import BearerAuth, HostGuard
from .state import ServerInfo

API_PREFIX = "/v1"
DOCS_ASSETS = "/docs-assets"

AUTH_ERRORS = {401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
               421: {"model": ErrorOut, "description": "Host header is not this server"}}
# The HTTP status of each refusal of the job service.
SERVICE_STATUS = {NotFound: 404, Conflict: 409, QueueFull: 429, ShuttingDown: 503}


def create_app(manager: JobManager, *, token: str, hosts, info: ServerInfo,
               keepalive_seconds: float = SSE_KEEPALIVE_SECONDS) -> FastAPI:
    """The ASGI app: the Host guard outside, the bearer token on every route but health."""
    app = FastAPI(title="Multiplane inference server", version=info.version,
                  description="Generates layered scene backdrops (an RGB background plus RGBA "
                              "foregrounds) for the Multiplane Blender add-on. Every endpoint "
                              "but /v1/health needs `Authorization: Bearer <token>`.",
                  docs_url=None, redoc_url=None)
    app.state.manager = manager
    app.state.info = info
    app.state.keepalive_seconds = keepalive_seconds
    add_offline_docs(app)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(InvalidRequest, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)

    app.include_router(health.router, prefix=API_PREFIX)
    private = {"prefix": API_PREFIX, "dependencies": [Depends(BearerAuth(token))],
               "responses": AUTH_ERRORS}
    app.include_router(jobs.router, **private)
    app.include_router(models.router, **private)
    app.include_router(imports.router, **private)
    app.add_middleware(HostGuard, hosts=hosts, token=token, public_paths=public_paths(app))
    return app


def public_paths(app: FastAPI) -> tuple[str, ...]:
    """What answers without a token: health, the API description and its docs page."""
    return (f"{API_PREFIX}/health", app.openapi_url, "/docs", f"{DOCS_ASSETS}/")


async def service_error(_request: Request, exc: Exception) -> JSONResponse:
    """A refusal of the service as its HTTP answer: `{"detail": message}` with the status of
    SERVICE_STATUS, or a bad request field as a 422 in FastAPI's own shape (clients read one
    format for every validation error)."""
    if isinstance(exc, InvalidRequest):
        return json_answer({"detail": [{"loc": ["body", *field_path(exc.field)],
                                        "msg": exc.message, "type": "value_error"}]}, 422)
    status = next((code for kind, code in SERVICE_STATUS.items() if isinstance(exc, kind)), 400)
    return json_answer({"detail": exc.detail}, status)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 (`detail`: a list naming each field), with an echo that is always JSON:
    the input it quotes may be NaN, 1e999 or a lone surrogate, which FastAPI's own handler
    fails to encode (a 500 instead of the 422)."""
    return json_answer({"detail": jsonable_encoder(exc.errors())}, 422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI answers 400 for a body it cannot even decode (e.g. not UTF-8); for the
    # client that is malformed JSON like any other: 422, in the usual shape.
    if exc.status_code == 400 and str(exc.detail).startswith("There was an error parsing the body"):
        return json_answer({"detail": [{"loc": ["body"], "type": "json_invalid",
                                        "msg": "the body is not valid JSON text"}]}, 422)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Starlette names only the first matching route's methods
        headers["Allow"] = ", ".join(allowed_methods(request))
    return json_answer({"detail": exc.detail}, exc.status_code, headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (for a 405's Allow header)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


def json_answer(content: Any, status: int, headers: Optional[dict] = None) -> JSONResponse:
    """An error answer whose every string and number can be written as strict JSON."""
    return JSONResponse(json_safe(content), status_code=status, headers=headers)


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as the strings "NaN", "Infinity", "-Infinity" and lone
    surrogates as \\uXXXX text (keys too): what strict JSON in UTF-8 can carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from files shipped in the `fastapi-offline` wheel.

    FastAPI's own page loads its script from a CDN, so on an offline machine (or a GPU box
    without internet) it stays blank. Falls back to that page if the wheel is missing.
    """
    try:
        import fastapi_offline
    except ImportError:
        app.state.docs_assets = {}
    else:
        from fastapi.staticfiles import StaticFiles

        static = Path(fastapi_offline.__file__).parent / "static"
        app.mount(DOCS_ASSETS, StaticFiles(directory=static), name="docs-assets")
        app.state.docs_assets = {"swagger_js_url": f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                 "swagger_css_url": f"{DOCS_ASSETS}/swagger-ui.css",
                                 "swagger_favicon_url": f"{DOCS_ASSETS}/favicon.png"}
    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)


async def swagger_ui(request: Request):
    from fastapi.openapi.docs import get_swagger_ui_html

    app = request.app
    return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                               **app.state.docs_assets)


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
