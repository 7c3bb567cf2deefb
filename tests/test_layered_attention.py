"""Layered attention processors and mask math on hand-made tensors, plus the tiny UNet."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from inference import masks as M
from inference.layered_attention import (
    AttentionCapture,
    KVComposite,
    LayeredAttentionState,
    LayeredAttnProcessor,
    default_inter_layer_pool,
    dense_weights,
    layered_attention,
)

DIM, HEADS = 16, 2


def make_attention(seed: int = 0, cross_dim: int | None = None) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=DIM, cross_attention_dim=cross_dim, heads=HEADS, dim_head=DIM // HEADS,
                     out_bias=True)
    attn.eval()
    return attn


def roles(n_fg: int) -> list[str]:
    return ["background"] + ["foreground"] * n_fg + ["blended"]


def pool_tokens(x: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """[b, T, c] → [b, T/p², c]: mean over p×p cells of the token grid, row-major."""
    b, _, c = x.shape
    h, w = grid
    cells = x.reshape(b, h // p, p, w // p, p, c).mean(dim=(2, 4))
    return cells.reshape(b, -1, c)


def manual_joint(attn: Attention, x: torch.Tensor, groups: int, items: int, log_w: torch.Tensor,
                 grid: tuple[int, int] = (3, 3), pool: int = 1) -> torch.Tensor:
    """Reference: softmax over own keys and the other items' pooled keys, log-weights per block."""
    b, t, _ = x.shape
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    pk, pv = pool_tokens(k, grid, pool), pool_tokens(v, grid, pool)
    hd = DIM // HEADS
    out = torch.empty(b, t, DIM)
    for g in range(groups):
        for i in range(items):
            row = g * items + i
            for h in range(HEADS):
                sl = slice(h * hd, (h + 1) * hd)
                scores, vals = [], []
                for j in range(items):
                    col = g * items + j
                    kk, vv = (k, v) if j == i else (pk, pv)
                    extra = 0.0 if j == i else math.log(pool * pool)
                    scores.append(q[row, :, sl] @ kk[col, :, sl].T / math.sqrt(hd) + log_w[i, j] + extra)
                    vals.append(vv[col, :, sl])
                p = torch.softmax(torch.cat(scores, dim=1), dim=1)
                out[row, :, sl] = p @ torch.cat(vals, dim=0)
    return attn.to_out[0](out)


