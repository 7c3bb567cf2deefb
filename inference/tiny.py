"""A tiny random-weight SDXL-family model, built in code, for tests, demos and CI.

No weights can be downloaded where the tests run, yet the whole engine (loading with
`from_pretrained`, tokenizing, sampling, transparency patch, transparent decoding) must be
exercised for real. `build_tiny_model` writes a complete diffusers folder with the SDXL
structure (two CLIP text encoders concatenated for cross-attention, pooled projection and
"text_time" micro-conditioning, a 4-level VAE so the latent is still 1/8 of the image)
plus the three LayerDiffuse files in their published formats, all with tiny widths.

The tokenizers are the real CLIP BPE (vocabulary from the `open_clip_torch` wheel,
converted to vocab.json + merges.txt), so prompts tokenize exactly as with SDXL.

Same seed and same library versions → byte-identical files. The folder is cached under a
content key (parameters + library versions + this file's source) and built in a temporary
sibling folder that is renamed into place, so a present folder is always complete.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

TINY_FORMAT_VERSION = 1
KEY_FILE = "tiny_model_key.txt"
LAYERDIFFUSE_DIR = "layerdiffuse"
TINY_CONFIG_FILE = "tiny_config.json"
UNET_PATCH_FILE = "ld_diffusers_sdxl_attn.safetensors"
DECODER_FILE = "vae_transparent_decoder.safetensors"
ENCODER_FILE = "vae_transparent_encoder.safetensors"

# -- configurations ----------------------------------------------------------------------
# The two text encoders differ in width, as in SDXL (768 and 1280): tools that tell them
# apart by shape (diffusers' single-file loader does) must see two different encoders.
TEXT_HIDDEN = 32  # text_encoder (CLIP ViT-L's role)
TEXT_HIDDEN_2 = 64  # text_encoder_2 (OpenCLIP bigG's role)
TEXT_PROJECTION = TEXT_HIDDEN_2  # pooled embedding of text_encoder_2
TIME_EMBED = 8  # SDXL's addition_time_embed_dim (256) scaled down; 6 micro-conditions

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),  # SDXL's field name; it holds the head *count* per block
    norm_num_groups=8,
    cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2,  # both encoders' hidden states, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_PROJECTION,
    flip_sin_to_cos=True,
    freq_shift=0,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),  # 4 levels → 2**3 = 8 pixels per latent cell
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=256,
    scaling_factor=0.13025,  # SDXL's
    force_upcast=True,
)


def _text_encoder_config(hidden_size: int, hidden_act: str) -> dict:
    return dict(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,  # SDXL reads the penultimate layer
        num_attention_heads=4,
        projection_dim=TEXT_PROJECTION,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


TEXT_ENCODER_CONFIG = _text_encoder_config(TEXT_HIDDEN, "quick_gelu")  # CLIP ViT-L/14 text tower
TEXT_ENCODER_2_CONFIG = _text_encoder_config(TEXT_HIDDEN_2, "gelu")  # OpenCLIP bigG text tower

# EulerDiscreteScheduler as configured in stabilityai/stable-diffusion-xl-base-1.0.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)

# Transparent VAE parts: the published layouts, narrowed. The decoder keeps all 7 levels
# (so images must be multiples of 64, as with the real one) and injects the latent at /8.
TINY_DECODER_CONFIG = dict(
    in_channels=3,
    out_channels=4,
    latent_channels=4,
    latent_scale_factor=8,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3,
    up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4,
    block_out_channels=(4, 4, 8, 8, 16, 16, 16),  # full-resolution levels dominate the cost
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=8,
)
TINY_ENCODER_CONFIG = dict(in_channels=4, out_channels=4, block_out_channels=(8, 8, 16, 16))

DELTA_SCALE = 0.1  # deltas ~ N(0, (0.1 / sqrt(fan_in))²): visible but small next to the weights

TOKENIZER_SETTINGS = {
    "tokenizer": dict(pad_token="<|endoftext|>"),
    "tokenizer_2": dict(pad_token="!"),  # SDXL's second tokenizer pads with "!"
}


# -- CLIP tokenizer ------------------------------------------------------------------------
def clip_vocab_path() -> Path:
    """The CLIP BPE vocabulary shipped in the open_clip_torch wheel (found without importing
    open_clip, whose torchvision dependency is not installed)."""
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "the tiny model needs the CLIP vocabulary from open_clip_torch; install it with "
            "`pip install --no-deps open_clip_torch==3.3.0` (make setup does this)"
        ) from None
    path = Path(str(dist.locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz")))
    if not path.is_file():
        raise RuntimeError(f"open_clip_torch is installed but {path} is missing; reinstall it")
    return path


def byte_symbols() -> list[str]:
    """The 256 byte symbols of byte-level BPE, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space,
    soft hyphen...) are shifted to code points 256, 257, ... in byte order, so that every
    byte has a visible, non-whitespace symbol.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


CLIP_MERGES = 49152 - 256 - 2  # merges CLIP uses from the file


def write_clip_vocabulary(folder: Path) -> None:
    """vocab.json + merges.txt of the 49,408-token CLIP BPE into `folder`.

    Token ids: the 256 byte symbols, the same with the end-of-word marker `</w>`, one token
    per merge in merge order, then <|startoftext|> (49406) and <|endoftext|> (49407).
    """
    lines = gzip.open(clip_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES]]  # line 0 is a header
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"unexpected CLIP vocabulary file {clip_vocab_path()}")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def build_clip_tokenizer(folder: Path, pad_token: str):
    """A transformers CLIPTokenizer over the real CLIP vocabulary (77-token context).

    `folder` gets vocab.json + merges.txt unless it already has them."""
    from transformers import CLIPTokenizer

    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        write_clip_vocabulary(folder)
    return CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=77, pad_token=pad_token,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )


