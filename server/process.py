"""The server process the Blender add-on starts: bind, announce, serve, and die with the add-on.

Life cycle:
1. Clean half-written stacks under the output root, pick the device, bind the socket
   (port 0 = a free port, known before serving because we bind it ourselves).
2. Print exactly one JSON line on stdout, `{"event": "ready", "url", "pid", "version",
   "token_file"}`; everything else goes to stderr.
3. Serve until one of: SIGTERM/SIGINT; the parent process (`parent_pid`) is gone; stdin
   reaches end-of-file (watched only when stdin is a pipe: the add-on starts us with
   stdin=PIPE and never writes, so when Blender dies the pipe closes even if the pid
   check is fooled). Then the running job is cancelled, queued ones dropped, and the
   process exits, leaving no temp folders: within 1 s when idle (measured ~0.2 s), within
   the denoising step in flight + 1 s mid-job (a worker still busy after
   WORKER_JOIN_SECONDS is abandoned).

Every start-up failure (bad option, token or device, an output root that cannot be
written, a models folder that is not one, a busy port) raises InvalidRequest before the
ready line: the command line prints it as one line on stderr and exits with code 2.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

from inference.stack import cleanup_temp

from .jobs import DEFAULT_MAX_QUEUE, DEFAULT_RETENTION, JobManager

log = logging.getLogger("multiplane.server")

POLL_SECONDS = 0.1
GIL_SWITCH_SECONDS = 0.0005
WORKER_JOIN_SECONDS = 1.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def server_version() -> str:
    from . import __version__

    return __version__


def default_output_root() -> Path:
    """Per-user data folder: $XDG_DATA_HOME, ~/Library/Application Support, %LOCALAPPDATA%."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "multiplane" / "stacks"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; with port 0 the OS picks a free port (read it back)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it every streamed event waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from inference.errors import InvalidRequest

        raise InvalidRequest("port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def stdin_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


class ParentWatch:
    """Is the process that started us still there? (pid + start time, so a reused pid does
    not count; a zombie counts as dead.)"""

    def __init__(self, pid: int):
        import psutil

        self.pid = pid
        self._psutil = psutil
        try:
            self._process = psutil.Process(pid)
            self._created = self._process.create_time()
        except psutil.Error:
            self._process = None

    def alive(self) -> bool:
        if self._process is None:
            return False
        psutil = self._psutil
        try:
            if self._process.create_time() != self._created:
                return False
            return self._process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def uvicorn_server(app, tls: Optional[tuple[Path, Path]] = None):
    """uvicorn.Server for `app` without its habit of re-raising the caught signal after
    shutdown (we clean up and return an exit code instead). `tls`: (certificate, key) files,
    served by uvicorn's own TLS."""
    import uvicorn

    from .connections import KEEPALIVE_SECONDS, MAX_REQUEST_HEAD_BYTES, GuardedH11Protocol

    cert, key = tls if tls else (None, None)
    config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=0.3, lifespan="off", http=GuardedH11Protocol,
                            timeout_keep_alive=KEEPALIVE_SECONDS,
                            h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
                            ssl_certfile=str(cert) if cert else None, ssl_keyfile=str(key) if key else None)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            import signal

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = [signal.SIGINT, signal.SIGTERM]
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)