@torch.no_grad()
def test_inter_layer_strength_zero_is_plain_attention_exactly():
    attn = make_attention()
    x = torch.randn(2 * 4, 9, DIM)
    plain = AttnProcessor2_0()(attn, x)
    state = LayeredAttentionState(roles(2), 2, (3, 3), inter_layer_strength=0.0)
    ours = LayeredAttnProcessor("a", state)(attn, x)
    assert torch.equal(ours, plain)
    # A vanishing strength takes the joint path and must agree numerically (continuity).
    state_tiny = LayeredAttentionState(roles(2), 2, (3, 3), inter_layer_strength=1e-30)
    near = LayeredAttnProcessor("a", state_tiny)(attn, x)
    torch.testing.assert_close(near, plain, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_inter_layer_attention_matches_reference_formula_and_mixes_layers():
    attn = make_attention(1)
    groups, items = 2, 4
    x = torch.randn(groups * items, 9, DIM)
    attends = torch.ones(items, items, dtype=torch.bool)
    attends[0, 3] = False  # background does not look at the blended item
    state = LayeredAttentionState(roles(2), groups, (3, 3), inter_layer_strength=0.5, attends=attends,
                                  inter_layer_pool=1)
    ours = LayeredAttnProcessor("a", state)(attn, x)
    log_w = torch.full((items, items), math.log(0.5))
    log_w[0, 3] = -math.inf
    log_w.fill_diagonal_(0.0)
    torch.testing.assert_close(ours, manual_joint(attn, x, groups, items, log_w), rtol=1e-4, atol=1e-5)
    plain = AttnProcessor2_0()(attn, x)
    assert (ours - plain).abs().max() > 1e-3
    # Pooled other-layer keys (2×2 on a 4×4 grid) count for the 4 tokens they stand for.
    x16 = torch.randn(groups * items, 16, DIM)
    pooled_state = LayeredAttentionState(roles(2), groups, (4, 4), inter_layer_strength=0.5, attends=attends,
                                         inter_layer_pool=2)
    pooled = LayeredAttnProcessor("a", pooled_state)(attn, x16)
    torch.testing.assert_close(pooled, manual_joint(attn, x16, groups, items, log_w, (4, 4), 2),
                               rtol=1e-4, atol=1e-5)
    assert [default_inter_layer_pool(n) for n in (2, 3, 5, 10)] == [3, 4, 6, 9]
    for n in range(2, 11):  # the smallest pooling that keeps the extra keys within T/8
        p = default_inter_layer_pool(n)
        assert (n - 1) / p**2 <= 1 / 8 < (n - 1) / (p - 1) ** 2
    # Groups never see each other: changing the unconditional group leaves the conditional one.
    x2 = x.clone()
    x2[:items] = torch.randn(items, 9, DIM)
    ours2 = LayeredAttnProcessor("a", state)(attn, x2)
    assert torch.equal(ours2[items:], ours[items:])


def test_pooling_matrix_is_ceil_mode_average_pooling():
    """Grids that the pooling does not divide: edge cells average only what they cover."""
    for (h, w), pool in (((7, 5), 3), ((16, 16), 6), ((4, 4), 2)):
        state = LayeredAttentionState(roles(2), 2, (h, w), inter_layer_strength=1.0, inter_layer_pool=pool)
        x = torch.randn(3, h * w, 5)
        matrix = state.pooling_matrix(h * w, x.device, x.dtype)
        grid = x.transpose(1, 2).reshape(3, 5, h, w)
        expected = F.avg_pool2d(grid, pool, ceil_mode=True).reshape(3, 5, -1).transpose(1, 2)
        torch.testing.assert_close(matrix @ x, expected)
    assert LayeredAttentionState(roles(2), 2, (4, 4), inter_layer_pool=1).pooling_matrix(16, "cpu", torch.float32) is None


def low_rank_factors(attn: Attention, rank: int = 3, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, linear in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v),
                         ("to_out.0", attn.to_out[0])):
        out_f, in_f = linear.weight.shape
        factors[name] = (torch.randn(out_f, rank, generator=g) * 0.3, torch.randn(rank, in_f, generator=g) * 0.3)
    return factors


@torch.no_grad()
def test_per_sample_side_path_only_touches_patched_rows():
    attn = make_attention(2)
    factors = low_rank_factors(attn)
    x = torch.randn(2 * 3, 4, DIM)
    plain = AttnProcessor2_0()(attn, x)
    state = LayeredAttentionState(["background", "foreground", "blended"], 2, (2, 2),
                                  transparency_scale=[0, 1, 0])
    ours = LayeredAttnProcessor("a", state, factors)(attn, x)
    for row in (0, 2, 3, 5):
        assert torch.equal(ours[row], plain[row])
    # Patched rows equal attention with the merged weights W + up·down.
    merged = make_attention(2)
    for name, linear in (("to_q", merged.to_q), ("to_k", merged.to_k), ("to_v", merged.to_v),
                         ("to_out.0", merged.to_out[0])):
        up, down = factors[name]
        linear.weight += up @ down
    patched = AttnProcessor2_0()(merged, x)
    torch.testing.assert_close(ours[[1, 4]], patched[[1, 4]], rtol=1e-4, atol=1e-5)
    assert (ours[1] - plain[1]).abs().max() > 1e-3
    state.set_transparency_scale([0, 0.5, 0])
    half = LayeredAttnProcessor("a", state, factors)(attn, x)
    assert (half[1] - ours[1]).abs().max() > 1e-4
    assert torch.equal(half[0], plain[0])
    # Full-rank factors take the merged-weight path; same result as the side path.
    full = low_rank_factors(attn, rank=DIM, seed=6)
    dense = dense_weights(attn, full)
    assert set(dense) == {"to_q", "to_k", "to_v", "to_out.0"}
    state.set_transparency_scale([0, 1, 0])
    via_dense = LayeredAttnProcessor("a", state, full, dense)(attn, x)
    via_side = LayeredAttnProcessor("a", state, full)(attn, x)
    torch.testing.assert_close(via_dense, via_side, rtol=1e-4, atol=1e-4)
    assert torch.equal(via_dense[0], plain[0]) and torch.equal(via_dense[5], plain[5])
    assert dense_weights(attn, factors) == {}  # rank 3 of 16: the side path is cheaper


