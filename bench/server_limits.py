"""The server's limits under load, side by side in one run (issue 12 parts 3 and 5):

- /v1/health latency from a fresh connection while 1000 half-open connections each send a
  header line a second, against the same server idle (target: under 100 ms, ratio ~1);
- SIGTERM to exit, idle (target ≤ 1 s) and mid-job (target ≤ one denoising step + 1 s;
  reported as the time beyond the step in flight).

Real server processes over fake engines (`tools/fake_server.py`): the HTTP layer and the
process are measured, not a model. Targets are reported, not asserted.
`python -m bench.server_limits` prints one JSON line.
"""
from __future__ import annotations

import http.client
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from tools.testing import ServerProcess, closed_by_server, open_half_requests

HEALTH_TARGET_MS = 100.0
IDLE_EXIT_TARGET_S = 1.0
MID_JOB_EXTRA_TARGET_S = 1.0
STEP_SECONDS = 0.5
SAMPLES = 20


def _health_ms(url: str) -> float:
    """GET /v1/health on a new connection (http.client: an httpx.Client costs tens of ms to build)."""
    parsed = urlparse(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    conn.request("GET", "/v1/health")
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"health: HTTP {response.status}")
    return (time.perf_counter() - t0) * 1000.0


def health_under_attack(root: Path) -> dict:
    server = ServerProcess(root / "attack", fake_step_seconds=0.0)
    try:
        idle = [_health_ms(server.url) for _ in range(SAMPLES)]
        parsed = urlparse(server.url)
        socks = open_half_requests(parsed.hostname, parsed.port, 1000)
        attacked = []
        for _ in range(SAMPLES):
            for sock in socks:
                if not closed_by_server(sock):
                    try:
                        sock.send(b"X-Slow: 1\r\n")
                    except OSError:
                        pass
            attacked.append(_health_ms(server.url))
            time.sleep(0.2)
        for sock in socks:
            sock.close()
    finally:
        server.stop()
    idle_ms, attacked_ms = statistics.median(idle), statistics.median(attacked)
    return {"health_idle_median_ms": round(idle_ms, 2), "health_attacked_median_ms": round(attacked_ms, 2),
            "health_attacked_p95_ms": round(sorted(attacked)[int(0.95 * (len(attacked) - 1))], 2),
            "health_attacked_max_ms": round(max(attacked), 2),
            "health_attacked_over_idle": round(attacked_ms / idle_ms, 2), "target_ms": HEALTH_TARGET_MS}


def exit_seconds(root: Path, mid_job: bool) -> float:
    server = ServerProcess(root / f"exit-{mid_job}", fake_step_seconds=STEP_SECONDS)
    try:
        if mid_job:
            server.wait_for_step(server.submit(steps=40)["id"], 1)
        else:
            server.client.get("/v1/health")
        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_exit(30)
        return time.perf_counter() - t0
    finally:
        server.stop()


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="multiplane-bench-limits-") as folder:
        root = Path(folder)
        result = health_under_attack(root)
        idle = min(exit_seconds(root, False) for _ in range(3))
        mid = min(exit_seconds(root, True) for _ in range(3))
    result.update({"sigterm_idle_s": round(idle, 3), "sigterm_idle_target_s": IDLE_EXIT_TARGET_S,
                   "sigterm_mid_job_s": round(mid, 3), "step_s": STEP_SECONDS,
                   "sigterm_mid_job_beyond_step_s": round(max(0.0, mid - STEP_SECONDS), 3),
                   "sigterm_mid_job_beyond_step_target_s": MID_JOB_EXTRA_TARGET_S})
    return result


if __name__ == "__main__":
    print(json.dumps({"benchmark": "server_limits", **run()}))
    sys.exit(0)
