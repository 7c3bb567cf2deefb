"""Load time, resident bytes and first-step latency of full-size SDXL, before/after the
factor cache, measured through the real engine (issue 13, section 3).

The full-size random-weight SDXL of `tools/full_size.py` (9.1 GB, the real Hugging Face
cache layout) is written once into $MULTIPLANE_FULL_SIZE_DIR (default
~/.cache/multiplane-bench/full-size-sdxl) and reused while the builder's plan is the same.
`Engine` loads it offline on the CPU in bfloat16 (`--dtype float32` to change; float32 SDXL
peaks near 21 GB). Each measurement is a fresh process:

- `load-page-cache`: a first load that only brings the files into the OS page cache, so
  the two loads below read them alike;
- `load-cold`: the factor cache entry of this delta file and dtype deleted first, so the
  load factors the 560 attention matrices: what every load cost before the cache;
- `load-warm`: the entry present (after); this child also counts the loaded objects'
  bytes per component beside the memory model's rule (the same modules built on the meta
  device from their configs, `inference.memory_model.weight_bytes`);
- `first-step`: a warm load, then jobs cancelled once their first denoising step is done:
  joint (the process's first job: the memory model traces the size), joint again,
  independent, whose foreground first waits for `applied()` to build the patched tensors
  from the factors (timed alone as `patch_swap_in_out_s`; before, copies were resident).

"Before" resident bytes are computed from the delta shapes (the old patched copies beside
the factors; that code is gone), float32 from the element size. `--tiny` runs the same
children on the tiny model (nothing to build; the tiny patch is too small to factor).

`python -m bench.full_size_load` prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

GIB = 2 ** 30
SIZE, STEPS = 256, 2  # the smallest canvas the request allows; jobs stop after their first step
# The first load reads the files into the OS page cache (a cold disk), which would make the
# cold-factor-cache load look slower for a reason that is not ours: it goes first, untimed.
CHILDREN = ("load-page-cache", "load-cold", "load-warm", "first-step")
FIRST_STEP_JOBS = (("joint_first_job", "joint"), ("joint_warm", "joint"), ("independent", "independent"))
# Memory a bfloat16 SDXL load needs here (weights 7.3 GiB, load-time peak above that), and
# the disk beyond the cache for the factor cache and slack.
NEEDED_RAM_GB = {"bfloat16": 13.0, "float32": 23.0, "float16": 13.0}
DISK_MARGIN = 2_000_000_000
DELTA_FILE_BYTES = 2  # the delta file is fp16; deltas too small to factor stay in that dtype


def default_root() -> Path:
    if os.environ.get("MULTIPLANE_FULL_SIZE_DIR"):
        return Path(os.path.expanduser(os.environ["MULTIPLANE_FULL_SIZE_DIR"]))
    return Path.home() / ".cache" / "multiplane-bench" / "full-size-sdxl"


# -- the full-size cache, built once ---------------------------------------------------------
def _planned_list(planned) -> list:
    return [[f.repo_id, f.filename, f.size] for f in planned]


def cache_is_complete(root: Path, planned) -> bool:
    """Whether `root` holds exactly `planned` (its stamp says so and every file is there)."""
    from tools.full_size import fake_commit, repo_cache_dir

    stamp = root / "built.json"
    try:
        if json.loads(stamp.read_text()) != _planned_list(planned):
            return False
    except (OSError, ValueError):
        return False
    hub = root / "hf" / "hub"
    for f in planned:
        path = repo_cache_dir(hub, f.repo_id) / "snapshots" / fake_commit(f.repo_id) / f.filename
        if not path.is_file() or path.stat().st_size != f.size:
            return False
    return True


def ensure_cache(root: Path, planned, log: Callable[[str], None] = print) -> Optional[float]:
    """Write `planned` into `<root>/hf/hub` unless it is already there; the seconds it took,
    or None when the cache was reused. A stale or partial cache is deleted first."""
    from tools.full_size import write_cache

    if cache_is_complete(root, planned):
        return None
    need = sum(f.size for f in planned)
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "hf", ignore_errors=True)
    (root / "built.json").unlink(missing_ok=True)
    free = shutil.disk_usage(root).free
    if free < need + DISK_MARGIN:
        raise OSError(f"{root}: {free / 1e9:.1f} GB free, {(need + DISK_MARGIN) / 1e9:.1f} GB needed for the "
                      "full-size cache; set MULTIPLANE_FULL_SIZE_DIR to a larger disk")
    t = time.perf_counter()
    write_cache(root / "hf" / "hub", planned, log=log)
    (root / "built.json").write_text(json.dumps(_planned_list(planned)))
    return time.perf_counter() - t


# -- what the children measure ---------------------------------------------------------------
def _engine(dtype: str):
    from inference.engine import Engine, EngineSettings

    return Engine(EngineSettings(device="cpu", allow_download=False, dtype=dtype))


def _stat(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


def factored_matrices(cache_file: Path) -> int:
    """How many matrices a factor cache file holds as factors (its `:up` entries)."""
    from safetensors import safe_open

    with safe_open(str(cache_file), framework="pt") as f:
        return sum(1 for key in f.keys() if key.endswith(":up"))


def measure_load(model: str, dtype: str, *, cold: bool) -> tuple:
    """Load `model` in a new Engine: (seconds per load step, RSS and what the factor cache
    did; the engine; the loaded model).

    `cold` deletes this delta file's factor cache entry first. The delta file's sha256 is
    hashed beforehand (the hash cache keeps it; every load before the cache hashed it too,
    for stack.json), so both loads time the same work but the factoring."""
    import torch

    from bench.common import PeakSampler
    from inference.models import resolve_model, transparency_factor_cache

    delta = resolve_model(model, allow_download=False).files.get("unet_patch")
    cache = transparency_factor_cache()
    cache_file = cache.path_for(delta, getattr(torch, dtype)) if delta is not None else None
    if delta is not None:
        cache.sha256(delta)
        if cold:
            cache_file.unlink(missing_ok=True)
    before = _stat(cache_file) if cache_file else None
    engine = _engine(dtype)
    with PeakSampler(interval=0.02) as rss:
        start = rss.rss()
        t = time.perf_counter()
        loaded = engine.load(model)
        total = time.perf_counter() - t
    after = _stat(cache_file) if cache_file else None
    written = after is not None and after != before
    steps = {k: round(v, 2) for k, v in loaded.load_seconds.items()}
    steps["resolve_and_rest"] = round(total - sum(loaded.load_seconds.values()), 2)
    return {"load_s": round(total, 2), "steps_s": steps,
            "factor_cache": {"entry_existed": before is not None, "written": written,
                             "matrices_factored": factored_matrices(cache_file) if written else 0},
            "rss_before_gib": round(start / GIB, 3), "peak_rss_gib": round(rss.peak / GIB, 3),
            "rss_growth_gib": round((rss.rss() - start) / GIB, 3)}, engine, loaded


def component_modules(loaded) -> dict[str, list]:
    """The loaded model's weight-holding modules by component."""
    from torch import nn

    groups: dict[str, list] = {"unet": [], "text_encoders": [], "vae": []}
    for name, module in loaded.pipeline.components.items():
        if isinstance(module, nn.Module):
            groups["text_encoders" if name.startswith("text_encoder") else name].append(module)
    groups["transparent_decoder"] = [loaded.decoder]
    groups["transparent_encoder"] = [loaded.encoder] if loaded.encoder is not None else []
    return groups


