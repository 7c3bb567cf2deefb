"""Method `joint` end to end on the tiny model: one UNet call per step, files, determinism,
cancel, layout boxes and request validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import Engine, EngineSettings
from inference.errors import Cancelled, InvalidRequest
from inference.progress import CancelToken, ignore_progress
from inference.request import LayerSpec, StackRequest
from inference.stack import alpha_over, load_layer_images, load_stack

pytestmark = pytest.mark.slow

BOX = (0.5, 0.0, 1.0, 0.5)  # top-right quarter


def run_layered(loaded, pipe, items, **settings):
    """One LayeredSampler run at the tests' size (256², 2 steps, guidance 4)."""
    from inference.layered_sampler import LayeredSampler, LayeredSettings

    base = dict(width=256, height=256, steps=2, guidance=4.0, negative_prompt="")
    return LayeredSampler(loaded, pipe, items, LayeredSettings(**{**base, **settings}))(
        progress=ignore_progress, cancel=CancelToken(), layers=3)


def request(**kw) -> StackRequest:
    base = dict(prompt="a forest at dusk", background="pine trees",
                layers=(LayerSpec("a red fox", box=BOX), LayerSpec("a rock")),
                width=256, height=256, steps=2, guidance=4.0, seed=5, tta_passes=1, method="joint")
    base.update(kw)
    return StackRequest(**base)


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(EngineSettings(device="cpu", allow_download=False))
    engine.load("tiny")
    return engine


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_one_unet_call_per_step_and_stack_files(engine, tmp_path):
    unet = engine.load("tiny").pipeline.unet
    batches = []
    handle = unet.register_forward_pre_hook(lambda _m, args, kwargs=None: batches.append(args[0].shape[0]))
    events = []
    try:
        engine.generate(request(steps=3), "tiny", tmp_path / "s", progress=events.append)
    finally:
        handle.remove()
    assert batches == [2 * (2 + 2)] * 3  # CFG × (background + 2 foregrounds + blended), once per step

    stack = load_stack(tmp_path / "s")
    assert stack.method == "joint" and stack.blended == "blended.png"
    assert [layer.mask for layer in stack.layers] == [None, "mask_01.png", "mask_02.png"]
    images = load_layer_images(stack, tmp_path / "s")
    composite = np.asarray(Image.open(tmp_path / "s" / "composite.png"))
    assert np.array_equal(composite, alpha_over(images))
    mask = np.asarray(Image.open(tmp_path / "s" / "mask_01.png"))
    assert mask[:128, 128:].max() > 0 and mask[160:, :96].max() == 0  # inside / far outside the box
    denoise = [e for e in events if e.phase == "denoise"]
    assert [e.step for e in denoise] == [0, 1, 2, 3] and {e.layer for e in denoise} == {None}
    assert {e.layers for e in denoise} == {3} and {e.total for e in denoise} == {3}
    assert {e.layer for e in events if e.phase == "decode"} == {0, 1, 2}


def test_step_schedule_of_inter_layer_attention_and_capture(engine, tmp_path, monkeypatch):
    """Layers see each other during the first half of the steps; attention maps for the
    self-masks are captured every CAPTURE_EVERY-th step from the first placement step."""
    from inference.layered_attention import AttentionCapture, LayeredAttnProcessor
    from inference.layered_sampler import CAPTURE_EVERY, INTER_LAYER_END, PLACEMENT_START

    unet = engine.load("tiny").pipeline.unet
    joint_calls: list[int] = []
    captures: list[int] = []
    joint, add_cross = LayeredAttnProcessor.inter_layer_attention, AttentionCapture.add_cross

    def counting_joint(self, *args, **kwargs):
        joint_calls[-1] += 1
        return joint(self, *args, **kwargs)

    def counting_capture(self, *args, **kwargs):
        captures[-1] += 1
        return add_cross(self, *args, **kwargs)

    monkeypatch.setattr(LayeredAttnProcessor, "inter_layer_attention", counting_joint)
    monkeypatch.setattr(AttentionCapture, "add_cross", counting_capture)
    def new_step(*_):
        joint_calls.append(0)
        captures.append(0)

    handle = unet.register_forward_pre_hook(new_step)
    steps = 10
    try:
        engine.generate(request(steps=steps), "tiny", tmp_path / "s")
    finally:
        handle.remove()
    self_attention = sum(1 for name in unet.attn_processors if ".attn1." in name)
    cross_attention = sum(1 for name in unet.attn_processors if ".attn2." in name)
    first = round(INTER_LAYER_END * steps)
    assert joint_calls == [self_attention] * first + [0] * (steps - first)
    start = int(PLACEMENT_START * steps)
    assert captures == [cross_attention if i >= start and (i - start) % CAPTURE_EVERY == 0 else 0
                        for i in range(steps)]
    assert sum(captures) > 0


