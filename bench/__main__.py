"""`make bench`: run every benchmark, each in its own process, and print one JSON object.

Each benchmark module has `run() -> dict` that measures ours and the baseline side by side
in one run and reports ratios; targets are stated next to the ratios, never asserted.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = (
    "bench.independent",
    "bench.transparent_decode",
    "bench.joint",
    "bench.real_size_flops",
    "bench.memory_model",
    "bench.patch_load",
    "bench.full_size_load",
    "bench.speed_levers",
    "bench.server_latency",
    "bench.server_limits",
    "bench.import_stack",
    "bench.watcher_tick",
    "bench.previews",
    "bench.addon_disable",
)


def main(argv: list[str]) -> int:
    selected = [b for b in BENCHMARKS if not argv or any(a in b for a in argv)]
    root = Path(__file__).resolve().parents[1]
    results: dict = {}
    for name in selected:
        if not (root / (name.replace(".", "/") + ".py")).exists():
            results[name] = {"skipped": "not present"}
            continue
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", name], cwd=root, capture_output=True, text=True)
        entry: dict
        try:
            entry = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            entry = {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
        entry["wall_seconds"] = round(time.perf_counter() - t, 2)
        results[name] = entry
        print(f"{name}: done in {entry['wall_seconds']} s", file=sys.stderr)
    print(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