@torch.no_grad()
def test_region_gate_confines_cross_attention_output_to_box():
    attn = make_attention(3, cross_dim=12)
    x = torch.randn(3, 64, DIM)
    context = torch.randn(3, 5, 12)
    regions = torch.stack([M.box_mask(None, 8, 8), M.box_mask((0.25, 0.25, 0.75, 0.75), 8, 8),
                           M.box_mask(None, 8, 8)])
    state = LayeredAttentionState(["background", "foreground", "blended"], 1, (8, 8), regions=regions)
    out = LayeredAttnProcessor("a", state)(attn, x, encoder_hidden_states=context)
    energy = out[1].pow(2).sum(dim=-1).reshape(8, 8)
    inside = regions[1] > 0.5
    assert energy[~inside].mean() < 1e-6 * energy[inside].mean()
    plain = AttnProcessor2_0()(attn, x, encoder_hidden_states=context)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[1][inside.flatten()], plain[1][inside.flatten()])


@torch.no_grad()
def test_kv_composite_takes_inside_and_outside_keys():
    attn = make_attention(4)
    x = torch.randn(3, 4, DIM)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    state = LayeredAttentionState(["background", "foreground", "blended"], 1, (2, 2),
                                  composite=KVComposite(target=2, inside=1, outside=0, mask=mask))
    out = LayeredAttnProcessor("a", state)(attn, x)
    plain = AttnProcessor2_0()(attn, x)
    assert torch.equal(out[:2], plain[:2])
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    m = mask.reshape(4, 1)
    keys = torch.cat([k[2], m * k[1] + (1 - m) * k[0]])
    vals = torch.cat([v[2], m * v[1] + (1 - m) * v[0]])
    hd = DIM // HEADS
    ref = torch.empty(4, DIM)
    for h in range(HEADS):
        sl = slice(h * hd, (h + 1) * hd)
        ref[:, sl] = torch.softmax(q[2, :, sl] @ keys[:, sl].T / math.sqrt(hd), dim=1) @ vals[:, sl]
    torch.testing.assert_close(out[2], attn.to_out[0](ref), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_capture_locates_tokens_that_listen_to_the_layer_words():
    attn = make_attention(6, cross_dim=DIM)
    # Queries in the left half point along key 1's direction; others are random noise.
    torch.manual_seed(0)
    for lin in (attn.to_q, attn.to_k):
        lin.weight.copy_(torch.eye(DIM))
    x = torch.randn(1, 16, DIM) * 0.1
    context = torch.randn(1, 4, DIM) * 0.1
    context[0, 1] = 0
    context[0, 1, 0] = 4.0
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    x[0, left.flatten(), 0] = 4.0
    cap = AttentionCapture({0: [1]})
    state = LayeredAttentionState(["foreground"], 1, (4, 4), capture=cap)
    LayeredAttnProcessor("a", state)(attn, x, encoder_hidden_states=context)
    content = M.minmax(cap.cross_map(0, (4, 4)))
    assert content[left].mean() > 0.8 and content[~left].mean() < 0.2


def test_mask_math_on_synthetic_maps():
    n = 16
    one_hot = torch.eye(n)[None].repeat(2, 1, 1)
    uniform = torch.full((2, n, n), 1.0 / n)
    assert torch.allclose(M.attention_spread(one_hot), torch.ones(n))
    assert torch.allclose(M.attention_spread(uniform), torch.full((n,), float(n)))
    # Object = top-left 2x2 of a 4x4 grid: its tokens attend to one key, the rest uniformly.
    obj = torch.zeros(4, 4, dtype=torch.bool)
    obj[:2, :2] = True
    rows = torch.where(obj.flatten()[:, None], torch.eye(n), torch.full((n, n), 1.0 / n))
    structure = M.structure_prior(M.attention_spread(rows[None]).reshape(4, 4))
    assert torch.all(structure[obj] == 1) and torch.all(structure[~obj] == 0)
    cross = torch.zeros(1, n, 3)
    cross[0, :, 2] = torch.linspace(0, 1, n)  # content rises along the sequence
    cross[0, :, 0] = 1 - cross[0, :, 2]
    content = M.content_confidence(cross, [2], (4, 4))
    assert content.min() == 0 and content.max() == 1
    soft = M.soft_mask(structure, content)
    expected = M.minmax(structure * content)
    assert torch.equal(soft, expected)
    assert soft[~obj].max() == 0 and soft[obj].max() == 1
    hard = M.hard_mask(soft, 0.5)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.bool(), soft >= 0.5)
    assert torch.equal(M.minmax(torch.full((3, 3), 2.0)), torch.zeros(3, 3))