def test_same_request_same_bytes_and_strength_matters(engine, tmp_path):
    engine.generate(request(), "tiny", tmp_path / "a")
    engine.generate(request(), "tiny", tmp_path / "b")
    a, b = png_bytes(tmp_path / "a"), png_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 7
    assert all(a[k] == b[k] for k in a)
    engine.generate(request(inter_layer_strength=0.0), "tiny", tmp_path / "c")
    c = png_bytes(tmp_path / "c")
    assert c["background.png"] != a["background.png"]  # layers do see each other at 0.3


def test_cancel_mid_run_leaves_nothing(engine, tmp_path):
    token = CancelToken()

    def on_progress(event):
        if event.phase == "denoise" and event.step == 1:
            token.cancel("user")

    unet = engine.load("tiny").pipeline.unet
    before = dict(unet.attn_processors)
    with pytest.raises(Cancelled):
        engine.generate(request(steps=3), "tiny", tmp_path / "s", progress=on_progress, cancel=token)
    assert list(tmp_path.iterdir()) == []
    assert all(unet.attn_processors[k] is v for k, v in before.items())  # processors restored


def test_empty_latent_is_mean_plus_std_times_offset_at_the_files_scale(engine):
    """What "transparent" means to confinement, masks and blending: the offset encoder's point
    of the VAE posterior of a fully transparent image, with the scale its weight file goes with."""
    from inference.layered_sampler import empty_latent
    from inference.sampling import job_pipeline, scale_latents

    loaded = engine.load("tiny")
    vae = job_pipeline(loaded.pipeline).vae
    assert loaded.resolved.files["encoder"].name == "vae_transparent_encoder.safetensors"
    assert loaded.encoder.offset_scale == loaded.resolved.encoder_offset_scale == 1.0  # v1 file: raw output
    clear = torch.zeros(1, 4, 64, 64)
    with torch.no_grad():
        posterior = vae.encode(clear[:, :3]).latent_dist  # premultiplied: colour x alpha = 0
        offset = loaded.encoder(clear) * 1.0
    z = posterior.mean + posterior.std * offset
    expected = scale_latents(vae, z[:, :, 3:5, 3:5].float().mean(dim=(2, 3), keepdim=True))
    assert offset.abs().max() > 1e-3  # the offset matters, so a wrong scale would show
    assert torch.allclose(empty_latent(loaded, vae), expected, atol=1e-5)


def test_box_confines_foreground_latent(engine):
    from inference.layered_sampler import empty_latent
    from inference.methods.joint import joint_items
    from inference.prompts import layer_seeds
    from inference.sampling import job_pipeline

    loaded = engine.load("tiny")
    pipe = job_pipeline(loaded.pipeline)
    req = request().validated()
    items = joint_items(pipe, req, layer_seeds(req), pipe.vae, pipe.unet, loaded.device, pipe.unet.dtype)
    result = run_layered(loaded, pipe, items, inter_layer_strength=0.3, mask_guidance=0.5)
    empty = empty_latent(loaded, pipe.vae)
    energy = (result.latents[1].float() - empty[0]).pow(2).sum(dim=0)  # fox, box = top-right quarter
    inside, outside = energy[:16, 16:], energy[16:, :]
    assert outside.max() <= 1e-6 * inside.mean()
    free = (result.latents[2].float() - empty[0]).pow(2).sum(dim=0)  # the rock has no box
    assert free[16:, :].mean() > 1e-3 * inside.mean()