def run_server(host: str = "127.0.0.1", port: int = 0, parent_pid: Optional[int] = None,
               output_root: Optional[Path] = None, device: str = "auto",
               models_dir: Optional[Path] = None, token: Optional[str] = None,
               max_queue: int = DEFAULT_MAX_QUEUE, retention: int = DEFAULT_RETENTION, *,
               engine_factory=None, watch_stdin: Optional[bool] = None,
               keepalive_seconds: Optional[float] = None, allow_hosts: tuple[str, ...] = (),
               tls_cert: Optional[Path] = None, tls_key: Optional[Path] = None,
               devices: Optional[str] = None, engine_options: Optional[dict] = None) -> int:
    """Run the server until told to stop; returns the exit code (0).

    `token`: the bearer token; default $MULTIPLANE_TOKEN, else a fresh one written to a 0600
    file named in the ready line. `engine_factory(device)`: makes an object with the Engine
    interface (tests); default a real `inference.engine.Engine`, with `engine_options`
    (EngineSettings fields such as max_batch, dtype). `watch_stdin`: default =
    stdin is a pipe. `allow_hosts`: more Host names to answer to (`security.allowed_hosts`);
    `tls_cert` and `tls_key`: serve HTTPS. `devices`: one worker per device
    (`resolve_devices`). Raises InvalidRequest for any bad option, device, folder or port
    before anything is announced.
    """
    from .app import create_app
    from .events import SSE_KEEPALIVE_SECONDS
    from .security import remove_token_file

    # 1. stdout is for the ready line only; options are checked before anything starts.
    announce = keep_stdout_for_ready_line()
    check_options(host, port, max_queue, retention)
    tls = check_tls(tls_cert, tls_key)
    hosts = checked_hosts(host, allow_hosts)
    output_root = writable_output_root(output_root)
    models_dir = readable_models_dir(models_dir)
    cleanup_temp(output_root)

    # 2. The engine (a bad or missing device fails here, before "ready"), the token, the parent.
    engines, info = engines_and_info(engine_factory, resolve_devices(devices, device), models_dir,
                                     engine_options)
    token_value, token_file, parent = token_and_parent(token, parent_pid)

    # 3. The socket (bound here, so the port is known before serving), the job service, the app.
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    manager = JobManager(engines, output_root, models_dir=models_dir, max_queue=max_queue,
                         retention=retention)
    manager.start()
    app = create_app(manager, token=token_value, hosts=hosts(bound_port), info=info,
                     keepalive_seconds=keepalive_seconds or SSE_KEEPALIVE_SECONDS)
    server = uvicorn_server(app, tls)

    # 4. Serve: announce once listening, then watch every reason to stop.
    stop = StopWatch(server, manager, parent, stdin_is_pipe() if watch_stdin is None else watch_stdin)
    ready = ready_line(host, bound_port, tls is not None, info.version, token_file)
    try:
        asyncio.run(serve(server, sock, lambda: announce_ready(announce, ready, stop)))
    finally:
        # 5. Stop the workers, leave no temp folders or token file behind.
        stopped = manager.close(timeout=WORKER_JOIN_SECONDS)
        cleanup_temp(output_root)
        remove_token_file(token_file)
        with contextlib.suppress(OSError):
            sock.close()
    if not stopped:
        # A worker is stuck inside one long device call; do not wait for it (the next start
        # removes whatever temp folder it leaves).
        log.warning("a job did not stop in time; exiting anyway")
        sys.stderr.flush()
        os._exit(0)
    return 0


def ready_line(host: str, port: int, tls: bool, version: str, token_file: Optional[Path]) -> dict:
    url_host = f"[{host}]" if ":" in host else host
    return {"event": "ready", "url": f"{'https' if tls else 'http'}://{url_host}:{port}", "pid": os.getpid(),
            "version": version, "token_file": str(token_file) if token_file else None}


def keep_stdout_for_ready_line():
    """The real stdout, for the ready line; everything else printed goes to stderr."""
    announce = sys.stdout
    # The worker thread runs Python-heavy pipeline code; a short GIL switch interval keeps
    # the HTTP thread answering within milliseconds while a job runs (default: 5 ms slices).
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    sys.stdout = sys.stderr  # stray prints (libraries) must not corrupt the one ready line
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return announce


