"""Pieces every engine benchmark shares: the warm tiny engine, alternating timing, RSS."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable


def tiny_engine():
    """An Engine with the tiny model loaded (so timings exclude loading)."""
    from inference.engine import Engine, EngineSettings

    engine = Engine(EngineSettings(device="cpu", allow_download=False))
    engine.load("tiny")
    return engine


def run_ours(engine, req, root: Path, tag: str) -> None:
    engine.generate(req, "tiny", root / f"{tag}-{time.perf_counter_ns()}")


def best_time(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Fastest of `repeats` runs of `fn` in seconds (after one untimed warm-up run)."""
    if warm_up:
        fn()  # first calls pay for allocator and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def alternate(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each variant, interleaved so machine noise hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return samples


class PeakSampler:
    """Samples RSS on a thread: this process's every 2 ms by default (ru_maxrss also counts
    import spikes), or with `pid` and `tree` another process's summed with all its
    descendants' (a CLI run and whatever it starts)."""

    def __init__(self, pid: int | None = None, *, tree: bool = False, interval: float = 0.002):
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process(pid)
        self._tree = tree
        self._interval = interval
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def rss(self) -> int:
        """Bytes resident now (0 once the process is gone)."""
        procs = [self._proc]
        if self._tree:
            try:
                procs += self._proc.children(recursive=True)
            except self._psutil.Error:
                pass
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except self._psutil.Error:
                pass  # exited between listing and reading
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def report_rss(work: Callable[[], None]) -> None:
    """In a benchmark's `--rss` child: RSS after loading, and the peak while `work` runs (KiB)."""
    import psutil

    loaded = psutil.Process().memory_info().rss
    with PeakSampler() as sampler:
        work()
    print(json.dumps({"loaded": loaded // 1024, "peak": sampler.peak // 1024}))


def peak_rss(module: str, variant: str) -> dict:
    """Run `python -m <module> --rss <variant>` in a fresh process and read its report."""
    out = subprocess.run([sys.executable, "-m", module, "--rss", variant],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_peak_rss(module: str, ours: str, plain: str) -> dict:
    """Peak RSS of the `ours` and `plain` variants, each in a fresh process, and their ratio."""
    ours_rss, plain_rss = peak_rss(module, ours), peak_rss(module, plain)
    return {"peak_rss_kib": {ours: ours_rss, plain: plain_rss},
            "rss_ratio": round(ours_rss["peak"] / plain_rss["peak"], 3)}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn()` as torch's flop counter sees them (works on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