def test_box_mask_and_latent_compositing():
    box = M.box_mask((0.25, 0.5, 0.75, 1.0), 4, 8)
    assert box.sum() == pytest.approx(0.5 * 0.5 * 32)
    assert torch.all(box[:2] == 0) and torch.all(box[2:, 2:6] == 1) and torch.all(box[:, :2] == 0)
    odd = M.box_mask((0.1, 0.0, 0.3, 1.0), 1, 10)
    assert odd.sum() == pytest.approx(2.0) and odd[0, 1] == pytest.approx(1.0)
    feathered = M.box_mask((0.25, 0.25, 0.75, 0.75), 8, 8, feather=2)
    assert 0 < feathered[0, 4] < feathered[1, 4] < feathered[2, 4] == 1
    assert feathered[0, 0] == pytest.approx(0.25 * 0.25)  # 1.5 cells out on both axes, ramp of 2
    empty = torch.full((1, 4, 1, 1), 0.3)
    x0 = torch.randn(1, 4, 4, 8)
    confined = M.confine(x0, box, empty)
    outside = (confined - empty).pow(2).sum(dim=1)[0]
    assert outside[box == 0].max() == 0
    torch.testing.assert_close(confined[..., box == 1], x0[..., box == 1])
    bg, fg1, fg2 = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    m1 = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    m2 = torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    z = M.latent_alpha_over(bg, [fg1, fg2], [m1, m2])
    assert torch.allclose(z[0, 0], torch.tensor([[1.0, 1.25], [2.0, 0.0]]))
    alpha = M.latent_alpha_proxy(torch.cat([empty.expand(1, 4, 2, 2), x0[..., :2, :2] + 5]), empty)
    assert alpha[0].max() == 0 and alpha[1].max() == 1


@pytest.fixture(scope="module")
def tiny_loaded():
    from inference.devices import default_dtype
    from inference.models import load_model, resolve_model

    resolved = resolve_model("tiny")
    return load_model(resolved, torch.device("cpu"), default_dtype(torch.device("cpu")))


