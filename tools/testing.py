"""Run the real server process (`python -m server serve`) and talk to it: for tests and
benchmarks. Needs httpx (requirements-dev.txt); the server itself never imports this."""
from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]  # the repository root (runs `-m server` there)
TOKEN = "process-test-token-0123456789"  # used unless token=None (then a token file)
FAST = {"prompt": "a misty lake at dawn", "model": "tiny", "method": "independent",
        "width": 256, "height": 256, "steps": 2, "tta_passes": 1}


def output_entries(root: Path) -> list[str]:
    """What is in a server's output root besides its jobs journal (and the journal's temp
    file, there for an instant while it is rewritten), sorted."""
    from server.journal import JOURNAL_FILE

    return sorted(p.name for p in Path(root).iterdir() if not p.name.startswith(JOURNAL_FILE))


class ServerProcess:
    """`python -m server serve --port 0` in a subprocess; `ready` is its announced JSON.

    `fake_step_seconds`: run it over fake engines (`tools.fake_server`) whose steps take this
    long, for tests that need the process but no model. `env`: more environment variables;
    `verify`: the client's TLS verification (an ssl.SSLContext for a self-signed server)."""

    def __init__(self, root: Path, *, token: str | None = TOKEN, parent_pid: int | None = None,
                 stdin=subprocess.PIPE, device: str = "cpu", extra_args: tuple[str, ...] = (),
                 fake_step_seconds: float | None = None, env: dict[str, str] | None = None,
                 verify=True):
        env = {**{k: v for k, v in os.environ.items() if k != "MULTIPLANE_TOKEN"}, **(env or {})}
        if token:
            env["MULTIPLANE_TOKEN"] = token
        cmd = [sys.executable, "-m", "server", "serve"]
        if fake_step_seconds is not None:  # the real process over fake engines (tools/fake_server.py)
            cmd = [sys.executable, "-m", "tools.fake_server"]
            env["MULTIPLANE_FAKE_STEP_SECONDS"] = str(fake_step_seconds)
        cmd += ["--port", "0", "--output-root", str(root), "--device", device, *extra_args]
        if parent_pid:
            cmd += ["--parent-pid", str(parent_pid)]
        self.root = Path(root)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.stderr_path = root.parent / f"server-{time.monotonic_ns()}.log"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        self.ready = json.loads(self._read_line(timeout=60))
        self.url = self.ready["url"]
        self.token = token or Path(self.ready["token_file"]).read_text()
        self.client = httpx.Client(base_url=self.url, timeout=30, verify=verify,
                                   headers={"Authorization": f"Bearer {self.token}"})

    def _read_line(self, timeout: float) -> str:
        """The first stdout line, waiting at most `timeout` s (selectors: POSIX pipes)."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            raise RuntimeError(f"no ready line in {timeout} s: {self.log()}")
        line = self.proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"server exited before ready: {self.log()}")
        return line

    def log(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def submit(self, **fields) -> dict:
        r = self.client.post("/v1/jobs", json={**FAST, **fields})
        if r.status_code != 202:
            raise RuntimeError(f"submit: HTTP {r.status_code} {r.text}")
        return r.json()

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.05)
        raise RuntimeError(f"job {job_id} did not finish in {timeout} s: {self.log()}")

    def wait_for_step(self, job_id: str, step: int = 1, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            p = job["progress"]
            if p["phase"] == "denoise" and p["step"] >= step:
                return job
            if job["status"] not in ("queued", "running"):
                raise RuntimeError(f"job {job_id} ended before step {step}: {job}")
            time.sleep(0.02)
        raise RuntimeError(f"job {job_id} never reached step {step}: {self.log()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"server still running after {timeout} s: {self.log()}") from None

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        if self.proc.stdin:
            self.proc.stdin.close()
        self._stderr.close()


def sse_events(server: ServerProcess, job_id: str, on_event=None,
               client: httpx.Client | None = None) -> list[tuple[float, dict]]:
    """Every status event of the job's stream, with arrival times, until the stream ends.

    Pass a long-lived `client` when timing: building an httpx.Client costs tens of
    milliseconds (it prepares TLS even for plain HTTP).
    """
    if client is None:
        with httpx.Client(base_url=server.url, timeout=60,
                          headers={"Authorization": f"Bearer {server.token}"}) as own:
            return sse_events(server, job_id, on_event, own)
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        if r.status_code != 200 or not r.headers["content-type"].startswith("text/event-stream"):
            raise RuntimeError(f"events of {job_id}: HTTP {r.status_code} {r.read()[:200]!r}")
        kind, data = None, None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
            elif line == "" and data is not None:
                if kind != "status":
                    raise RuntimeError(f"unexpected event {kind!r}")
                events.append((time.monotonic(), data))
                if on_event:
                    on_event(data)
                kind, data = None, None
    return events


def open_half_requests(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` connections, each having sent only a request line."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        sock.setblocking(False)
        try:
            sock.send(b"GET /v1/health HTTP/1.1\r\n")
        except OSError:
            pass
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    """Has the server closed this non-blocking socket (end-of-file or a reset)?"""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def self_signed_certificate(folder: Path) -> tuple[Path, Path, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl CLI:
    (cert.pem, key.pem, its SHA-256 fingerprint as openssl prints it, "AB:CD:...")."""
    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    printed = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    return cert, key, printed.strip().split("=", 1)[1]
