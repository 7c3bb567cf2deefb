"""The GPU benchmark's driver: plain diffusers against our methods, and the speed levers, side by side.

Scenarios (same loaded pipeline, same prompts, `--steps`, default 30): plain diffusers 1
image; plain batch of 5; our `independent` background + 3 foregrounds; `joint` background +
3 foregrounds (10 UNet rows per step); `joint` with forced chunking (`max_batch` 5: one
guidance half per call); `joint` with the UNet channels-last.
Speed levers (`joint`, `--lever-steps`, default 10, to fit the 8 minutes): float16 (the
run's dtype) against bfloat16 (a second engine); `--compile` against eager (a third engine:
its warm-up at load, then steady-state it/s); lean activations on against off (when the
engine has them); and the transparent decoder at TTA 1 against TTA 8.
Each row is warmed up once at 2 steps, then timed: seconds, denoise it/s, peak VRAM
(`torch.cuda.max_memory_allocated`); the ratios follow. A row that fails (out of memory, a
missing kernel, a compiler) is reported with its error and the others still run; rows past
`--budget-s` are reported as skipped. `--tiny --device cpu` runs the same driver on the
tiny model (the test suite's dry run); `bash bench/gpu/run.sh` is the one command of the
real run (wheels, full-size cache, then this).

`python -m bench.gpu [--model sdxl] [--device cuda] [--size 1024] [--steps 30] [--out FILE]`
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

PROMPT = "a quiet harbour at dawn"
BACKGROUND = "stone quay, calm water, fishing boats"
LAYERS = ("a red lighthouse", "a seagull on a post", "a stack of wooden crates")
BUDGET_S = 420  # the driver's share of run.sh's 8 minutes (the full-size cache is written first)


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


class Rows:
    """Runs rows fail-soft under a time budget: `measure(name, run, steps)` warms `run` up at
    2 steps, times it at `steps` (None: one call, no step count) and records the entry, or
    the error (the others still run), or "skipped" once the budget is spent."""

    def __init__(self, meter: Meter, budget_s: float, out: Optional[Path] = None):
        self.meter, self.deadline, self.results, self.out = meter, time.perf_counter() + budget_s, {}, out

    def skipped(self, name: str, needs_s: float = 0.0) -> bool:
        """Record `name` as skipped when less than `needs_s` of the budget is left."""
        if time.perf_counter() + needs_s <= self.deadline:
            return False
        self.add(name, {"skipped": f"time budget (--budget-s): needs about {needs_s:.0f} s more than is left"
                        if needs_s else "time budget (--budget-s) spent"})
        return True

    def measure(self, name: str, run: Callable[[Optional[int]], object], steps: Optional[int]) -> None:
        if self.skipped(name):
            return
        try:
            run(None if steps is None else min(2, steps))  # warm-up: kernel selection, first allocations
            entry = self.meter(lambda: run(steps))
            if steps is not None:
                entry["steps"] = steps
                entry["denoise_it_per_s"] = round(steps / max(entry["seconds"], 1e-3), 3)  # whole call: a lower bound
        except Exception as exc:  # noqa: BLE001 - one row's failure is that row's result
            entry = failure(exc)
        self.add(name, entry)

    def add(self, name: str, entry: dict) -> None:
        """Record a row; with `out`, the results so far are written there too (a killed run
        leaves what it measured)."""
        self.results[name] = entry
        print(f"{name}: {entry}", file=sys.stderr, flush=True)
        if self.out is not None:
            self.out.write_text(json.dumps({"partial": True, "results": self.results}) + "\n")


def failure(exc: BaseException) -> dict:
    """A failed row's entry (and the device memory it held given back)."""
    import torch

    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return {"error": f"{type(exc).__name__}: {first_line}", "out_of_memory": oom}


def scenarios(engine, model: str, size: int, work: Path) -> dict[str, Callable[[int], None]]:
    """name → run(steps) for every scenario, on the engine's loaded pipeline."""
    loaded = engine.load(model)
    pipe = loaded.pipeline

    def plain(images: int) -> Callable[[int], None]:
        return lambda n: pipe(prompt=[PROMPT] * images, width=size, height=size, num_inference_steps=n,
                              guidance_scale=5.0, output_type="np")

    return {"plain_1_image": plain(1), "plain_batch_5": plain(5),
            "independent_bg_3fg": ours(engine, model, "independent", size, work),
            "joint_bg_3fg": ours(engine, model, "joint", size, work),
            "joint_forced_chunking": ours(engine, model, "joint", size, work, max_batch=5),
            "joint_channels_last": ours(engine, model, "joint", size, work, channels_last=True)}


