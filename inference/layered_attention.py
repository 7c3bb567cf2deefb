"""Attention processors that let the items of one batched UNet call see each other.

A layered job runs every layer as one batch item of a single UNet call. The batch is
arranged `(groups × items)`: `groups` is 2 with classifier-free guidance (unconditional
half first, like diffusers) and 1 without; inside a group the items follow `roles`
(e.g. background, foreground 1..N, blended). `LayeredAttnProcessor`, installed on every
attention module of the UNet by `layered_attention(...)`, adds per job:

- **per-sample transparency**: the LayerDiffuse SDXL patch as a low-rank side path
  `W·x + scale_b · up·(down·x)` on q/k/v/out, with a per-item scale (1 for foregrounds, 0
  for background/blended). The base product runs on the whole batch exactly like the plain
  processor and the side path is added only to rows with a nonzero scale, so unpatched
  items are bit-identical to a run without the patch;
- **inter-layer attention** (self attention only): each item's queries attend to its own
  keys and to the keys/values of the other items of its group, average-pooled p×p on the
  token grid (`inter_layer_pool`, by default the smallest p ≥ 2 with (L−1)/p² ≤ 1/2, so
  the joint attention costs at most ~1.5× plain attention instead of L times), with a log-bias
  `log(strength) + log(p²)` on their logits: another layer's region counts `strength`
  times as much as an own region of the same size with the same score. At
  strength 0 the processor runs plain attention (the joint path is skipped, not merely
  down-weighted, so the result is exactly the plain one); `attends[i, j]` restricts who
  sees whom (pinned/kept items of an edit attend only to themselves);
- **layout regions** (cross attention): an item's text-attention output is multiplied by
  its region mask (a layout box), so outside the box the layer gets no content from its
  prompt (attention masking; the joint method adds latent masking on top);
- **key/value composite** (LayerFusion-style, self attention): a target item (blended)
  additionally attends to keys/values `m ⊙ K_inside + (1 − m) ⊙ K_outside` — a foreground's
  inside a soft mask, the background's outside;
- **attention-map capture** for self-mask estimation: cross-attention mass on a layer's
  own prompt tokens and self-attention spread (see `inference.masks`), accumulated on the
  latent grid.

Everything per job lives in one `LayeredAttentionState`; processors hold only their module
name and their low-rank factors, so installing/removing is cheap and restores exactly.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidRequest
from .masks import resize_map

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ROLES = ("background", "foreground", "blended")

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------ job state
@dataclass
class KVComposite:
    """Target item (index in the group) also attends to m·K[inside] + (1−m)·K[outside]."""

    target: int
    inside: int
    outside: int
    mask: torch.Tensor  # [h, w] soft mask on the latent grid, 1 = take the inside item


class AttentionCapture:
    """Accumulates attention maps of chosen batch items (read back resized to any grid).

    `cross_tokens[b]` are the prompt-token positions whose attention mass is summed for batch
    item b; `self_items` are batch items whose self-attention spread `1/Σ P²` (divided by
    the key count, so resolutions are comparable) is recorded for modules with at most
    `max_self_tokens` tokens (the full T×T map is materialized there).
    """

    def __init__(self, cross_tokens: Mapping[int, Sequence[int]], self_items: Sequence[int] = (),
                 max_self_tokens: int = 1024):
        self.cross_tokens = {int(b): list(t) for b, t in cross_tokens.items()}
        self.self_items = [int(b) for b in self_items]
        self.max_self_tokens = max_self_tokens
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        # Sums are kept per item and per token grid (h, w) and resized to the latent grid only
        # when read, so capturing costs no interpolation per attention call.
        self._cross: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        self._cross_count: dict[int, int] = {}
        self._spread: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        self._spread_count: dict[int, int] = {}

    @staticmethod
    def _add(sums: dict, counts: dict, b: int, grid_map: torch.Tensor) -> None:
        per_grid = sums.setdefault(b, {})
        grid = tuple(grid_map.shape)
        per_grid[grid] = grid_map if grid not in per_grid else per_grid[grid] + grid_map
        counts[b] = counts.get(b, 0) + 1

    @staticmethod
    def _mean(sums: dict, counts: dict, b: int, size: tuple[int, int]) -> Optional[torch.Tensor]:
        if b not in sums:
            return None
        total = sum(resize_map(m[None], *size)[0] for m in sums[b].values())
        return total / counts[b]

    def add_cross(self, b: int, grid_map: torch.Tensor) -> None:
        self._add(self._cross, self._cross_count, b, grid_map)

    def add_spread(self, b: int, grid_map: torch.Tensor) -> None:
        self._add(self._spread, self._spread_count, b, grid_map)

    def cross_map(self, b: int, size: tuple[int, int]) -> Optional[torch.Tensor]:
        """Mean captured cross-attention mass of item b on a `size` grid (None if nothing captured)."""
        return self._mean(self._cross, self._cross_count, b, size)

    def spread_map(self, b: int, size: tuple[int, int]) -> Optional[torch.Tensor]:
        """Mean captured relative attention spread of item b on a `size` grid (None if nothing)."""
        return self._mean(self._spread, self._spread_count, b, size)


def default_inter_layer_pool(items: int) -> int:
    """Pooling p (≥ 2) that keeps the other items' keys at most about T/2 in total.

    (L−1)·T/p² ≤ T/2 ⇔ p ≥ √(2(L−1)): 2 for one foreground (L = 3), 3 for three (L = 5),
    5 for eight; the joint attention then costs at most ~1.5× plain attention.
    """
    return max(2, math.ceil(math.sqrt(2 * max(items - 1, 1))))


class LayeredAttentionState:
    """Everything the processors need for one job: batch layout and the job's options.

    `roles`: role per item of a group; `groups`: 2 with CFG else 1; `latent_size`: (h, w)
    of the UNet input. `transparency_scale`: per item (len(roles)); `attends`: [L, L] bool,
    may item i see item j (diagonal forced on); `regions`: [L, h, w] cross-attention gates.
    """

    def __init__(self, roles: Sequence[str], groups: int, latent_size: tuple[int, int], *,
                 inter_layer_strength: float = 0.0,
                 inter_layer_pool: Optional[int] = None,
                 transparency_scale: Optional[Sequence[float]] = None,
                 attends: Optional[torch.Tensor] = None,
                 regions: Optional[torch.Tensor] = None,
                 composite: Optional[KVComposite] = None,
                 capture: Optional[AttentionCapture] = None):
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown roles {unknown}; use {ROLES}")
        if groups not in (1, 2):
            raise ValueError(f"groups must be 1 or 2, got {groups}")
        if not math.isfinite(inter_layer_strength) or inter_layer_strength < 0:
            raise ValueError(f"inter_layer_strength must be ≥ 0, got {inter_layer_strength}")
        self.roles = tuple(roles)
        self.items = len(self.roles)
        self.groups = groups
        self.batch = self.items * groups
        self.latent_size = tuple(latent_size)
        self.inter_layer_strength = float(inter_layer_strength)
        if inter_layer_pool is None:
            inter_layer_pool = default_inter_layer_pool(self.items)
        if not isinstance(inter_layer_pool, int) or inter_layer_pool < 1:
            raise ValueError(f"inter_layer_pool must be a positive integer, got {inter_layer_pool!r}")
        self.inter_layer_pool = inter_layer_pool
        if attends is None:
            attends = torch.ones(self.items, self.items, dtype=torch.bool)
        attends = attends.clone().bool()
        if attends.shape != (self.items, self.items):
            raise ValueError(f"attends must be [{self.items}, {self.items}], got {tuple(attends.shape)}")
        attends.fill_diagonal_(True)
        self.attends = attends
        self.regions = regions
        if regions is not None and regions.shape[0] != self.items:
            raise ValueError(f"regions needs one map per item ({self.items}), got {regions.shape[0]}")
        self.composite = composite
        self.capture = capture
        self.set_transparency_scale(transparency_scale)
        self._grid_cache: dict[int, tuple[int, int]] = {}
        self._bias_cache: dict = {}

    def set_transparency_scale(self, scale: Optional[Sequence[float]]) -> None:
        """Per-item side-path scale; rows with scale 0 never touch the side path."""
        if scale is None:
            self.patched_rows = None
            self.patched_scale = None
            self.unit_scale = False
            return
        scale = [float(s) for s in scale]
        if len(scale) != self.items:
            raise ValueError(f"transparency_scale needs {self.items} values, got {len(scale)}")
        per_row = scale * self.groups
        rows = [b for b, s in enumerate(per_row) if s != 0.0]
        self.patched_rows = torch.tensor(rows, dtype=torch.long) if rows else None
        self.unpatched_rows = torch.tensor([b for b, s in enumerate(per_row) if s == 0.0], dtype=torch.long)
        self.patched_scale = torch.tensor([per_row[b] for b in rows]) if rows else None
        self.unit_scale = all(per_row[b] == 1.0 for b in rows)

    def grid(self, tokens: int) -> tuple[int, int]:
        """(h, w) of a token sequence at one UNet resolution (each level halves, rounding up)."""
        if tokens not in self._grid_cache:
            h, w = self.latent_size
            for _ in range(8):
                if h * w == tokens:
                    self._grid_cache[tokens] = (h, w)
                    break
                h, w = (h + 1) // 2, (w + 1) // 2
            else:
                raise ValueError(f"{tokens} tokens match no resolution of a {self.latent_size} latent")
        return self._grid_cache[tokens]

    def log_weights(self) -> torch.Tensor:
        """[L, L] log-weight of item j's keys for item i: 0 own, log(strength) others, −inf off."""
        s = self.inter_layer_strength
        other = math.log(s) if s > 0 else -math.inf
        w = torch.full((self.items, self.items), other, dtype=torch.float32)
        w[~self.attends] = -math.inf
        w.fill_diagonal_(0.0)
        return w

    @property
    def other_items(self) -> torch.Tensor:
        """[L, L−1]: for each item, the other items of its group in order."""
        return torch.tensor([[j for j in range(self.items) if j != i] for i in range(self.items)],
                            dtype=torch.long).reshape(self.items, self.items - 1)

    def inter_layer_bias(self, tokens: int, pooled_tokens: int, device, dtype) -> torch.Tensor:
        """Additive bias [G·L, 1, 1, T + (L−1)·T'] for [own keys, other items' pooled keys].

        A pooled key stands for T/T' tokens, so it gets log(T/T') on top of log(strength):
        another layer's region counts `strength` times an own region of the same size.
        """
        key = (tokens, pooled_tokens, device, dtype)
        if key not in self._bias_cache:
            w = self.log_weights() + math.log(tokens / pooled_tokens)
            rows = []
            for i in range(self.items):
                others = w[i, self.other_items[i]].repeat_interleave(pooled_tokens)
                rows.append(torch.cat([torch.zeros(tokens), others]))
            bias = torch.stack(rows).repeat(self.groups, 1)
            self._bias_cache[key] = bias[:, None, None, :].to(device=device, dtype=dtype)
        return self._bias_cache[key]


