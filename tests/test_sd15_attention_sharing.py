"""SD 1.5 attention sharing: strict loading of the published layouts, exact semantics."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file, save_file

from inference.errors import WeightMismatch
from inference.sd15_attention_sharing import (
    CONTROL_KWARG,
    LAYER_SD15_FILES,
    AttentionSharingAdapter,
    AttentionSharingProcessor,
    attention_sharing_from_state_dict,
    load_attention_sharing,
    sd15_attention_module_names,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_weights import deterministic_weights  # noqa: E402

# SD 1.5 topology (diffusers defaults: 4 levels, 2 layers per block, cross attention in
# the first three down / last three up levels and the mid block) at toy widths.
TINY_SD15 = dict(
    sample_size=16,
    block_out_channels=(16, 32, 32, 32),
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=2,  # diffusers' legacy name: 2 heads per attention, as SD1.5's 8
)
RANK = 4


def sd15_meta_unet(cross_attention_dim: int = 768) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=cross_attention_dim, attention_head_dim=8,
                                    sample_size=64)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SD15).eval()


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def manifest_shapes(weight_manifest, name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in weight_manifest["files"][name].items()}


def meta_tensors(shapes) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in shapes.items()}


# ------------------------------------------------------------------ layout vs. manifest
def test_module_order_reproduces_manifest(weight_manifest):
    names = sd15_attention_module_names(sd15_meta_unet())
    assert names == [e["diffusers"] for e in weight_manifest["layer_sd15_module_order"]]
    assert [e["index"] for e in weight_manifest["layer_sd15_module_order"]] == list(range(32))


@pytest.mark.parametrize("file_name", sorted(LAYER_SD15_FILES))
def test_manifest_names_match_sd15_adapter(weight_manifest, file_name):
    """Names and shapes agree exactly with the real SD 1.5 UNet (768-wide text context)."""
    frames, control = LAYER_SD15_FILES[file_name]
    with torch.device("meta"):
        adapter = AttentionSharingAdapter.for_unet(sd15_meta_unet(), frames, use_control=control)
    assert adapter.expected_shapes() == manifest_shapes(weight_manifest, file_name)


@pytest.mark.parametrize("file_name", sorted(LAYER_SD15_FILES))
def test_manifest_loads_strictly(weight_manifest, file_name):
    """Every published tensor name and shape loads with strict=True (meta tensors, no memory)
    on the SD 1.5 UNet as it is: the unit structure, frame count and control path of every file."""
    frames, control = LAYER_SD15_FILES[file_name]
    published = manifest_shapes(weight_manifest, file_name)
    unet = sd15_meta_unet()
    adapter = attention_sharing_from_state_dict(meta_tensors(published), unet, frames, control,
                                                what=file_name)
    assert len(adapter.hookers.layers) == 32
    assert (adapter.kwargs_encoder is not None) == control
    assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == published
    # and plain torch strict loading on the same structure
    with torch.device("meta"):
        fresh = AttentionSharingAdapter.for_unet(unet, frames, use_control=control)
    fresh.load_state_dict(meta_tensors(published), strict=True, assign=True)


def test_control_encoder_layout_matches_manifest(weight_manifest):
    published = manifest_shapes(weight_manifest, "layer_sd15_fg2bg")
    with torch.device("meta"):
        adapter = AttentionSharingAdapter.for_unet(sd15_meta_unet(), 2, use_control=True)
    encoder = {f"kwargs_encoder.{k}": tuple(v.shape) for k, v in adapter.kwargs_encoder.state_dict().items()}
    assert encoder == {k: v for k, v in published.items() if k.startswith("kwargs_encoder.")}
    assert len(encoder) == 28


@pytest.mark.parametrize("change", ["missing", "extra", "misshaped"])
def test_bad_layout_is_refused_by_name(weight_manifest, change):
    published = manifest_shapes(weight_manifest, "layer_sd15_joint")
    unet = sd15_meta_unet()
    name = "hookers.layers.17.to_v_lora.2.up.weight"
    if change == "missing":
        del published[name]
    elif change == "extra":
        name = "hookers.layers.17.to_v_lora.3.up.weight"
        published[name] = (1280, 256)
    else:
        published[name] = (1280, 128)
    with pytest.raises(WeightMismatch) as info:
        attention_sharing_from_state_dict(meta_tensors(published), unet, 3, False, what="joint")
    assert name in str(info.value)
    listed = {"missing": info.value.missing, "extra": info.value.unexpected,
              "misshaped": [m[0] for m in info.value.mismatched]}[change]
    assert listed == [name]


def test_cross_attention_lora_sized_for_another_context_is_refused(weight_manifest):
    """A file whose attn2 k/v LoRAs take a 1280-wide context (no SD 1.5 module has one; the
    manifest once listed it so) is refused by name, not loaded into the wrong shapes."""
    published = manifest_shapes(weight_manifest, "layer_sd15_transparent_attn")
    assert published["hookers.layers.1.to_k_lora.0.down.weight"] == (256, 768)
    wrong = dict(published, **{"hookers.layers.1.to_k_lora.0.down.weight": (256, 1280)})
    with pytest.raises(WeightMismatch, match=r"hookers\.layers\.1\.to_k_lora\.0\.down\.weight"):
        attention_sharing_from_state_dict(meta_tensors(wrong), sd15_meta_unet(), 1, False)


# ------------------------------------------------------------------ reference numerics
GOLDEN = "sd15_attention_sharing_golden.safetensors"


def golden_unit_shapes(weight_manifest, layer: int) -> dict[str, tuple[int, ...]]:
    """The 41 names of a golden unit: its own tensors as `layer_sd15_joint` stores them under
    `hookers.layers.{layer}.`, plus the wrapped SD 1.5 attention's five."""
    prefix = f"hookers.layers.{layer}."
    own = {k[len(prefix):]: v for k, v in manifest_shapes(weight_manifest, "layer_sd15_joint").items()
           if k.startswith(prefix)}
    kv_in = own["to_k_lora.0.down.weight"][1]
    return {**own, "original.to_q.weight": (320, 320), "original.to_k.weight": (320, kv_in),
            "original.to_v.weight": (320, kv_in), "original.to_out.0.weight": (320, 320),
            "original.to_out.0.bias": (320,)}