# -- cache key -----------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _source_digest(module_file: Optional[str]) -> str:
    if not module_file or not os.path.isfile(module_file):
        return "absent"
    return hashlib.sha256(Path(module_file).read_bytes()).hexdigest()


def tiny_model_key(seed: int = 0) -> str:
    """Content key of a tiny build: everything that can change its bytes. Reads the
    decoder's source without importing it: GET /v1/models asks this, and importing
    transparent_vae would import torch (seconds on a cold server)."""
    import importlib.util

    decoder_source = importlib.util.find_spec(f"{__package__}.transparent_vae").origin
    payload = {
        "format": TINY_FORMAT_VERSION,
        "seed": seed,
        "configs": [UNET_CONFIG, VAE_CONFIG, TEXT_ENCODER_CONFIG, TEXT_ENCODER_2_CONFIG,
                    SCHEDULER_CONFIG, TINY_DECODER_CONFIG, TINY_ENCODER_CONFIG, TOKENIZER_SETTINGS,
                    DELTA_SCALE],
        "versions": {d: _version(d) for d in ("torch", "diffusers", "transformers", "tokenizers",
                                             "safetensors", "open_clip_torch")},
        "sources": [_source_digest(__file__), _source_digest(decoder_source)],
    }
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_tiny_key(folder: Path) -> Optional[str]:
    try:
        return (Path(folder) / KEY_FILE).read_text().strip()
    except OSError:
        return None


# -- building ------------------------------------------------------------------------------
def build_tiny_model(dest: Path, seed: int = 0) -> Path:
    """Build (or reuse) the tiny model at `dest`; return `dest`.

    Layout: a diffusers SDXL folder (model_index.json, unet/, vae/, text_encoder/,
    text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) plus
    `layerdiffuse/{ld_diffusers_sdxl_attn,vae_transparent_decoder,vae_transparent_encoder}.safetensors`
    and `layerdiffuse/tiny_config.json` (decoder/encoder configs for
    `TransparentDecoder/TransparentEncoder.from_single_file(path, **config)`).
    """
    dest = Path(dest)
    key = tiny_model_key(seed)
    if read_tiny_key(dest) == key:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _write_tiny_model(tmp, seed)
        (tmp / KEY_FILE).write_text(key + "\n")
        _replace_folder(tmp, dest, key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _replace_folder(tmp: Path, dest: Path, key: str) -> None:
    """Move the finished build into place; a stale build is moved aside and deleted."""
    try:
        os.rename(tmp, dest)
        return
    except OSError:
        if read_tiny_key(dest) == key:  # a concurrent build of the same key won the race
            return
    stale = dest.with_name(f".{dest.name}.stale-{os.getpid()}")
    os.rename(dest, stale)
    os.rename(tmp, dest)
    shutil.rmtree(stale, ignore_errors=True)


def _seeded(seed: int, component: int):
    import torch

    torch.manual_seed(seed * 1000 + component)


def _write_tiny_model(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .transparent_vae import TransparentDecoder, TransparentEncoder

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch), **TOKENIZER_SETTINGS["tokenizer"])
        tokenizer_2 = build_clip_tokenizer(Path(scratch), **TOKENIZER_SETTINGS["tokenizer_2"])

    _seeded(seed, 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    _seeded(seed, 2)
    vae = AutoencoderKL(**VAE_CONFIG)
    _seeded(seed, 3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    _seeded(seed, 4)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG))
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)

    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)

    ld = folder / LAYERDIFFUSE_DIR
    ld.mkdir()
    _save_fp16(unet_patch_deltas(unet, seed), ld / UNET_PATCH_FILE)
    _seeded(seed, 5)
    _save_fp16(TransparentDecoder(**TINY_DECODER_CONFIG).state_dict(), ld / DECODER_FILE)
    _seeded(seed, 6)
    _save_fp16(TransparentEncoder(**TINY_ENCODER_CONFIG).state_dict(), ld / ENCODER_FILE)
    (ld / TINY_CONFIG_FILE).write_text(json.dumps(
        {"decoder": TINY_DECODER_CONFIG, "encoder": TINY_ENCODER_CONFIG}, indent=2, sort_keys=True) + "\n")


def unet_patch_deltas(unet, seed: int) -> dict:
    """Random dense deltas for every attn1/attn2 to_q/to_k/to_v/to_out.0 weight of `unet`,
    keyed by the diffusers parameter name (the `ld_diffusers_sdxl_attn` layout)."""
    import math

    import torch

    suffixes = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    params = dict(unet.named_parameters())
    names = sorted(n for n in params
                   if ".transformer_blocks." in n and (".attn1." in n or ".attn2." in n) and n.endswith(suffixes))
    deltas = {}
    for i, name in enumerate(names):
        shape = params[name].shape
        g = torch.Generator().manual_seed(seed * 100_000 + i)
        deltas[name] = torch.randn(shape, generator=g) * (DELTA_SCALE / math.sqrt(shape[1]))
    return deltas


def _save_fp16(state_dict: dict, path: Path) -> None:
    """Save as fp16 safetensors, like the published LayerDiffuse files."""
    import torch
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in sorted(state_dict.items())}, str(path))


def tiny_layerdiffuse_configs(folder: Path) -> dict:
    """{"decoder": {...}, "encoder": {...}} config overrides stored with a tiny build."""
    return json.loads((Path(folder) / LAYERDIFFUSE_DIR / TINY_CONFIG_FILE).read_text())