# ------------------------------------------------------------------ the processor
def check_plain_attention(attn: nn.Module, name: str) -> None:
    """Refuse attention variants our processor does not reproduce (SDXL/SD1.5 use none)."""
    unsupported = [feature for feature, present in (
        ("group_norm", getattr(attn, "group_norm", None) is not None),
        ("spatial_norm", getattr(attn, "spatial_norm", None) is not None),
        ("norm_cross", bool(getattr(attn, "norm_cross", False))),
        ("norm_q/norm_k", getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None),
        ("added kv projections", getattr(attn, "add_k_proj", None) is not None),
        ("residual_connection", bool(getattr(attn, "residual_connection", False))),
        ("rescale_output_factor", getattr(attn, "rescale_output_factor", 1.0) != 1.0),
    ) if present]
    if unsupported:
        raise InvalidRequest("model", f"{name}: layered attention supports plain transformer attention only; "
                                      f"this one uses {', '.join(unsupported)}")


class LayeredAttnProcessor:
    """Per-module processor; all job behaviour comes from the shared `LayeredAttentionState`."""

    def __init__(self, name: str, state: LayeredAttentionState, factors: Optional[Factors] = None,
                 dense: Optional[dict[str, torch.Tensor]] = None):
        self.name = name
        self.state = state
        self.factors = factors or {}
        # Merged W + up·down where that is cheaper than the side path (rank ≥ in·out/(in+out),
        # e.g. full-rank test patches); used for rows whose scale is exactly 1.
        self.dense = dense or {}

    # Declared as __call__ with named parameters only: Attention.forward passes just these.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        st = self.state
        if hidden_states.ndim != 3:
            raise ValueError(f"{self.name}: expected hidden states [batch, tokens, channels], "
                             f"got {tuple(hidden_states.shape)}")
        batch, tokens, _ = hidden_states.shape
        if batch != st.batch:
            raise ValueError(f"{self.name}: batch {batch} does not match the layered layout "
                             f"({st.groups} groups × {st.items} items = {st.batch})")
        is_self = encoder_hidden_states is None
        context = hidden_states if is_self else encoder_hidden_states

        query = self.project(attn.to_q, "to_q", hidden_states)
        key = self.project(attn.to_k, "to_k", context)
        value = self.project(attn.to_v, "to_v", context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, heads, head_dim).transpose(1, 2)

        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])

        if is_self and mask is None and st.inter_layer_strength > 0 and st.items > 1:
            out = self.inter_layer_attention(q, k, v, tokens)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        if is_self and st.composite is not None:
            out = self.composite_attention(out, q, k, v, tokens)
        if st.capture is not None and st.capture.enabled:
            self.capture(attn, q, k, tokens, is_self)

        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(q.dtype)
        out = self.project(attn.to_out[0], "to_out.0", out)
        out = attn.to_out[1](out)
        if not is_self and st.regions is not None:
            out = out * self.region_gate(tokens, out.dtype, out.device)
        return out

    # -- parts ---------------------------------------------------------------------------
    def project(self, linear: nn.Module, which: str, x: torch.Tensor) -> torch.Tensor:
        """linear(x), plus scale_b · up(down(x_b)) on the rows with a nonzero transparency scale."""
        st = self.state
        factors = self.factors.get(which)
        if factors is None or st.patched_rows is None:
            return linear(x)
        rows = st.patched_rows.to(x.device)
        dense = self.dense.get(which)
        if dense is not None and st.unit_scale and dense.device == x.device:
            # Each row through exactly one weight: W for unpatched rows, W + ΔW for patched ones
            # (no row is projected twice).
            patched = F.linear(x.index_select(0, rows), dense, linear.bias)
            keep = st.unpatched_rows.to(x.device)
            out = patched.new_empty((x.shape[0], *patched.shape[1:]))
            if keep.numel():
                out.index_copy_(0, keep, linear(x.index_select(0, keep)).to(out.dtype))
            return out.index_copy_(0, rows, patched)
        out = linear(x)
        up, down = factors
        if up.device != x.device or up.dtype != x.dtype:
            # Model CPU offload moves the UNet per call; follow it once and keep the copy.
            up, down = up.to(device=x.device, dtype=x.dtype), down.to(device=x.device, dtype=x.dtype)
            self.factors[which] = (up, down)
        side = F.linear(F.linear(x.index_select(0, rows), down), up)
        side = side * st.patched_scale.to(device=x.device, dtype=side.dtype).view(-1, 1, 1)
        return out.index_add_(0, rows, side.to(out.dtype))

    def inter_layer_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int
                              ) -> torch.Tensor:
        """Each item attends to its own keys and the other items' (pooled) keys, log-weighted."""
        st = self.state
        groups, items = st.groups, st.items
        batch, heads, _, head_dim = k.shape
        h, w = st.grid(tokens)
        pool = st.inter_layer_pool

        def pooled(x: torch.Tensor) -> torch.Tensor:
            if pool == 1:
                return x
            grid = x.transpose(2, 3).reshape(batch, heads * head_dim, h, w)
            grid = F.avg_pool2d(grid, pool, ceil_mode=True)
            return grid.reshape(batch, heads, head_dim, -1).transpose(2, 3)

        others = st.other_items.to(k.device)

        def context(own: torch.Tensor) -> torch.Tensor:
            small = pooled(own)
            n = small.shape[2]
            small = small.reshape(groups, items, heads, n, head_dim)[:, others]  # [G, L, L−1, H, n, d]
            small = small.permute(0, 1, 3, 2, 4, 5).reshape(batch, heads, (items - 1) * n, head_dim)
            return torch.cat([own, small], dim=2)

        keys, values = context(k), context(v)
        bias = st.inter_layer_bias(tokens, (keys.shape[2] - tokens) // (items - 1), q.device, q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, dropout_p=0.0, is_causal=False)

    def composite_attention(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            tokens: int) -> torch.Tensor:
        """Target rows attend to [own keys, m·K_inside + (1−m)·K_outside] instead."""
        st = self.state
        comp = st.composite
        h, w = st.grid(tokens)
        m = resize_map(comp.mask.float(), h, w).reshape(1, 1, tokens, 1).to(device=k.device, dtype=k.dtype)
        rows = lambda item: torch.tensor([g * st.items + item for g in range(st.groups)],  # noqa: E731
                                         device=k.device)
        target, inside, outside = rows(comp.target), rows(comp.inside), rows(comp.outside)
        mixed_k = m * k[inside] + (1 - m) * k[outside]
        mixed_v = m * v[inside] + (1 - m) * v[outside]
        keys = torch.cat([k[target], mixed_k], dim=2)
        values = torch.cat([v[target], mixed_v], dim=2)
        replaced = F.scaled_dot_product_attention(q[target], keys, values, dropout_p=0.0, is_causal=False)
        return out.index_copy_(0, target, replaced.to(out.dtype))

    def region_gate(self, tokens: int, dtype, device) -> torch.Tensor:
        """[B, T, 1] region mask of each row at this resolution."""
        st = self.state
        h, w = st.grid(tokens)
        gate = resize_map(st.regions.float(), h, w).reshape(st.items, tokens)
        return gate.repeat(st.groups, 1)[:, :, None].to(device=device, dtype=dtype)

    @torch.no_grad()
    def capture(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, tokens: int, is_self: bool) -> None:
        st = self.state
        cap = st.capture
        h, w = st.grid(tokens)
        scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
        if not is_self:
            if not cap.cross_tokens:
                return
            rows = list(cap.cross_tokens)
            probs = torch.softmax((q[rows].float() @ k[rows].float().transpose(-1, -2)) * scale, dim=-1)
            heard = probs.mean(dim=1)  # [rows, T, S]
            for n, b in enumerate(rows):
                cap.add_cross(b, heard[n][:, cap.cross_tokens[b]].sum(dim=-1).reshape(h, w))
        elif tokens <= cap.max_self_tokens:
            for b in cap.self_items:
                probs = torch.softmax((q[b].float() @ k[b].float().transpose(-1, -2)) * scale, dim=-1)
                rows = probs.mean(dim=0)
                spread = (1.0 / (rows * rows).sum(dim=-1).clamp(min=1e-12)) / tokens
                cap.add_spread(b, spread.reshape(h, w))


# ------------------------------------------------------------------ installing
def module_factors(factors: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]], module: str
                   ) -> Optional[Factors]:
    """The q/k/v/out factors of one attention module from `TransparencyPatch.low_rank()` names."""
    if not factors:
        return None
    found = {p: factors[f"{module}.{p}.weight"] for p in PROJECTIONS if f"{module}.{p}.weight" in factors}
    return found or None