@pytest.mark.parametrize("unit, layer", [("a", 0), ("b", 1)])
def test_processor_reproduces_the_reference_attention_sharing_unit(reference, weight_manifest, unit, layer):
    """Both reference units (self- and cross-attention of the first SD 1.5 block, 3 frames) to
    2e-5 in float32: per-frame LoRA attention, cross-frame attention, minus the input."""
    golden = load_file(str(reference / GOLDEN))
    shapes = golden_unit_shapes(weight_manifest, layer)
    assert len(shapes) == 41
    weights = deterministic_weights(shapes)
    if unit == "a":  # the recipe, names, order and seeds, bit for bit
        assert {n: tuple(w.shape) for n, w in weights.items()} == {
            k[len("unit_a."):]: tuple(v.shape) for k, v in golden.items() if k.startswith("unit_a.")}
        for name, w in weights.items():
            assert torch.equal(w, golden[f"unit_a.{name}"]), name
    cross = layer % 2 == 1
    assert (shapes["original.to_k.weight"][1] == 768) == cross
    attn = Attention(query_dim=320, cross_attention_dim=768 if cross else None, heads=8, dim_head=40,
                     out_bias=True).eval()
    attn.load_state_dict({k[len("original."):]: v for k, v in weights.items() if k.startswith("original.")},
                         strict=True)
    processor = AttentionSharingProcessor(320, 768 if cross else None, frames=3, rank=256).eval()
    processor.load_state_dict({k: v for k, v in weights.items() if not k.startswith("original.")}, strict=True)
    processor.check_compatible(attn)
    context = golden["context"] if cross else None
    with torch.no_grad():
        out = processor(attn, golden["h"], encoder_hidden_states=context)
        plain = AttnProcessor2_0()(attn, golden["h"], encoder_hidden_states=context)
    assert out.dtype == torch.float32 and out.shape == golden[f"unit_{unit}_out"].shape
    assert (out - golden[f"unit_{unit}_out"]).abs().max() <= 2e-5
    # The wrapped module alone, same weights: a check that the golden's SD 1.5 attention is ours.
    assert (plain - golden[f"unit_{unit}_original_out"]).abs().max() <= 2e-5
    assert (out - plain).abs().max() > 1.0  # the unit really is more than the plain module


