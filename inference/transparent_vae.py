"""LayerDiffuse "latent transparency" models: the transparent decoder and the offset encoder.

LayerDiffuse makes an ordinary SD/SDXL latent carry transparency. Decoding goes through the
normal VAE first (which gives the object composited on neutral grey) and then through
`TransparentDecoder`, a small UNet that looks at that RGB image *and* the latent and
predicts alpha plus the straight (un-premultiplied) colour. Encoding an RGBA image back
into such a latent goes through the VAE plus `TransparentEncoder`, which predicts an
offset inside the VAE posterior.

Both modules reproduce the published weight layouts (`vae_transparent_decoder`,
`layer_sd15_vae_transparent_decoder`, `vae_transparent_encoder`) name-for-name, so the
published .safetensors files load with `strict=True`; `from_single_file` checks every
name and shape first and refuses anything else.

Channel orders, once and for all:
- `TransparentDecoder.forward` returns the raw network output [B, 4, H, W] in the
  reference order **A, R, G, B** (channel 0 alpha, 1..3 straight RGB), unclipped.
- `decode_transparent` returns **R, G, B, A** (straight, in [0, 1]) — the order every
  image format and the layer-stack files use. `augmented_decode` is the same computation
  in the raw A, R, G, B order.
- `encode_transparent` takes R, G, B, A (straight, in [0, 1]).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
)
from torch import nn

from .errors import InvalidRequest
from .progress import CancelToken, Progress, ProgressCallback
from .request import validate_tta_passes
from .weights import check_state_dict, load_safetensors, refuse_pickle

__all__ = [
    "TransparentDecoder",
    "TransparentEncoder",
    "TTA_AUGMENTATIONS",
    "augmented_decode",
    "decode_transparent",
    "encode_transparent",
    "pad_transparent_rgb",
]

_DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D}
_UP_BLOCKS = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}


def _load_strict(model_cls, path: str | Path, what: str, dtype: torch.dtype, device, config: dict):
    """Build `model_cls(**config)` without allocating, check the file against it, load it.

    The model is created on the meta device, so checking the file's names and shapes
    against it costs nothing and a mismatching file is rejected before any model memory is
    allocated; the file's own tensors, converted to `dtype`/`device` (the published files
    are fp16), then replace the meta parameters (strict=True).
    """
    refuse_pickle(path)
    state_dict = load_safetensors(path)
    with torch.device("meta"):
        model = model_cls(**config)
    check_state_dict(state_dict, model.state_dict(), what=f"{what} ({Path(path).name})")
    # Convert before assigning: ModelMixin.to(dtype=...) logs a spurious fp32-modules warning.
    state_dict = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


class StrictSingleFile:
    """`from_single_file` for our published-weight models; `weight_kind` names them in errors."""

    weight_kind = "model"

    @classmethod
    def from_single_file(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", **config):
        """Load a published .safetensors strictly (WeightMismatch names any bad tensor).

        `config` overrides the default (published) configuration, e.g. for tiny test models.
        """
        return _load_strict(cls, path, cls.weight_kind, dtype, device, config)


PUBLISHED_DOWN_BLOCKS = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3
PUBLISHED_UP_BLOCKS = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4


def _latent_injection_block(down_block_types: Sequence[str], up_block_types: Sequence[str],
                            block_out_channels: Sequence[int], latent_scale_factor: int) -> int:
    """The down block where the latent joins (validating the configuration on the way)."""
    n_blocks = len(block_out_channels)
    if len(down_block_types) != n_blocks or len(up_block_types) != n_blocks:
        raise ValueError(
            f"need one down and one up block type per entry of block_out_channels ({n_blocks}); "
            f"got {len(down_block_types)} down and {len(up_block_types)} up"
        )
    unknown = [t for t in down_block_types if t not in _DOWN_BLOCKS] + [
        t for t in up_block_types if t not in _UP_BLOCKS
    ]
    if unknown:
        raise ValueError(f"unsupported block types: {unknown}")
    injection = int(round(math.log2(latent_scale_factor))) if latent_scale_factor >= 1 else -1
    if injection < 0 or 2**injection != latent_scale_factor or injection >= n_blocks:
        raise ValueError(
            f"latent_scale_factor must be a power of two below 2**{n_blocks}, got {latent_scale_factor}"
        )
    return injection


def _down_blocks(types: Sequence[str], widths: Sequence[int], layers: int, head_dim: int,
                 resnet: dict) -> nn.ModuleList:
    """Every block but the last halves the resolution."""
    blocks = nn.ModuleList()
    channels = widths[0]
    for i, block_type in enumerate(types):
        is_last = i == len(widths) - 1
        common = dict(in_channels=channels, out_channels=widths[i], num_layers=layers, downsample_padding=1,
                      **resnet)
        if block_type == "AttnDownBlock2D":
            block = AttnDownBlock2D(**common, attention_head_dim=head_dim, downsample_type=None if is_last else "conv")
        else:
            block = DownBlock2D(**common, add_downsample=not is_last)
        blocks.append(block)
        channels = widths[i]
    return blocks


def _up_blocks(types: Sequence[str], widths: Sequence[int], layers: int, head_dim: int,
               resnet: dict) -> nn.ModuleList:
    """Mirror of the down blocks, one more resnet per block (for the skip connections)."""
    n_blocks = len(widths)
    reversed_channels = list(reversed(widths))
    blocks = nn.ModuleList()
    prev_output = reversed_channels[0]
    for i, block_type in enumerate(types):
        is_last = i == n_blocks - 1
        common = dict(in_channels=reversed_channels[min(i + 1, n_blocks - 1)], prev_output_channel=prev_output,
                      out_channels=reversed_channels[i], num_layers=layers + 1, **resnet)
        if block_type == "AttnUpBlock2D":
            block = AttnUpBlock2D(**common, attention_head_dim=head_dim, upsample_type=None if is_last else "conv")
        else:
            block = UpBlock2D(**common, add_upsample=not is_last)
        blocks.append(block)
        prev_output = reversed_channels[i]
    return blocks


class TransparentDecoder(StrictSingleFile, ModelMixin, ConfigMixin):
    """UNet (no time embedding) mapping (VAE-decoded RGB, unscaled latent) → alpha + straight RGB.

    The latent is projected with a 1x1 conv and added to the activations entering the
    down block that works at 1/`latent_scale_factor` resolution (block 3 for the published
    /8 latents), the only place where the two inputs have the same spatial size.
    Every block except the last halves the resolution, so H and W must be multiples of
    `size_multiple` (2 ** (number of blocks - 1) = 64 for the published model).
    """

    weight_kind = "transparent decoder"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        latent_channels: int = 4,
        latent_scale_factor: int = 8,
        down_block_types: Sequence[str] = PUBLISHED_DOWN_BLOCKS,
        up_block_types: Sequence[str] = PUBLISHED_UP_BLOCKS,
        block_out_channels: Sequence[int] = (32, 32, 64, 128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 4,
        norm_eps: float = 1e-5,
        attention_head_dim: int = 8,
        act_fn: str = "silu",
    ):
        super().__init__()
        injection = _latent_injection_block(down_block_types, up_block_types, block_out_channels,
                                            latent_scale_factor)
        # Down block i sees the input downsampled i times (all blocks but the last downsample).
        self.latent_injection_block = injection
        channels_at_injection = block_out_channels[max(injection - 1, 0)]
        resnet = dict(temb_channels=None, resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.latent_conv_in = nn.Conv2d(latent_channels, channels_at_injection, kernel_size=1)
        self.down_blocks = _down_blocks(down_block_types, block_out_channels, layers_per_block,
                                        attention_head_dim, resnet)
        self.mid_block = UNetMidBlock2D(in_channels=block_out_channels[-1], attention_head_dim=attention_head_dim,
                                        add_attention=True, **resnet)
        self.up_blocks = _up_blocks(up_block_types, block_out_channels, layers_per_block, attention_head_dim,
                                    resnet)
        self.conv_norm_out = nn.GroupNorm(num_groups=norm_num_groups, num_channels=block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (each block but the last halves them)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """pixel [B,3,H,W] in [0,1], latent [B,4,H/f,W/f] unscaled → raw [B,4,H,W] (A,R,G,B)."""
        latent_features = self.latent_conv_in(latent)
        hidden = self.conv_in(pixel)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        for i, block in enumerate(self.down_blocks):
            if i == self.latent_injection_block:
                hidden = hidden + latent_features
            hidden, block_skips = block(hidden_states=hidden, temb=None)
            skips += block_skips
        hidden = self.mid_block(hidden, None)
        for block in self.up_blocks:
            n = len(block.resnets)
            hidden = block(hidden, skips[-n:], None)
            skips = skips[:-n]
        hidden = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))
        return hidden


class TransparentEncoder(StrictSingleFile, ModelMixin, ConfigMixin):
    """Plain conv stack predicting the latent offset that encodes transparency.

    Input cat(alpha, padded straight RGB) [B,4,H,W] → offset [B,4,H/f,W/f] with
    f = 2 ** (len(block_out_channels) - 1). Layout (the published `blocks.N` names):
    conv(in→c0), SiLU, conv(c0→c0), SiLU, then for every further width c a stride-2
    conv(prev→c), SiLU, conv(c→c), SiLU, and a final conv(c_last→out). The output is raw;
    see `encode_transparent` for how it is scaled and used.

    `offset_scale` is the factor the raw output is used with. It belongs to the weight file
    (the published files share one layout but are run x1 or x300 by their references), so
    whoever loads a file sets it — `load_model` from the preset; None means "unknown" and
    `encode_transparent` refuses to guess.
    """

    weight_kind = "transparent encoder"
    offset_scale: Optional[float] = None

    @classmethod
    def from_single_file(cls, path: str | Path, *, offset_scale: Optional[float] = None,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **config):
        """`StrictSingleFile.from_single_file`, recording the file's `offset_scale`."""
        encoder = super().from_single_file(path, dtype=dtype, device=device, **config)
        encoder.offset_scale = None if offset_scale is None else float(offset_scale)
        return encoder

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: Sequence[int] = (32, 64, 128, 256),
    ):
        super().__init__()
        if not block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(block_out_channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(previous, width, kernel_size=3, padding=1, stride=stride), nn.SiLU()]
            layers += [nn.Conv2d(width, width, kernel_size=3, padding=1), nn.SiLU()]
            previous = width
        layers.append(nn.Conv2d(previous, out_channels, kernel_size=3, padding=1))
        self.blocks = nn.Sequential(*layers)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, alpha_and_rgb: torch.Tensor) -> torch.Tensor:
        return self.blocks(alpha_and_rgb)


