"""Disabling the add-on: how long the caller (Blender's UI thread) is held while the local
server stops. The real server is started and stopped both ways, alternately: the add-on's
`stop_all_in_background()` (what unregister calls) and the blocking `stop_all()` (what it
used to call; still used at interpreter exit). Target: at most 0.3 s held.

`python -m bench.addon_disable` prints one JSON line.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 3


def _started_server(root: Path):
    from addon import backend

    server = backend.ManagedServer(Path(sys.executable), device="cpu", output_root=root / "out",
                                   log_path=root / "server.log")
    server.start()
    server.wait_ready(120)
    return server


def run() -> dict:
    from addon import backend

    held = {"background": [], "blocking": []}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for _ in range(REPEATS):
            for way, stop in (("background", backend.stop_all_in_background), ("blocking", backend.stop_all)):
                server = _started_server(root)
                t = time.perf_counter()
                result = stop()
                held[way].append(time.perf_counter() - t)
                if way == "background":
                    result.join(30)
                assert server._proc.poll() is not None
    background, blocking = statistics.median(held["background"]), statistics.median(held["blocking"])
    return {"benchmark": "UI thread held while disabling stops the local server",
            "held_seconds_background": round(background, 4), "held_seconds_blocking": round(blocking, 4),
            "ratio_background_to_blocking": round(background / blocking, 4), "target_held_seconds": 0.3}


if __name__ == "__main__":
    print(json.dumps(run()))