def test_decoding_in_chunks_matches_one_batch(engine, monkeypatch):
    """Small images share VAE/decoder calls; large ones go one per call. Same layers either
    way (up to batch-size rounding), same per-layer progress, skipped items stay None."""
    from inference.methods import joint
    from inference.prompts import layer_seeds
    from inference.sampling import job_pipeline

    loaded = engine.load("tiny")
    pipe = job_pipeline(loaded.pipeline)
    req = request().validated()
    items = joint.joint_items(pipe, req, layer_seeds(req), pipe.vae, pipe.unet, loaded.device, pipe.unet.dtype)
    latents = torch.cat([it.noise for it in items]) * 0.5

    def decode(pixels_per_call, skip=()):
        monkeypatch.setattr(joint, "DECODE_BATCH_PIXELS", pixels_per_call)
        events = []
        out = joint.decode_items(loaded, pipe.vae, items, latents, 2, events.append, CancelToken(), skip=skip)
        return out, sorted({(e.layer, e.step, e.total) for e in events if e.step == e.total})

    (bg, fgs, blend), done = decode(16 * 256 * 256)  # all four items in one call
    (bg1, fgs1, blend1), done1 = decode(256 * 256)  # one item per call
    assert done == done1 == [(0, 1, 1), (1, 2, 2), (2, 2, 2)]  # every layer reports it finished
    for a, b in zip([bg, *fgs, blend], [bg1, *fgs1, blend1]):
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    (bg2, fgs2, blend2), _ = decode(2 * 256 * 256, skip=(0, 2))
    assert bg2 is None and fgs2[1] is None and blend2 is not None
    assert np.abs(fgs2[0].astype(int) - fgs[0].astype(int)).max() <= 1


@pytest.mark.parametrize("field,value", [("inter_layer_strength", -0.1), ("inter_layer_strength", 5.0),
                                         ("inter_layer_strength", float("nan")), ("mask_guidance", 1.5),
                                         ("mask_guidance", True)])
def test_invalid_joint_fields_are_named(field, value):
    with pytest.raises(InvalidRequest) as err:
        request(**{field: value}).validated()
    assert err.value.field == field


def test_harmonized_needs_one_layer_and_joint_is_default():
    with pytest.raises(InvalidRequest) as err:
        request(method="harmonized").validated()
    assert err.value.field == "layers"
    assert StackRequest(prompt="x").method == "joint"


# ------------------------------------------------------------------ SD 1.5 joint arrangement
def test_merge_rows_averages_copies():
    from inference.families import RowLayout

    eps = torch.arange(6, dtype=torch.float32).view(6, 1) + torch.zeros(6, 2)
    merged = RowLayout(4, [1, 0, 3, 2, 0, 3]).merge(eps)
    assert merged[:, 0].tolist() == [2.5, 0.0, 3.0, 3.5]


def test_sd15_rows_native_for_one_foreground():
    from inference.families.sd15 import sd15_joint_rows
    from inference.layered_sampler import LayerItem

    z = torch.zeros(1, 4, 2, 2)
    items = [LayerItem("background", "b", z), LayerItem("foreground", "f", z), LayerItem("blended", "x", z)]
    assert sd15_joint_rows(items) == [1, 0, 2]  # frames: foreground, background, blended
    items.insert(2, LayerItem("foreground", "g", z))
    assert sd15_joint_rows(items) == [1, 0, 3, 2, 0, 3]
    with pytest.raises(InvalidRequest):
        sd15_joint_rows([items[0], items[-1]])


