"""Add-on preferences: where the inference engine runs, and the buttons to manage it.

Two backends. "Start local process": the add-on runs `python -m server serve` with a Python
interpreter that has the engine installed (auto-detected: the checkout's .venv, else the
environment "Install inference environment" makes in the extension's user folder).
"Connect to server": a server someone started elsewhere (a GPU machine), by URL + token.
`backend_settings(context)` turns either into plain values for the job watcher's thread (watcher.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import bpy
from bpy.props import EnumProperty, StringProperty
from bpy.types import AddonPreferences, Operator

from . import backend, installer
from .client import ServerClient, ServerError, describe_models, plain_http_warning
from .watcher import ensure_timer, watcher

# The extension's root package (…multiplane); this module lives in its `addon` sub-package.
ADDON_ID = __package__.rpartition(".")[0] or __package__

OFFLINE_REMOTE = ("Blender's online access is disabled, so the add-on does not connect to a server on "
                  "another machine: allow it in Preferences › System › Network (a local server works offline)")

DEVICES = (
    ("auto", "Automatic", "The best device found: CUDA, then Apple Metal (MPS), then CPU"),
    ("cuda", "CUDA (NVIDIA)", "The first NVIDIA GPU"),
    ("mps", "Metal (Apple)", "Apple silicon GPU"),
    ("cpu", "CPU", "Slow, but works everywhere (the tiny test model is fine on it)"),
)


def user_dir() -> Path:
    """The extension's own writable folder (managed venv, logs, downloaded stacks)."""
    try:
        return Path(bpy.utils.extension_path_user(ADDON_ID, create=True))
    except ValueError:  # loaded as a plain module (tests, scripts), not as an extension
        return Path(bpy.utils.user_resource("DATAFILES", path="multiplane", create=True))


def managed_venv() -> Path:
    return user_dir() / "venv"


def server_log_path() -> Path:
    return user_dir() / "server.log"


@dataclass(frozen=True)
class BackendSettings:
    """The preferences as plain values, safe to hand to a worker thread."""

    mode: str  # "LOCAL" | "REMOTE"
    python: Optional[Path]
    device: str
    models_dir: Optional[Path]
    output_dir: Path  # the server's output root (local) / nothing (remote)
    stacks_dir: Path  # where the add-on keeps its copies of finished stacks
    log_path: Path
    url: str
    token: str
    online_access: bool = False  # bpy.app.online_access when the settings were read
    cert_sha256: str = ""  # a remote https server's pinned certificate fingerprint
    ca_file: str = ""  # or the PEM file of the authority that signed its certificate

    def remote_client(self, timeout: float) -> ServerClient:
        """The client for the "Connect to Server" URL, trusting its certificate as pinned."""
        return ServerClient(self.url, self.token, timeout=timeout, cert_sha256=self.cert_sha256,
                            ca_file=self.ca_file)

    def make_server(self) -> backend.ManagedServer:
        return backend.ManagedServer(self.python, device=self.device, models_dir=self.models_dir,
                                     output_root=self.output_dir, log_path=self.log_path,
                                     offline=not self.online_access)

    def remote_needs_online_access(self) -> bool:
        """A server beyond this computer is network use Blender's online access must allow."""
        from urllib.parse import urlparse

        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return False  # not an address at all: the client says so
        return (self.mode == "REMOTE" and parsed.hostname not in ("127.0.0.1", "localhost", "::1")
                and not self.online_access)


def _path_or_none(value: str) -> Optional[Path]:
    value = (value or "").strip()
    return Path(bpy.path.abspath(value)).expanduser() if value else None


def get(context=None):
    """This add-on's AddonPreferences, or None when it is not enabled as an add-on."""
    context = context or bpy.context
    entry = context.preferences.addons.get(ADDON_ID)
    return entry.preferences if entry is not None else None


def backend_settings(context=None) -> BackendSettings:
    prefs = get(context)
    mode = getattr(prefs, "backend", "LOCAL")
    python = _path_or_none(getattr(prefs, "python_path", ""))
    if python is None:
        python = backend.find_python(managed_venv())
    base = user_dir()
    return BackendSettings(
        mode=mode, python=python, device=getattr(prefs, "device", "auto"),
        models_dir=_path_or_none(getattr(prefs, "models_dir", "")),
        output_dir=_path_or_none(getattr(prefs, "output_dir", "")) or base / "server-output",
        stacks_dir=_path_or_none(getattr(prefs, "stacks_dir", "")) or base / "stacks", log_path=server_log_path(),
        url=getattr(prefs, "server_url", "").strip(), token=getattr(prefs, "server_token", "").strip(),
        online_access=bool(getattr(bpy.app, "online_access", True)),
        cert_sha256=getattr(prefs, "server_cert_sha256", "").strip(),
        ca_file=str(_path_or_none(getattr(prefs, "server_ca_file", "")) or ""))


