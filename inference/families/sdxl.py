"""SDXL: one batch row per item; the LayerDiffuse patch per sample and the inter-layer
attention come from our attention processors (`inference.layered_attention`)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..layered_attention import LayeredAttentionState, layered_attention, transparency_factors
from . import AttentionSetup, RowLayout, guidance_halves


class SDXLLayered:
    def row_layout(self, items: Sequence, *, composite=None, capture_self: Sequence[int] = ()) -> RowLayout:
        return RowLayout(len(items))

    def encode_prompts(self, pipe, prompts: list[str], negative: str, cfg: bool, device,
                       height: int, width: int) -> tuple[torch.Tensor, Optional[dict]]:
        n = len(prompts)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=[negative] * n if negative else None)
        context = torch.cat([neg, pos]) if cfg else pos
        text_embeds = torch.cat([neg_pooled, pooled]) if cfg else pooled
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=context.dtype)
        return context, {"text_embeds": text_embeds.to(device), "time_ids": time_ids.repeat(context.shape[0], 1)}

    def attention(self, loaded, unet, setup: AttentionSetup):
        state = LayeredAttentionState(setup.roles, setup.groups, setup.latent_size,
                                      inter_layer_strength=setup.inter_layer_strength,
                                      transparency_scale=setup.transparency_scale, attends=setup.attends,
                                      regions=setup.regions, composite=setup.composite, capture=setup.capture)
        patch = loaded.unet_patch
        return state, layered_attention(unet, state, transparency_factors(patch), patch.bias_deltas())

    def at_step(self, state, step: int, inter_layer_strength: float, inter_layer_end: int) -> None:
        state.set_inter_layer_strength(inter_layer_strength if step < inter_layer_end else 0.0)

    def chunk_units(self, state, rows_per_group: int, groups: int) -> list[list[int]]:
        """A guidance half while its items mix (inter-layer attention, the key/value
        composite); otherwise single rows, with the captured rows kept together (their maps
        are accumulated per attention call)."""
        if state.composite is not None or (state.inter_layer_strength > 0 and state.items > 1):
            return guidance_halves(rows_per_group, groups)
        capture = state.capture
        together = sorted(set(capture.cross_rows) | set(capture.self_items)) \
            if capture is not None and capture.enabled else []
        units = [[r] for r in range(rows_per_group * groups) if r not in together]
        return sorted(units + ([together] if together else []))
