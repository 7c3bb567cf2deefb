"""SDXL transparency patch: layout checks against the published manifest, exact swap/restore."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from inference.errors import WeightMismatch
from inference.sdxl_transparency import (
    TransparencyPatch,
    expected_delta_shapes,
    unet_param_shapes,
    validate_sdxl_delta,
)

# SDXL topology (DownBlock2D first, text_time embedding, linear projections, 1 and 2
# transformer layers per level) at toy widths.
TINY_SDXL = dict(
    sample_size=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=24,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=6 * 4 + 12,
)


@pytest.fixture(scope="module")
def sdxl_meta_unet(reference):
    cfg = json.loads((reference / "sdxl_unet_config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(cfg)


@pytest.fixture(scope="module")
def manifest_shapes(weight_manifest):
    return {k: tuple(v) for k, v in weight_manifest["files"]["ld_diffusers_sdxl_attn"].items()}


def tiny_unet(seed: int = 0, dtype=torch.float32) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SDXL).to(dtype).eval()


def random_deltas(unet, seed: int = 1, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in expected_delta_shapes(unet).items()}


def tiny_inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 5, 24, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, 12, generator=g),
                           "time_ids": torch.randn(2, 6, generator=g)},
    )


def run(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(**tiny_inputs()).sample


def hand_merged(unet, deltas: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """A copy of `unet` with each delta added to its weight by hand: what the patch must equal."""
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for name, param in merged.named_parameters():
            if name in deltas:
                param.add_(deltas[name])
    return merged


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in unet.named_parameters()}


# ------------------------------------------------------------------ manifest / meta device
def test_expected_deltas_reproduce_manifest_for_sdxl_config(sdxl_meta_unet, manifest_shapes):
    assert next(sdxl_meta_unet.parameters()).is_meta  # nothing real was allocated
    expected = expected_delta_shapes(sdxl_meta_unet)
    assert len(expected) == 560  # 70 transformer blocks × attn1/attn2 × q,k,v,out
    assert expected == manifest_shapes


def test_manifest_validates_with_and_without_bias_deltas(sdxl_meta_unet, manifest_shapes):
    params = unet_param_shapes(sdxl_meta_unet)
    validate_sdxl_delta(manifest_shapes, params)
    biases = {k.replace(".weight", ".bias"): params[k.replace(".weight", ".bias")]
              for k in manifest_shapes if k.endswith("to_out.0.weight")}
    assert len(biases) == 140
    validate_sdxl_delta({**manifest_shapes, **biases}, params)
    some = dict(list(biases.items())[:3])  # a subset of biases is fine too
    validate_sdxl_delta({**manifest_shapes, **some}, params)


def test_missing_delta_is_named(sdxl_meta_unet, manifest_shapes):
    name = "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v.weight"
    shapes = dict(manifest_shapes)
    del shapes[name]
    with pytest.raises(WeightMismatch) as info:
        validate_sdxl_delta(shapes, unet_param_shapes(sdxl_meta_unet))
    assert info.value.missing == [name] and name in str(info.value)


@pytest.mark.parametrize("extra", [
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",  # a UNet param, not patched
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.bias",  # no such parameter
    "conv_in.weight",
])
def test_extra_delta_is_named(sdxl_meta_unet, manifest_shapes, extra):
    params = unet_param_shapes(sdxl_meta_unet)
    shapes = {**manifest_shapes, extra: params.get(extra, (3,))}
    with pytest.raises(WeightMismatch) as info:
        validate_sdxl_delta(shapes, params)
    assert info.value.unexpected == [extra] and extra in str(info.value)


def test_misshaped_delta_is_named(sdxl_meta_unet, manifest_shapes):
    name = "mid_block.attentions.0.transformer_blocks.4.attn2.to_k.weight"
    assert manifest_shapes[name] == (1280, 2048)
    shapes = {**manifest_shapes, name: (1280, 768)}  # an SD1.5-width text projection
    with pytest.raises(WeightMismatch) as info:
        validate_sdxl_delta(shapes, unet_param_shapes(sdxl_meta_unet))
    assert [m[0] for m in info.value.mismatched] == [name]
    assert name in str(info.value) and "(1280, 768)" in str(info.value)


def test_misshaped_bias_delta_is_named(sdxl_meta_unet, manifest_shapes):
    name = "down_blocks.2.attentions.1.transformer_blocks.3.attn1.to_out.0.bias"
    with pytest.raises(WeightMismatch) as info:
        validate_sdxl_delta({**manifest_shapes, name: (640,)}, unet_param_shapes(sdxl_meta_unet))
    assert name in str(info.value)


# ------------------------------------------------------------------ tiny SDXL-shaped UNet
def test_tiny_expected_deltas_follow_the_rule():
    unet = tiny_unet()
    expected = expected_delta_shapes(unet)
    # down 1 attention × 2 layers, up 2 attentions × 2 layers, mid 2 layers = 8 blocks
    assert len(expected) == 8 * 2 * 4
    for name, shape in expected.items():
        module_name, _, _ = name.rpartition(".")
        assert dict(unet.named_modules())[module_name].weight.shape == shape
        assert ".transformer_blocks." in name and (".attn1." in name or ".attn2." in name)


def test_patched_forward_equals_hand_merged_unet():
    unet = tiny_unet()
    deltas = random_deltas(unet)
    merged = hand_merged(unet, deltas)
    plain = run(unet)
    patch = TransparencyPatch.from_state_dict(deltas, unet)
    with patch.applied(unet):
        patched = run(unet)
    assert torch.equal(patched, run(merged))
    assert not torch.allclose(patched, plain, atol=1e-4)  # the patch did something
    assert torch.equal(run(unet), plain)  # and is gone again


def test_swap_restores_bit_identically_even_on_exception():
    unet = tiny_unet()
    before = snapshot(unet)
    pointers = {k: p.data_ptr() for k, p in unet.named_parameters()}
    patch = TransparencyPatch.from_state_dict(random_deltas(unet), unet)
    assert len(patch.parameter_names) == 64
    with pytest.raises(KeyError):
        with patch.applied(unet):
            changed = [k for k, p in unet.named_parameters() if not torch.equal(p, before[k])]
            assert sorted(changed) == sorted(patch.parameter_names)
            raise KeyError("boom")
    for name, param in unet.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.data_ptr() == pointers[name], name  # the original storage, no copy
    with patch.applied(unet):  # reusable after an exception
        with pytest.raises(RuntimeError, match="already applied"):
            with patch.applied(unet):
                pass


def test_patch_refuses_a_unet_that_changed_under_it():
    unet = tiny_unet()
    patch = TransparencyPatch.from_state_dict(random_deltas(unet), unet)
    unet.to(torch.float64)
    with pytest.raises(ValueError, match="rebuild the patch"):
        with patch.applied(unet):
            pass
    with pytest.raises(ValueError, match="another UNet|rebuild"):
        with patch.applied(UNet2DConditionModel(**{**TINY_SDXL, "layers_per_block": 2})):
            pass


def test_offload_round_trip_is_rebound_only_when_asked():
    """Model CPU offload moves parameters between devices (new storage, same values): the
    patch refuses that by default and, with rebind_moved, binds the originals back."""
    unet = tiny_unet()
    deltas = random_deltas(unet)
    merged = hand_merged(unet, deltas)
    plain = run(unet)
    patch = TransparencyPatch.from_state_dict(deltas, unet)
    with torch.no_grad():  # what an offload round trip does to every parameter
        for param in unet.parameters():
            param.data = param.data.clone()
    with pytest.raises(ValueError, match="rebuild the patch"):
        with patch.applied(unet):
            pass
    with patch.applied(unet, rebind_moved=True):
        assert torch.equal(run(unet), run(merged))
    assert torch.equal(run(unet), plain)
    unet.to(torch.float64)  # a real conversion is still refused
    with pytest.raises(ValueError, match="rebuild the patch"):
        with patch.applied(unet, rebind_moved=True):
            pass


def test_merge_into_is_permanent_and_spends_the_patch():
    unet = tiny_unet()
    deltas = random_deltas(unet)
    before = snapshot(unet)
    patch = TransparencyPatch.from_state_dict(deltas, unet)
    patch.merge_into(unet)
    for name, param in unet.named_parameters():
        want = before[name] + deltas[name] if name in deltas else before[name]
        assert torch.equal(param, want), name
    with pytest.raises(RuntimeError, match="spent"):
        with patch.applied(unet):
            pass


def test_low_rank_factors_reproduce_low_rank_deltas():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(5)
    rank = 3
    deltas = {k: 0.1 * torch.randn(s[0], rank, generator=g) @ torch.randn(rank, s[1], generator=g)
              for k, s in expected_delta_shapes(unet).items()}
    patch = TransparencyPatch.from_state_dict(deltas, unet)
    factors = patch.low_rank(rank=rank)
    assert factors.keys() == deltas.keys()
    for name, (up, down) in factors.items():
        assert up.shape == (deltas[name].shape[0], rank) and down.shape == (rank, deltas[name].shape[1])
        torch.testing.assert_close(up @ down, deltas[name], atol=2e-6, rtol=1e-4)
    # too small a rank cannot reproduce a rank-3 delta: the check above can fail
    name = next(iter(deltas))
    up, down = patch.low_rank(rank=1)[name]
    assert (up @ down - deltas[name]).abs().max() > 1e-3
    # rank larger than the matrix is clamped to its smaller side
    up, down = patch.low_rank(rank=256)[name]
    assert up.shape[1] == min(deltas[name].shape)


def test_randomized_factoring_matches_full_svd_and_is_deterministic():
    from inference.sdxl_transparency import factor_low_rank

    g = torch.Generator().manual_seed(1)
    rank = 24
    # A rank-24 delta stored in fp16 (like the published file): rank 24 plus rounding noise.
    delta = (torch.randn(300, rank, generator=g) @ torch.randn(rank, 500, generator=g) / rank).half().float()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    up, down = factor_low_rank(delta, rank)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert up.shape == (300, rank) and down.shape == (rank, 500)
    error = lambda approx: ((approx - delta).norm() / delta.norm()).item()  # noqa: E731
    assert error(up @ down) <= error(best) * 1.001 + 1e-7
    assert error(up @ down) < 1e-3
    again = factor_low_rank(delta, rank)
    assert torch.equal(again[0], up) and torch.equal(again[1], down)
    # A rank too small for the delta cannot reproduce it (the check above can fail).
    assert error(torch.matmul(*factor_low_rank(delta, 4))) > 0.1


def test_from_file_streams_validates_and_matches_in_memory(tmp_path):
    unet = tiny_unet()
    deltas = {k: v.half() for k, v in random_deltas(unet).items()}
    bias_name = next(k for k in deltas if k.endswith("to_out.0.weight")).replace(".weight", ".bias")
    deltas[bias_name] = torch.full((dict(unet.named_parameters())[bias_name].shape[0],), 0.25).half()
    path = tmp_path / "ld_diffusers_sdxl_attn.safetensors"
    save_file(deltas, str(path))

    from_file = TransparencyPatch.from_file(path, unet)
    in_memory = TransparencyPatch.from_state_dict(deltas, unet)
    with from_file.applied(unet):
        a = snapshot(unet)
    with in_memory.applied(unet):
        b = snapshot(unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = dict(unet.named_parameters())[bias_name]
    assert torch.equal(a[bias_name], base.detach() + 0.25)  # the bias delta is applied


def test_from_file_refuses_before_touching_the_unet(tmp_path):
    unet = tiny_unet()
    before = snapshot(unet)
    deltas = random_deltas(unet)
    name = "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_k.weight"
    deltas[name] = torch.zeros(32, 7)
    path = tmp_path / "bad.safetensors"
    save_file(deltas, str(path))
    with pytest.raises(WeightMismatch, match=name.replace(".", r"\.")):
        TransparencyPatch.from_file(path, unet)
    assert all(torch.equal(p, before[k]) for k, p in unet.named_parameters())


def test_patched_tensors_are_added_in_float32_then_cast():
    # bf16 UNet + fp16 file: casting the delta to bf16 first would lose its low bits.
    unet = tiny_unet(dtype=torch.bfloat16)
    before = snapshot(unet)
    deltas = {k: v.half() for k, v in random_deltas(unet, scale=1e-2).items()}
    patch = TransparencyPatch.from_state_dict(deltas, unet)
    params = dict(unet.named_parameters())
    naive_differs = False
    with patch.applied(unet):
        for name, delta in deltas.items():
            assert params[name].dtype == torch.bfloat16
            want = (before[name].float() + delta.float()).bfloat16()
            assert torch.equal(params[name], want), name
            naive_differs |= not torch.equal(want, before[name] + delta.bfloat16())
    assert naive_differs  # the float32 accumulation is observable, so the check above can fail
    assert all(torch.equal(p, before[k]) for k, p in unet.named_parameters())


def low_rank_deltas(unet, rank: int, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s[0], rank, generator=g) @ torch.randn(rank, s[1], generator=g)
            for k, s in expected_delta_shapes(unet).items()}


def test_factored_patch_keeps_one_representation(monkeypatch):
    """Where factors are smaller than the matrix (SDXL at rank 256; here rank 4 on 32-wide
    matrices) only the factors stay resident: `low_rank` hands out those very tensors and
    `applied()` builds the patched weights for its block only."""
    import inference.sdxl_transparency as transparency

    monkeypatch.setattr(transparency, "PATCH_RANK", 4)
    unet = tiny_unet()
    before = snapshot(unet)
    deltas = low_rank_deltas(unet, rank=4)
    patch = TransparencyPatch.from_state_dict(deltas, unet)
    stored = sum(t.numel() for t in patch.stored_tensors())
    assert stored < 0.5 * sum(d.numel() for d in deltas.values())
    factors = patch.low_rank(rank=4)
    resident = {id(t) for t in patch.stored_tensors()}
    assert all(id(up) in resident and id(down) in resident for up, down in factors.values())
    params = dict(unet.named_parameters())
    with patch.applied(unet):
        for name, delta in deltas.items():
            torch.testing.assert_close(params[name], before[name] + delta, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(p, before[k]) for k, p in unet.named_parameters())


def test_factor_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    import inference.sdxl_transparency as transparency
    from inference.models import HashCache
    from inference.sdxl_transparency import FactorCache

    monkeypatch.setattr(transparency, "PATCH_RANK", 4)
    factorings = []
    real = transparency.factor_low_rank
    monkeypatch.setattr(transparency, "factor_low_rank", lambda d, r: factorings.append(1) or real(d, r))
    unet = tiny_unet()
    path = tmp_path / "ld_diffusers_sdxl_attn.safetensors"
    save_file(low_rank_deltas(unet, rank=4), str(path))
    cache = FactorCache(tmp_path / "factors", HashCache(tmp_path / "hashes.json").sha256)

    def loaded_weights():
        with TransparencyPatch.from_file(path, unet, factor_cache=cache).applied(unet):
            return snapshot(unet)

    first = loaded_weights()
    built = len(factorings)
    assert built == 64 and cache.path_for(path, torch.float32).is_file()
    again = loaded_weights()
    assert len(factorings) == built  # read from the cache: no factoring
    assert all(torch.equal(first[k], again[k]) for k in first)

    save_file(low_rank_deltas(unet, rank=4, seed=9), str(path))  # the delta file changed
    changed = loaded_weights()
    assert len(factorings) == 2 * built
    assert not all(torch.equal(first[k], changed[k]) for k in first)

    cache.path_for(path, torch.float32).write_bytes(b"torn")  # a broken cache file is rebuilt
    assert all(torch.equal(changed[k], v) for k, v in loaded_weights().items())
    assert len(factorings) == 3 * built