# ---------------------------------------------------------------------- status line


def status_text(context=None) -> tuple[str, str]:
    """(text, icon) describing the backend right now; cheap (no network)."""
    settings = backend_settings(context)
    if settings.mode == "REMOTE":
        if not settings.url:
            return "No server URL set", "ERROR"
        return f"Remote server: {settings.url}", "URL"
    if installer.current_install() is not None and installer.current_install().running:
        return f"Installing: {installer.current_install().status}", "IMPORT"
    if watcher.state.phase == "starting":  # the job is starting the server: one story, the watcher's
        return "Local server starting…", "SORTTIME"
    server = backend.current_server()
    state = server.poll() if server is not None else "stopped"
    if state == "ready":
        return f"Local server running at {server.info.url} (pid {server.pid})", "CHECKMARK"
    if state == "starting":
        return "Local server starting…", "SORTTIME"
    if state == "failed":
        return server.error or "Local server failed", "ERROR"
    if settings.python is None:
        last = installer.current_install()
        if last is not None and last.error and not last.cancelled:
            return f"No inference environment: the install failed (log: {last.log_path})", "ERROR"
        return "No inference environment: click Install Inference Environment", "ERROR"
    if not settings.python.is_file():
        return f"Python not found: {settings.python} (fix it in the preferences)", "ERROR"
    return f"Local server not running (starts on Generate) — {settings.python}", "INFO"


# ---------------------------------------------------------------------- preferences


class MultiplanePreferences(AddonPreferences):
    bl_idname = ADDON_ID

    backend: EnumProperty(
        name="Backend",
        description="Where the images are made: a server Blender starts on this computer, or one running elsewhere",
        items=(
            ("LOCAL", "Start Local Process", "Run the inference server on this computer, started by Blender"),
            ("REMOTE", "Connect to Server", "Use a server running elsewhere (for example a GPU machine)"),
        ),
        default="LOCAL",
    )
    python_path: StringProperty(
        name="Python",
        description="Python interpreter with the Multiplane engine installed. Empty: the checkout's "
                    ".venv, else the environment made by Install Inference Environment",
        subtype="FILE_PATH", default="",
    )
    device: EnumProperty(name="Device", description="What the local inference server computes on "
                          "(used when it starts: Restart Server after a change)", items=DEVICES, default="auto")
    models_dir: StringProperty(
        name="Models Folder",
        description="Where model weights are looked up and downloaded (empty: the Hugging Face cache)",
        subtype="DIR_PATH", default="",
    )
    output_dir: StringProperty(
        name="Output Folder",
        description="Where the local server writes generated stacks (empty: the extension's user folder)",
        subtype="DIR_PATH", default="",
    )
    stacks_dir: StringProperty(
        name="Stacks Folder",
        description="Where finished stacks are kept for import and history (empty: the extension's user folder)",
        subtype="DIR_PATH", default="",
    )
    server_url: StringProperty(
        name="URL", description="Address of a running Multiplane server, e.g. http://192.168.1.20:8765",
        default="",
    )
    server_token: StringProperty(
        name="Token", description="The server's bearer token (MULTIPLANE_TOKEN on that machine)",
        subtype="PASSWORD", default="",
    )
    server_cert_sha256: StringProperty(
        name="Certificate SHA-256",
        description="https with a self-signed certificate: its SHA-256 fingerprint, trusted instead of "
                    "an authority (openssl x509 -noout -fingerprint -sha256 -in cert.pem on the server)",
        default="",
    )
    server_ca_file: StringProperty(
        name="CA File",
        description="https: a PEM file of the authority that signed the server's certificate (or the "
                    "certificate itself); empty: the system's authorities",
        subtype="FILE_PATH", default="",
    )

    def draw(self, context):
        draw_preferences(self, self.layout, context)


def draw_preferences(prefs, layout, context) -> None:
    """The preferences UI (a function, so tests can draw it against a recording layout)."""
    layout.prop(prefs, "backend", expand=True)
    box = layout.box()
    if prefs.backend == "LOCAL":
        box.prop(prefs, "python_path")
        if not prefs.python_path:
            found = backend.find_python(managed_venv())
            box.label(text=f"Detected: {found}" if found else "No environment found: install one below",
                      icon="INFO" if found else "ERROR")
        box.prop(prefs, "device")
        box.prop(prefs, "models_dir")
        box.prop(prefs, "output_dir")
        row = box.row()
        job = installer.current_install()
        if job is not None and job.running:
            if hasattr(row, "progress"):
                row.progress(factor=job.fraction, type="BAR", text=job.status)
            else:
                row.label(text=f"{job.status} ({job.fraction:.0%})")
            row.operator(MULTIPLANE_OT_cancel_install.bl_idname, text="", icon="CANCEL")
        else:
            row.operator(MULTIPLANE_OT_install_environment.bl_idname, icon="IMPORT")
            if job is not None and job.error:
                box.label(text=job.error, icon="ERROR")
        box.operator(MULTIPLANE_OT_restart_server.bl_idname, icon="FILE_REFRESH")
    else:
        box.prop(prefs, "server_url")
        box.prop(prefs, "server_token")
        if prefs.server_url.strip().lower().startswith("https:"):
            box.prop(prefs, "server_cert_sha256")
            box.prop(prefs, "server_ca_file")
        warning = plain_http_warning(prefs.server_url, prefs.server_token)
        if warning:  # shown before anything is sent
            box.label(text=warning, icon="ERROR")
    layout.prop(prefs, "stacks_dir")
    row = layout.row()
    row.operator(MULTIPLANE_OT_test_connection.bl_idname, icon="LINKED")
    text, icon = status_text(context)
    layout.label(text=text, icon=icon)


