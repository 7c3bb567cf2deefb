"""The GPU benchmark's driver: plain diffusers against our methods, side by side, one process.

Scenarios (same loaded pipeline, same prompts): plain diffusers 1 image; plain batch of 5;
our `independent` background + 3 foregrounds; `joint` background + 3 foregrounds (10 UNet
rows per step); `joint` with forced chunking (`max_batch` 5: one guidance half per call);
`joint` with the UNet channels-last (a lever: kept if it pays).
Each is warmed up once at 2 steps, then timed: seconds, denoise it/s, peak VRAM
(`torch.cuda.max_memory_allocated`), and the ratios. `--tiny --device cpu` runs the same
driver on the tiny model (the test suite's smoke run); `bash bench/gpu/run.sh` is the one
command of the real run (wheels, full-size cache, then this).

`python -m bench.gpu [--model sdxl] [--device cuda] [--size 1024] [--steps 30] [--out FILE]`
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

PROMPT = "a quiet harbour at dawn"
BACKGROUND = "stone quay, calm water, fishing boats"
LAYERS = ("a red lighthouse", "a seagull on a post", "a stack of wooden crates")


def stack_request(method: str, size: int, steps: int):
    from inference.request import LayerSpec, StackRequest

    boxes = ((0.05, 0.1, 0.45, 0.9), (0.5, 0.05, 0.8, 0.5), (0.55, 0.55, 0.95, 0.95))
    return StackRequest(prompt=PROMPT, background=BACKGROUND, method=method, width=size, height=size,
                        steps=steps, guidance=5.0, seed=7, tta_passes=1,
                        layers=tuple(LayerSpec(p, box=b) for p, b in zip(LAYERS, boxes)))


class Meter:
    """Wall seconds and peak device memory of one call (CUDA: max_memory_allocated)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> dict:
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        return {"seconds": round(seconds, 3), "peak_vram_gib": None if peak is None else round(peak / 2 ** 30, 2)}


def scenarios(engine, model: str, size: int, steps: int, work: Path) -> dict[str, Callable[[int], None]]:
    """name → run(steps) for every scenario, on the engine's loaded pipeline."""
    loaded = engine.load(model)
    pipe = loaded.pipeline
    counter = iter(range(10 ** 6))

    def plain(images: int) -> Callable[[int], None]:
        return lambda n: pipe(prompt=[PROMPT] * images, width=size, height=size, num_inference_steps=n,
                              guidance_scale=5.0, output_type="np")

    def ours(method: str, max_batch: Optional[int] = None, channels_last: bool = False) -> Callable[[int], None]:
        def run(n: int) -> None:
            import torch

            loaded.max_batch = max_batch
            if channels_last:  # a lever under test: the UNet's convolutions channels-last
                pipe.unet.to(memory_format=torch.channels_last)
            try:
                engine.generate(stack_request(method, size, n), model, work / f"{method}-{next(counter)}")
            finally:
                loaded.max_batch = None
                pipe.unet.to(memory_format=torch.contiguous_format)
        return run

    return {"plain_1_image": plain(1), "plain_batch_5": plain(5), "independent_bg_3fg": ours("independent"),
            "joint_bg_3fg": ours("joint"), "joint_forced_chunking": ours("joint", max_batch=5),
            "joint_channels_last": ours("joint", channels_last=True)}


def predicted_unet_peaks(engine, model: str, size: int) -> dict:
    """The memory model's device peak of one denoising step (weights on the device now plus
    the traced activations of the rows per call), for the joint scenarios; CUDA only."""
    import torch

    from inference.memory_model import unet_activation_model

    if engine.device.type != "cuda":
        return {}
    unet = engine.load(model).pipeline.unet
    per_row, fixed = unet_activation_model(unet.config, (size // 8, size // 8), unet.dtype)
    resident = torch.cuda.memory_allocated(engine.device)
    rows = {"joint_bg_3fg": 10, "joint_forced_chunking": 5, "joint_channels_last": 10}
    return {name: round((resident + fixed + n * per_row) / 2 ** 30, 2) for name, n in rows.items()}


def ratios(results: dict) -> dict:
    s = {k: v["seconds"] for k, v in results.items()}
    return {"independent_vs_4_plain_images": round(s["independent_bg_3fg"] / (4 * s["plain_1_image"]), 3),
            "joint_vs_plain_batch_5": round(s["joint_bg_3fg"] / s["plain_batch_5"], 3),
            "joint_vs_independent": round(s["joint_bg_3fg"] / s["independent_bg_3fg"], 3),
            "forced_chunking_vs_joint": round(s["joint_forced_chunking"] / s["joint_bg_3fg"], 3),
            "channels_last_vs_joint": round(s["joint_channels_last"] / s["joint_bg_3fg"], 3)}


def run(model: str, device: str, size: int, steps: int, dtype: Optional[str] = None) -> dict:
    import torch

    from inference.engine import Engine, EngineSettings

    engine = Engine(EngineSettings(device=device, allow_download=False, dtype=dtype))
    t = time.perf_counter()
    engine.load(model)
    load_s = time.perf_counter() - t
    meter = Meter(engine.device)
    predicted = predicted_unet_peaks(engine, model, size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in scenarios(engine, model, size, steps, Path(tmp)).items():
            fn(min(2, steps))  # warm-up: kernel selection, first-call allocations
            entry = meter(lambda: fn(steps))
            entry["denoise_it_per_s"] = round(steps / entry["seconds"], 3)  # whole call: a lower bound
            results[name] = entry
            print(f"{name}: {entry}", file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None
    for name, peak in predicted.items():  # the memory model against max_memory_allocated
        results[name]["memory_model_unet_step_gib"] = peak
    return {"model": model, "device": str(engine.device), "gpu": gpu, "size": size, "steps": steps,
            "dtype": str(engine.load(model).dtype).removeprefix("torch."), "load_seconds": round(load_s, 2),
            "torch": torch.__version__, "results": results, "ratios": ratios(results)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=None, help="default 1024 (256 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="default 30 (2 with --tiny)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--tiny", action="store_true", help="the tiny model at 256², 2 steps (smoke run)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    args.size = args.size or (256 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    report = run(args.model, args.device, args.size, args.steps, args.dtype)
    text = json.dumps(report)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
