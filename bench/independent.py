"""`independent` stack (background + 3 foregrounds) vs plain diffusers pipeline calls.

Same tiny model, size and steps. Timing alternates ours/plain in one process after a
warm-up; peak RSS is measured in two fresh subprocesses (one per variant) doing the same
load + generation. Target: time and RSS ratios ≤ 1.10 (our machinery adds ≤ 10 %).
Ours includes transparent decoding (TTA 1 for the headline ratio; TTA 8 reported too) and
writing the PNG stack; plain produces the same four images as arrays. 20 steps (the
default is 30): with fewer steps the fixed per-layer work (decode, PNG) dominates a tiny
model far more than it ever does a real one.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE, STEPS, REPEATS = 256, 20, 3
LAYERS = ("a red fox", "a moss-covered rock", "hanging fern leaves")


def make_request(tta: int):
    from inference.request import LayerSpec, StackRequest

    return StackRequest(prompt="a forest clearing at dusk", background="pine trees",
                        layers=tuple(LayerSpec(p) for p in LAYERS), width=SIZE, height=SIZE,
                        steps=STEPS, seed=3, tta_passes=tta, method="independent").validated()


def plain_pipelines():
    """Two ordinary SDXL pipelines: base UNet, and a UNet with the LayerDiffuse delta merged."""
    import copy

    import torch
    from diffusers import StableDiffusionXLPipeline

    from inference.engine import quiet_libraries
    from inference.models import resolve_model
    from inference.sdxl_transparency import TransparencyPatch

    quiet_libraries()
    resolved = resolve_model("tiny", allow_download=False)
    base = StableDiffusionXLPipeline.from_pretrained(str(resolved.base), local_files_only=True,
                                                     dtype=torch.float32)
    fg_unet = copy.deepcopy(base.unet)
    TransparencyPatch.from_file(resolved.files["unet_patch"], fg_unet).merge_into(fg_unet)
    fg = StableDiffusionXLPipeline(**{**base.components, "unet": fg_unet})
    for p in (base, fg):
        p.set_progress_bar_config(disable=True)
    return base, fg


def run_plain(base, fg, req) -> None:
    import torch

    from inference.methods.independent import combine_prompts, layer_seeds

    seeds = layer_seeds(req)
    prompts = [combine_prompts(req.background, req.prompt)] + [combine_prompts(l.prompt, req.prompt)
                                                               for l in req.layers]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        pipe = base if i == 0 else fg
        pipe(prompt=prompt, width=req.width, height=req.height, num_inference_steps=req.steps,
             guidance_scale=req.guidance, generator=torch.Generator().manual_seed(seed), output_type="np")


def run_ours(engine, req, root: Path, tag: str) -> None:
    engine.generate(req, "tiny", root / f"{tag}-{time.perf_counter_ns()}")


def timing() -> dict:
    from inference.engine import Engine, EngineSettings

    engine = Engine(EngineSettings(device="cpu", allow_download=False))
    engine.load("tiny")
    base, fg = plain_pipelines()
    req1, req8 = make_request(1), make_request(8)
    samples: dict[str, list[float]] = {"ours_tta1": [], "ours_tta8": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_ours(engine, req1, root, "warm")
        run_plain(base, fg, req1)
        for _ in range(REPEATS):
            for name, fn in (("plain", lambda: run_plain(base, fg, req1)),
                             ("ours_tta1", lambda: run_ours(engine, req1, root, "t1")),
                             ("ours_tta8", lambda: run_ours(engine, req8, root, "t8"))):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"seconds": {k: round(v, 3) for k, v in med.items()},
            "time_ratio": round(med["ours_tta1"] / med["plain"], 3),
            "time_ratio_tta8": round(med["ours_tta8"] / med["plain"], 3)}


def peak_rss(variant: str) -> dict:
    """RSS (KiB) of a fresh process: after loading, and the peak while generating once."""
    out = subprocess.run([sys.executable, "-m", "bench.independent", "--rss", variant],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class PeakSampler:
    """Samples this process's RSS every 2 ms on a thread (ru_maxrss also counts import spikes)."""

    def __init__(self):
        import threading

        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def rss_child(variant: str) -> None:
    import psutil

    req = make_request(1)
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "ours":
            from inference.engine import Engine, EngineSettings

            engine = Engine(EngineSettings(device="cpu", allow_download=False))
            engine.load("tiny")
            loaded = psutil.Process().memory_info().rss
            with PeakSampler() as sampler:
                run_ours(engine, req, Path(tmp), "rss")
        else:
            base, fg = plain_pipelines()
            loaded = psutil.Process().memory_info().rss
            with PeakSampler() as sampler:
                run_plain(base, fg, req)
    print(json.dumps({"loaded": loaded // 1024, "peak": sampler.peak // 1024}))


def run() -> dict:
    from inference.models import resolve_model

    resolve_model("tiny", allow_download=False)  # build the tiny model once, outside any timing
    result = {"benchmark": "independent stack (bg + 3 fg) vs plain diffusers calls",
              "size": SIZE, "steps": STEPS, "target_ratio": 1.10}
    result.update(timing())
    ours, plain = peak_rss("ours"), peak_rss("plain")
    result["peak_rss_kib"] = {"ours": ours, "plain": plain}
    result["rss_ratio"] = round(ours["peak"] / plain["peak"], 3)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss":
        rss_child(sys.argv[2])
    else:
        print(json.dumps(run()))
