"""Load-time work and resident bytes of the SDXL transparency patch, before and after.

Before: the patch kept patched copies of the 560 attention tensors beside the UNet, and the
first joint run factored all 560 matrices (rank 256) before its first step. After: the
rank-256 factors are the one resident form, read from the factor cache on every load but
the first. Per shape kind of SDXL's patch (counts from the real UNet config), one matrix is
factored (fp32, this CPU) and one cached entry read back; totals scale by the counts (the
work is per matrix). Resident bytes are exact, from the shapes. `cpu_bf16` times one SDXL
transformer block (1280 wide, 32² tokens) in float32 and bfloat16 on this CPU: bf16 halves
every resident byte; whether it also pays in time depends on the CPU's bf16 units.

`python -m bench.patch_load` prints one JSON line.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

from bench.common import best_time
from bench.real_size_flops import sdxl_unet
from inference.memory_model import GIB
from inference.sdxl_transparency import PATCH_RANK, FactorCache, expected_delta_shapes, factor_low_rank


def patch_work() -> dict:
    shapes = Counter(tuple(s) for s in expected_delta_shapes(sdxl_unet()).values())
    factor_s = read_s = 0.0
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FactorCache(Path(tmp), lambda path: "sha256:bench")
        for (out_f, in_f), count in shapes.items():
            delta = torch.randn(out_f, PATCH_RANK, generator=g) @ torch.randn(PATCH_RANK, in_f, generator=g) * 1e-3
            factor_s += count * best_time(lambda: factor_low_rank(delta, PATCH_RANK), 1, warm_up=False)
            name = "m.to_q.weight"
            base = {name: torch.zeros(out_f, in_f)}
            cache.save(Path(tmp) / "delta", {name: factor_low_rank(delta, PATCH_RANK)}, base)
            read_s += count * best_time(lambda: cache.load(Path(tmp) / "delta", base), 3)
    elements = sum(count * o * i for (o, i), count in shapes.items())
    factor_elements = sum(count * PATCH_RANK * (o + i) for (o, i), count in shapes.items())
    resident = {
        f"{dtype}": {"before_patched_copies_plus_factors_gib": round((elements + factor_elements) * size / GIB, 3),
                     "after_factors_only_gib": round(factor_elements * size / GIB, 3)}
        for dtype, size in (("fp16", 2), ("fp32", 4))}
    return {"matrices": sum(shapes.values()), "shape_kinds": {f"{o}x{i}": c for (o, i), c in shapes.items()},
            "factor_all_seconds_fp32_cpu": round(factor_s, 1), "read_cached_seconds": round(read_s, 2),
            "first_joint_step_waits_seconds": {"before": round(factor_s, 1), "after_cached": 0.0},
            "resident_patch_bytes": resident}


def cpu_bf16() -> dict:
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(1280, 20, 64, cross_attention_dim=2048).eval()
    x = torch.randn(2, 1024, 1280)
    ctx = torch.randn(2, 77, 2048)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        b, xi, ci = block.to(dtype), x.to(dtype), ctx.to(dtype)
        with torch.inference_mode():
            b(xi, encoder_hidden_states=ci)  # warm-up
            times[str(dtype).removeprefix("torch.")] = best_time(lambda: b(xi, encoder_hidden_states=ci), 3, warm_up=False)
    return {"sdxl_block_seconds": {k: round(v, 3) for k, v in times.items()},
            "bf16_over_fp32_time": round(times["bfloat16"] / times["float32"], 3),
            "bf16_over_fp32_bytes": 0.5}


def run() -> dict:
    return {"shape": "SDXL transparency patch (ld_diffusers_sdxl_attn layout), rank 256, this CPU",
            "patch": patch_work(), "cpu_bf16": cpu_bf16(),
            "targets": "one resident representation; a second load reads factors instead of factoring"}


if __name__ == "__main__":
    print(json.dumps(run()))
