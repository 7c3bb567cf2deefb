"""LayerDiffuse attention sharing for SD 1.5, as diffusers attention processors.

The `layer_sd15_*` files (LayerDiffusion/layerdiffusion-v1) replace each of the 32
attention modules of the SD 1.5 UNet with a unit that treats consecutive batch items as
the *frames* of one sample (foreground / background / blended for the joint model):

1. per frame f, attention whose q/k/v/out weights get a frame-specific rank-256 LoRA
   (W + up·down, no alpha; applied here as W·x + up·(down·x), the same value); keys and
   values come from the frame's own text context (cross attention) or the frame's own
   hidden states (self attention);
2. a cross-frame attention at every pixel: LayerNorm → temporal_i → q/k/v over the f
   frames (same head count) → temporal_o, added as a residual.

The unit returns (hidden after 1 and 2) − (its input), because the surrounding transformer
block adds the residual itself. Here that difference is computed as the sum of the
residual branches (control + attention + cross-frame), which is the same value without the
cancellation error of subtracting a large input.

fg2bg/bg2fg additionally add, before step 1, a per-frame projection (`control_convs`) of
features of a condition image (`kwargs_encoder`, pixel space). Here the features are
computed once with `AttentionSharingAdapter.encode_control(image)` and handed to the
processors through `cross_attention_kwargs={"attention_sharing_control": features}`, so no
processor holds per-job state.

Batch layout: `(samples × frames)` with frames consecutive; with classifier-free guidance
each half (uncond, cond) must itself be arranged that way. Per-frame prompts are simply the
per-item `encoder_hidden_states`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MissingWeights
from .weights import check_state_dict, load_safetensors, refuse_pickle, safetensors_shapes

#: Published SD 1.5 attention-sharing files: name → (frames, uses control).
LAYER_SD15_FILES: dict[str, tuple[int, bool]] = {
    "layer_sd15_transparent_attn": (1, False),
    "layer_sd15_joint": (3, False),  # frames: foreground, background, blended
    "layer_sd15_fg2bg": (2, True),  # control = foreground; frames: background, blended
    "layer_sd15_bg2fg": (2, True),  # control = background; frames: foreground, blended
}

#: Channels of the condition-image features that `control_convs` take.
CONTROL_CHANNELS = 256

#: The cross_attention_kwargs key carrying `encode_control` features to the processors.
CONTROL_KWARG = "attention_sharing_control"


class FrameLoRA(nn.Module):
    """A rank-r weight update `up @ down` for one linear layer of one frame (no alpha)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update's contribution x·(up·down)ᵀ, to add to the base layer's output."""
        return self.up(self.down(x))


def _multihead_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, [n, L, c] in and out, c split into `heads` heads."""
    n, q_len, channels = query.shape
    head_dim = channels // heads
    q = query.reshape(n, q_len, heads, head_dim).transpose(1, 2)
    k = key.reshape(n, key.shape[1], heads, head_dim).transpose(1, 2)
    v = value.reshape(n, value.shape[1], heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(n, q_len, channels)


class AttentionSharingProcessor(nn.Module):
    """Attention processor with per-frame LoRA attention plus cross-frame attention.

    Holds the weights of one `hookers.layers.N` unit. `hidden_size` is the attention's
    query and inner width, `cross_attention_dim` the text-context width (None for self
    attention). The head count is the attention module's own.
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int | None = None,
        frames: int = 1,
        rank: int = 256,
        use_control: bool = False,
    ):
        super().__init__()
        if frames < 1:
            raise ValueError(f"frames must be ≥ 1, got {frames}")
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.frames = frames
        self.rank = rank
        self.use_control = use_control
        kv_in = cross_attention_dim if cross_attention_dim is not None else hidden_size

        def loras(in_features: int) -> nn.ModuleList:
            return nn.ModuleList(FrameLoRA(in_features, hidden_size, rank) for _ in range(frames))

        self.to_q_lora = loras(hidden_size)
        self.to_k_lora = loras(kv_in)
        self.to_v_lora = loras(kv_in)
        self.to_out_lora = loras(hidden_size)

        self.temporal_n = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=True)
        self.temporal_i = nn.Linear(hidden_size, hidden_size)
        self.temporal_q = nn.Linear(hidden_size, hidden_size)
        self.temporal_k = nn.Linear(hidden_size, hidden_size)
        self.temporal_v = nn.Linear(hidden_size, hidden_size)
        self.temporal_o = nn.Linear(hidden_size, hidden_size)

        self.control_convs: nn.ModuleList | None = None
        if use_control:
            self.control_convs = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(CONTROL_CHANNELS, CONTROL_CHANNELS, kernel_size=3, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(CONTROL_CHANNELS, hidden_size, kernel_size=1),
                )
                for _ in range(frames)
            )

    def check_compatible(self, attn: nn.Module, name: str = "attention") -> None:
        """Raise ValueError unless `attn` is a plain attention of the widths we were built for."""
        q_w, k_w, out_w = attn.to_q.weight, attn.to_k.weight, attn.to_out[0].weight
        kv_in = self.cross_attention_dim if self.cross_attention_dim is not None else self.hidden_size
        want = {"to_q": (self.hidden_size, self.hidden_size), "to_k": (self.hidden_size, kv_in),
                "to_v": (self.hidden_size, kv_in), "to_out.0": (self.hidden_size, self.hidden_size)}
        got = {"to_q": tuple(q_w.shape), "to_k": tuple(k_w.shape),
               "to_v": tuple(attn.to_v.weight.shape), "to_out.0": tuple(out_w.shape)}
        if got != want:
            raise ValueError(f"{name}: projection shapes {got} do not fit this attention-sharing "
                             f"unit (expected {want})")
        if self.hidden_size % attn.heads:
            raise ValueError(f"{name}: width {self.hidden_size} is not divisible by {attn.heads} heads")
        unsupported = [feature for feature, present in (
            ("group_norm", getattr(attn, "group_norm", None) is not None),
            ("spatial_norm", getattr(attn, "spatial_norm", None) is not None),
            ("norm_cross", bool(getattr(attn, "norm_cross", False))),
            ("norm_q/norm_k", getattr(attn, "norm_q", None) is not None
             or getattr(attn, "norm_k", None) is not None),
            ("added kv projections", getattr(attn, "add_k_proj", None) is not None),
            ("residual_connection", bool(getattr(attn, "residual_connection", False))),
            ("rescale_output_factor", getattr(attn, "rescale_output_factor", 1.0) != 1.0),
        ) if present]
        if unsupported:
            raise ValueError(f"{name}: attention sharing supports plain SD 1.5 attention only; "
                             f"this one uses {', '.join(unsupported)}")

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attention_sharing_control: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # Defined as __call__ (like diffusers' IP-Adapter processors) so that Attention.forward
        # sees the named cross_attention_kwargs we accept.
        if hidden_states.ndim != 3:
            raise ValueError("attention sharing expects hidden states [batch, tokens, channels], "
                             f"got shape {tuple(hidden_states.shape)}")
        batch, tokens, channels = hidden_states.shape
        frames = self.frames
        if batch % frames:
            raise ValueError(
                f"attention sharing with {frames} frames needs the batch arranged as samples × "
                f"{frames} consecutive frames, but the batch size {batch} is not a multiple of "
                f"{frames} (with classifier-free guidance each half must be)"
            )
        if encoder_hidden_states is not None and encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} "
                             f"does not match the hidden-states batch {batch}")
        samples = batch // frames
        heads = attn.heads

        control = self._control_residual(attention_sharing_control, samples, tokens, hidden_states)
        x = hidden_states if control is None else hidden_states + control
        context = x if encoder_hidden_states is None else encoder_hidden_states

        # Per-frame LoRA projections, applied as base(x) + up(down(x_f)): the same value as
        # linear(x_f, W + up·down), but the base part runs on the whole batch exactly as the
        # plain processor does, so zero LoRAs reproduce plain attention bit for bit.
        query = attn.to_q(x) + self._lora_update(self.to_q_lora, x)
        key = attn.to_k(context) + self._lora_update(self.to_k_lora, context)
        value = attn.to_v(context) + self._lora_update(self.to_v_lora, context)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])
        # Items never attend across the batch here, so whole-batch attention is per frame.
        attended = _multihead_attention(query, key, value, heads, mask)
        attention_out = attn.to_out[0](attended) + self._lora_update(self.to_out_lora, attended)
        attention_out = attn.to_out[1](attention_out)  # dropout, as in the original attention

        shared = x + attention_out
        # Cross-frame attention at every token position: sequences of length `frames`.
        y = self.temporal_i(self.temporal_n(shared))
        y = y.reshape(samples, frames, tokens, channels).transpose(1, 2)
        y = y.reshape(samples * tokens, frames, channels)
        y = _multihead_attention(self.temporal_q(y), self.temporal_k(y), self.temporal_v(y), heads)
        y = self.temporal_o(y)
        y = y.reshape(samples, tokens, frames, channels).transpose(1, 2).reshape(batch, tokens, channels)

        # (x + attention + cross-frame) − input, summed without the subtraction.
        residual = attention_out + y
        if control is not None:
            residual = residual + control
        return residual

    def _lora_update(self, loras: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """up_f(down_f(x)) for the items of each frame f; x is [(samples frames), L, in]."""
        batch, length, _ = x.shape
        framed = x.reshape(batch // self.frames, self.frames, length, x.shape[-1])
        out = [lora(framed[:, f]) for f, lora in enumerate(loras)]
        return torch.stack(out, dim=1).reshape(batch, length, -1)

    def _control_residual(
        self,
        control: Mapping[int, torch.Tensor] | None,
        samples: int,
        tokens: int,
        hidden_states: torch.Tensor,
    ) -> torch.Tensor | None:
        """Per-frame projections of the condition features, [(samples frames), tokens, c]."""
        if self.control_convs is None:
            if control is not None:
                raise ValueError(f"{CONTROL_KWARG} was given but this attention-sharing model "
                                 "has no control path (only fg2bg/bg2fg do)")
            return None
        if control is None:
            raise ValueError(f"this attention-sharing model (fg2bg/bg2fg) needs the condition "
                             f"image: pass cross_attention_kwargs={{'{CONTROL_KWARG}': "
                             "adapter.encode_control(image)}")
        features = control.get(tokens)
        if features is None:
            raise ValueError(f"{CONTROL_KWARG} has no features for {tokens} tokens (has "
                             f"{sorted(control)}); encode the condition image at 8× the latent size")
        if features.shape[0] not in (1, samples):
            raise ValueError(f"{CONTROL_KWARG} batch {features.shape[0]} must be 1 or the number "
                             f"of samples per frame ({samples})")
        features = features.to(device=hidden_states.device, dtype=hidden_states.dtype)
        per_frame = []
        for conv in self.control_convs:
            out = conv(features)  # [n, c, h, w]
            out = out.flatten(2).transpose(1, 2)  # [n, h*w, c], row-major like the UNet's tokens
            per_frame.append(out.expand(samples, -1, -1))
        return torch.stack(per_frame, dim=1).reshape(samples * self.frames, tokens, -1)


class ControlConditionEncoder(nn.Module):
    """Condition-image encoder of fg2bg/bg2fg (`kwargs_encoder`): RGB → features at /8../64.

    Returns {tokens (h·w): features [n, 256, h, w]} for the four UNet resolutions, so each
    attention picks the map matching its token count.
    """

    def __init__(self):
        super().__init__()

        def conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=stride), nn.SiLU()]

        self.blocks_0 = nn.Sequential(
            *conv(3, 32), *conv(32, 32), *conv(32, 64, 2), *conv(64, 64),
            *conv(64, 128, 2), *conv(128, 128), *conv(128, 256, 2), *conv(256, 256),
        )
        self.blocks_1 = nn.Sequential(*conv(256, 256, 2), *conv(256, 256))
        self.blocks_2 = nn.Sequential(*conv(256, 256, 2), *conv(256, 256))
        self.blocks_3 = nn.Sequential(*conv(256, 256, 2), *conv(256, 256))

    def forward(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """`image` in [-1, 1], [n, 3, H, W] with H and W multiples of 64."""
        features: dict[int, torch.Tensor] = {}
        h = image
        for block in (self.blocks_0, self.blocks_1, self.blocks_2, self.blocks_3):
            h = block(h)
            features[h.shape[2] * h.shape[3]] = h
        return features


class AttentionSharingLayers(nn.Module):
    """Container whose only job is the published naming: `hookers.layers.N.…`."""

    def __init__(self, layers: Sequence[AttentionSharingProcessor]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


def sd15_attention_module_names(unet: nn.Module) -> list[str]:
    """The attention modules in the reference order: down blocks, up blocks, then mid.

    Within a block: attentions in order, their transformer blocks in order, attn1 then attn2.
    For the SD 1.5 UNet these are the 32 modules of `layer_sd15_module_order`.
    """
    names: list[str] = []

    def add(prefix: str, block: nn.Module | None) -> None:
        for i, transformer in enumerate(getattr(block, "attentions", None) or []):
            for j, tb in enumerate(getattr(transformer, "transformer_blocks", [])):
                names.append(f"{prefix}.attentions.{i}.transformer_blocks.{j}.attn1")
                if getattr(tb, "attn2", None) is not None:
                    names.append(f"{prefix}.attentions.{i}.transformer_blocks.{j}.attn2")

    for i, block in enumerate(unet.down_blocks):
        add(f"down_blocks.{i}", block)
    for i, block in enumerate(unet.up_blocks):
        add(f"up_blocks.{i}", block)
    add("mid_block", unet.mid_block)
    return names


class AttentionSharingAdapter(nn.Module):
    """All attention-sharing units of one published file, in `hookers.layers.N` order.

    `module_names[N]` is the diffusers name of the attention that unit N replaces.
    `load_state_dict(strict=True)` accepts the published files unchanged.
    """

    def __init__(
        self,
        module_names: Sequence[str],
        layer_dims: Sequence[tuple[int, int | None]],
        frames: int,
        rank: int = 256,
        use_control: bool = False,
    ):
        super().__init__()
        if len(module_names) != len(layer_dims):
            raise ValueError("module_names and layer_dims must have the same length")
        self.module_names = list(module_names)
        self.frames = frames
        self.use_control = use_control
        self.hookers = AttentionSharingLayers([
            AttentionSharingProcessor(hidden, cross, frames=frames, rank=rank, use_control=use_control)
            for hidden, cross in layer_dims
        ])
        self.kwargs_encoder = ControlConditionEncoder() if use_control else None
        self._original_processors: dict | None = None

    @classmethod
    def for_unet(
        cls, unet: nn.Module, frames: int, use_control: bool = False, rank: int = 256
    ) -> "AttentionSharingAdapter":
        """Units for every transformer attention of `unet`, widths read from the UNet.

        The k/v LoRA input width is the attention's `to_k.in_features` (768 for SD 1.5's
        text context), as in the reference. Build inside `torch.device("meta")` to get names and shapes without memory.
        """
        modules = dict(unet.named_modules())
        names = sd15_attention_module_names(unet)
        dims = []
        for name in names:
            attn = modules[name]
            cross = attn.to_k.in_features if attn.is_cross_attention else None
            dims.append((attn.to_q.out_features, cross))
        return cls(names, dims, frames=frames, rank=rank, use_control=use_control)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes a weight file for this adapter must have."""
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    @torch.no_grad()
    def encode_control(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """Features of the condition image for `cross_attention_kwargs[CONTROL_KWARG]`.

        `image`: RGB in [0, 1], [n, 3, H, W] at pixel size (8× the latent), H and W multiples
        of 64; the reference passes the RGBA condition composited on 50 % grey.
        """
        if self.kwargs_encoder is None:
            raise ValueError("this attention-sharing model has no control path (only fg2bg/bg2fg do)")
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"condition image must be [n, 3, H, W], got {tuple(image.shape)}")
        if image.shape[2] % 64 or image.shape[3] % 64:
            raise ValueError(f"condition image size {tuple(image.shape[2:])} must be multiples of 64")
        param = next(self.kwargs_encoder.parameters())
        return self.kwargs_encoder(image.to(param) * 2.0 - 1.0)

    # ------------------------------------------------------------ installing
    @property
    def is_installed(self) -> bool:
        return self._original_processors is not None

    def install(self, unet: nn.Module) -> None:
        """Set our processors on the named attentions (others keep theirs).

        Moves the adapter to the UNet's device and dtype. Install after anything that resets
        processors (attention slicing, set_default_attn_processor).
        """
        if self.is_installed:
            raise RuntimeError("this attention-sharing adapter is already installed")
        modules = dict(unet.named_modules())
        current = unet.attn_processors
        replacement = dict(current)
        for name, processor in zip(self.module_names, self.hookers.layers):
            attn = modules.get(name)
            if attn is None or f"{name}.processor" not in current:
                raise ValueError(f"the UNet has no attention module {name}")
            processor.check_compatible(attn, name)
            replacement[f"{name}.processor"] = processor
        reference = next(unet.parameters())
        self.to(device=reference.device, dtype=reference.dtype)
        unet.set_attn_processor(replacement)
        self._original_processors = current

    def remove(self, unet: nn.Module) -> None:
        """Put back exactly the processors the UNet had before `install`."""
        if not self.is_installed:
            raise RuntimeError("this attention-sharing adapter is not installed")
        unet.set_attn_processor(dict(self._original_processors))
        self._original_processors = None

    @contextlib.contextmanager
    def installed(self, unet: nn.Module) -> Iterator[nn.Module]:
        """`install` for the `with` body, `remove` afterwards (also on exceptions)."""
        self.install(unet)
        try:
            yield unet
        finally:
            self.remove(unet)