@pytest.fixture(scope="module")
def sd15_loaded(engine):
    """A tiny SD 1.5-shaped pipeline (tiny model's CLIP/VAE, SD 1.5 UNet topology) with a
    random 3-frame attention-sharing adapter, dressed as a LoadedModel."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from inference.models import resolve_model
    from inference.sd15_attention_sharing import AttentionSharingAdapter
    from inference.transparent_vae import TransparentDecoder, TransparentEncoder

    resolved = resolve_model("tiny", allow_download=False)
    xl = engine.load("tiny").pipeline
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
                                cross_attention_dim=xl.text_encoder.config.hidden_size,
                                attention_head_dim=2).eval()
    pipe = StableDiffusionPipeline(vae=xl.vae, text_encoder=xl.text_encoder, tokenizer=xl.tokenizer, unet=unet,
                                   scheduler=xl.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    adapter = AttentionSharingAdapter.for_unet(unet, 3, rank=4).eval()
    decoder = TransparentDecoder.from_single_file(resolved.files["decoder"], dtype=torch.float32,
                                                  device=torch.device("cpu"), **resolved.decoder_config)
    # The SD 1.5 offset encoder has the SDXL one's layout and is run x1 (layerdiffusion-v1).
    encoder = TransparentEncoder.from_single_file(resolved.files["encoder"], offset_scale=1.0, dtype=torch.float32,
                                                  device=torch.device("cpu"), **resolved.encoder_config)
    return SimpleNamespace(pipeline=pipe, decoder=decoder, encoder=encoder, unet_patch=None, family="sd15",
                           device=torch.device("cpu"), dtype=torch.float32,
                           attention_sharing=lambda role: adapter if role == "joint" else None,
                           describe=lambda: {"preset": "sd15", "base": "tiny-sd15", "files": {}})


def test_sd15_joint_frames_arrangement(sd15_loaded):
    from inference.methods.joint import generate_joint

    unet = sd15_loaded.pipeline.unet
    before = dict(unet.attn_processors)
    calls = []

    def record(_module, args, kwargs):
        calls.append((args[0].clone(), kwargs["encoder_hidden_states"].clone()))

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = generate_joint(sd15_loaded, request(steps=2), progress=ignore_progress, cancel=CancelToken())
    finally:
        handle.remove()
    assert len(calls) == 2  # one UNet call per step
    sample, context = calls[1]
    assert sample.shape[0] == 2 * 3 * 2  # CFG × frame triples (fg_k, bg, blended) for 2 foregrounds
    cond_sample, cond_context = sample[6:], context[6:]
    # Rows: fox, bg, blended, rock, bg, blended — copies share latent and prompt.
    assert torch.equal(cond_sample[1], cond_sample[4]) and torch.equal(cond_sample[2], cond_sample[5])
    assert torch.equal(cond_context[1], cond_context[4]) and torch.equal(cond_context[2], cond_context[5])
    assert not torch.equal(cond_sample[0], cond_sample[3]) and not torch.equal(cond_context[0], cond_context[3])
    assert not torch.equal(cond_context[0], cond_context[1])
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert len(result.foregrounds) == 2 and result.foregrounds[0].shape == (256, 256, 4)
    assert result.blended.shape == (256, 256, 3) and len(result.masks) == 2
    # The box confines the fox's mask as on SDXL.
    assert result.masks[0][160:, :96].max() == 0


def test_sd15_chunked_joint_keeps_frame_triples_and_the_result(sd15_loaded):
    """Chunks of SD 1.5's joint run are whole frame triples (frames attend only inside one)."""
    from types import SimpleNamespace

    from inference.methods.joint import generate_joint

    unet = sd15_loaded.pipeline.unet
    batches = []
    handle = unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        whole = generate_joint(sd15_loaded, request(steps=2), progress=ignore_progress, cancel=CancelToken())
        chunked_model = SimpleNamespace(**{**vars(sd15_loaded), "max_batch": 4})
        chunked = generate_joint(chunked_model, request(steps=2), progress=ignore_progress, cancel=CancelToken())
    finally:
        handle.remove()
    assert batches == [12, 12] + [3, 3, 3, 3] * 2  # 4 rows per call allowed: one triple at a time
    for a, b in [(whole.background, chunked.background), (whole.blended, chunked.blended),
                 *zip(whole.foregrounds, chunked.foregrounds)]:
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_sd15_editing_re_encodes_kept_foregrounds_with_its_encoder(engine, sd15_loaded, tmp_path):
    """With its offset encoder SD 1.5 can regenerate one layer: the kept foreground is encoded
    back (no "needs the transparent encoder" refusal) and stays byte-identical."""
    from inference.stack import load_stack

    source = tmp_path / "src"
    engine.generate(request(steps=2), "tiny", source)

    class SD15Engine(Engine):  # the real engine, serving the tiny SD 1.5 model
        def load(self, spec, progress=None, cancel=None):
            return sd15_loaded

    sd15 = SD15Engine(EngineSettings(device="cpu", allow_download=False))
    out = tmp_path / "edited"
    sd15.regenerate(source, 1, out, new_seed=11, tta_passes=1)
    assert (out / "layer_02.png").read_bytes() == (source / "layer_02.png").read_bytes()
    assert (out / "background.png").read_bytes() == (source / "background.png").read_bytes()
    assert (out / "layer_01.png").read_bytes() != (source / "layer_01.png").read_bytes()
    restyled = sd15.restyle(source, "ukiyo-e print", tmp_path / "restyled", tta_passes=1)
    assert [layer.seed for layer in restyled.layers] == [layer.seed for layer in load_stack(source).layers]
    assert (tmp_path / "restyled" / "layer_01.png").read_bytes() != (source / "layer_01.png").read_bytes()