def _meta_copy(module, dtype):
    """`module`'s architecture on the meta device (no data), built from its config alone."""
    import torch
    from diffusers import ModelMixin

    with torch.device("meta"):
        copy = type(module).from_config(module.config) if isinstance(module, ModelMixin) else type(module)(module.config)
    return copy.to(dtype)


def resident_bytes(loaded) -> dict:
    """Bytes per component: measured on the loaded objects, and as the memory model counts
    them (meta copies from the configs in the run dtype; the patch from its delta shapes:
    rank-256 factors where smaller than the matrix, else the dense fp16 delta). `before`: the patched copies the old
    representation kept beside the factors."""
    import torch

    from inference.memory_model import tensor_bytes, weight_bytes
    from inference.sdxl_transparency import PATCH_RANK, expected_delta_shapes

    dtype = loaded.dtype
    size = torch.empty((), dtype=dtype).element_size()
    measured, modelled = {}, {}
    for name, modules in component_modules(loaded).items():
        measured[name] = sum(weight_bytes(modules).values())
        modelled[name] = sum(weight_bytes([_meta_copy(m, dtype) for m in modules]).values())
    shapes = expected_delta_shapes(loaded.pipeline.unet) if loaded.family == "sdxl" else {}
    measured["transparency_factors"] = tensor_bytes(loaded.unet_patch.stored_tensors()) if shapes else 0
    modelled["transparency_factors"] = sum(  # factors in the run dtype, else dense in the file's fp16
        PATCH_RANK * (o + i) * size if PATCH_RANK * (o + i) < o * i else o * i * DELTA_FILE_BYTES
        for o, i in shapes.values())
    copies = sum(o * i for o, i in shapes.values()) * size
    return {"measured": measured, "modelled": modelled, "before_patched_copies": copies, "element_size": size}


