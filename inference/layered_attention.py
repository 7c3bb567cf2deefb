"""Attention processors that let the items of one batched UNet call see each other (SDXL).

The batch is `(groups × items)` (guidance halves, unconditional first). Per job, one
`LayeredAttentionState` drives every `LayeredAttnProcessor`: per-sample transparency (the
LayerDiffuse patch as low-rank factors and bias deltas on the foreground rows), inter-layer
attention over the other items' pooled keys, layout regions, the LayerFusion key/value
composite, and attention-map capture for the self-masks. Design notes: docs/methods.md.
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
KEY_ALIGNMENT = 16  # inter-layer attention pads its key count to a multiple of this
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

    Capturing runs inside every attention call, so it is vectorized over the captured rows:
    one score product for all of them and a 0/1 token selector instead of per-item loops;
    sums are kept per token grid and resized only when read.
    """

    def __init__(self, cross_tokens: Mapping[int, Sequence[int]], self_items: Sequence[int] = (),
                 max_self_tokens: int = 1024):
        self.cross_tokens = {int(b): list(t) for b, t in cross_tokens.items()}
        self.self_items = [int(b) for b in self_items]
        self.max_self_tokens = max_self_tokens
        self.enabled = True
        self.cross_rows = sorted(self.cross_tokens)
        self._cross_index = {b: n for n, b in enumerate(self.cross_rows)}
        self._self_index = {b: n for n, b in enumerate(self.self_items)}
        self._selectors: dict = {}
        self.reset()

    def reset(self) -> None:
        self._cross: dict[tuple[int, int], torch.Tensor] = {}  # grid → [rows, h, w] sum
        self._cross_count = 0
        self._spread: dict[tuple[int, int], torch.Tensor] = {}
        self._spread_count = 0
        self._means: dict = {}  # (kind, size) → [rows, *size] mean, until the next add

    def selector(self, length: int, device, dtype) -> torch.Tensor:
        """[rows, 1, S, 1] 0/1 weights picking each captured row's own prompt tokens."""
        key = (length, device, dtype)
        if key not in self._selectors:
            sel = torch.zeros(len(self.cross_rows), 1, length, 1, dtype=dtype)
            for n, b in enumerate(self.cross_rows):
                tokens = [t for t in self.cross_tokens[b] if 0 <= t < length]
                sel[n, 0, tokens, 0] = 1.0
            self._selectors[key] = sel.to(device)
        return self._selectors[key]

    def add_cross(self, grid_maps: torch.Tensor) -> None:
        """Add one attention call's [cross rows, h, w] prompt-token mass."""
        grid = tuple(grid_maps.shape[1:])
        self._cross[grid] = grid_maps if grid not in self._cross else self._cross[grid] + grid_maps
        self._cross_count += 1
        self._means.clear()

    def add_spread(self, grid_maps: torch.Tensor) -> None:
        """Add one attention call's [self items, h, w] relative attention spread."""
        grid = tuple(grid_maps.shape[1:])
        self._spread[grid] = grid_maps if grid not in self._spread else self._spread[grid] + grid_maps
        self._spread_count += 1
        self._means.clear()

    def _mean(self, kind: str, row: Optional[int], size: tuple[int, int]) -> Optional[torch.Tensor]:
        sums, count = (self._cross, self._cross_count) if kind == "cross" else (self._spread, self._spread_count)
        if row is None or not sums:
            return None
        key = (kind, tuple(size))
        if key not in self._means:  # all rows at once: items are read one after another
            self._means[key] = sum(resize_map(m, *size) for m in sums.values()) / count
        return self._means[key][row]

    def cross_map(self, b: int, size: tuple[int, int]) -> Optional[torch.Tensor]:
        """Mean captured cross-attention mass of item b on a `size` grid (None if nothing captured)."""
        return self._mean("cross", self._cross_index.get(b), size)

    def spread_map(self, b: int, size: tuple[int, int]) -> Optional[torch.Tensor]:
        """Mean captured relative attention spread of item b on a `size` grid (None if nothing)."""
        return self._mean("spread", self._self_index.get(b), size)