# ------------------------------------------------------------------ files on a tiny UNet
def test_load_from_file_roundtrip_and_wrong_frame_count(tmp_path):
    unet = tiny_unet()
    source = AttentionSharingAdapter.for_unet(unet, 3, rank=RANK)
    randomize(source, 1)
    state = {k: v.half() for k, v in source.state_dict().items()}
    path = tmp_path / "layer_sd15_joint.safetensors"
    save_file(state, str(path))

    adapter = load_attention_sharing(path, unet, frames=3, use_control=False, rank=RANK)
    loaded = adapter.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    with pytest.raises(WeightMismatch, match=r"to_q_lora\.1"):  # joint file read as frames=1
        load_attention_sharing(path, unet, frames=1, use_control=False, rank=RANK)
    with pytest.raises(WeightMismatch, match=r"control_convs") as info:  # read as fg2bg-style
        load_attention_sharing(path, unet, frames=3, use_control=True, rank=RANK)
    assert "kwargs_encoder.blocks_3.2.weight" in info.value.missing


# ------------------------------------------------------------------ semantics
def make_attention(query_dim: int, cross_dim: int | None, heads: int, seed: int) -> Attention:
    attn = Attention(query_dim=query_dim, cross_attention_dim=cross_dim, heads=heads,
                     dim_head=query_dim // heads, out_bias=True).double().eval()
    randomize(attn, seed)
    return attn


def reference_unit(attn, proc, h, context, control_features=None):
    """The published semantics written out plainly, item by item and head by head."""
    batch, tokens, channels = h.shape
    frames, heads = proc.frames, attn.heads
    head_dim = channels // heads

    def lora_weight(base, lora):
        return base + lora.up.weight @ lora.down.weight

    def attend(q, k, v):  # q [Lq, C], k/v [Lk, C]
        out = torch.zeros(q.shape[0], channels, dtype=q.dtype)
        for head in range(heads):
            sl = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[:, sl] @ k[:, sl].T / math.sqrt(head_dim)
            out[:, sl] = torch.softmax(scores, dim=-1) @ v[:, sl]
        return out

    def control_for(item, f):
        feats = control_features[tokens]
        feats = feats[0 if feats.shape[0] == 1 else item // frames][None]
        conv1, conv2 = proc.control_convs[f][0], proc.control_convs[f][2]
        y = F.conv2d(F.silu(F.conv2d(feats, conv1.weight, conv1.bias, padding=1)), conv2.weight, conv2.bias)[0]
        rows, cols = y.shape[1:]
        return torch.stack([y[:, r, c] for r in range(rows) for c in range(cols)])  # [tokens, C]

    h_prime = torch.zeros_like(h)
    for item in range(batch):
        f = item % frames
        x = h[item]
        if control_features is not None:
            x = x + control_for(item, f)
        ctx = context[item] if context is not None else x
        q = x @ lora_weight(attn.to_q.weight, proc.to_q_lora[f]).T
        k = ctx @ lora_weight(attn.to_k.weight, proc.to_k_lora[f]).T
        v = ctx @ lora_weight(attn.to_v.weight, proc.to_v_lora[f]).T
        o = attend(q, k, v) @ lora_weight(attn.to_out[0].weight, proc.to_out_lora[f]).T + attn.to_out[0].bias
        h_prime[item] = x + o

    out = torch.zeros_like(h)
    for sample in range(batch // frames):
        items = [sample * frames + f for f in range(frames)]
        for t in range(tokens):
            seq = torch.stack([h_prime[i, t] for i in items])  # [frames, C]
            mean = seq.mean(-1, keepdim=True)
            var = ((seq - mean) ** 2).mean(-1, keepdim=True)
            x = (seq - mean) / torch.sqrt(var + 1e-6) * proc.temporal_n.weight + proc.temporal_n.bias
            x = x @ proc.temporal_i.weight.T + proc.temporal_i.bias
            q = x @ proc.temporal_q.weight.T + proc.temporal_q.bias
            k = x @ proc.temporal_k.weight.T + proc.temporal_k.bias
            v = x @ proc.temporal_v.weight.T + proc.temporal_v.bias
            x = attend(q, k, v) @ proc.temporal_o.weight.T + proc.temporal_o.bias
            for f, i in enumerate(items):
                out[i, t] = h_prime[i, t] + x[f] - h[i, t]
    return out


@pytest.mark.parametrize("cross", [None, 6])
@pytest.mark.parametrize("frames", [1, 3])
def test_processor_matches_reference_math(cross, frames):
    torch.manual_seed(0)
    attn = make_attention(8, cross, heads=2, seed=1)
    proc = AttentionSharingProcessor(8, cross, frames=frames, rank=RANK).double()
    randomize(proc, 2)
    proc.check_compatible(attn)
    attn.set_processor(proc)
    h = torch.randn(2 * frames, 4, 8, dtype=torch.float64)
    context = torch.randn(2 * frames, 5, 6, dtype=torch.float64) if cross else None
    got = attn(h, encoder_hidden_states=context)
    torch.testing.assert_close(got, reference_unit(attn, proc, h, context), atol=1e-10, rtol=1e-10)


def test_processor_with_control_matches_reference_math():
    frames, tokens = 2, 4
    attn = make_attention(8, 6, heads=2, seed=3)
    proc = AttentionSharingProcessor(8, 6, frames=frames, rank=RANK, use_control=True).double()
    randomize(proc, 4, scale=0.05)
    attn.set_processor(proc)
    h = torch.randn(2 * frames, tokens, 8, dtype=torch.float64)
    context = torch.randn(2 * frames, 5, 6, dtype=torch.float64)
    for control_batch in (1, 2):
        features = {tokens: torch.randn(control_batch, 256, 2, 2, dtype=torch.float64),
                    1: torch.randn(1, 256, 1, 1, dtype=torch.float64)}
        got = attn(h, encoder_hidden_states=context, **{CONTROL_KWARG: features})
        want = reference_unit(attn, proc, h, context, features)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match=CONTROL_KWARG):
        attn(h, encoder_hidden_states=context)
    with pytest.raises(ValueError, match="no features for 4 tokens"):
        attn(h, encoder_hidden_states=context, **{CONTROL_KWARG: {16: features[tokens]}})


def test_batch_not_multiple_of_frames_is_refused():
    attn = make_attention(8, None, heads=2, seed=1)
    attn.set_processor(AttentionSharingProcessor(8, None, frames=3, rank=RANK).double())
    with pytest.raises(ValueError, match="batch size 4 is not a multiple of 3"):
        attn(torch.randn(4, 4, 8, dtype=torch.float64))


def test_cross_frame_attention_mixes_frames_only_within_a_sample():
    attn = make_attention(8, None, heads=2, seed=1)
    proc = AttentionSharingProcessor(8, None, frames=3, rank=RANK).double()
    randomize(proc, 2)
    attn.set_processor(proc)
    h = torch.randn(6, 4, 8, dtype=torch.float64)
    changed = h.clone()
    changed[2] += 1.0  # frame 2 of sample 0
    a, b = attn(h), attn(changed)
    assert (a[0] - b[0]).abs().max() > 1e-3  # frame 0 of the same sample sees it
    assert torch.equal(a[3:], b[3:])  # the other sample does not

    single = AttentionSharingProcessor(8, None, frames=1, rank=RANK).double()
    randomize(single, 2)
    attn.set_processor(single)
    a, b = attn(h), attn(changed)
    assert torch.equal(a[torch.arange(6) != 2], b[torch.arange(6) != 2])
    assert (a[2] - b[2]).abs().max() > 1e-3


def zero_lora_and_temporal_output(adapter: AttentionSharingAdapter) -> None:
    """Randomize everything, then zero the LoRA up-weights and temporal_o: a no-op unit."""
    randomize(adapter, 7)
    with torch.no_grad():
        for unit in adapter.hookers.layers:
            for loras in (unit.to_q_lora, unit.to_k_lora, unit.to_v_lora, unit.to_out_lora):
                for lora in loras:
                    lora.up.weight.zero_()
            unit.temporal_o.weight.zero_()
            unit.temporal_o.bias.zero_()


def tiny_inputs(batch: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 16, 16, generator=g),
                timestep=torch.tensor(400),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=g))


