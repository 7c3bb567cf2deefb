"""LayerDiffuse transparent decoder/encoder: layout, golden numerics, strict loading, TTA."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.errors import Cancelled, InvalidRequest, UnsafeCheckpoint, WeightMismatch
from inference.progress import CancelToken
from inference.transparent_vae import (
    TTA_AUGMENTATIONS,
    TransparentDecoder,
    TransparentEncoder,
    augmented_decode,
    decode_transparent,
    encode_transparent,
    pad_transparent_rgb,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_weights import deterministic_weights  # noqa: E402

TINY_DECODER = dict(block_out_channels=(8, 8, 16, 16, 32, 32, 32), norm_num_groups=4, attention_head_dim=8)
TINY_ENCODER = dict(block_out_channels=(8, 8, 8, 16))



def manifest_layout(weight_manifest: dict, name: str) -> dict[str, tuple[int, ...]]:
    files = weight_manifest["files"]
    if name == "layer_sd15_vae_transparent_decoder" and name not in files:
        # Documented as having the same layout as vae_transparent_decoder.
        name = "vae_transparent_decoder"
    return {k: tuple(v) for k, v in files[name].items()}


def meta_shapes(model_cls, **config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = model_cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def decoder_layout(weight_manifest):
    return manifest_layout(weight_manifest, "vae_transparent_decoder")


@pytest.fixture(scope="module")
def golden_decoder(decoder_layout, tmp_path_factory):
    """The full-size decoder loaded strictly from a float32 file of deterministic weights."""
    path = tmp_path_factory.mktemp("golden") / "vae_transparent_decoder.safetensors"
    save_file(deterministic_weights(decoder_layout), str(path))
    model = TransparentDecoder.from_single_file(path, dtype=torch.float32)
    path.unlink()
    return model


@pytest.fixture(scope="module")
def fp16_decoder_weights(decoder_layout):
    return {k: v.half() for k, v in deterministic_weights(decoder_layout).items()}


def tiny_decoder(seed: int = 0, **overrides) -> TransparentDecoder:
    torch.manual_seed(seed)
    return TransparentDecoder(**{**TINY_DECODER, **overrides}).eval()


# ---------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    "model_cls, manifest_name",
    [
        (TransparentDecoder, "vae_transparent_decoder"),
        (TransparentDecoder, "layer_sd15_vae_transparent_decoder"),
        (TransparentEncoder, "vae_transparent_encoder"),
    ],
)
def test_own_state_dict_equals_manifest(weight_manifest, model_cls, manifest_name):
    ours = meta_shapes(model_cls)
    published = manifest_layout(weight_manifest, manifest_name)
    assert sorted(set(ours) - set(published)) == []
    assert sorted(set(published) - set(ours)) == []
    assert {k: v for k, v in ours.items() if published[k] != v} == {}


def test_latent_injection_follows_latent_scale_factor():
    with torch.device("meta"):
        default = TransparentDecoder()
        quarter = TransparentDecoder(latent_scale_factor=4, **TINY_DECODER)
    assert default.latent_injection_block == 3
    assert default.latent_conv_in.out_channels == 64 and default.size_multiple == 64
    assert quarter.latent_injection_block == 2
    assert quarter.latent_conv_in.out_channels == TINY_DECODER["block_out_channels"][1]
    with pytest.raises(ValueError, match="power of two"):
        TransparentDecoder(latent_scale_factor=6, **TINY_DECODER)


# ---------------------------------------------------------------------------- golden numerics


def test_decoder_reproduces_golden(golden_decoder, reference):
    golden = load_file(str(reference / "transparent_decoder_golden.safetensors"))
    with torch.no_grad():
        single = golden_decoder(golden["pixel"], golden["latent"])
    assert single.shape == golden["single_pass"].shape
    assert (single - golden["single_pass"]).abs().max().item() <= 1e-4

    median = augmented_decode(golden_decoder, golden["pixel"], golden["latent"], passes=8)
    assert (median - golden["augmented_median"]).abs().max().item() <= 1e-4

    # The engine runs the decoder channels-last on CPU/CUDA (faster); same numerics.
    from inference.transparent_vae import fast_memory_format

    fast_memory_format(golden_decoder, "cpu")
    try:
        with torch.no_grad():
            fast = golden_decoder(golden["pixel"], golden["latent"])
        assert (fast - golden["single_pass"]).abs().max().item() <= 1e-4
        median = augmented_decode(golden_decoder, golden["pixel"], golden["latent"], passes=8)
        assert (median - golden["augmented_median"]).abs().max().item() <= 1e-4
    finally:
        golden_decoder.to(memory_format=torch.contiguous_format)


def test_encoder_reproduces_golden(weight_manifest, reference, tmp_path):
    path = tmp_path / "vae_transparent_encoder.safetensors"
    layout = manifest_layout(weight_manifest, "vae_transparent_encoder")
    save_file(deterministic_weights(layout), str(path))
    encoder = TransparentEncoder.from_single_file(path)
    golden = load_file(str(reference / "transparent_encoder_golden.safetensors"))
    with torch.no_grad():
        offset = encoder(golden["input"])
    assert offset.shape == golden["offset"].shape == (1, 4, 8, 8)
    assert (offset - golden["offset"]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------- strict loading


def test_fp16_decoder_file_loads_and_converts(fp16_decoder_weights, weight_manifest, tmp_path):
    # The SD1.5 decoder file shares the layout; loading is by layout, so one file covers both names.
    assert manifest_layout(weight_manifest, "layer_sd15_vae_transparent_decoder") == {
        k: tuple(v.shape) for k, v in fp16_decoder_weights.items()
    }
    path = tmp_path / "layer_sd15_vae_transparent_decoder.safetensors"
    save_file(fp16_decoder_weights, str(path))
    model = TransparentDecoder.from_single_file(path, dtype=torch.float32)
    loaded = model.state_dict()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in loaded.values())
    for name in ("conv_in.weight", "latent_conv_in.bias", "up_blocks.0.attentions.2.to_v.weight"):
        assert torch.equal(loaded[name], fp16_decoder_weights[name].float())


def test_fp16_encoder_file_loads(weight_manifest, tmp_path):
    layout = manifest_layout(weight_manifest, "vae_transparent_encoder")
    weights = {k: v.half() for k, v in deterministic_weights(layout).items()}
    path = tmp_path / "vae_transparent_encoder.safetensors"
    save_file(weights, str(path))
    model = TransparentEncoder.from_single_file(path, dtype=torch.bfloat16)
    assert model.blocks[16].weight.dtype == torch.bfloat16
    assert torch.equal(model.blocks[16].weight, weights["blocks.16.weight"].to(torch.bfloat16))


def _tamper(weights: dict, how: str) -> tuple[dict, str]:
    weights = dict(weights)
    names = sorted(weights)
    victim = names[len(names) // 2]
    if how == "missing":
        del weights[victim]
        return weights, victim
    if how == "extra":
        extra = "down_blocks.9.resnets.0.conv1.weight" if "conv_in.weight" in weights else "blocks.18.weight"
        weights[extra] = torch.zeros(3, 3, dtype=torch.float16)
        return weights, extra
    shape = list(weights[victim].shape)
    shape[0] += 1
    weights[victim] = torch.zeros(shape, dtype=weights[victim].dtype)
    return weights, victim


@pytest.mark.parametrize("how", ["missing", "extra", "misshaped"])
def test_decoder_refuses_tampered_file(fp16_decoder_weights, tmp_path, how):
    weights, victim = _tamper(fp16_decoder_weights, how)
    path = tmp_path / "vae_transparent_decoder.safetensors"
    save_file(weights, str(path))
    with pytest.raises(WeightMismatch) as info:
        TransparentDecoder.from_single_file(path)
    assert victim in str(info.value)
    assert "vae_transparent_decoder.safetensors" in str(info.value)


@pytest.mark.parametrize("how", ["missing", "extra", "misshaped"])
def test_encoder_refuses_tampered_file(weight_manifest, tmp_path, how):
    layout = manifest_layout(weight_manifest, "vae_transparent_encoder")
    weights, victim = _tamper({k: v.half() for k, v in deterministic_weights(layout).items()}, how)
    path = tmp_path / "vae_transparent_encoder.safetensors"
    save_file(weights, str(path))
    with pytest.raises(WeightMismatch) as info:
        TransparentEncoder.from_single_file(path)
    assert victim in str(info.value)


def test_tiny_variant_round_trips_through_strict_loading(tmp_path):
    model = tiny_decoder(seed=3)
    path = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = TransparentDecoder.from_single_file(path, **TINY_DECODER)
    pixel, latent = torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(pixel, latent), model(pixel, latent))
    with pytest.raises(WeightMismatch):
        TransparentDecoder.from_single_file(path)  # tiny file vs the published layout


@pytest.mark.parametrize("model_cls", [TransparentDecoder, TransparentEncoder])
def test_pickle_checkpoint_refused(model_cls, tmp_path):
    path = tmp_path / "vae_transparent_decoder.ckpt"
    path.write_bytes(b"not even opened")
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        model_cls.from_single_file(path)


# ---------------------------------------------------------------------------- TTA decode


def test_rejects_sizes_not_multiple_of_64():
    decoder = tiny_decoder()
    with pytest.raises(InvalidRequest, match=r"multiples of 64.*got 128x96"):
        decode_transparent(decoder, torch.rand(1, 3, 96, 128), torch.randn(1, 4, 12, 16), passes=1)
    with pytest.raises(InvalidRequest, match="latent"):
        decode_transparent(decoder, torch.rand(1, 3, 64, 64), torch.randn(1, 4, 16, 16), passes=1)


@pytest.mark.parametrize("passes", [0, 3, 5, 16, 2.5, True])
def test_rejects_unsupported_pass_counts(passes):
    with pytest.raises(InvalidRequest, match="tta_passes"):
        decode_transparent(tiny_decoder(), torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8), passes=passes)


def test_single_pass_is_clipped_raw_output_in_rgba_order():
    decoder = tiny_decoder(seed=1)
    pixel, latent = torch.rand(2, 3, 64, 64), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        raw = decoder(pixel, latent)
    assert ((raw < 0) | (raw > 1)).any(), "test needs raw values outside [0,1] to check clipping"
    rgba = decode_transparent(decoder, pixel, latent, passes=1)
    clipped = raw.clamp(0, 1)
    assert torch.equal(rgba[:, :3], clipped[:, 1:4])
    assert torch.equal(rgba[:, 3], clipped[:, 0])


def _by_hand_median(decoder, pixel, latent, augmentations):
    """Independent re-derivation: transform, decode, clip, undo, take the lower middle value."""
    results = []
    for flip, turns in augmentations:
        p, z = pixel, latent
        if flip:
            p, z = p.flip(-1), z.flip(-1)
        for _ in range(turns):  # one counter-clockwise quarter turn at a time
            p, z = p.transpose(-1, -2).flip(-2), z.transpose(-1, -2).flip(-2)
        with torch.no_grad():
            y = decoder(p, z).clamp(0, 1)
        for _ in range(turns):  # and back, one clockwise quarter turn at a time
            y = y.flip(-2).transpose(-1, -2)
        if flip:
            y = y.flip(-1)
        results.append(y)
    stacked = torch.stack(results)
    return stacked, stacked.sort(dim=0).values[(len(results) - 1) // 2]


@pytest.mark.parametrize("passes", [2, 4, 8])
def test_tta_median_matches_hand_computation(passes):
    decoder = tiny_decoder(seed=2)
    pixel, latent = torch.rand(1, 3, 64, 128), torch.randn(1, 4, 8, 16)  # non-square on purpose
    stacked, expected = _by_hand_median(decoder, pixel, latent, TTA_AUGMENTATIONS[:passes])
    # The random model is far from equivariant, so the passes genuinely disagree.
    assert (stacked.max(0).values - stacked.min(0).values).max() > 0.1
    got = augmented_decode(decoder, pixel, latent, passes=passes)
    assert got.shape == (1, 4, 64, 128)
    assert torch.allclose(got, expected, atol=1e-5)


def test_tta_subsets_are_documented_groups():
    assert TTA_AUGMENTATIONS[:2] == ((False, 0), (True, 0))
    assert set(TTA_AUGMENTATIONS[:4]) == {(False, 0), (True, 0), (False, 2), (True, 2)}
    assert set(TTA_AUGMENTATIONS) == {(f, k) for f in (False, True) for k in range(4)}


class EquivariantDecoder(TransparentDecoder):
    """Output = (nearest-upsampled latent channel 0, pixel): commutes with flips and rot90."""

    def forward(self, pixel, latent):
        factor = self.config.latent_scale_factor
        return torch.cat([latent[:, :1].repeat_interleave(factor, -2).repeat_interleave(factor, -1), pixel], 1)


def test_tta_undoes_transforms_for_an_equivariant_model():
    torch.manual_seed(5)
    decoder = EquivariantDecoder(**TINY_DECODER).eval()
    pixel, latent = torch.rand(2, 3, 64, 128), torch.rand(2, 4, 8, 16)
    rgba = decode_transparent(decoder, pixel, latent, passes=8)
    # Any wrong inverse (direction of rotation, order of flip/rotate, latent not moved
    # with the pixels) would scramble this asymmetric input.
    assert torch.allclose(rgba[:, :3], pixel, atol=1e-6)
    alpha = latent[:, :1].repeat_interleave(8, -2).repeat_interleave(8, -1)
    assert torch.allclose(rgba[:, 3:], alpha, atol=1e-6)


def test_progress_and_cancel():
    decoder = tiny_decoder()
    pixel, latent = torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    events = []
    decode_transparent(decoder, pixel, latent, passes=4, progress=events.append, layer=2, layers=3)
    assert [(e.phase, e.step, e.total, e.layer, e.layers) for e in events] == [
        ("decode", i, 4, 2, 3) for i in range(1, 5)
    ]

    token, steps = CancelToken(), []

    def cancel_after_first(event):
        steps.append(event.step)
        token.cancel("user asked")

    with pytest.raises(Cancelled, match="user asked"):
        decode_transparent(decoder, pixel, latent, passes=8, cancel=token, progress=cancel_after_first)
    assert steps == [1]


def test_follows_decoder_dtype():
    decoder = tiny_decoder(seed=4)
    pixel, latent = torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    reference = decode_transparent(decoder, pixel, latent, passes=2)
    low = decode_transparent(decoder.to(torch.bfloat16), pixel, latent, passes=2)
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() < 0.1


@pytest.mark.parametrize("size", [64, 128])
def test_tiny_variant_runs(size):
    decoder = tiny_decoder(seed=6)
    pixel, latent = torch.rand(2, 3, size, size), torch.randn(2, 4, size // 8, size // 8)
    rgba = decode_transparent(decoder, pixel, latent, passes=8)
    assert rgba.shape == (2, 4, size, size)
    assert rgba.min() >= 0 and rgba.max() <= 1
    # The latent really reaches the network.
    other = decode_transparent(decoder, pixel, latent + 1.0, passes=1)
    assert (other - decode_transparent(decoder, pixel, latent, passes=1)).abs().max() > 1e-3


# ---------------------------------------------------------------------------- encoding


def test_pad_transparent_rgb_keeps_opaque_and_extends_colour():
    rgb = torch.zeros(1, 3, 32, 32)
    rgb[:, 0, :, :16] = 1.0  # left half red
    rgb[:, 2, :, 16:] = 1.0  # right half blue, but invisible
    alpha = torch.zeros(1, 1, 32, 32)
    alpha[..., :16] = 1.0
    padded = pad_transparent_rgb(rgb, alpha)
    assert torch.allclose(padded[..., :16], rgb[..., :16])
    # Hidden blue must not leak; the transparent half continues the red.
    assert padded[:, 2, :, 16:].abs().max() < 1e-6
    assert padded[:, 0, :, 16:].min() > 0.9
    assert torch.isfinite(pad_transparent_rgb(rgb, torch.zeros_like(alpha))).all()


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def test_encode_transparent_formula():
    vae = _tiny_vae()
    torch.manual_seed(1)
    encoder = TransparentEncoder(**TINY_ENCODER).eval()
    rgba = torch.rand(2, 4, 64, 64)
    z = encode_transparent(vae, encoder, rgba, offset_scale=3.0)
    assert z.shape == (2, 4, 8, 8)

    rgb, alpha = rgba[:, :3], rgba[:, 3:]
    with torch.no_grad():
        posterior = vae.encode((rgb * 2 - 1) * alpha).latent_dist
        offset = encoder(torch.cat([alpha, pad_transparent_rgb(rgb, alpha)], 1))
    assert offset.abs().max() > 1e-3
    assert torch.allclose(z, posterior.mean + posterior.std * offset * 3.0, atol=1e-5)
    assert torch.allclose(encode_transparent(vae, encoder, rgba, offset_scale=0.0), posterior.mean, atol=1e-6)
    # Colour under fully transparent pixels must not matter at all (premultiplied VAE input,
    # padding rebuilt from the visible pixels), while visible colour does.
    rgba[:, 3, :, 32:] = 0.0
    changed = rgba.clone()
    changed[:, :3, :, 32:] = torch.rand(2, 3, 64, 32)
    base = encode_transparent(vae, encoder, rgba, offset_scale=3.0)
    assert torch.allclose(encode_transparent(vae, encoder, changed, offset_scale=3.0), base, atol=1e-5)
    changed[:, :3, :, :32] = torch.rand(2, 3, 64, 32)
    assert (encode_transparent(vae, encoder, changed, offset_scale=3.0) - base).abs().max() > 1e-4


def test_encode_uses_the_scale_the_encoder_file_was_loaded_with(tmp_path):
    """The scale belongs to the weight file: set at load, used by every encode, never guessed."""
    from safetensors.torch import save_file

    vae = _tiny_vae()
    torch.manual_seed(2)
    path = tmp_path / "encoder.safetensors"
    save_file(TransparentEncoder(**TINY_ENCODER).state_dict(), str(path))
    rgba = torch.rand(1, 4, 64, 64)
    unknown = TransparentEncoder.from_single_file(path, **TINY_ENCODER)
    assert unknown.offset_scale is None
    with pytest.raises(InvalidRequest, match="scale is unknown"):
        encode_transparent(vae, unknown, rgba)
    x1 = TransparentEncoder.from_single_file(path, offset_scale=1.0, **TINY_ENCODER)
    x300 = TransparentEncoder.from_single_file(path, offset_scale=300, **TINY_ENCODER)
    assert (x1.offset_scale, x300.offset_scale) == (1.0, 300.0)
    assert torch.equal(encode_transparent(vae, x1, rgba), encode_transparent(vae, unknown, rgba, offset_scale=1.0))
    assert torch.equal(encode_transparent(vae, x300, rgba), encode_transparent(vae, x1, rgba, offset_scale=300.0))
    assert not torch.allclose(encode_transparent(vae, x300, rgba), encode_transparent(vae, x1, rgba), atol=1e-3)


def test_encode_transparent_rejects_bad_input():
    vae, encoder = _tiny_vae(), TransparentEncoder(**TINY_ENCODER)
    encoder.offset_scale = 1.0
    with pytest.raises(InvalidRequest, match="multiples of 8"):
        encode_transparent(vae, encoder, torch.rand(1, 4, 60, 64))
    with pytest.raises(InvalidRequest, match="R,G,B,A"):
        encode_transparent(vae, encoder, torch.rand(1, 3, 64, 64))
