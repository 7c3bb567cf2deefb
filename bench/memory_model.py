"""Peak memory of SDXL layer stacks at the real shapes, from the meta-device memory model.

SDXL 1024², CFG, background + 3 foregrounds + the blended image (`joint`, 10 UNet rows),
fp16: weights by component (the real configs), activation peaks of one layered UNet call
(our processors, inter-layer attention and capture on) and of the decoders, traced with
`inference.memory_model` — then the device peak of three set-ups: everything resident in
one call per step; automatic chunking on a 12 GiB card (rows and VAE tiling chosen by the
same rules as the engine); model CPU offload on an 8 GiB card. Chunked FLOPs are counted
against unchunked ones, and the model is checked against a real run (tiny model on the
CPU: traced peak vs measured RSS growth of a fresh process).

`python -m bench.memory_model` prints one JSON line; `--measure` is the child that measures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from bench.common import count_flops
from bench.real_size_flops import RANK, SIZE, sdxl_unet, unet_inputs
from inference.engine import quiet_libraries
from inference.families.sdxl import SDXLLayered
from inference.layered_attention import AttentionCapture, LayeredAttentionState, layered_attention
from inference.layered_sampler import pack_chunks
from inference.memory_model import (GIB, HEADROOM, TILE_LATENT, tensor_bytes, traced_peak, usable_memory,
                                    weight_bytes)
from inference.sdxl_transparency import expected_delta_shapes
from tools.full_size import CONFIG_DIR

DTYPE = torch.float16
ROLES = ["background", "foreground", "foreground", "foreground", "blended"]
CUDA_CONTEXT = int(0.5 * GIB)  # the CUDA context and cuBLAS/cuDNN handles (outside torch's allocator)
GB = 1e9


def _config(name: str) -> dict:
    return json.loads((CONFIG_DIR / "sdxl" / name / "config.json").read_text())


def components() -> dict:
    """The SDXL components on the meta device, in their run dtypes."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from inference.transparent_vae import TransparentDecoder

    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(**_config("text_encoder"))).to(DTYPE)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2"))).to(DTYPE)
        vae = AutoencoderKL.from_config(_config("vae")).to(DTYPE)
        decoder = TransparentDecoder().to(DTYPE)
    unet = sdxl_unet()
    factors = {name: (torch.empty(shape[0], RANK, device="meta", dtype=DTYPE),
                      torch.empty(RANK, shape[1], device="meta", dtype=DTYPE))
               for name, shape in expected_delta_shapes(unet).items()}
    return dict(unet=unet, text_encoders=(te1, te2), vae=vae, decoder=decoder, factors=factors)