def first_step(engine, model: str, method: str, out: Path) -> dict:
    """Seconds from `Engine.generate` to the first progress event and to the first finished
    denoising step of each layer that starts; cancelled once the last layer's first step is done."""
    from inference.errors import Cancelled
    from inference.progress import CancelToken
    from inference.request import LayerSpec, StackRequest
    from tools.full_size import BACKGROUND, LAYERS, PROMPT

    req = StackRequest(prompt=PROMPT, background=BACKGROUND, layers=(LayerSpec(LAYERS[0]),), width=SIZE,
                       height=SIZE, steps=STEPS, seed=1, tta_passes=1, method=method)
    cancel, marks = CancelToken(), {}
    last_layer = 1 if method == "independent" else None  # joint: one run for all layers
    t = time.perf_counter()

    def progress(event):
        if event.phase == "denoise":
            marks.setdefault((event.layer, event.step), time.perf_counter() - t)
            if event.step >= 1 and event.layer == last_layer:
                cancel.cancel("first step measured")

    try:
        engine.generate(req, model, out, progress=progress, cancel=cancel)
    except Cancelled:
        pass
    result = {"first_event_s": round(marks[(0 if last_layer else None, 0)], 2),
              "first_step_s": round(marks[(0 if last_layer else None, 1)], 2)}
    if last_layer:  # the foreground starts after the background's steps, decode and the patch swap
        result["foreground_first_step_s"] = round(marks[(1, 1)], 2)
        result["background_step_1_s"] = round(marks[(0, 1)] - marks[(0, 0)], 2)
        result["foreground_step_1_s"] = round(marks[(1, 1)] - marks[(1, 0)], 2)  # patched UNet
    return result


