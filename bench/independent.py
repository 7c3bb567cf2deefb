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
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import alternate, compare_peak_rss, report_rss, run_ours, tiny_engine

SIZE, STEPS, REPEATS = 256, 20, 8
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

    from inference.prompts import combine_prompts, layer_seeds

    seeds = layer_seeds(req)
    prompts = [combine_prompts(req.background, req.prompt)] + [combine_prompts(l.prompt, req.prompt)
                                                               for l in req.layers]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        pipe = base if i == 0 else fg
        pipe(prompt=prompt, width=req.width, height=req.height, num_inference_steps=req.steps,
             guidance_scale=req.guidance, generator=torch.Generator().manual_seed(seed), output_type="np")


def timing() -> dict:
    engine = tiny_engine()
    base, fg = plain_pipelines()
    req1, req8 = make_request(1), make_request(8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_ours(engine, req1, root, "warm")
        run_plain(base, fg, req1)
        samples = alternate({"plain": lambda: run_plain(base, fg, req1),
                             "ours_tta1": lambda: run_ours(engine, req1, root, "t1"),
                             "ours_tta8": lambda: run_ours(engine, req8, root, "t8")}, REPEATS)
    # Ratios use each variant's fastest run (the one least disturbed by other processes).
    best = {k: min(v) for k, v in samples.items()}
    return {"seconds": {k: round(v, 3) for k, v in best.items()},
            "median_seconds": {k: round(statistics.median(v), 3) for k, v in samples.items()},
            "time_ratio": round(best["ours_tta1"] / best["plain"], 3),
            "time_ratio_tta8": round(best["ours_tta8"] / best["plain"], 3)}


def rss_child(variant: str) -> None:
    req = make_request(1)
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "ours":
            engine = tiny_engine()
            report_rss(lambda: run_ours(engine, req, Path(tmp), "rss"))
        else:
            base, fg = plain_pipelines()
            report_rss(lambda: run_plain(base, fg, req))


def run() -> dict:
    from inference.models import resolve_model

    resolve_model("tiny", allow_download=False)  # build the tiny model once, outside any timing
    result = {"benchmark": "independent stack (bg + 3 fg) vs plain diffusers calls",
              "size": SIZE, "steps": STEPS, "target_ratio": 1.10}
    result.update(timing())
    result.update(compare_peak_rss("bench.independent", "ours", "plain"))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss":
        rss_child(sys.argv[2])
    else:
        print(json.dumps(run()))