def layered_state(groups: int = 2) -> LayeredAttentionState:
    n = len(ROLES)
    capture = AttentionCapture({n + i: [1, 2, 3, 4, 5, 6] for i, r in enumerate(ROLES) if r == "foreground"})
    return LayeredAttentionState(ROLES, groups, (SIZE // 8, SIZE // 8), inter_layer_strength=0.3,
                                 transparency_scale=[1.0 if r == "foreground" else 0.0 for r in ROLES],
                                 capture=capture)


def chunked_call(unet, state, chunks: list[list[int]]) -> None:
    """One step's UNet work in `chunks` (the sampler's `_denoise_chunked`, on meta inputs)."""
    for rows in chunks:
        state.select_rows(rows)
        unet(**unet_inputs(unet, len(rows)))
    state.select_rows(None)


def activations(parts: dict) -> dict:
    """Activation peaks (bytes): one layered UNet call per row count, the decoders."""
    unet, vae = parts["unet"], parts["vae"]
    state = layered_state()
    rows = 2 * len(ROLES)
    out: dict = {}
    with torch.no_grad(), layered_attention(unet, state, parts["factors"]):
        out["unet_call_rows"] = {n: traced_peak(lambda n=n: chunked_call(unet, state, [list(range(n))]))
                                 for n in (rows, len(ROLES))}
        halves = SDXLLayered().chunk_units(state, len(ROLES), 2)
        out["flops_unchunked"] = count_flops(lambda: chunked_call(unet, state, [list(range(rows))]))
        out["flops_chunked_halves"] = count_flops(lambda: chunked_call(unet, state, pack_chunks(halves, 5)))
    latent = torch.empty(1, 4, SIZE // 8, SIZE // 8, device="meta", dtype=torch.float32)
    vae32 = vae.float()  # the SDXL VAE is upcast for decoding (force_upcast)
    out["vae_decode_fp32"] = traced_peak(lambda: vae32.decode(latent))
    vae32.use_tiling, vae32.tile_latent_min_size, vae32.tile_sample_min_size = True, TILE_LATENT, 8 * TILE_LATENT
    out["vae_decode_fp32_tiled"] = traced_peak(lambda: vae32.decode(latent))
    vae32.use_tiling = False
    vae.to(DTYPE)
    pixel = torch.empty(1, 3, SIZE, SIZE, device="meta", dtype=DTYPE)
    out["transparent_decoder_pass"] = traced_peak(lambda: parts["decoder"](pixel, latent.to(DTYPE)))
    return out


def resident(parts: dict) -> dict:
    """Weight bytes per component (fp16), and today's patched attention copies beside the UNet."""
    def total(modules) -> int:
        return sum(weight_bytes(modules).values())

    shapes = expected_delta_shapes(parts["unet"])
    return {"unet": total([parts["unet"]]), "text_encoders": total(parts["text_encoders"]),
            "vae": total([parts["vae"]]), "transparent_decoder": total([parts["decoder"]]),
            "transparency_factors_rank256": tensor_bytes(t for pair in parts["factors"].values() for t in pair),
            "transparency_patched_copies": sum(2 * torch.Size(s).numel() for s in shapes.values())}


def rows_that_fit(free: int, per_row: int, fixed: int) -> int:
    return max(1, int((usable_memory(free) - fixed) // per_row))


def plan(card: float, weights: dict, act: dict, *, offload: bool, patched_copies: bool) -> dict:
    """Peak device bytes of a joint run on a `card`-GiB GPU, rows and tiling by the engine's rules."""
    rows_act = act["unet_call_rows"]
    per_row = (rows_act[10] - rows_act[5]) // 5
    fixed = max(rows_act[5] - 5 * per_row, 0)
    w = dict(weights)
    copies = w.pop("transparency_patched_copies") if patched_copies else 0
    w.pop("transparency_patched_copies", None)
    vae_fp32_extra = w["vae"]  # fp32 copy during the upcast decode = twice the fp16 weights
    if offload:  # diffusers' model offload: one pipeline model on the device at a time
        # (the patched copies stay in host memory: the patch is built before the UNet moves)
        denoise_weights = w["unet"] + w["transparency_factors_rank256"] + w["transparent_decoder"]
        decode_weights = 2 * w["vae"] + w["transparency_factors_rank256"] + w["transparent_decoder"]
    else:
        denoise_weights = sum(w.values()) + copies
        decode_weights = denoise_weights + vae_fp32_extra
    capacity = int(card * GIB) - CUDA_CONTEXT
    rows = min(10, rows_that_fit(capacity - denoise_weights, per_row, fixed))
    chunks = pack_chunks([[r for r in range(g * 5, g * 5 + 5)] for g in range(2)], rows)
    unet_peak = denoise_weights + max(traced_rows(rows_act, len(c), per_row, fixed) for c in chunks)
    tile = act["vae_decode_fp32"] > usable_memory(capacity - decode_weights)
    decode_act = max(act["vae_decode_fp32_tiled"] if tile else act["vae_decode_fp32"],
                     act["transparent_decoder_pass"])
    peak = max(unet_peak, decode_weights + decode_act) + CUDA_CONTEXT
    return {"card_gib": card, "rows_per_unet_call": [len(c) for c in chunks], "vae_tiled": tile,
            "peak_gb": round(peak / GB, 2), "peak_gib": round(peak / GIB, 2)}


def traced_rows(rows_act: dict, n: int, per_row: int, fixed: int) -> int:
    return rows_act.get(n, fixed + n * per_row)


# ------------------------------------------------------------------ model vs measurement
def measure_child() -> None:
    """In a fresh process: RSS growth of one layered tiny UNet call (CPU, fp32, 512², 10 rows)
    against the traced peak of the same call on a meta copy."""
    from bench.common import PeakSampler
    from inference.memory_model import meta_unet, unet_meta_inputs
    from bench.common import tiny_engine

    loaded = tiny_engine().load("tiny")
    unet = loaded.pipeline.unet
    size, rows = (64, 64), 10

    def call(model, device):
        inputs = unet_meta_inputs(model.config, rows, size, torch.float32)
        if device != "meta":
            inputs = {k: ({n: torch.zeros(v.shape) for n, v in v.items()} if isinstance(v, dict)
                          else torch.zeros(v.shape, dtype=v.dtype)) for k, v in inputs.items()}
        model(**inputs)

    meta = meta_unet(unet.config, torch.float32)
    traced = traced_peak(lambda: call(meta, "meta"))
    with torch.inference_mode():
        call(unet, "cpu")  # warm-up: kernels' one-time buffers
        with PeakSampler(interval=0.0005) as sampler:
            base = sampler.rss()
            call(unet, "cpu")
    print(json.dumps({"traced": traced, "measured": sampler.peak - base}))


def measured_vs_traced() -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")  # frees return pages
    out = subprocess.run([sys.executable, "-m", "bench.memory_model", "--measure"], capture_output=True,
                         text=True, check=True, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tiny_unet_call_cpu_fp32_512px_10_rows": {
        "traced_mib": round(got["traced"] / 2 ** 20, 1), "measured_rss_growth_mib": round(got["measured"] / 2 ** 20, 1),
        "measured_over_traced": round(got["measured"] / max(got["traced"], 1), 3)}}


def run() -> dict:
    quiet_libraries()
    parts = components()
    weights = resident(parts)
    act = activations(parts)
    return {
        "shape": f"SDXL {SIZE}x{SIZE}, CFG, background + 3 foregrounds + blended (joint, 10 rows), fp16, meta device",
        "weights_gib": {k: round(v / GIB, 3) for k, v in weights.items()},
        "activation_peaks_gib": {
            **{f"unet_call_{n}_rows": round(v / GIB, 3) for n, v in sorted(act["unet_call_rows"].items())},
            "vae_decode_fp32_upcast": round(act["vae_decode_fp32"] / GIB, 3),
            "vae_decode_fp32_tiled_512px": round(act["vae_decode_fp32_tiled"] / GIB, 3),
            "transparent_decoder_pass": round(act["transparent_decoder_pass"] / GIB, 3)},
        "device_peak": {
            "before_unchunked_with_patched_copies": plan(80, weights, act, offload=False, patched_copies=True),
            "unchunked_all_resident": plan(80, weights, act, offload=False, patched_copies=False),
            "auto_chunking_12gib_card": plan(12, weights, act, offload=False, patched_copies=False),
            "auto_chunking_10gib_card": plan(10, weights, act, offload=False, patched_copies=False),
            "model_offload_8gib_card": plan(8, weights, act, offload=True, patched_copies=False),
        },
        "chunked_vs_unchunked_flops": round(act["flops_chunked_halves"] / act["flops_unchunked"], 4),
        "memory_model_check": measured_vs_traced(),
        "notes": f"peaks include a {CUDA_CONTEXT / GIB} GiB CUDA context and the engine keeps "
                 f"max(10 %, {HEADROOM / GIB} GiB) of free memory unused when it sizes chunks; 'before' is "
                 "the transparency patch as it was (patched attention copies beside the factors)",
        "targets": "auto chunking <= 10 GiB (12 GiB cards), model offload <= 7 GiB (8 GiB cards), "
                   "chunked <= 1.15x unchunked FLOPs",
    }


if __name__ == "__main__":
    if "--measure" in sys.argv:
        measure_child()
    else:
        print(json.dumps(run()))