def _meta_adapter(unet: nn.Module, frames: int, use_control: bool, rank: int) -> AttentionSharingAdapter:
    with torch.device("meta"):
        return AttentionSharingAdapter.for_unet(unet, frames, use_control=use_control, rank=rank)


def attention_sharing_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    unet: nn.Module,
    frames: int,
    use_control: bool,
    rank: int = 256,
    what: str = "attention-sharing weights",
) -> AttentionSharingAdapter:
    """An adapter for `unet` holding exactly `state_dict` (names/shapes checked first).

    The adapter is built on the meta device and the given tensors are assigned, so nothing
    is allocated twice.
    """
    adapter = _meta_adapter(unet, frames, use_control, rank)
    check_state_dict(state_dict, adapter.expected_shapes(),
                     f"{what} (frames={frames}, control={use_control})")
    adapter.load_state_dict(dict(state_dict), strict=True, assign=True)
    return adapter.requires_grad_(False).eval()


def load_attention_sharing(
    path: str | Path,
    unet: nn.Module,
    frames: int,
    use_control: bool,
    rank: int = 256,
) -> AttentionSharingAdapter:
    """Load a `layer_sd15_*` file strictly for `unet` (header checked before reading data)."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise MissingWeights([str(path)], "download it from LayerDiffusion/layerdiffusion-v1")
    adapter = _meta_adapter(unet, frames, use_control, rank)
    what = f"{path.name} (frames={frames}, control={use_control})"
    check_state_dict(safetensors_shapes(path), adapter.expected_shapes(), what)
    state = load_safetensors(path)
    adapter.load_state_dict(state, strict=True, assign=True)
    return adapter.requires_grad_(False).eval()