# ---------------------------------------------------------------------- operators


class MULTIPLANE_OT_test_connection(Operator):
    """Check that the inference server answers (a local server is started if needed)"""

    bl_idname = "multiplane.test_connection"
    bl_label = "Test Connection"

    def execute(self, context):
        settings = backend_settings(context)
        try:
            if settings.mode == "REMOTE":
                if not settings.url:
                    raise ServerError("no server URL: enter the server's address in the Multiplane preferences")
                if settings.remote_needs_online_access():
                    raise ServerError(OFFLINE_REMOTE)
                client = settings.remote_client(timeout=3.0)
                health = client.health()
                client.check_token()
                models = client.models()
                if client.warning:
                    self.report({"WARNING"}, client.warning)
            else:
                server = backend.ensure_server(settings.make_server)
                # A short wait: enough for an already-running server; a cold start keeps going
                # in the background and the status line shows it.
                state = server.poll()
                if state != "ready":
                    self.report({"INFO"}, "The local server is starting; the status line shows when it is ready")
                    return {"FINISHED"}
                client = ServerClient(server.info.url, server.token, timeout=3.0)
                health = client.health()
                models = client.models()
        except (ServerError, backend.BackendError) as error:
            self.report({"ERROR"}, f"Connection failed: {error}")
            return {"CANCELLED"}
        device = health.get("device", {}).get("device") or health.get("device", {}).get("type") or "?"
        self.report({"INFO"}, f"Connected: Multiplane server {health.get('version', '?')} on {device}, "
                              f"{health.get('queue_length', 0)} job(s) waiting; models: {describe_models(models)}")
        return {"FINISHED"}


class MULTIPLANE_OT_restart_server(Operator):
    """Stop the local inference server and start it again (after changing the device or folders)"""

    bl_idname = "multiplane.restart_server"
    bl_label = "Restart Server"

    def execute(self, context):
        if watcher.busy:
            self.report({"ERROR"}, "A backdrop is being generated: cancel it first, then restart the server")
            return {"CANCELLED"}
        settings = backend_settings(context)
        backend.stop_current_server()
        if settings.mode == "REMOTE":
            self.report({"INFO"}, "Remote servers are restarted on their own machine")
            return {"FINISHED"}
        try:
            backend.ensure_server(settings.make_server)
        except backend.BackendError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, "Restarting the local inference server")
        return {"FINISHED"}


class MULTIPLANE_OT_install_environment(Operator):
    """Create a Python environment in the extension's user folder and install the inference engine (torch, diffusers: several GB)"""

    bl_idname = "multiplane.install_environment"
    bl_label = "Install Inference Environment"

    def execute(self, context):
        try:
            job = installer.start_install(managed_venv(), online_access=bpy.app.online_access)
        except installer.InstallError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        ensure_timer()
        torch = f"; torch: {job.torch.reason}" if job.torch else ""
        self.report({"INFO"}, f"Installing the inference environment into {job.venv}{torch}; log: {job.log_path}")
        return {"FINISHED"}


class MULTIPLANE_OT_cancel_install(Operator):
    """Stop installing the inference environment"""

    bl_idname = "multiplane.cancel_install"
    bl_label = "Cancel Install"

    def execute(self, _context):
        job = installer.current_install()
        if job is None or not job.running:
            self.report({"INFO"}, "Nothing is being installed")
            return {"CANCELLED"}
        job.cancel()
        self.report({"INFO"}, "Install cancelled")
        return {"FINISHED"}


CLASSES = (
    MULTIPLANE_OT_test_connection,
    MULTIPLANE_OT_restart_server,
    MULTIPLANE_OT_install_environment,
    MULTIPLANE_OT_cancel_install,
    MultiplanePreferences,
)

_register_classes, _unregister_classes = bpy.utils.register_classes_factory(CLASSES)


def register() -> None:
    _register_classes()


def unregister() -> None:
    installer.cancel_current_install()
    backend.stop_all_in_background()
    _unregister_classes()