def ours(engine, model: str, method: str, size: int, work: Path, max_batch: Optional[int] = None,
         channels_last: bool = False, lean: Optional[str] = None) -> Callable[[int], None]:
    """run(steps) of our `method`, with the loaded model's chunk size, UNet memory format and
    lean activations set for the call (and put back after)."""
    counter = iter(range(10 ** 6))

    def run(n: int) -> None:
        import torch

        loaded = engine.load(model)
        unet = loaded.pipeline.unet
        saved_lean = getattr(loaded, "lean_activations", None)
        loaded.max_batch = max_batch
        if lean is not None:
            loaded.lean_activations = lean
        if channels_last:  # a lever under test: the UNet's convolutions channels-last
            unet.to(memory_format=torch.channels_last)
        try:
            engine.generate(stack_request(method, size, n), model, work / f"{method}-{time.time_ns()}-{next(counter)}")
        finally:
            loaded.max_batch = engine.settings.max_batch
            if lean is not None:
                loaded.lean_activations = saved_lean
            unet.to(memory_format=torch.contiguous_format)
    return run


def lean_available() -> bool:
    """Whether this engine has lean activations (EngineSettings.lean_activations: on | off)."""
    from inference.engine import EngineSettings

    return "lean_activations" in {f.name for f in dataclasses.fields(EngineSettings)}