@pytest.mark.parametrize("frames", [1, 3])
def test_zeroed_adapter_reproduces_the_plain_unet_exactly(frames):
    unet = tiny_unet()
    inputs = tiny_inputs(2 * frames)
    with torch.no_grad():
        plain = unet(**inputs).sample
    adapter = AttentionSharingAdapter.for_unet(unet, frames, rank=RANK)
    zero_lora_and_temporal_output(adapter)
    with adapter.installed(unet), torch.no_grad():
        shared = unet(**inputs).sample
    assert torch.equal(shared, plain)

    randomize(adapter, 8, scale=0.05)  # nonzero weights do change the result
    with adapter.installed(unet), torch.no_grad():
        assert not torch.allclose(unet(**inputs).sample, plain, atol=1e-4)


def test_install_covers_all_32_and_remove_restores_processors_exactly():
    unet = tiny_unet()
    originals = unet.attn_processors
    assert len(originals) == 32
    adapter = AttentionSharingAdapter.for_unet(unet, 1, rank=RANK)
    adapter.install(unet)
    installed = unet.attn_processors
    assert all(installed[f"{n}.processor"] is u for n, u in zip(adapter.module_names, adapter.hookers.layers))
    with pytest.raises(RuntimeError, match="already installed"):
        adapter.install(unet)
    adapter.remove(unet)
    after = unet.attn_processors
    assert after.keys() == originals.keys() and all(after[k] is originals[k] for k in originals)
    assert not any("hookers" in k or ".processor." in k for k in unet.state_dict())


