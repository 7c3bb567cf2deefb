"""The tiny random-weight SDXL-family model: real tokenizer, loadable, deterministic, cached."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import tiny
from inference.tiny import build_tiny_model, byte_symbols, tiny_model_key

DIFFUSERS_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                   "tokenizer_2", "scheduler")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def pipeline(tiny_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- tokenizer ---------------------------------------------------------------------------------
def test_byte_symbols_are_a_visible_bijection():
    symbols = byte_symbols()
    assert len(symbols) == len(set(symbols)) == 256
    assert not any(s.isspace() for s in symbols)
    assert symbols[0] == "!" and symbols[ord("a") - ord("!")] == "a"


def test_clip_vocabulary_layout(tmp_path):
    tiny.write_clip_vocabulary(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # Word-final byte tokens follow the 256 plain ones; merges follow in file order.
    assert vocab["a</w>"] == 256 + vocab["a"]
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    first_merge = merges[1].split()
    assert vocab["".join(first_merge)] == 512


def test_tokenizer_gives_real_clip_ids(tiny_dir):
    from transformers import CLIPTokenizer

    for sub in ("tokenizer", "tokenizer_2"):
        tok = CLIPTokenizer.from_pretrained(str(tiny_dir / sub), local_files_only=True)
        ids = tok("a red fox").input_ids
        assert ids == [49406, 320, 736, 3240, 49407]
        assert tok.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "fox</w>"]
        assert tok("A  Red FOX").input_ids == ids  # lower-cased, whitespace collapsed
        assert tok.model_max_length == 77 and len(tok) == 49408
    tok1 = CLIPTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    assert tok1("fox!").input_ids == [49406, 3240, 256, 49407]  # "!</w>" = 256 + id of "!" (0)
    tok2 = CLIPTokenizer.from_pretrained(str(tiny_dir / "tokenizer_2"))
    # As in SDXL's tokenizer_2, "!" is its pad token (a special token, id 0).
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    padded = tok2("a red fox", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[5:] == [0] * 72  # SDXL's second tokenizer pads with "!" (id 0)


# -- the diffusers folder ------------------------------------------------------------------------
def test_folder_layout_and_configs(tiny_dir):
    for part in DIFFUSERS_PARTS:
        assert (tiny_dir / part).exists(), part
    unet = json.loads((tiny_dir / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == tiny.TEXT_HIDDEN + tiny.TEXT_HIDDEN_2
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + tiny.TEXT_PROJECTION
    vae = json.loads((tiny_dir / "vae" / "config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8
    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert (sched["beta_schedule"], sched["timestep_spacing"], sched["steps_offset"]) == ("scaled_linear", "leading", 1)


def test_models_are_small(pipeline):
    """Speed proxy that does not depend on machine load: parameter counts stay tiny."""
    counts = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
              for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert counts["unet"] < 2_000_000 and counts["vae"] < 500_000, counts
    assert counts["text_encoder"] < 2_000_000, counts  # mostly the 49408 x 32 embedding
    assert counts["text_encoder_2"] < 4_000_000, counts
    # different widths, like SDXL's 768/1280, so the two encoders cannot be confused
    assert pipeline.text_encoder.config.hidden_size != pipeline.text_encoder_2.config.hidden_size


def test_pipeline_generates_deterministically(pipeline):
    assert pipeline.vae_scale_factor == 2 ** (len(pipeline.vae.config.block_out_channels) - 1) == 8

    def run(seed):
        out = pipeline("a red fox", num_inference_steps=2, width=256, height=256, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(seed), output_type="np")
        return out.images[0]

    a, b, c = run(1), run(1), run(2)
    assert a.shape == (256, 256, 3) and np.isfinite(a).all()
    assert a.std() > 0.01  # not a constant image
    assert a.tobytes() == b.tobytes()
    assert np.abs(a - c).mean() > 1e-3


def test_prompt_reaches_the_unet(pipeline):
    """Two encoders concatenated for cross-attention, pooled projection from the second."""
    embeds, neg, pooled, neg_pooled = pipeline.encode_prompt("a red fox", do_classifier_free_guidance=True,
                                                             negative_prompt=None)
    assert embeds.shape == (1, 77, tiny.TEXT_HIDDEN + tiny.TEXT_HIDDEN_2)
    assert pooled.shape == (1, tiny.TEXT_PROJECTION)
    assert pipeline.config.force_zeros_for_empty_prompt  # as SDXL base: no negative prompt → zeros
    assert torch.count_nonzero(neg) == 0
    other, *_ = pipeline.encode_prompt("a blue whale", do_classifier_free_guidance=False)
    assert not torch.allclose(embeds, other)


# -- LayerDiffuse files ----------------------------------------------------------------------------
def test_unet_patch_matches_the_unet_layout(tiny_dir, pipeline):
    from inference.sdxl_transparency import TransparencyPatch, expected_delta_shapes
    from inference.weights import load_safetensors, safetensors_shapes

    path = tiny_dir / "layerdiffuse" / tiny.UNET_PATCH_FILE
    shapes = safetensors_shapes(path)
    expected = expected_delta_shapes(pipeline.unet)
    assert shapes == expected
    # every attn1/attn2 q/k/v/out of every transformer block, as in the published file
    from diffusers.models.attention import BasicTransformerBlock

    blocks = {n.rsplit(".attn", 1)[0] for n in shapes}
    unet_blocks = {n for n, m in pipeline.unet.named_modules() if isinstance(m, BasicTransformerBlock)}
    assert blocks == unet_blocks and len(unet_blocks) == 8  # down 1x2, mid 2, up 2x2
    assert len(shapes) == 8 * len(blocks)
    deltas = load_safetensors(path)
    assert all(t.dtype == torch.float16 for t in deltas.values())
    params = dict(pipeline.unet.named_parameters())
    for name, delta in deltas.items():
        ratio = delta.float().std() / params[name].detach().float().std()
        assert 0.01 < ratio < 0.5, (name, float(ratio))  # small next to the weights, not zero
    patch = TransparencyPatch.from_file(path, pipeline.unet)
    assert sorted(patch.parameter_names) == sorted(expected)


def test_transparent_vae_files_load_strictly(tiny_dir):
    from inference.transparent_vae import TransparentDecoder, TransparentEncoder, decode_transparent
    from inference.weights import load_safetensors

    configs = tiny.tiny_layerdiffuse_configs(tiny_dir)
    ld = tiny_dir / "layerdiffuse"
    for name in (tiny.DECODER_FILE, tiny.ENCODER_FILE):
        assert all(t.dtype == torch.float16 for t in load_safetensors(ld / name).values())
    decoder = TransparentDecoder.from_single_file(ld / tiny.DECODER_FILE, **configs["decoder"])
    encoder = TransparentEncoder.from_single_file(ld / tiny.ENCODER_FILE, **configs["encoder"])
    assert decoder.size_multiple == 64 and encoder.downscale_factor == 8
    rgba = decode_transparent(decoder, torch.rand(1, 3, 128, 128), torch.randn(1, 4, 16, 16), passes=2)
    assert rgba.shape == (1, 4, 128, 128) and 0 <= rgba.min() and rgba.max() <= 1
    assert encoder(torch.rand(1, 4, 64, 64)).shape == (1, 4, 8, 8)


# -- determinism and caching -----------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert files_of(again) == files_of(tiny_dir)
    other = build_tiny_model(tmp_path / "other", seed=1)
    a, b = files_of(tiny_dir), files_of(other)
    assert a.keys() == b.keys()
    for name in ("unet/diffusion_pytorch_model.safetensors", "layerdiffuse/" + tiny.UNET_PATCH_FILE,
                 "layerdiffuse/" + tiny.DECODER_FILE):
        assert a[name] != b[name]
    assert a["tokenizer/tokenizer.json"] == b["tokenizer/tokenizer.json"]
    assert tiny_model_key(0) != tiny_model_key(1)


def test_cached_build_is_reused_and_stale_build_replaced(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    build_tiny_model(dest, seed=0)
    marker = dest / "unet" / "config.json"
    mtime = marker.stat().st_mtime_ns

    calls = []
    real_write = tiny._write_tiny_model
    monkeypatch.setattr(tiny, "_write_tiny_model", lambda folder, seed: (calls.append(seed), real_write(folder, seed)))
    assert build_tiny_model(dest, seed=0) == dest
    assert calls == [] and marker.stat().st_mtime_ns == mtime

    monkeypatch.setattr(tiny, "TINY_FORMAT_VERSION", tiny.TINY_FORMAT_VERSION + 100)  # new key
    (dest / "leftover.txt").write_text("from the stale build")
    build_tiny_model(dest, seed=0)
    assert calls == [0]
    assert not (dest / "leftover.txt").exists()  # whole folder replaced, not patched
    assert (dest / tiny.KEY_FILE).read_text().strip() == tiny_model_key(0)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or stale folders left


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(folder, seed):
        (folder / "half-written").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny, "_write_tiny_model", broken)
    with pytest.raises(RuntimeError, match="boom"):
        build_tiny_model(tmp_path / "model", seed=0)
    assert list(tmp_path.iterdir()) == []