def patch_swap_seconds(loaded, repeats: int = 3) -> float:
    """Fastest swap of the patched tensors in and out (`applied()`: W + up·down built for
    every patched matrix): what each independent foreground pays now that the factors are
    the one resident form (before, patched copies were resident and the swap was free)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with loaded.transparency():
            pass
        best = min(best, time.perf_counter() - t)
    return best


def measure_first_steps(model: str, dtype: str) -> dict:
    from bench.common import PeakSampler

    _, engine, loaded = measure_load(model, dtype, cold=False)
    out: dict = {"patch_swap_in_out_s": round(patch_swap_seconds(loaded), 3)}
    with tempfile.TemporaryDirectory() as tmp, PeakSampler(interval=0.05) as rss:
        for name, method in FIRST_STEP_JOBS:
            out[name] = first_step(engine, model, method, Path(tmp) / name)
    out["peak_rss_gib"] = round(rss.peak / GIB, 3)
    return out


def child(kind: str, model: str, dtype: str) -> dict:
    from inference.engine import quiet_libraries

    quiet_libraries()
    if kind == "first-step":
        return measure_first_steps(model, dtype)
    result, _, loaded = measure_load(model, dtype, cold=kind == "load-cold")
    if kind == "load-warm":
        result["resident_bytes"] = resident_bytes(loaded)
    return result


# -- the parent: fresh processes, side by side -----------------------------------------------
def run_child(kind: str, model: str, dtype: str, env: Optional[dict] = None) -> dict:
    command = [sys.executable, "-m", "bench.full_size_load", "--child", kind, "--model", model, "--dtype", dtype]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(value: float) -> float:
    return round(value / GIB, 3)


def summarize(cold: dict, warm: dict, first: dict) -> dict:
    """The figures side by side: before (cold factor cache, patched copies) and after."""
    res = warm.pop("resident_bytes")
    measured, modelled, copies = res["measured"], res["modelled"], res["before_patched_copies"]
    after, predicted = sum(measured.values()), sum(modelled.values())
    to_fp32 = 4 / res["element_size"]
    joint = first["joint_first_job"]["first_step_s"]
    patch = "transparency_patch"
    return {
        "load": {"before_cold_factor_cache": cold, "after_warm_factor_cache": warm,
                 "load_after_over_before": round(warm["load_s"] / cold["load_s"], 3),
                 "patch_step_after_over_before": round(warm["steps_s"][patch] / max(cold["steps_s"][patch], 1e-3), 4)},
        "resident": {
            "measured_gib": {k: _gib(v) for k, v in measured.items()},
            "modelled_gib": {k: _gib(v) for k, v in modelled.items()},
            "measured_over_modelled": round(after / max(predicted, 1), 4),
            "load_rss_growth_over_modelled": round(warm["rss_growth_gib"] * GIB / max(predicted, 1), 3),
            "before_gib": {"transparency_patched_copies": _gib(copies), "total": _gib(after + copies)},
            "after_total_gib": _gib(after),
            "after_over_before": round(after / (after + copies), 3),
            "float32_modelled_gib": {"before_total": _gib((after + copies) * to_fp32),
                                     "after_total": _gib(after * to_fp32)}},
        "first_step": {**first, "first_joint_step_from_load_start_s": {
            "before": round(cold["load_s"] + joint, 1), "after": round(warm["load_s"] + joint, 1),
            "after_over_before": round((warm["load_s"] + joint) / (cold["load_s"] + joint), 3)}},
    }


def _available_ram_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 1e9


def run(*, tiny: bool = False, dtype: str = "bfloat16", root: Optional[Path] = None) -> dict:
    """Build (once) and measure: cold load, warm load, first steps, each in a fresh process."""
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    model, env, build_s = "tiny", None, None
    if not tiny:
        from tools.full_size import offline_env, plan_preset

        root = root or default_root()
        if _available_ram_gb() < NEEDED_RAM_GB[dtype]:
            return {"skipped": f"{_available_ram_gb():.1f} GB of RAM available, a full-size SDXL load in {dtype} "
                               f"needs about {NEEDED_RAM_GB[dtype]} GB"}
        try:
            build_s = ensure_cache(root, plan_preset("sdxl"), log=log)
        except OSError as exc:
            return {"skipped": str(exc)}
        model, env = "sdxl", offline_env(root)
    results = {}
    for kind in CHILDREN:
        if not tiny and _available_ram_gb() < NEEDED_RAM_GB[dtype]:
            raise RuntimeError(f"before {kind}: only {_available_ram_gb():.1f} GB of RAM available "
                               f"(other jobs?); {NEEDED_RAM_GB[dtype]} GB needed")
        t = time.perf_counter()
        results[kind] = run_child(kind, model, dtype, env)
        log(f"full_size_load: {kind} done in {time.perf_counter() - t:.0f} s")
    summary = summarize(results["load-cold"], results["load-warm"], results["first-step"])
    summary["load"]["page_cache_warm_up_load_s"] = results["load-page-cache"]["load_s"]
    return {
        "shape": (f"{'tiny model' if tiny else 'full-size random-weight SDXL (tools/full_size.py), HF cache layout'}, "
                  f"{dtype}, CPU, offline Engine; first steps: {SIZE}x{SIZE}, background + 1 foreground, "
                  f"{STEPS} steps, cancelled after the first (joint: 6 UNet rows per step)"),
        "cache": {"dir": str(root) if root else None, "built_seconds": None if build_s is None else round(build_s, 1)},
        **summary,
        "measured": "load seconds and steps (fresh process each), peak RSS, bytes of the loaded objects, "
                    "factor cache behaviour (entry written, matrices factored), seconds to the first steps",
        "modelled": "component bytes from meta copies built from the configs (the memory model's weight rule); "
                    "'before' resident bytes (patched copies from the delta shapes); float32 bytes by element size",
        "targets": "a warm load does not factor; one resident representation of the patch",
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.full_size_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of full-size SDXL")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(NEEDED_RAM_GB))
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="sdxl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.dtype)))
    else:
        print(json.dumps(run(tiny=args.tiny, dtype=args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