def test_partial_adapter_keeps_other_processors_and_context_manager_restores_on_error():
    unet = tiny_unet()
    custom = {name: AttnProcessor2_0() for name in unet.attn_processors}  # distinct objects
    unet.set_attn_processor(dict(custom))
    full = AttentionSharingAdapter.for_unet(unet, 1, rank=RANK)
    subset = [0, 5, 31]
    modules = dict(unet.named_modules())
    names = [full.module_names[i] for i in subset]
    dims = [(modules[n].to_q.out_features, modules[n].to_k.in_features if modules[n].is_cross_attention else None)
            for n in names]
    adapter = AttentionSharingAdapter(names, dims, frames=1, rank=RANK)
    with pytest.raises(ZeroDivisionError):
        with adapter.installed(unet):
            current = unet.attn_processors
            for key, proc in current.items():
                if key[: -len(".processor")] in names:
                    assert isinstance(proc, AttentionSharingProcessor)
                else:
                    assert proc is custom[key]
            1 / 0
    after = unet.attn_processors
    assert all(after[k] is custom[k] for k in custom)
    assert not adapter.is_installed


def test_install_refuses_mismatched_widths():
    unet = tiny_unet()
    adapter = AttentionSharingAdapter(["down_blocks.0.attentions.0.transformer_blocks.0.attn2"],
                                      [(16, 768)], frames=1, rank=RANK)
    with pytest.raises(ValueError, match="attn2"):
        adapter.install(unet)
    assert not adapter.is_installed


def test_control_path_runs_through_the_unet():
    unet = tiny_unet()
    adapter = AttentionSharingAdapter.for_unet(unet, 2, use_control=True, rank=RANK)
    randomize(adapter.hookers, 9, scale=0.02)  # the encoder keeps its default init
    image = torch.rand(1, 3, 128, 128)  # 8× the 16×16 latent
    features = adapter.encode_control(image)
    assert sorted(features) == [4, 16, 64, 256]  # the four UNet resolutions, 16² … 2²
    inputs = tiny_inputs(4)
    with adapter.installed(unet), torch.no_grad():
        out = unet(**inputs, cross_attention_kwargs={CONTROL_KWARG: features}).sample
        other = unet(**inputs, cross_attention_kwargs={
            CONTROL_KWARG: adapter.encode_control(1 - image)}).sample
        assert out.shape == (4, 4, 16, 16) and torch.isfinite(out).all()
        assert not torch.allclose(out, other, atol=1e-5)  # the condition image matters
        with pytest.raises(ValueError, match=CONTROL_KWARG):
            unet(**inputs)
    with pytest.raises(ValueError, match="multiples of 64"):
        adapter.encode_control(torch.rand(1, 3, 100, 128))