def test_loaded_transparent_decoder_runs_channels_last(tiny_loaded):
    conv = next(m for m in tiny_loaded.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def unet_inputs(unet, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    text_embeds = torch.randn(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                              generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)
    return dict(sample=sample, timestep=torch.tensor(500), encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})


@torch.no_grad()
def test_unet_per_sample_transparency_and_restore(tiny_loaded):
    from inference.layered_attention import transparency_factors

    unet = tiny_loaded.pipeline.unet
    originals = dict(unet.attn_processors)
    inputs = unet_inputs(unet, 6)
    plain = unet(**inputs).sample
    with tiny_loaded.transparency(unet):
        patched_full = unet(**inputs).sample
    factors = transparency_factors(tiny_loaded.unet_patch)
    state = LayeredAttentionState(["background", "foreground", "blended"], 2, (8, 8),
                                  transparency_scale=[0, 1, 0])
    with layered_attention(unet, state, factors) as procs:
        assert set(procs) == set(originals)
        ours = unet(**inputs).sample
        state.set_transparency_scale([0, 0.5, 0])
        ours_half = unet(**inputs).sample
    assert all(unet.attn_processors[k] is v for k, v in originals.items())
    for row in (0, 2, 3, 5):  # background and blended, both guidance halves
        assert torch.equal(ours[row], plain[row])
    torch.testing.assert_close(ours[[1, 4]], patched_full[[1, 4]], rtol=1e-4, atol=1e-4)
    assert (ours[1] - plain[1]).abs().max() > 1e-4
    assert (ours_half[1] - ours[1]).abs().max() > 1e-5
    assert torch.equal(ours_half[0], plain[0])

    # Processors are restored also when the body fails.
    with pytest.raises(RuntimeError):
        with layered_attention(unet, state, factors):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in originals.items())
    # A wrong batch layout is refused with a clear message, and still restored.
    with pytest.raises(ValueError, match="layered layout"):
        with layered_attention(unet, state, factors):
            unet(**unet_inputs(unet, 4))
    assert all(unet.attn_processors[k] is v for k, v in originals.items())


@torch.no_grad()
def test_per_sample_transparency_applies_bias_deltas(tiny_loaded):
    """A delta file that also carries to_out.0 bias deltas: the patched rows equal the merged
    patch (bias included) at full strength (merged-weight path) and at half strength (factor
    side path); the other rows stay plain."""
    from inference.layered_attention import transparency_factors
    from inference.sdxl_transparency import TransparencyPatch, expected_delta_shapes

    unet = tiny_loaded.pipeline.unet
    params = dict(unet.named_parameters())
    g = torch.Generator().manual_seed(3)
    deltas = {k: 0.02 * torch.randn(s, generator=g) for k, s in expected_delta_shapes(unet).items()}
    biases = {k.replace(".weight", ".bias"): 0.1 * torch.randn(params[k.replace(".weight", ".bias")].shape,
                                                                generator=g)
              for k in deltas if k.endswith("to_out.0.weight")}
    assert biases
    with_biases = {**deltas, **biases}
    inputs = unet_inputs(unet, 6)
    plain = unet(**inputs).sample

    def merged(scale: float, include_biases: bool = True):
        chosen = with_biases if include_biases else deltas
        with TransparencyPatch.from_state_dict({k: scale * v for k, v in chosen.items()}, unet).applied(unet):
            return unet(**inputs).sample

    full, half = merged(1.0), merged(0.5)
    assert (full - merged(1.0, include_biases=False)).abs().max() > 1e-3  # the bias deltas matter here
    patch = TransparencyPatch.from_state_dict(with_biases, unet)
    assert set(patch.bias_deltas()) == set(biases)
    state = LayeredAttentionState(["background", "foreground", "blended"], 2, (8, 8),
                                  transparency_scale=[0, 1, 0])
    with layered_attention(unet, state, transparency_factors(patch), patch.bias_deltas()):
        ours = unet(**inputs).sample
        state.set_transparency_scale([0, 0.5, 0])
        ours_half = unet(**inputs).sample
    torch.testing.assert_close(ours[[1, 4]], full[[1, 4]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_half[[1, 4]], half[[1, 4]], rtol=1e-4, atol=1e-4)
    for row in (0, 2, 3, 5):
        assert torch.equal(ours[row], plain[row]) and torch.equal(ours_half[row], plain[row])
