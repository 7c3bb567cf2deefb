"""Speed levers side by side: attention kernel, memory format, dtype, TTA passes, first progress.

On this CPU with the tiny model (256², one UNet call of 8 rows, fastest of 5 interleaved
runs): SDPA processors vs diffusers' explicit-softmax ones, channels-last vs contiguous
UNet, bfloat16 vs float32, `--compile` (its warm-up, then compiled vs eager); at SDXL 1024²
from the memory model: the activation peak of one UNet row with explicit-softmax attention
vs SDPA (the T×T scores it materializes); TTA passes from the FLOP model
(bench.real_size_flops) and on the tiny decoder; and the latency from `generate` to the
first progress event and to the first finished step, with the chunk size taken from the
memory model (cold: traced at the first job of a size) or fixed.

`python -m bench.speed_levers` prints one JSON line.
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import alternate, tiny_engine

ROWS = 8


def _fastest(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: min(v) for k, v in samples.items()}


def unet_inputs(unet) -> dict:
    """Zeros for one UNet call of ROWS rows at a 32×32 latent (256²), at timestep 500."""
    from inference.compilation import zero_inputs

    inputs = zero_inputs(unet, ROWS, (32, 32), "cpu")
    inputs["timestep"] = torch.tensor(500)
    return inputs


def unet_levers(engine) -> dict:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = engine.load("tiny").pipeline.unet
    inputs = unet_inputs(unet)
    bf16 = {k: ({n: t.bfloat16() for n, t in v.items()} if isinstance(v, dict) else
                (v.bfloat16() if v.is_floating_point() else v)) for k, v in inputs.items()}

    def prepared(processor, memory_format=torch.contiguous_format, dtype=torch.float32):
        model = copy.deepcopy(unet).to(memory_format=memory_format, dtype=dtype)
        model.set_attn_processor(processor())
        args = bf16 if dtype == torch.bfloat16 else inputs

        def run():
            with torch.inference_mode():
                model(**args)
        return run

    variants = {"sdpa": prepared(AttnProcessor2_0), "explicit_softmax": prepared(AttnProcessor),
                "channels_last": prepared(AttnProcessor2_0, torch.channels_last),
                "bfloat16": prepared(AttnProcessor2_0, dtype=torch.bfloat16)}
    for fn in variants.values():
        fn()  # warm-up
    best = _fastest(alternate(variants, 5))
    return {"tiny_unet_call_seconds": {k: round(v, 4) for k, v in best.items()},
            "explicit_softmax_over_sdpa": round(best["explicit_softmax"] / best["sdpa"], 3),
            "channels_last_over_contiguous_cpu": round(best["channels_last"] / best["sdpa"], 3),
            "bf16_over_fp32_cpu": round(best["bfloat16"] / best["sdpa"], 3)}


def compile_lever(engine) -> dict:
    """`--compile` (inference.compilation) against eager on one tiny UNet call of ROWS rows:
    the warm-up at load (cold: an empty inductor cache; cached: what a later process pays,
    dynamo tracing again but inductor's compiled code read from its disk cache) and the
    steady-state call, fastest of 5 interleaved."""
    import os

    import torch._dynamo

    from inference.compilation import compile_unet_blocks, warm_up

    unet = engine.load("tiny").pipeline.unet
    inputs = unet_inputs(unet)
    warm_ups = {}
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            for name in ("cold", "cached"):
                torch._dynamo.reset()  # a new process: no graphs in memory
                compiled = copy.deepcopy(unet)
                compile_unet_blocks(compiled)
                warm_ups[name] = round(warm_up(compiled, "cpu"), 2)
            variants = {"eager": _call(unet, inputs), "compiled": _call(compiled, inputs)}
            for fn in variants.values():
                fn()
            best = _fastest(alternate(variants, 5))
        finally:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            if previous is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    return {"warm_up_seconds": warm_ups, "tiny_unet_call_seconds": {k: round(v, 4) for k, v in best.items()},
            "compiled_over_eager_cpu": round(best["compiled"] / best["eager"], 3)}


def _call(unet, inputs):
    def run():
        with torch.inference_mode():
            unet(**inputs)
    return run


def sdxl_attention_memory() -> dict:
    """Activation peak of one SDXL 1024² UNet row (fp16): explicit softmax vs SDPA."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from bench.real_size_flops import sdxl_unet, unet_inputs
    from inference.memory_model import traced_peak

    unet = sdxl_unet()
    peaks = {}
    for name, processor in (("sdpa", AttnProcessor2_0), ("explicit_softmax", AttnProcessor)):
        unet.set_attn_processor(processor())
        with torch.no_grad():
            peaks[name] = traced_peak(lambda: unet(**unet_inputs(unet, 1)))
    return {"sdxl_unet_row_peak_gib": {k: round(v / 2 ** 30, 3) for k, v in peaks.items()},
            "explicit_softmax_over_sdpa": round(peaks["explicit_softmax"] / peaks["sdpa"], 2)}


def tta_levers(engine) -> dict:
    from inference.transparent_vae import decode_transparent

    loaded = engine.load("tiny")
    pixel, latent = torch.rand(1, 3, 256, 256), torch.randn(1, 4, 32, 32)
    variants = {f"tta{n}": (lambda n=n: decode_transparent(loaded.decoder, pixel, latent, passes=n)) for n in (1, 8)}
    best = _fastest(alternate(variants, 3))
    return {"tiny_decoder_tta8_over_tta1": round(best["tta8"] / best["tta1"], 2),
            "sdxl_1024_flops": "8 passes = 0.65 x one SDXL VAE decode; independent TTA 8 = 1.012 x plain "
                               "(bench.real_size_flops): at the real size TTA 8 costs about 1 %"}


def first_progress(engine) -> dict:
    """Seconds from generate to the first progress event and to the first finished step."""
    from inference import memory_model
    from inference.request import LayerSpec, StackRequest

    req = StackRequest(prompt="a forest", background="trees", layers=(LayerSpec("a fox"),), width=256,
                       height=256, steps=2, seed=1, tta_passes=1, method="joint")
    loaded = engine.load("tiny")
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        engine.generate(req, "tiny", Path(tmp) / "warm-up")
        for repeat in range(3):
            for name, max_batch in (("fixed_max_batch", 64), ("memory_model_cold", None),
                                    ("memory_model_warm", None)):
                if name == "memory_model_cold":
                    memory_model._ACTIVATION_CACHE.clear()
                loaded.max_batch = max_batch
                marks: dict = {}
                t = time.perf_counter()

                def progress(event, marks=marks, t=t):
                    if event.phase == "denoise":
                        marks.setdefault(event.step, time.perf_counter() - t)
                engine.generate(req, "tiny", Path(tmp) / f"{name}-{repeat}", progress=progress)
                best = out.setdefault(name, {"first_event_s": marks[0], "first_step_s": marks[1]})
                best["first_event_s"] = round(min(best["first_event_s"], marks[0]), 3)
                best["first_step_s"] = round(min(best["first_step_s"], marks[1]), 3)
    loaded.max_batch = None
    return out


def run() -> dict:
    engine = tiny_engine()
    return {"shape": f"tiny model, CPU, 256², UNet call of {ROWS} rows; SDXL 1024² from the memory model",
            "unet": unet_levers(engine), "compile": compile_lever(engine),
            "attention_memory": sdxl_attention_memory(), "tta": tta_levers(engine),
            "first_progress": first_progress(engine),
            "kept": "SDPA everywhere (our processors and diffusers' default); channels-last for the "
                    "transparent decoder on CPU/CUDA; float32 on the CPU by default, bfloat16 by --dtype; "
                    "TTA 8 default (about 1 % of the FLOPs at SDXL 1024²); --compile off by default (no gain "
                    "on this CPU for a minute of warm-up; on CUDA see bench.gpu)"}


if __name__ == "__main__":
    print(json.dumps(run()))
