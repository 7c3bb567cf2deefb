"""Cost of transparent decoding per foreground layer, next to a plain VAE decode.

Every foreground layer is decoded twice: the ordinary VAE decode (RGB on grey), then the
LayerDiffuse transparent decoder, 1 or 8 times (test-time augmentation). This measures,
in one run on the same latent: the VAE decode, the transparent decoder with TTA 1 and
TTA 8, and reports their ratios. The transparent decoder has the published architecture
(random weights — speed does not depend on values); the VAE is a small random 4-block
`AutoencoderKL` so the run stays short on a CPU. Because that VAE is much cheaper than the
real SDXL VAE, the FLOP counts of the real shapes at 1024² are reported too (counted on
the meta device, nothing allocated): they give the ratio to expect on real models.

`python -m bench.transparent_decode [size]` prints one JSON line.
"""
from __future__ import annotations

import json
import sys

import torch
from diffusers import AutoencoderKL

from bench.common import best_time, count_flops
from inference.transparent_vae import TransparentDecoder, decode_transparent, fast_memory_format

BENCH_VAE = dict(
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
)
SDXL_VAE = dict(BENCH_VAE, block_out_channels=(128, 256, 512, 512))


def full_size_flops(size: int = 1024) -> dict:
    """FLOPs of one transparent-decoder pass and one SDXL-VAE decode at `size`², on meta."""
    with torch.device("meta"), torch.no_grad():
        decoder = TransparentDecoder()
        vae = AutoencoderKL(**SDXL_VAE)
        pixel = torch.empty(1, 3, size, size)
        latent = torch.empty(1, 4, size // 8, size // 8)
        decoder_flops = count_flops(lambda: decoder(pixel, latent))
        vae_flops = count_flops(lambda: vae.decode(latent))
    return {
        "size": size,
        "transparent_decoder_tflop_per_pass": round(decoder_flops / 1e12, 3),
        "sdxl_vae_decode_tflop": round(vae_flops / 1e12, 3),
        "expected_ratio_tta8_vs_vae": round(8 * decoder_flops / vae_flops, 2),
        "expected_ratio_tta1_vs_vae": round(decoder_flops / vae_flops, 2),
    }


def run(size: int = 256, repeats: int = 2) -> dict:
    """Best-of-`repeats` timings (after one warm-up each) and their ratios, as a dict."""
    torch.manual_seed(0)
    decoder = fast_memory_format(TransparentDecoder().eval(), "cpu")  # as the engine loads it
    vae = AutoencoderKL(**BENCH_VAE).eval()
    latent = torch.randn(1, 4, size // 8, size // 8)
    with torch.no_grad():
        pixel = (vae.decode(latent).sample * 0.5 + 0.5).clamp(0, 1)

    def vae_decode():
        with torch.no_grad():
            vae.decode(latent)

    vae_s = best_time(vae_decode, repeats)
    tta1_s = best_time(lambda: decode_transparent(decoder, pixel, latent, passes=1), repeats)
    # The decoder is warm from the TTA 1 runs; 8 passes are long enough to time once.
    tta8_s = best_time(lambda: decode_transparent(decoder, pixel, latent, passes=8), 1, warm_up=False)
    with torch.no_grad():
        decoder_flops = count_flops(lambda: decoder(pixel, latent))
        vae_flops = count_flops(lambda: vae.decode(latent))
    return {
        "size": size,
        "threads": torch.get_num_threads(),
        "vae_decode_s": round(vae_s, 4),
        "transparent_tta1_s": round(tta1_s, 4),
        "transparent_tta8_s": round(tta8_s, 4),
        "ratio_tta8_vs_vae": round(tta8_s / vae_s, 2),
        "ratio_tta1_vs_vae": round(tta1_s / vae_s, 2),
        "ratio_tta8_vs_tta1": round(tta8_s / tta1_s, 2),
        "ratio_layer_total_tta8_vs_plain": round((vae_s + tta8_s) / vae_s, 2),
        "decoder_gflop_per_s": round(decoder_flops / tta1_s / 1e9, 1),
        "vae_gflop_per_s": round(vae_flops / vae_s / 1e9, 1),
        "note": "measured VAE is a small 4-block AutoencoderKL; see full_size for real-shape FLOP ratios",
        "target": "TTA 8 costs about 8x TTA 1 (no extra overhead); pick TTA 1 for previews",
        "full_size": full_size_flops(1024),
    }


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 256)))
