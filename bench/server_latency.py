"""What the HTTP server adds on top of the engine, with the model warm.

Side by side in one run, on the tiny model (real engine code, random weights):
- latency from sending POST /v1/jobs to the client seeing the first progress event on the
  job's server-sent event stream (target ≤ 50 ms);
- end-to-end time of the same stack through the server process (submit, follow the
  stream to `succeeded`) against calling `Engine.generate` directly in this process,
  alternating the two, best of several runs each (target overhead ≤ 5 %); and, per served
  job, the client's time minus the worker's time on it (the server's own share).

The server is the real `python -m server serve` process over loopback. Both sides run on
the same CPU, one at a time. The stack is the same size and step count as the engine
benchmarks (256², 20 steps: well under a second, shorter than any real job, so the server's
fixed per-job cost weighs more here than in use). Targets are reported, not asserted.

`python -m bench.server_latency [repeats]` prints one JSON line.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from tools.testing import ServerProcess, sse_events

LATENCY_TARGET_MS = 50.0
OVERHEAD_TARGET_PERCENT = 5.0
REQUEST = {"prompt": "a misty lake at dawn", "background": "reeds", "model": "tiny",
           "method": "independent",
           "width": 256, "height": 256, "steps": 20, "tta_passes": 1,
           "layers": [{"prompt": "a heron"}]}


def _first_progress_ms(server: ServerProcess) -> float:
    """POST, then open the job's stream; ms until an event with a progress phase arrives."""
    t0 = time.perf_counter()
    r = server.client.post("/v1/jobs", json={**REQUEST, "steps": 1, "layers": []})
    r.raise_for_status()
    job_id = r.json()["id"]
    first: list[float] = []

    def on_event(event: dict) -> None:
        if not first and event["progress"]["phase"] is not None:
            first.append(time.perf_counter())

    sse_events(server, job_id, on_event, client=server.client)  # returns at the terminal status
    return (first[0] - t0) * 1000.0


def _through_server(server: ServerProcess) -> tuple[float, float]:
    """(client-side seconds from POST to the `succeeded` event, seconds the server's worker
    spent on the job: its `finished - started`)."""
    t0 = time.perf_counter()
    r = server.client.post("/v1/jobs", json=REQUEST)
    r.raise_for_status()
    events = sse_events(server, r.json()["id"], client=server.client)
    elapsed = time.perf_counter() - t0
    final = events[-1][1]
    if final["status"] != "succeeded":
        raise RuntimeError(f"server job ended {final['status']}: {final['error']}")
    worker = _seconds(final["finished"]) - _seconds(final["started"])
    return elapsed, worker


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _direct(engine, request, out_dir: Path) -> float:
    t0 = time.perf_counter()
    engine.generate(request, REQUEST["model"], out_dir)
    return time.perf_counter() - t0


def run(repeats: int = 7) -> dict:
    from inference.engine import Engine, EngineSettings
    from server.schemas import JobCreate

    request = JobCreate(**REQUEST).to_stack_request()
    with tempfile.TemporaryDirectory(prefix="multiplane-bench-") as tmp:
        tmp_path = Path(tmp)
        engine = Engine(EngineSettings(device="cpu"))
        server = ServerProcess(tmp_path / "server-stacks")
        try:
            # warm both: build/load the tiny model once on each side
            _direct(engine, request, tmp_path / "direct-warm")
            _through_server(server)

            latencies = [_first_progress_ms(server) for _ in range(repeats)]
            direct, served, worker = [], [], []

            def one_served() -> None:
                elapsed, in_worker = _through_server(server)
                served.append(elapsed)
                worker.append(in_worker)

            for i in range(repeats):  # alternate which side goes first
                if i % 2 == 0:
                    direct.append(_direct(engine, request, tmp_path / f"direct-{i}"))
                    one_served()
                else:
                    one_served()
                    direct.append(_direct(engine, request, tmp_path / f"direct-{i}"))
            health = httpx.get(f"{server.url}/v1/health").json()
        finally:
            server.stop()

    # Other processes on the machine only ever add time, so the best run of each side is the
    # fairest comparison; medians are reported too.
    overhead_best = 100.0 * (min(served) - min(direct)) / min(direct)
    overhead_median = 100.0 * (statistics.median(served) - statistics.median(direct)) / statistics.median(direct)
    # The server's own share of each job, independent of how fast the engine ran that time.
    own_ms = [1000.0 * (s - w) for s, w in zip(served, worker)]
    latency_median = statistics.median(latencies)
    return {
        "request": {k: REQUEST[k] for k in ("model", "width", "height", "steps", "tta_passes")}
                   | {"layers": 1 + len(REQUEST["layers"])},
        "device": health["device"].get("device"),
        "repeats": repeats,
        "first_progress_ms": {"median": round(latency_median, 1),
                              "max": round(max(latencies), 1),
                              "samples": [round(v, 1) for v in latencies],
                              "target_max_ms": LATENCY_TARGET_MS,
                              "meets_target": latency_median <= LATENCY_TARGET_MS},
        "end_to_end": {"direct_engine_best_s": round(min(direct), 4),
                       "through_server_best_s": round(min(served), 4),
                       "overhead_percent": round(overhead_best, 2),
                       "overhead_percent_of_medians": round(overhead_median, 2),
                       "server_own_ms_median": round(statistics.median(own_ms), 1),
                       "server_own_percent_median": round(100.0 * statistics.median(
                           [(s - w) / w for s, w in zip(served, worker)]), 2),
                       "direct_samples": [round(v, 4) for v in direct],
                       "server_samples": [round(v, 4) for v in served],
                       "target_max_percent": OVERHEAD_TARGET_PERCENT,
                       "meets_target": overhead_best <= OVERHEAD_TARGET_PERCENT},
    }


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 7)))