def check_options(host: str, port: int, max_queue: int, retention: int) -> None:
    from inference.errors import InvalidRequest

    if max_queue < 1:
        raise InvalidRequest("max_queue", f"must be at least 1, got {max_queue}")
    if retention < 1:
        raise InvalidRequest("retention", f"must be at least 1, got {retention}")
    if not 0 <= port <= 65535:
        raise InvalidRequest("port", f"must be in 0..65535, got {port}")
    if host not in LOOPBACK_HOSTS:
        log.warning("listening on %s, not loopback: anyone who can reach it and has the token "
                    "can use this machine's GPU (serve HTTPS with --tls-cert/--tls-key, or keep "
                    "loopback and use an SSH tunnel: docs/addon.md)", host)


def check_tls(cert: Optional[Path], key: Optional[Path]) -> Optional[tuple[Path, Path]]:
    """(certificate, key) when both are given and load; InvalidRequest naming the option."""
    import ssl

    from inference.errors import InvalidRequest

    if not cert and not key:
        return None
    if not (cert and key):
        raise InvalidRequest("tls_cert" if not cert else "tls_key",
                             "--tls-cert and --tls-key go together (a PEM certificate and its key)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidRequest("tls_cert", f"cannot load the certificate {cert} with the key {key}: "
                                         f"{getattr(exc, 'strerror', None) or exc}") from None
    return Path(cert), Path(key)


def checked_hosts(host: str, allow_hosts: tuple[str, ...]):
    """port → the Host names to accept (the port is known only once bound); the names of
    --allow-host and $MULTIPLANE_ALLOW_HOSTS are checked now."""
    from functools import partial

    from inference.errors import InvalidRequest

    from .security import allow_hosts_from_env, allowed_hosts, check_host_name

    names = (*allow_hosts, *allow_hosts_from_env())
    for name in names:
        try:
            check_host_name(name)
        except ValueError as exc:
            raise InvalidRequest("allow_host", str(exc)) from None
    return partial(allowed_hosts, host, extra_names=names)


def writable_output_root(output_root: Optional[Path]) -> Path:
    """The output root, created if needed and proven writable (a probe file), or
    InvalidRequest naming --output-root: jobs must not fail one by one later."""
    import tempfile

    from inference.errors import InvalidRequest

    root = Path(output_root).expanduser() if output_root else default_output_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root, prefix=".multiplane-probe-"):
            pass
    except OSError as exc:
        raise InvalidRequest("output_root", f"cannot write to {root}: {exc.strerror or exc}; "
                                            f"choose a folder this user can write") from None
    return root


def readable_models_dir(models_dir: Optional[Path]) -> Optional[Path]:
    """The extra weights folder, which must be an existing, readable folder when given."""
    from inference.errors import InvalidRequest

    if not models_dir:
        return None
    folder = Path(models_dir).expanduser()
    if not folder.is_dir():
        raise InvalidRequest("models_dir", f"{folder} is not a folder (give the folder that holds "
                                           f"the weight files, or leave the option out)")
    try:
        next(os.scandir(folder), None)
    except OSError as exc:
        raise InvalidRequest("models_dir", f"cannot read {folder}: {exc.strerror or exc}") from None
    return folder