# --------------------------------------------------------------------------------------
# Test-time augmented decoding
# --------------------------------------------------------------------------------------

# (horizontal flip first?, number of counter-clockwise rot90 turns). `passes=k` uses the
# first k entries, so 2 = {identity, hflip} and 4 adds the two 180° turns (which keep
# H x W, so every pass of a 2/4-pass decode costs the same memory as the plain one);
# 8 is the full dihedral group, as in the reference.
TTA_AUGMENTATIONS: tuple[tuple[bool, int], ...] = (
    (False, 0),
    (True, 0),
    (False, 2),
    (True, 2),
    (False, 1),
    (True, 1),
    (False, 3),
    (True, 3),
)


def _augment(x: torch.Tensor, flip: bool, turns: int) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(3,))
    return torch.rot90(x, k=turns, dims=(2, 3)) if turns else x


def _unaugment(x: torch.Tensor, flip: bool, turns: int) -> torch.Tensor:
    if turns:
        x = torch.rot90(x, k=-turns, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip else x


def _check_decode_inputs(decoder: TransparentDecoder, pixel: torch.Tensor, latent: torch.Tensor, passes: int):
    validate_tta_passes("tta_passes", passes)
    if pixel.ndim != 4 or pixel.shape[1] != decoder.config.in_channels:
        raise InvalidRequest(
            "pixel", f"expected [batch, {decoder.config.in_channels}, height, width], got {tuple(pixel.shape)}"
        )
    height, width = pixel.shape[-2:]
    multiple = decoder.size_multiple
    if height % multiple or width % multiple:
        raise InvalidRequest(
            "size",
            f"width and height must be multiples of {multiple} for transparent decoding; "
            f"got {width}x{height}",
        )
    factor = decoder.config.latent_scale_factor
    expected = (pixel.shape[0], decoder.config.latent_channels, height // factor, width // factor)
    if tuple(latent.shape) != expected:
        raise InvalidRequest(
            "latent", f"expected shape {expected} for a {width}x{height} image, got {tuple(latent.shape)}"
        )


@torch.no_grad()
def augmented_decode(
    decoder: TransparentDecoder,
    pixel: torch.Tensor,
    latent: torch.Tensor,
    passes: int = 8,
    *,
    cancel: Optional[CancelToken] = None,
    progress: Optional[ProgressCallback] = None,
    layer: Optional[int] = None,
    layers: int = 0,
) -> torch.Tensor:
    """Test-time augmented transparent decode in the decoder's raw order (A, R, G, B).

    Each of the first `passes` entries of TTA_AUGMENTATIONS transforms (pixel, latent),
    runs the decoder, clips to [0, 1] and transforms back; the result is the element-wise
    `torch.median` over the passes — for an even count the *lower* of the two middle
    values, as in the reference (so passes=2 gives the element-wise minimum). passes=1 is
    the clipped single pass. `pixel` is the VAE-decoded image in [0, 1], `latent` the
    unscaled latent (latents / scaling_factor). Inputs are moved to the decoder's device
    and dtype; the result is float32 on that device. `cancel` is checked before every pass,
    `progress` gets Progress(phase="decode", step=i+1, total=passes, layer=layer) after it.
    """
    _check_decode_inputs(decoder, pixel, latent, passes)
    device, dtype = decoder.device, decoder.dtype
    pixel = pixel.to(device=device, dtype=dtype)
    latent = latent.to(device=device, dtype=dtype)
    batch, _, height, width = pixel.shape
    # One preallocated buffer instead of a list + stack: the passes are never held twice.
    outputs = torch.empty((passes, batch, decoder.config.out_channels, height, width), dtype=torch.float32, device=device)
    for i, (flip, turns) in enumerate(TTA_AUGMENTATIONS[:passes]):
        if cancel is not None:
            cancel.raise_if_cancelled()
        raw = decoder(_augment(pixel, flip, turns), _augment(latent, flip, turns))
        outputs[i] = _unaugment(raw.float().clamp_(0.0, 1.0), flip, turns)
        del raw
        if progress is not None:
            progress(Progress(phase="decode", step=i + 1, total=passes, layer=layer, layers=layers))
    if passes == 1:
        return outputs[0]
    return torch.median(outputs, dim=0).values


def fast_memory_format(decoder: nn.Module, device) -> nn.Module:
    """Put the decoder's weights channels-last where that is faster, and return it.

    Its full-resolution convolutions run ~1.7× faster channels-last on the CPU (oneDNN) and
    use tensor cores on CUDA; results agree with the reference to ~5e-6. MPS keeps the
    default layout.
    """
    if torch.device(device).type in ("cpu", "cuda"):
        decoder.to(memory_format=torch.channels_last)
    return decoder


def decode_transparent(
    decoder: TransparentDecoder,
    pixel: torch.Tensor,
    latent: torch.Tensor,
    passes: int = 8,
    *,
    cancel: Optional[CancelToken] = None,
    progress: Optional[ProgressCallback] = None,
    layer: Optional[int] = None,
    layers: int = 0,
) -> torch.Tensor:
    """Straight RGBA [B, 4, H, W] in [0, 1], channels ordered **R, G, B, A**.

    Same computation and arguments as `augmented_decode`, with the channels reordered
    from the decoder's A, R, G, B.
    """
    argb = augmented_decode(
        decoder, pixel, latent, passes, cancel=cancel, progress=progress, layer=layer, layers=layers
    )
    return torch.cat([argb[:, 1:4], argb[:, 0:1]], dim=1)


# --------------------------------------------------------------------------------------
# Encoding an RGBA image into a transparency-carrying latent
# --------------------------------------------------------------------------------------

def pad_transparent_rgb(rgb: torch.Tensor, alpha: torch.Tensor, shrink: float = 1.2) -> torch.Tensor:
    """Fill the colour of (semi-)transparent pixels by extrapolating from the opaque ones.

    Builds a pyramid of premultiplied colour and alpha (area-downsampled by `shrink` per
    level down to one pixel on the short side), starts from the alpha-weighted mean colour
    and, from coarse to fine, upsamples the estimate and composites each level over it:
    `fill = premultiplied + fill * (1 - alpha)`. Opaque pixels keep their colour; fully
    transparent ones get a smooth colour continued from nearby opaque ones. This is our
    torch rendering of the reference's padding idea (which uses OpenCV resizes), so values
    may differ slightly from it. rgb [B,3,H,W], alpha [B,1,H,W], both in [0,1].
    """
    premultiplied, coverage = rgb * alpha, alpha
    pyramid = []
    while True:
        pyramid.append((premultiplied, coverage))
        h, w = coverage.shape[-2:]
        if min(h, w) <= 1:
            break
        size = (max(int(h / shrink), 1), max(int(w / shrink), 1))
        premultiplied = F.interpolate(premultiplied, size=size, mode="area")
        coverage = F.interpolate(coverage, size=size, mode="area")
    top_colour, top_alpha = pyramid[-1]
    fill = top_colour.sum(dim=(2, 3), keepdim=True) / top_alpha.sum(dim=(2, 3), keepdim=True).clamp(min=1e-8)
    for level_colour, level_alpha in reversed(pyramid):
        fill = F.interpolate(fill, size=level_colour.shape[-2:], mode="bilinear", align_corners=False)
        fill = level_colour + fill * (1.0 - level_alpha)
    return fill


@torch.no_grad()
def encode_transparent(
    vae,
    encoder: TransparentEncoder,
    rgba: torch.Tensor,
    *,
    offset_scale: Optional[float] = None,
) -> torch.Tensor:
    """Encode straight RGBA [B,4,H,W] in [0,1] (R,G,B,A) into an *unscaled* latent.

    What is computed:
    1. `posterior = vae.encode((rgb * 2 - 1) * alpha)` — the colour premultiplied in the
       VAE's [-1, 1] range, i.e. transparent areas become 0 (neutral grey);
    2. `offset = encoder(cat(alpha, pad_transparent_rgb(rgb, alpha))) * offset_scale`, the
       scale the encoder's weight file goes with (`encoder.offset_scale`) unless given;
    3. `z = posterior.mean + posterior.std * offset` (a deterministic point of the
       posterior, chosen by the offset encoder).
    Returns z as `vae.decode` takes it (multiply by `vae.config.scaling_factor` for the
    diffusion model), in the VAE's dtype and device. H and W must be multiples of the
    encoder's downscale factor (8 for the published model).
    """
    if rgba.ndim != 4 or rgba.shape[1] != 4:
        raise InvalidRequest("rgba", f"expected [batch, 4, height, width] (R,G,B,A), got {tuple(rgba.shape)}")
    height, width = rgba.shape[-2:]
    factor = encoder.downscale_factor
    if height % factor or width % factor:
        raise InvalidRequest(
            "size", f"width and height must be multiples of {factor} to encode; got {width}x{height}"
        )
    scale = encoder.offset_scale if offset_scale is None else offset_scale
    if scale is None:
        raise InvalidRequest("encoder", "the offset encoder's scale is unknown: it goes with the weight "
                                        "file (x1 for LayerDiffusion/layerdiffusion-v1's encoders, x300 for "
                                        "LayerDiffuse_Diffusers'); load it with from_single_file(..., "
                                        "offset_scale=...) or pass offset_scale")
    rgba = rgba.float().clamp(0.0, 1.0)
    rgb, alpha = rgba[:, :3], rgba[:, 3:4]

    posterior = vae.encode(((rgb * 2.0 - 1.0) * alpha).to(device=vae.device, dtype=vae.dtype)).latent_dist
    encoder_input = torch.cat([alpha, pad_transparent_rgb(rgb, alpha)], dim=1)
    offset = encoder(encoder_input.to(device=encoder.device, dtype=encoder.dtype)) * scale
    if offset.shape != posterior.mean.shape:
        raise InvalidRequest(
            "vae", f"VAE latent shape {tuple(posterior.mean.shape)} does not match the offset "
            f"encoder's {tuple(offset.shape)}; the transparent encoder needs a /{factor} 4-channel VAE"
        )
    return posterior.mean + posterior.std * offset.to(device=posterior.mean.device, dtype=posterior.mean.dtype)
