"""Peak memory of SDXL layer stacks at the real shapes, from the meta-device memory model.

SDXL 1024², CFG, background + 3 foregrounds + the blended image (`joint`, 10 UNet rows),
fp16: weights by component (the real configs), activation peaks of one layered UNet call
(our processors, inter-layer attention and capture on) and of the decoders, traced with
`inference.memory_model`, plain and under lean activations (`inference.lean_unet`, the real
context manager) — then the device peak of five set-ups: before (patched attention copies,
one plain call), everything resident in one plain call per step; automatic chunking on 12
and 10 GiB cards and model CPU offload on an 8 GiB card, rows, lean activations and VAE
tiling chosen by the engine's own rules (`unet_call_plan`, `usable_memory`). Chunked FLOPs
are counted against unchunked ones, and the model is checked against real runs (tiny model
on the CPU, plain and lean: traced peak vs measured RSS growth of a fresh process).

`python -m bench.memory_model` prints one JSON line; `--measure` is the child that measures.
"""
from __future__ import annotations

import contextlib
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
from inference.lean_unet import lean_activations
from inference.memory_model import (GIB, HEADROOM, TILE_LATENT, tensor_bytes, traced_peak, unet_activation_model,
                                    usable_memory, weight_bytes)
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
    """Activation peaks (bytes): one layered UNet call per row count, plain and lean; the
    engine's own per-row model of both (what it sizes chunks with); the decoders."""
    unet, vae = parts["unet"], parts["vae"]
    state = layered_state()
    rows = 2 * len(ROLES)
    out: dict = {}
    with torch.no_grad(), layered_attention(unet, state, parts["factors"]):
        out["unet_call_rows"] = {n: traced_peak(lambda n=n: chunked_call(unet, state, [list(range(n))]))
                                 for n in (rows, len(ROLES))}
        with lean_activations(unet):
            out["lean_unet_call_rows"] = {n: traced_peak(lambda n=n: chunked_call(unet, state, [list(range(n))]))
                                          for n in (rows, len(ROLES))}
        halves = SDXLLayered().chunk_units(state, len(ROLES), 2)
        out["flops_unchunked"] = count_flops(lambda: chunked_call(unet, state, [list(range(rows))]))
        out["flops_chunked_halves"] = count_flops(lambda: chunked_call(unet, state, pack_chunks(halves, 5)))
        with lean_activations(unet):
            out["flops_lean"] = count_flops(lambda: chunked_call(unet, state, [list(range(rows))]))
    latent_size = (SIZE // 8, SIZE // 8)
    out["engine_model"] = {lean: unet_activation_model(unet.config, latent_size, DTYPE, lean=lean)
                           for lean in (False, True)}
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
    """`inference.memory_model.unet_rows_that_fit` on a given free memory."""
    return max(1, int((usable_memory(free) - fixed) // per_row))


def call_peak(traced: dict, n: int) -> int:
    """A layered call's traced peak at `n` rows (linear between / beyond the traced counts)."""
    if n in traced:
        return traced[n]
    (a, pa), (b, pb) = sorted(traced.items())
    return int(pa + (n - a) * (pb - pa) / (b - a))


def plan(card: float, weights: dict, act: dict, *, offload: bool, patched_copies: bool = False,
         lean: bool = True, evicted_at_planning: bool = False) -> dict:
    """Peak device bytes of a joint run on a `card`-GiB GPU, by the engine's rules.

    Rows: `unet_call_plan` on CUDA (lean activations on unless `lean` is False, rows from the
    free memory when the chunks are sized, with the engine's own per-row model); then one
    guidance half per call while the layers see each other, rows packed up to that count
    after. Model offload (diffusers: one pipeline model on the device at a time): the UNet's
    weights are taken off the free memory, and when the chunks are sized the second text
    encoder is still on the device (the UNet's hook evicts it at its first call) — unless
    `evicted_at_planning`, which shows what a planner that foresaw the eviction would pick;
    the transparent decoder waits in host memory (`codecs_on_device`) until decoding.
    """
    w = dict(weights)
    copies = w.pop("transparency_patched_copies") if patched_copies else 0
    w.pop("transparency_patched_copies", None)
    te2 = w.pop("text_encoder_2")
    traced = act["lean_unet_call_rows" if lean else "unet_call_rows"]
    per_row, fixed = act["engine_model"][lean]
    capacity = int(card * GIB) - CUDA_CONTEXT
    if offload:
        denoise_weights = w["unet"] + w["transparency_factors_rank256"]
        at_planning = w["transparency_factors_rank256"] + (0 if evicted_at_planning else te2 + w["vae"])
        free = capacity - at_planning - w["unet"]
        # the VAE upcast for decoding (fp16 + fp32 copy), the factors, the decoder brought over
        decode_weights = 2 * w["vae"] + w["transparency_factors_rank256"] + w["transparent_decoder"]
    else:
        denoise_weights = sum(w.values()) + copies
        free = capacity - denoise_weights
        decode_weights = denoise_weights + w["vae"]  # fp32 copy during the upcast decode
    rows = min(10, rows_that_fit(free, per_row, fixed))
    largest = 10 if rows >= 10 else max(5, rows)  # halves while the layers see each other
    unet_peak = denoise_weights + call_peak(traced, largest)
    tile = act["vae_decode_fp32"] > usable_memory(capacity - decode_weights)
    decode_act = max(act["vae_decode_fp32_tiled"] if tile else act["vae_decode_fp32"],
                     act["transparent_decoder_pass"])
    peak = max(unet_peak, decode_weights + decode_act) + CUDA_CONTEXT
    return {"card_gib": card, "lean_activations": lean, "rows_per_unet_call_planned": rows,
            "largest_unet_call_rows": largest, "vae_tiled": tile,
            "peak_gb": round(peak / GB, 2), "peak_gib": round(peak / GIB, 2)}


# ------------------------------------------------------------------ model vs measurement
def measure_child(lean: bool) -> None:
    """In a fresh process: RSS growth of one layered tiny UNet call (CPU, fp32, 512², 10 rows;
    `lean`: under lean activations) against the traced peak of the same call on a meta copy."""
    from bench.common import PeakSampler, tiny_engine
    from inference.memory_model import meta_unet, unet_meta_inputs

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
    with lean_activations(meta) if lean else contextlib.nullcontext():
        traced = traced_peak(lambda: call(meta, "meta"))
    with torch.inference_mode(), lean_activations(unet) if lean else contextlib.nullcontext():
        call(unet, "cpu")  # warm-up: kernels' one-time buffers
        with PeakSampler(interval=0.0005) as sampler:
            base = sampler.rss()
            call(unet, "cpu")
    print(json.dumps({"traced": traced, "measured": sampler.peak - base}))


def measured_vs_traced() -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")  # frees return pages
    result = {}
    for lean in (False, True):
        out = subprocess.run([sys.executable, "-m", "bench.memory_model", "--measure"] + (["--lean"] if lean else []),
                             capture_output=True, text=True, check=True, env=env)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        result[f"tiny_unet_call_cpu_fp32_512px_10_rows{'_lean' if lean else ''}"] = {
            "traced_mib": round(got["traced"] / 2 ** 20, 1),
            "measured_rss_growth_mib": round(got["measured"] / 2 ** 20, 1),
            "measured_over_traced": round(got["measured"] / max(got["traced"], 1), 3)}
    return result


def device_peaks(weights: dict, act: dict) -> dict:
    return {
        "before_unchunked_with_patched_copies": plan(80, weights, act, offload=False, patched_copies=True,
                                                     lean=False),
        "unchunked_all_resident": plan(80, weights, act, offload=False, lean=False),
        "auto_chunking_12gib_card": plan(12, weights, act, offload=False),
        "auto_chunking_10gib_card": plan(10, weights, act, offload=False),
        "model_offload_8gib_card": plan(8, weights, act, offload=True),
        "model_offload_8gib_card_if_planned_after_eviction": plan(8, weights, act, offload=True,
                                                                  evicted_at_planning=True),
        "model_offload_8gib_card_without_lean": plan(8, weights, act, offload=True, lean=False),
    }


def run() -> dict:
    quiet_libraries()
    parts = components()
    weights = resident(parts)
    act = activations(parts)
    te2 = sum(weight_bytes([parts["text_encoders"][1]]).values())
    peaks = device_peaks(dict(weights, text_encoder_2=te2), act)
    auto12, offload8 = peaks["auto_chunking_12gib_card"], peaks["model_offload_8gib_card"]
    engine_gib = {("lean" if lean else "plain"): {"per_row": round(r / GIB, 4), "fixed": round(f / GIB, 4)}
                  for lean, (r, f) in act["engine_model"].items()}
    return {
        "shape": f"SDXL {SIZE}x{SIZE}, CFG, background + 3 foregrounds + blended (joint, 10 rows), fp16, meta device",
        "weights_gib": {k: round(v / GIB, 3) for k, v in weights.items()},
        "activation_peaks_gib": {
            **{f"unet_call_{n}_rows": round(v / GIB, 3) for n, v in sorted(act["unet_call_rows"].items())},
            **{f"lean_unet_call_{n}_rows": round(v / GIB, 3) for n, v in sorted(act["lean_unet_call_rows"].items())},
            "engine_model_plain_unet_call": engine_gib["plain"],
            "engine_model_lean_unet_call": engine_gib["lean"],
            "vae_decode_fp32_upcast": round(act["vae_decode_fp32"] / GIB, 3),
            "vae_decode_fp32_tiled_512px": round(act["vae_decode_fp32_tiled"] / GIB, 3),
            "transparent_decoder_pass": round(act["transparent_decoder_pass"] / GIB, 3)},
        "device_peak": peaks,
        "chunked_vs_unchunked_flops": round(act["flops_chunked_halves"] / act["flops_unchunked"], 4),
        "lean_vs_plain_flops": round(act["flops_lean"] / act["flops_unchunked"], 4),
        "memory_model_check": measured_vs_traced(),
        "notes": f"peaks include a {CUDA_CONTEXT / GIB} GiB CUDA context and the engine keeps "
                 f"max(10 %, {HEADROOM / GIB} GiB) of free memory unused when it sizes chunks; 'before' is "
                 "the transparency patch as it was (patched attention copies beside the factors); lean "
                 "activations are on by default on GPUs (exact, no FLOPs); under model offload the "
                 "transparent decoder waits in host memory while the UNet runs",
        "targets_decimal_gb": {
            "auto_chunking_12gib_card_le_10gb": {"peak_gb": auto12["peak_gb"], "met": auto12["peak_gb"] <= 10.0},
            "model_offload_8gib_card_le_7gb": {"peak_gb": offload8["peak_gb"], "met": offload8["peak_gb"] <= 7.0},
            "chunked_le_1.15x_unchunked_flops": act["flops_chunked_halves"] <= 1.15 * act["flops_unchunked"]},
    }


if __name__ == "__main__":
    if "--measure" in sys.argv:
        measure_child(lean="--lean" in sys.argv)
    else:
        print(json.dumps(run()))
