"""A small HTTP client for the Multiplane inference server (API v1), standard library only.

Blender ships no `requests`/`httpx`, and the add-on must not depend on the engine's
environment, so this speaks the API with `urllib`: JSON bodies, the bearer token, short
timeouts, and errors turned into one readable sentence (`ServerError`) instead of an
HTTP traceback. It is thread-agnostic: the job watcher calls it from its worker thread.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

API = "/v1"
DEFAULT_TIMEOUT = 5.0
IMPORT_TIMEOUT = 120.0  # a layered import is done before the server answers (big PSDs: seconds)
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class ServerError(Exception):
    """The server could not be reached or refused a request; `str()` is for the artist.

    `status` is the HTTP status (None when the server was not reached at all).
    """

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status

    @property
    def unreachable(self) -> bool:
        return self.status is None


def describe_validation_error(detail: Any) -> str:
    """FastAPI's 422 `detail` list → "layers[0].prompt: must not be blank; ..." ."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        if not isinstance(item, dict):
            parts.append(str(item))
            continue
        loc = [p for p in item.get("loc", []) if p != "body"]
        where = ""
        for piece in loc:
            where += f"[{piece}]" if isinstance(piece, int) else (f".{piece}" if where else str(piece))
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def describe_models(models: list[dict]) -> str:
    """One line for the user from GET /v1/models: which presets are ready to use and what a
    first job with each of the others would download ("sdxl ready, sd15 to download: 4.3 GB")."""
    parts = []
    for model in models:
        name = model.get("name", "?")
        if model.get("available"):
            parts.append(f"{name} ready")
        else:
            size = model.get("download_bytes") or model.get("size_bytes")
            parts.append(f"{name} to download" + (f": {size / 1e9:.1f} GB" if size else ""))
    return ", ".join(parts) if parts else "no models"


def plain_http_warning(url: str, token: str = "") -> Optional[str]:
    """The warning to show before a token goes over plain http beyond this computer, or None."""
    parsed = urllib.parse.urlparse((url or "").strip())
    if parsed.scheme != "http" or not parsed.hostname or parsed.hostname in _LOOPBACK or not token:
        return None
    return (f"{parsed.hostname} is reached over plain http: the token and the images cross the "
            f"network unencrypted. Use https:// (server started with --tls-cert/--tls-key) or an "
            f"SSH tunnel to 127.0.0.1")


def normalize_fingerprint(text: str) -> str:
    """"AB:CD:..." (openssl's way), "abcd..." or with spaces → 64 lowercase hex digits;
    ServerError when it is not a SHA-256 fingerprint."""
    digits = "".join(c for c in (text or "") if c not in ": \t").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ServerError("the certificate fingerprint must be the SHA-256 one: 64 hex digits, e.g. "
                          "from `openssl x509 -noout -fingerprint -sha256 -in cert.pem`")
    return digits


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a server whose certificate is trusted because its SHA-256 fingerprint is the
    one the artist pinned (a self-signed certificate has no authority to vouch for it)."""

    def __init__(self, *args, fingerprint: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._fingerprint = fingerprint

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        if hashlib.sha256(der).hexdigest() != self._fingerprint:
            self.close()
            raise ssl.SSLCertVerificationError(
                f"the server's certificate has fingerprint {hashlib.sha256(der).hexdigest()}, "
                f"not the pinned one")


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, fingerprint: str):
        context = ssl.create_default_context()
        context.check_hostname = False  # the fingerprint identifies the server instead
        context.verify_mode = ssl.CERT_NONE
        super().__init__(context=context)
        self._context = context
        self._fingerprint = fingerprint

    def https_open(self, req):
        return self.do_open(functools.partial(_PinnedHTTPSConnection, fingerprint=self._fingerprint),
                            req, context=self._context)


def _https_handlers(cert_sha256: str, ca_file: str) -> list:
    """How an https server is trusted: the pinned fingerprint, else the CA file, else the
    system's authorities."""
    if cert_sha256:
        return [_PinnedHTTPSHandler(normalize_fingerprint(cert_sha256))]
    if ca_file:
        try:
            return [urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file))]
        except (OSError, ssl.SSLError) as error:
            raise ServerError(f"cannot read the CA file {ca_file}: {error}") from None
    return []