def test_joint_without_interactions_is_independent(engine):
    """inter_layer_strength 0, mask_guidance 0, no boxes: every layer of the joint run — the
    background and each foreground latent, same seeds — is the independent method's (plain
    pipeline for the background, patched one for each foreground). Joint is independent plus
    only the documented interactions."""
    from inference.methods.joint import joint_items
    from inference.prompts import combine_prompts, layer_seeds
    from inference.sampling import denoise, initial_noise, job_pipeline

    loaded = engine.load("tiny")
    pipe = job_pipeline(loaded.pipeline)
    req = request(layers=(LayerSpec("a red fox"), LayerSpec("a rock")), inter_layer_strength=0.0,
                  mask_guidance=0.0).validated()
    seeds = layer_seeds(req)
    items = joint_items(pipe, req, seeds, pipe.vae, pipe.unet, loaded.device, pipe.unet.dtype)
    joint = run_layered(loaded, pipe, items, inter_layer_strength=0.0, mask_guidance=0.0).latents

    def independent(layer: int, prompt: str) -> torch.Tensor:
        noise = initial_noise(seeds[layer], pipe.vae, pipe.unet, 256, 256, loaded.device, pipe.unet.dtype)
        return denoise(pipe, prompt=combine_prompts(prompt, req.prompt), negative_prompt="", width=256, height=256,
                       steps=2, guidance=4.0, noise=noise, progress=ignore_progress, cancel=CancelToken(),
                       layer=layer, layers=3)

    torch.testing.assert_close(joint[0:1], independent(0, req.background), rtol=1e-4, atol=1e-4)
    for i, layer in enumerate(req.layers, start=1):
        with loaded.transparency(pipe.unet):
            alone = independent(i, layer.prompt)
        torch.testing.assert_close(joint[i:i + 1], alone, rtol=1e-4, atol=1e-4)
        assert (joint[i:i + 1] - joint[0:1]).abs().max() > 1e-2  # layers differ, so the check can fail
    interacting = run_layered(loaded, pipe, items, inter_layer_strength=0.3, mask_guidance=0.0).latents
    assert (interacting[1:2] - joint[1:2]).abs().max() > 1e-3  # inter-layer attention is what differs


def test_background_at_strength_zero_matches_plain_diffusers(engine):
    """With layers not attending to each other, the joint sampler's background row is the
    ordinary SDXL pipeline's result for the same prompt and noise (batched call or not)."""
    from inference.methods.joint import joint_items
    from inference.prompts import layer_seeds
    from inference.sampling import job_pipeline

    loaded = engine.load("tiny")
    pipe = job_pipeline(loaded.pipeline)
    req = request(layers=(LayerSpec("a red fox"), LayerSpec("a rock")), inter_layer_strength=0.0).validated()
    items = joint_items(pipe, req, layer_seeds(req), pipe.vae, pipe.unet, loaded.device, pipe.unet.dtype)
    result = run_layered(loaded, pipe, items, inter_layer_strength=0.0, mask_guidance=0.5)
    plain = job_pipeline(loaded.pipeline)(prompt=items[0].prompt, width=256, height=256, num_inference_steps=2,
                                          guidance_scale=4.0, latents=items[0].noise.clone(),
                                          output_type="latent", return_dict=False)[0]
    torch.testing.assert_close(result.latents[0:1], plain, rtol=1e-4, atol=1e-4)
    with_layers = run_layered(loaded, pipe, items, inter_layer_strength=0.3, mask_guidance=0.5)
    assert (with_layers.latents[0:1] - plain).abs().max() > 1e-3