def exit_process(code: int) -> None:
    """End the server process now that everything is cleaned up: flush, then `os._exit`.
    The interpreter's own teardown of torch and diffusers takes 1-2 s, and SIGTERM must
    take at most one second when idle."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def engines_and_info(engine_factory, devices: list[str], models_dir: Optional[Path],
                     options: Optional[dict] = None):
    """([engine per device], ServerInfo): the factory's engines (tests), else real ones; a
    bad or missing device raises InvalidRequest here, before the ready line."""
    from .state import ServerInfo

    info = ServerInfo(version=server_version())
    engines = []
    for device in devices:
        if engine_factory is None:
            from inference.devices import describe_device, select_device
            from inference.engine import Engine, EngineSettings

            selected = select_device(device)
            engines.append(Engine(EngineSettings(device=device, models_dir=Path(models_dir) if models_dir else None,
                                                 **(options or {}))))
            info.devices.append(describe_device(selected))
        else:
            engines.append(engine_factory(device))
            info.devices.append({"device": str(getattr(engines[-1], "device", device)), "type": "test"})
    info.device = info.devices[0]
    info.torch = _package_version("torch")
    info.diffusers = _package_version("diffusers")
    return engines, info


def resolve_devices(devices: Optional[str], device: str) -> list[str]:
    """The devices to run workers on: `--devices` ("auto": every CUDA GPU when there are
    several, else `--device`; or a list "cuda:0,cuda:1"), else just `--device`. A GPU may
    appear once (a second worker would load a second model into the same memory)."""
    from inference.errors import InvalidRequest

    if not devices:
        return [device]
    if devices.strip().lower() == "auto":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] if count > 1 else [device]
    names = [name.strip().lower() for name in devices.split(",")]
    if not all(names):
        raise InvalidRequest("devices", f"{devices!r} has an empty entry; give auto or a list like cuda:0,cuda:1")
    repeated = sorted({n for n in names if names.count(n) > 1 and n != "cpu"})
    if repeated:
        raise InvalidRequest("devices", f"{', '.join(repeated)} appears twice; give each GPU once")
    return names


def token_and_parent(token: Optional[str], parent_pid: Optional[int]):
    """(token, its file or None, ParentWatch or None); InvalidRequest for a bad one."""
    from inference.errors import InvalidRequest

    from .security import remove_token_file, resolve_token

    try:
        token_value, token_file = resolve_token(token)
    except ValueError as exc:
        raise InvalidRequest("token", str(exc)) from None
    parent = ParentWatch(parent_pid) if parent_pid else None
    if parent is not None and not parent.alive():
        remove_token_file(token_file)
        raise InvalidRequest("parent_pid", f"process {parent_pid} does not exist")
    return token_value, token_file, parent


class StopWatch:
    """Turns every reason to stop (a signal, stdin closing, the parent gone) into: cancel
    the jobs, then let uvicorn exit."""

    def __init__(self, server, manager: JobManager, parent: Optional[ParentWatch], watch_stdin: bool):
        self.server = server
        self.manager = manager
        self.parent = parent
        self.stdin_closed = threading.Event()
        if watch_stdin:
            threading.Thread(target=_read_until_eof, args=(self.stdin_closed,), name="multiplane-stdin",
                             daemon=True).start()

    def start(self) -> None:
        threading.Thread(target=self.watch, name="multiplane-supervisor", daemon=True).start()

    def watch(self) -> None:
        reason = None
        while reason is None:
            time.sleep(POLL_SECONDS)
            if self.server.should_exit:
                reason = "signal"
            elif self.stdin_closed.is_set():
                reason = "stdin closed"
            elif self.parent is not None and not self.parent.alive():
                reason = f"parent process {self.parent.pid} exited"
        log.warning("stopping: %s", reason)
        self.manager.begin_shutdown()
        self.server.should_exit = True


def announce_ready(announce, ready: dict, stop: StopWatch) -> None:
    """The one stdout line, then stdout detached, then the stop watch running."""
    announce.write(json.dumps(ready) + "\n")
    announce.flush()
    _detach_stdout()
    stop.start()


async def serve(server, sock: socket.socket, on_started) -> None:
    """uvicorn on our socket; `on_started` runs once it accepts connections."""
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.005)
    if server.started:
        on_started()
    await task


def _detach_stdout() -> None:
    """After the ready line, point file descriptor 1 at stderr: the parent sees end-of-file
    on our stdout, and nothing (not even C-level output) can fill a pipe it no longer reads."""
    try:
        sys.__stdout__.flush()
        os.dup2(sys.stderr.fileno(), 1)
    except (AttributeError, OSError, ValueError):
        pass


def _read_until_eof(closed: threading.Event) -> None:
    try:
        fd = sys.stdin.fileno()
        while os.read(fd, 65536):
            pass
    except (OSError, ValueError):
        pass
    closed.set()


def _package_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