@contextlib.contextmanager
def layered_attention(unet: nn.Module, state: LayeredAttentionState,
                      factors: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] = None
                      ) -> Iterator[dict[str, LayeredAttnProcessor]]:
    """Install a `LayeredAttnProcessor` on every attention module for the `with` body.

    The UNet's previous processors (whatever they were) are put back afterwards, also when
    the body raises or is cancelled. Install after anything that resets processors.
    """
    originals = dict(unet.attn_processors)
    modules = dict(unet.named_modules())
    processors: dict[str, LayeredAttnProcessor] = {}
    for key in originals:
        module = key[: -len(".processor")]
        attn = modules[module]
        check_plain_attention(attn, module)
        found = module_factors(factors, module)
        processors[key] = LayeredAttnProcessor(module, state, found, dense_weights(attn, found))
    unet.set_attn_processor(dict(processors))
    try:
        yield processors
    finally:
        unet.set_attn_processor(dict(originals))


_FACTOR_CACHE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
# id(up factor) → (weak reference to that factor, merged weight); tensors compare by value,
# so they cannot be WeakKeyDictionary keys.
_DENSE_CACHE: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _projection(attn: nn.Module, which: str) -> nn.Module:
    return attn.to_out[0] if which == "to_out.0" else getattr(attn, which)