def default_inter_layer_pool(items: int) -> int:
    """Pooling p (≥ 2) that keeps the other items' keys at most T/8 in total.

    (L−1)·T/p² ≤ T/8 ⇔ p ≥ √(8(L−1)): 3 for one foreground (L = 3), 6 for three (L = 5),
    9 for eight. Attention cost grows with the key count (and a bit more: the extra keys
    break the kernel's aligned blocks), so this budget keeps the joint self-attention
    within ~1.3× of plain attention on CPU.
    """
    return max(2, math.ceil(math.sqrt(8 * max(items - 1, 1))))


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
        # [L, L−1]: for each item, the other items of its group in order (built once: every
        # self-attention call of the job indexes with it).
        self.other_items = torch.tensor([[j for j in range(self.items) if j != i] for i in range(self.items)],
                                        dtype=torch.long).reshape(self.items, self.items - 1)
        self.regions = regions
        if regions is not None and regions.shape[0] != self.items:
            raise ValueError(f"regions needs one map per item ({self.items}), got {regions.shape[0]}")
        self.composite = composite
        self.capture = capture
        self._grid_cache: dict[int, tuple[int, int]] = {}
        self._tensor_cache: dict = {}
        self.full_batch = self.batch
        self.rows: tuple[int, ...] = tuple(range(self.full_batch))
        self.set_transparency_scale(transparency_scale)

    def set_inter_layer_strength(self, strength: float) -> None:
        """Change the strength between steps (0 = plain self-attention from now on)."""
        if not math.isfinite(strength) or strength < 0:
            raise ValueError(f"inter_layer_strength must be ≥ 0, got {strength}")
        if float(strength) != self.inter_layer_strength:
            self.inter_layer_strength = float(strength)
            self._tensor_cache.clear()

    def set_transparency_scale(self, scale: Optional[Sequence[float]]) -> None:
        """Per-item side-path scale; rows with scale 0 never touch the side path."""
        if scale is not None:
            scale = [float(s) for s in scale]
            if len(scale) != self.items:
                raise ValueError(f"transparency_scale needs {self.items} values, got {len(scale)}")
        self._item_scale = scale
        self._derive_rows()

    def select_rows(self, rows: Optional[Sequence[int]] = None) -> None:
        """Let the next UNet calls carry only these rows of the full (groups × items) batch,
        in this order (one chunk of a chunked step); None = every row.

        Inter-layer attention and the key/value composite need whole guidance halves in a
        chunk (they mix items of one half); the sampler's chunk plan keeps them whole.
        """
        rows = tuple(range(self.full_batch)) if rows is None else tuple(int(r) for r in rows)
        if not rows or any(not 0 <= r < self.full_batch for r in rows):
            raise ValueError(f"chunk rows must be in 0..{self.full_batch - 1}, got {rows}")
        if rows != self.rows:
            self.rows = rows
            self._derive_rows()

    def _derive_rows(self) -> None:
        """Per-row facts of the current rows: patched rows and their scale, whole halves."""
        rows, items = self.rows, self.items
        self.batch = len(rows)
        self.row_items = tuple(r % items for r in rows)
        starts = rows[::items]
        whole = len(rows) % items == 0 and all(
            s % items == 0 and rows[n * items:(n + 1) * items] == tuple(range(s, s + items))
            for n, s in enumerate(starts))
        self.chunk_groups = len(rows) // items if whole else None  # whole halves in this chunk
        self._local_cache: dict = {}
        scale = self._item_scale
        if scale is None:
            self.patched_rows = None
            self.patched_scale = None
            self.unit_scale = False
            self.row_patched = (False,) * self.batch
            return
        per_row = [scale[i] for i in self.row_items]
        patched = [b for b, s in enumerate(per_row) if s != 0.0]
        self.patched_rows = torch.tensor(patched, dtype=torch.long) if patched else None
        self.patched_scale = torch.tensor([per_row[b] for b in patched]) if patched else None
        self.unit_scale = all(per_row[b] == 1.0 for b in patched)
        self.row_patched = tuple(s != 0.0 for s in per_row)

    def local_rows(self, full_rows: Sequence[int], device) -> Optional[torch.Tensor]:
        """Positions of `full_rows` (full-batch indices) in the current chunk, as an index
        tensor; None when the chunk has none of them (a chunk holds all or none)."""
        key = (tuple(full_rows), device)
        if key not in self._local_cache:
            where = {r: n for n, r in enumerate(self.rows)}
            found = [where[r] for r in full_rows if r in where]
            if found and len(found) != len(full_rows):
                raise ValueError(f"rows {list(full_rows)} must be in one chunk, this one has {list(self.rows)}")
            self._local_cache[key] = torch.tensor(found, dtype=torch.long, device=device) if found else None
        return self._local_cache[key]

    def whole_groups(self, what: str) -> int:
        """Guidance halves in the current chunk; ValueError when `what` needs whole halves."""
        if self.chunk_groups is None:
            raise ValueError(f"{what} mixes the items of a guidance half: a chunk must hold whole halves, "
                             f"this one has rows {list(self.rows)}")
        return self.chunk_groups

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

    def pooling_matrix(self, tokens: int, device, dtype) -> Optional[torch.Tensor]:
        """[n, T]: row c averages the tokens of the c-th p×p cell of the token grid (cells at
        the right/bottom edge average the tokens they cover, like `avg_pool2d(ceil_mode=True)`);
        None for p = 1. One matmul pools keys and values of every item at once."""
        if self.inter_layer_pool == 1:
            return None
        key = ("pool", tokens, device, dtype)
        if key not in self._tensor_cache:
            h, w = self.grid(tokens)
            p = self.inter_layer_pool
            cols = math.ceil(w / p)
            cell = (torch.arange(h)[:, None] // p * cols + torch.arange(w)[None, :] // p).flatten()
            matrix = torch.zeros(math.ceil(h / p) * cols, tokens)
            matrix[cell, torch.arange(tokens)] = 1.0
            self._tensor_cache[key] = (matrix / matrix.sum(dim=1, keepdim=True)).to(device=device, dtype=dtype)
        return self._tensor_cache[key]

    def log_weights(self) -> torch.Tensor:
        """[L, L] log-weight of item j's keys for item i: 0 own, log(strength) others, −inf off."""
        s = self.inter_layer_strength
        other = math.log(s) if s > 0 else -math.inf
        w = torch.full((self.items, self.items), other, dtype=torch.float32)
        w[~self.attends] = -math.inf
        w.fill_diagonal_(0.0)
        return w

    def inter_layer_bias(self, tokens: int, pooled_tokens: int, device, dtype, padding: int = 0,
                         groups: Optional[int] = None) -> torch.Tensor:
        """Additive bias [G·L, 1, 1, T + (L−1)·T' + padding] for [own keys, other items' pooled
        keys, padding keys].

        A pooled key stands for T/T' tokens, so it gets log(T/T') on top of log(strength):
        another layer's region counts `strength` times an own region of the same size.
        Padding keys get −inf (they only align the key count for the attention kernel).
        `groups`: the guidance halves of the call (all of them unless a chunk holds fewer).
        """
        groups = self.groups if groups is None else groups
        key = (tokens, pooled_tokens, padding, device, dtype, groups)
        if key not in self._tensor_cache:
            w = self.log_weights() + math.log(tokens / pooled_tokens)
            rows = []
            for i in range(self.items):
                others = w[i, self.other_items[i]].repeat_interleave(pooled_tokens)
                rows.append(torch.cat([torch.zeros(tokens), others, torch.full((padding,), -math.inf)]))
            bias = torch.stack(rows).repeat(groups, 1)
            self._tensor_cache[key] = bias[:, None, None, :].to(device=device, dtype=dtype)
        return self._tensor_cache[key]


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
                 dense: Optional[dict[str, torch.Tensor]] = None,
                 bias_deltas: Optional[dict[str, torch.Tensor]] = None):
        self.name = name
        self.state = state
        self.factors = factors or {}
        # Transparency deltas of 1-D parameters (to_out.0 biases), added on the patched rows.
        self.bias_deltas = bias_deltas or {}
        # Merged W + up·down where that is cheaper than the side path (rank ≥ in·out/(in+out),
        # e.g. full-rank test patches); used for rows whose scale is exactly 1.
        self.dense = dense or {}
        self._row_weights: dict[tuple, torch.Tensor] = {}

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
                             f"({len(st.rows)} of the {st.groups} groups × {st.items} items)")
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
        """linear(x), plus scale_b · (up(down(x_b)) + Δbias) on the rows with a nonzero
        transparency scale."""
        st = self.state
        factors = self.factors.get(which)
        bias_delta = self.bias_deltas.get(which)
        if (factors is None and bias_delta is None) or st.patched_rows is None:
            return linear(x)
        if bias_delta is not None and (bias_delta.device != x.device or bias_delta.dtype != x.dtype):
            bias_delta = self.bias_deltas[which] = bias_delta.to(device=x.device, dtype=x.dtype)  # offload
        rows = st.patched_rows.to(x.device)
        dense = self.dense.get(which)
        if factors is not None and dense is not None and st.unit_scale and dense.device == x.device \
                and x.dtype == dense.dtype:
            # Each row through exactly one weight — W for unpatched rows, W + ΔW for patched
            # ones — in one batched product with a per-row weight (no row projected twice, no
            # gathering and scattering of rows).
            weights = self.row_weights(which, linear.weight, dense)
            if linear.bias is None:
                out = torch.bmm(x, weights)
            else:
                out = torch.baddbmm(linear.bias.view(1, 1, -1), x, weights)
            if bias_delta is None:
                return out
            return out.index_add_(0, rows, bias_delta.view(1, 1, -1).expand(len(rows), out.shape[1], -1))
        out = linear(x)
        picked = x.index_select(0, rows)
        if factors is None:
            side = bias_delta.view(1, 1, -1).expand(len(rows), out.shape[1], -1)
        else:
            up, down = factors
            if up.device != x.device or up.dtype != x.dtype:
                # Model CPU offload moves the UNet per call; follow it once and keep the copy.
                up, down = up.to(device=x.device, dtype=x.dtype), down.to(device=x.device, dtype=x.dtype)
                self.factors[which] = (up, down)
            side = F.linear(F.linear(picked, down), up, bias_delta)
        side = side * st.patched_scale.to(device=x.device, dtype=side.dtype).view(-1, 1, 1)
        return out.index_add_(0, rows, side.to(out.dtype))

    def row_weights(self, which: str, weight: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[B, in, out]: Wᵀ for unpatched rows, (W + ΔW)ᵀ for patched ones; built once per layout."""
        st = self.state
        key = (which, st.row_patched, weight.data_ptr(), dense.data_ptr(), weight.device)
        if key not in self._row_weights:  # one entry per row pattern (chunks alternate patterns)
            if len(self._row_weights) >= 4 * len(PROJECTIONS):
                self._row_weights.clear()
            per_row = [dense.t() if patched else weight.t() for patched in st.row_patched]
            self._row_weights[key] = torch.stack(per_row).contiguous()
        return self._row_weights[key]

    def inter_layer_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int
                              ) -> torch.Tensor:
        """Each item attends to its own keys and the other items' (pooled) keys, log-weighted."""
        st = self.state
        groups, items = st.whole_groups("inter-layer attention"), st.items
        batch, heads, _, head_dim = k.shape
        others = st.other_items.to(k.device)
        pool = st.pooling_matrix(tokens, k.device, k.dtype)  # [n, T], None when not pooling
        n = tokens if pool is None else pool.shape[0]
        extra = (items - 1) * n
        # Zero keys (bias −inf) up to a multiple of KEY_ALIGNMENT: attention kernels are much
        # slower on odd key counts (on CPU 292 keys cost 20 % more than 304).
        padding = -(tokens + extra) % KEY_ALIGNMENT
        # Keys and values side by side in one buffer: [own tokens | other items' pooled | pad].
        kv = k.new_empty(2, batch, heads, tokens + extra + padding, head_dim)
        kv[0, :, :, :tokens] = k
        kv[1, :, :, :tokens] = v
        own = kv[:, :, :, :tokens]
        small = own if pool is None else torch.matmul(pool, own)  # [2, B, H, n, d]
        small = small.reshape(2, groups, items, heads, n, head_dim)[:, :, others]  # [2, G, L, L−1, H, n, d]
        kv[:, :, :, tokens:tokens + extra] = small.permute(0, 1, 2, 4, 3, 5, 6).reshape(
            2, batch, heads, extra, head_dim)
        if padding:
            kv[:, :, :, tokens + extra:] = 0
        bias = st.inter_layer_bias(tokens, n, q.device, q.dtype, padding, groups)
        return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias, dropout_p=0.0, is_causal=False)

    def composite_attention(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            tokens: int) -> torch.Tensor:
        """Target rows attend to [own keys, m·K_inside + (1−m)·K_outside] instead."""
        st = self.state
        comp = st.composite
        h, w = st.grid(tokens)
        m = resize_map(comp.mask.float(), h, w).reshape(1, 1, tokens, 1).to(device=k.device, dtype=k.dtype)
        st.whole_groups("the key/value composite")
        rows = lambda item: st.local_rows([r for r in st.rows if r % st.items == item], k.device)  # noqa: E731
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
        return gate[list(st.row_items)][:, :, None].to(device=device, dtype=dtype)

    @torch.no_grad()
    def capture(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, tokens: int, is_self: bool) -> None:
        st = self.state
        cap = st.capture
        h, w = st.grid(tokens)
        scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
        if not is_self:
            if not cap.cross_rows:
                return
            rows = st.local_rows(cap.cross_rows, q.device)
            if rows is None:
                return
            qr, kr = q.index_select(0, rows).float(), k.index_select(0, rows).float()
            probs = torch.softmax(torch.matmul(qr, kr.transpose(-1, -2)) * scale, dim=-1)  # [R, H, T, S]
            mass = torch.matmul(probs, cap.selector(kr.shape[2], q.device, probs.dtype))  # [R, H, T, 1]
            cap.add_cross(mass.mean(dim=1).reshape(len(cap.cross_rows), h, w))
        elif cap.self_items and tokens <= cap.max_self_tokens:
            rows = st.local_rows(cap.self_items, q.device)
            if rows is None:
                return
            qr, kr = q.index_select(0, rows).float(), k.index_select(0, rows).float()
            probs = torch.softmax(torch.matmul(qr, kr.transpose(-1, -2)) * scale, dim=-1).mean(dim=1)
            spread = (1.0 / (probs * probs).sum(dim=-1).clamp(min=1e-12)) / tokens  # [R, T]
            cap.add_spread(spread.reshape(len(cap.self_items), h, w))


# ------------------------------------------------------------------ installing
def module_factors(factors: Optional[Mapping[str, object]], module: str, kind: str = "weight") -> Optional[dict]:
    """One attention module's entries, by projection, from parameter-named patch data:
    `TransparencyPatch.low_rank()` factors (`kind` "weight") or `bias_deltas()` ("bias")."""
    if not factors:
        return None
    found = {p: factors[f"{module}.{p}.{kind}"] for p in PROJECTIONS if f"{module}.{p}.{kind}" in factors}
    return found or None


@contextlib.contextmanager
def layered_attention(unet: nn.Module, state: LayeredAttentionState,
                      factors: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] = None,
                      bias_deltas: Optional[Mapping[str, torch.Tensor]] = None,
                      ) -> Iterator[dict[str, LayeredAttnProcessor]]:
    """Install a `LayeredAttnProcessor` on every attention module for the `with` body.

    `factors` and `bias_deltas` are the transparency patch's per-sample form
    (`transparency_factors(patch)`, `patch.bias_deltas()`), keyed by UNet parameter name.

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
        processors[key] = LayeredAttnProcessor(module, state, found, dense_weights(attn, found),
                                               module_factors(bias_deltas, module, "bias"))
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