class ServerClient:
    """Talks to one server: `ServerClient("http://127.0.0.1:8765", token)`.

    An https server with a self-signed certificate is trusted only when the artist pins it:
    `cert_sha256` (its SHA-256 fingerprint) or `ca_file` (a PEM file of the authority that
    signed it, or the certificate itself)."""

    def __init__(self, url: str, token: str = "", timeout: float = DEFAULT_TIMEOUT,
                 cert_sha256: str = "", ca_file: str = ""):
        url = (url or "").strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ServerError(f"the server URL {url!r} is not an http:// or https:// address "
                              f"(example: http://192.168.1.20:8765)")
        self.url = url
        self.token = token or ""
        self.timeout = timeout
        self.warning = plain_http_warning(url, self.token)
        # Loopback never goes through a proxy (an http_proxy variable would break the local server).
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        if parsed.scheme == "https":
            handlers += _https_handlers((cert_sha256 or "").strip(), (ca_file or "").strip())
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------ plumbing

    def _open(self, method: str, path: str, body: Optional[dict] = None, auth: bool = True,
              timeout: Optional[float] = None):
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            return self._opener.open(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as error:
            raise self._http_error(error, method, path) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise ServerError(f"the Multiplane server at {self.url} has a certificate this computer "
                                  f"does not trust ({getattr(reason, 'verify_message', '') or reason}). "
                                  f"For a self-signed certificate, pin its SHA-256 fingerprint (or its "
                                  f"CA file) in the Multiplane preferences") from None
            if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
                what = f"did not answer within {timeout or self.timeout:g} s"
            elif isinstance(reason, ConnectionRefusedError) or "refused" in str(reason).lower():
                what = "refused the connection (nothing is listening there)"
            else:
                what = f"could not be reached ({reason})"
            raise ServerError(f"the Multiplane server at {self.url} {what}") from None

    def _http_error(self, error: urllib.error.HTTPError, method: str, path: str) -> ServerError:
        try:
            detail = json.loads(error.read().decode("utf-8", "replace")).get("detail")
        except (ValueError, AttributeError, OSError):
            detail = None
        status = error.code
        if status == 401:
            message = ("the server refused the token (check the token in the Multiplane "
                       "preferences; a local server makes its own)")
        elif status == 422:
            message = f"the server refused the request: {describe_validation_error(detail)}"
        elif status == 429:
            message = f"the server's queue is full: {detail or 'try again when a job finished'}"
        elif status == 404:
            message = f"not found on the server: {detail or path}"
        elif status == 421:
            message = f"the server does not accept this address as its host: {detail}"
        else:
            message = f"{method} {path} failed with HTTP {status}: {detail or error.reason}"
        return ServerError(message, status)

    def _json(self, method: str, path: str, body: Optional[dict] = None, auth: bool = True,
              timeout: Optional[float] = None) -> Any:
        with self._open(method, path, body, auth, timeout) as response:
            raw = response.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise ServerError(f"{self.url}{path} did not answer with JSON: is this a Multiplane server?") from None

    # ------------------------------------------------------------------ the API

    def health(self, timeout: Optional[float] = None) -> dict:
        """GET /v1/health (no token needed): version, device, queue."""
        data = self._json("GET", f"{API}/health", auth=False, timeout=timeout)
        if not isinstance(data, dict) or data.get("status") != "ok":
            raise ServerError(f"{self.url} answered, but not like a Multiplane server")
        return data

    def check_token(self) -> None:
        """A cheap authenticated call, so a wrong token shows up in "Test connection"."""
        self._json("GET", f"{API}/jobs?limit=1")

    def models(self) -> list[dict]:
        return self._json("GET", f"{API}/models")["models"]

    def submit(self, body: dict) -> dict:
        """POST /v1/jobs → the queued job (id, status, position)."""
        return self._json("POST", f"{API}/jobs", body)

    def regenerate(self, job_id: str, body: dict) -> dict:
        """POST /v1/jobs/{id}/regenerate → a new queued job (kind "regenerate") whose stack
        keeps every layer of job `job_id` but `body["layer_index"]`, which gets the new
        prompt and/or seed. 404: the server does not know the job; 409: it has no finished stack."""
        return self._json("POST", f"{API}/jobs/{urllib.parse.quote(job_id)}/regenerate", body)

    def import_layers(self, body: dict) -> dict:
        """POST /v1/imports → a finished job (kind "import") whose stack is the layered file
        `body["path"]` on the server's machine; `warnings` say what did not carry over."""
        return self._json("POST", f"{API}/imports", body, timeout=max(self.timeout, IMPORT_TIMEOUT))
    def extend(self, job_id: str, body: dict) -> dict:
        """POST /v1/jobs/{id}/extend → a new queued job (kind "extend") whose stack grows every
        layer of job `job_id` so that `body["margins"]` (left, top, right, bottom, fractions of
        the frame) fit around the same frame. 404: the server does not know the job; 409: it has
        no finished stack; 422: margins it cannot serve (e.g. beyond the 2048-pixel cap)."""
        return self._json("POST", f"{API}/jobs/{urllib.parse.quote(job_id)}/extend", body)

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"{API}/jobs/{urllib.parse.quote(job_id)}")

    def cancel(self, job_id: str) -> Optional[dict]:
        """DELETE /v1/jobs/{id}; a job that already finished (409) is not an error here."""
        try:
            return self._json("DELETE", f"{API}/jobs/{urllib.parse.quote(job_id)}")
        except ServerError as error:
            if error.status == 409:
                return None
            raise

    def preview(self, job_id: str, name: str, timeout: float = 5.0) -> bytes:
        """GET /v1/jobs/{id}/previews/{name}: a running job's live preview of one layer (PNG)."""
        path = f"{API}/jobs/{urllib.parse.quote(job_id)}/previews/{urllib.parse.quote(name)}"
        with self._open("GET", path, timeout=timeout) as response:
            return response.read()

    def download_file(self, job_id: str, name: str, destination: Path, timeout: float = 60.0) -> Path:
        """GET /v1/jobs/{id}/files/{name} into `destination` (written whole, then renamed)."""
        destination = Path(destination)
        partial = destination.with_name(destination.name + ".part")
        path = f"{API}/jobs/{urllib.parse.quote(job_id)}/files/{urllib.parse.quote(name)}"
        with self._open("GET", path, timeout=timeout) as response, open(partial, "wb") as out:
            while True:
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                out.write(chunk)
        partial.replace(destination)
        return destination