def dense_weights(attn: nn.Module, factors: Optional[Factors]) -> dict[str, torch.Tensor]:
    """W + up·down for the projections where a dense product is cheaper than the side path.

    Side path per row costs r·(in + out) multiply-adds, the dense product in·out; for the
    published SDXL patch (r = 256, widths 640–2048) the side path always wins and nothing
    is built here; rank-saturated (test) patches get merged weights, cached per factor.
    """
    dense: dict[str, torch.Tensor] = {}
    for which, (up, down) in (factors or {}).items():
        weight = _projection(attn, which).weight
        out_f, in_f = weight.shape
        if up.shape[1] * (in_f + out_f) < in_f * out_f:
            continue
        entry = _DENSE_CACHE.get(id(up))
        if entry is not None and entry[0]() is up and entry[1].shape == weight.shape:
            merged = entry[1]
        else:
            with torch.no_grad():
                merged = (weight.float() + up.float() @ down.float()).to(weight.dtype)
            for key in [k for k, (ref, _) in _DENSE_CACHE.items() if ref() is None]:
                del _DENSE_CACHE[key]
            _DENSE_CACHE[id(up)] = (weakref.ref(up), merged)
        dense[which] = merged
    return dense


def transparency_factors(patch, rank: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`patch.low_rank(rank)`, computed once per loaded patch (SVDs are not free on SDXL).

    Memory: for SDXL about 1 GB extra in fp16 beside the patch itself.
    """
    per_patch = _FACTOR_CACHE.setdefault(patch, {})
    if rank not in per_patch:
        per_patch[rank] = patch.low_rank(rank=rank)
    return per_patch[rank]
