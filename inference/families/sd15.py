"""SD 1.5 with `layer_sd15_joint`: the attention-sharing adapter's processors are both the
transparency (per-frame LoRA) and the inter-layer attention (cross-frame attention); rows
are (foreground, background, blended) frame triples. Masks come from the latent alpha
proxy and boxes only (our attention processors, and so attention capture, are not used)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import InvalidRequest
from ..layered_attention import LayeredAttentionState
from . import AttentionSetup, RowLayout


def sd15_joint_rows(items: Sequence, composite=None, capture_self: Sequence[int] = ()) -> list[int]:
    """Item index per batch row for `layer_sd15_joint` (frames foreground, background,
    blended): one frame triple per foreground, (fg_k, bg, blended), so N = 1 is the native
    layout. For N > 1 the background and blended items appear in N triples; their noise
    predictions are averaged over the copies, so each copy has seen a different foreground
    through the cross-frame attention and the blend sees them all.
    """
    roles = [it.role for it in items]
    fgs = [i for i, r in enumerate(roles) if r == "foreground"]
    if roles.count("background") != 1 or roles.count("blended") != 1 or not fgs:
        raise InvalidRequest("layers", "SD 1.5 joint generation needs one background, one blended item and "
                                       "at least one foreground layer")
    # Kept (pinned) layers need nothing special: their latents are reset before every step and
    # their predictions unused, so through the cross-frame attention they only give context.
    if composite is not None or capture_self:
        raise InvalidRequest("method", "with SD 1.5 the harmonized method is not available (it needs "
                                       "SDXL's attention-level blending); use joint")
    bg, blend = roles.index("background"), roles.index("blended")
    return [i for fg in fgs for i in (fg, bg, blend)]


class SD15Layered:
    def row_layout(self, items: Sequence, *, composite=None, capture_self: Sequence[int] = ()) -> RowLayout:
        return RowLayout(len(items), sd15_joint_rows(items, composite, capture_self))

    def encode_prompts(self, pipe, prompts: list[str], negative: str, cfg: bool, device,
                       height: int, width: int) -> tuple[torch.Tensor, Optional[dict]]:
        pos, neg = pipe.encode_prompt(prompts, device, 1, cfg, [negative] * len(prompts) if negative else None)
        return (torch.cat([neg, pos]) if cfg else pos), None

    def attention(self, loaded, unet, setup: AttentionSetup):
        state = LayeredAttentionState(setup.roles, setup.groups, setup.latent_size)
        return state, loaded.attention_sharing("joint").installed(unet)

    def at_step(self, state, step: int, inter_layer_strength: float, inter_layer_end: int) -> None:
        pass  # the cross-frame attention has no strength to schedule

    def chunk_units(self, state, rows_per_group: int, groups: int) -> list[list[int]]:
        """One frame triple (foreground, background, blended): frames attend only inside it."""
        return [list(range(start, start + 3)) for start in range(0, rows_per_group * groups, 3)]