def decode_rows(engine, model: str, size: int) -> dict[str, Callable[[Optional[int]], None]]:
    """The transparent decoder alone at the canvas size: TTA 1 against TTA 8 passes."""
    import torch

    from inference.transparent_vae import decode_transparent

    loaded = engine.load(model)
    decoder = loaded.decoder
    kind = dict(device=loaded.device, dtype=loaded.dtype)
    pixel, latent = torch.rand(1, 3, size, size, **kind), torch.randn(1, 4, size // 8, size // 8, **kind)

    def decode(passes: int) -> Callable[[Optional[int]], None]:
        def run(_steps: Optional[int]) -> None:
            with torch.inference_mode():
                decode_transparent(decoder, pixel, latent, passes=passes)
        return run
    return {"decode_tta1": decode(1), "decode_tta8": decode(8)}


def main_engine_rows(rows: Rows, engine, model: str, size: int, steps: int, lever_steps: int, work: Path) -> None:
    """The scenarios at `steps`, then on the same engine the levers at `lever_steps`: the
    joint baseline of the engine-swapping levers, lean activations on/off, the decoder."""
    for name, run in scenarios(engine, model, size, work).items():
        rows.measure(name, run, steps)
    rows.measure("lever_joint", ours(engine, model, "joint", size, work), lever_steps)
    if lean_available():
        for choice in ("on", "off"):
            rows.measure(f"lever_joint_lean_{choice}", ours(engine, model, "joint", size, work, lean=choice),
                         lever_steps)
    for name, run in decode_rows(engine, model, size).items():
        rows.measure(name, run, None)


def other_engine_row(rows: Rows, name: str, model: str, device: str, size: int, lever_steps: int, work: Path,
                     needs_s: float, **settings) -> None:
    """`joint` at `lever_steps` on a fresh engine with `settings` (dtype, compile), when about
    `needs_s` (load, warm-up, run) are left: its load (and compile warm-up) seconds are
    recorded with the row; the engine is freed after."""
    from inference.engine import Engine, EngineSettings

    if rows.skipped(name, needs_s):
        return
    engine = None
    try:
        engine = Engine(EngineSettings(device=device, allow_download=False, **settings))
        t = time.perf_counter()
        engine.load(model)
        load_s = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - e.g. no Triton for --compile, no bf16 on this GPU
        rows.add(name, {**failure(exc), "settings": settings})
        return
    try:
        rows.measure(name, ours(engine, model, "joint", size, work), lever_steps)
        extra = {"settings": settings, "load_seconds": round(load_s, 2)}
        if engine.compile_seconds is not None:
            extra["compile_warm_up_seconds"] = round(engine.compile_seconds, 2)
        rows.add(name, {**rows.results[name], **extra})
    finally:
        engine.unload()


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


RATIOS = {  # name: (numerator row, denominator row, what is compared)
    "independent_vs_4_plain_images": ("independent_bg_3fg", "plain_1_image", "seconds"),
    "joint_vs_plain_batch_5": ("joint_bg_3fg", "plain_batch_5", "seconds"),
    "joint_vs_independent": ("joint_bg_3fg", "independent_bg_3fg", "seconds"),
    "forced_chunking_vs_joint": ("joint_forced_chunking", "joint_bg_3fg", "seconds"),
    "channels_last_vs_joint": ("joint_channels_last", "joint_bg_3fg", "seconds"),
    "bf16_vs_run_dtype_joint": ("lever_joint_bfloat16", "lever_joint", "seconds"),
    "compiled_vs_eager_joint": ("lever_joint_compiled", "lever_joint", "seconds"),
    "lean_on_vs_off_joint": ("lever_joint_lean_on", "lever_joint_lean_off", "seconds"),
    "lean_on_vs_off_peak_vram": ("lever_joint_lean_on", "lever_joint_lean_off", "peak_vram_gib"),
    "tta8_vs_tta1_decode": ("decode_tta8", "decode_tta1", "seconds"),
}


def ratios(results: dict) -> dict:
    """Every ratio whose two rows succeeded (None where one failed, was skipped or is absent)."""
    out = {}
    for name, (top, bottom, key) in RATIOS.items():
        a, b = results.get(top, {}).get(key), results.get(bottom, {}).get(key)
        scale = 4 if name == "independent_vs_4_plain_images" else 1
        out[name] = round(a / (scale * b), 3) if a is not None and b else None
    return out


def run(model: str, device: str, size: int, steps: int, lever_steps: int, dtype: Optional[str] = None,
        budget_s: float = BUDGET_S, out: Optional[Path] = None) -> dict:
    import torch

    from inference.engine import Engine, EngineSettings

    engine = Engine(EngineSettings(device=device, allow_download=False, dtype=dtype))
    t = time.perf_counter()
    engine.load(model)
    load_s = time.perf_counter() - t
    run_dtype = str(engine.load(model).dtype).removeprefix("torch.")
    predicted = predicted_unet_peaks(engine, model, size)
    rows = Rows(Meter(engine.device), budget_s, out)
    with tempfile.TemporaryDirectory() as tmp:
        main_engine_rows(rows, engine, model, size, steps, lever_steps, Path(tmp))
        engine.unload()  # one model on the device at a time
        if run_dtype != "bfloat16":  # the run's dtype (float16 on CUDA) against bfloat16
            other_engine_row(rows, "lever_joint_bfloat16", model, device, size, lever_steps, Path(tmp),
                             needs_s=60, dtype="bfloat16")
        other_engine_row(rows, "lever_joint_compiled", model, device, size, lever_steps, Path(tmp),
                         needs_s=180, dtype=dtype, compile=True)
    results = rows.results
    gpu = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None
    for name, peak in predicted.items():  # the memory model against max_memory_allocated
        results[name]["memory_model_unet_step_gib"] = peak
    return {"model": model, "device": str(engine.device), "gpu": gpu, "size": size, "steps": steps,
            "lever_steps": lever_steps, "dtype": run_dtype, "load_seconds": round(load_s, 2),
            "torch": torch.__version__, "lean_activations": lean_available(), "results": results,
            "ratios": ratios(results)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=None, help="default 1024 (256 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="default 30 (2 with --tiny)")
    p.add_argument("--lever-steps", type=int, default=None, help="steps of the lever rows: default 10 (1 with --tiny)")
    p.add_argument("--dtype", default=None, help="the run's dtype (default: the device's, float16 on CUDA)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="rows starting later are skipped")
    p.add_argument("--tiny", action="store_true", help="the tiny model at 256², 2 steps (CPU dry run)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    args.size = args.size or (256 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    args.lever_steps = args.lever_steps or (1 if args.tiny else 10)
    report = run(args.model, args.device, args.size, args.steps, args.lever_steps, args.dtype, args.budget_s,
                 args.out)
    text = json.dumps(report)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
