"""The `independent` method end to end on the tiny model: files, determinism, progress, cancel,
and equality with plain diffusers pipeline calls."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import Engine, EngineSettings
from inference.errors import Cancelled
from inference.progress import CancelToken
from inference.request import LayerSpec, StackRequest
from inference.stack import alpha_over, load_layer_images, load_stack

pytestmark = pytest.mark.slow


def request(**kw) -> StackRequest:
    base = dict(prompt="a forest at dusk", background="pine trees",
                layers=(LayerSpec("a red fox"), LayerSpec("a rock", box=(0.1, 0.5, 0.6, 1.0))),
                width=256, height=320, steps=2, guidance=4.0, seed=11, tta_passes=2,
                method="independent")
    base.update(kw)
    return StackRequest(**base)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineSettings(device="cpu", allow_download=False))


def png_bytes(folder: Path) -> dict[str, str]:
    """File name → sha256 (comparing digests keeps pytest from diffing megabytes on failure)."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def test_stack_files_and_metadata(engine, tmp_path):
    events = []
    stack = engine.generate(request(), "tiny", tmp_path / "s", progress=events.append)
    loaded = load_stack(tmp_path / "s")
    assert [layer.file for layer in loaded.layers] == ["background.png", "layer_01.png", "layer_02.png"]
    assert tuple(loaded.layers[2].box) == (0.1, 0.5, 0.6, 1.0)
    assert loaded.method == "independent" and (loaded.width, loaded.height) == (256, 320)
    assert loaded.model["preset"] == "tiny"
    assert all(v.startswith("sha256:") for v in loaded.model["files"].values())
    assert set(loaded.timings) >= {"load", "denoise", "decode", "total"}
    assert Image.open(tmp_path / "s" / "background.png").mode == "RGB"
    fg = Image.open(tmp_path / "s" / "layer_01.png")
    assert fg.mode == "RGBA" and fg.size == (256, 320)
    images = load_layer_images(loaded, tmp_path / "s")
    composite = np.asarray(Image.open(tmp_path / "s" / "composite.png"))
    assert np.array_equal(composite, alpha_over(images))
    assert stack.layers[1].seed != stack.layers[2].seed

    phases = [e.phase for e in events]
    assert phases[0] in ("download", "load")
    assert phases[-1] == "save"
    denoise = [e for e in events if e.phase == "denoise"]
    assert {e.layer for e in denoise} == {0, 1, 2}
    for layer in (0, 1, 2):
        steps = [e.step for e in denoise if e.layer == layer]
        assert steps == [0, 1, 2]
    decode_passes = [e for e in events if e.phase == "decode" and e.layer == 1]
    assert max(e.step for e in decode_passes) == 2  # tta_passes


def test_same_request_same_bytes(engine, tmp_path):
    engine.generate(request(), "tiny", tmp_path / "a")
    engine.generate(request(), "tiny", tmp_path / "b")
    a, b = png_bytes(tmp_path / "a"), png_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and a == b


def test_layer_seed_changes_only_that_layer(engine, tmp_path):
    base = request()
    engine.generate(base, "tiny", tmp_path / "a")
    layers = (base.layers[0], LayerSpec("a rock", seed=12345, box=base.layers[1].box))
    engine.generate(request(layers=layers), "tiny", tmp_path / "b")
    a, b = png_bytes(tmp_path / "a"), png_bytes(tmp_path / "b")
    assert a["background.png"] == b["background.png"]
    assert a["layer_01.png"] == b["layer_01.png"]
    assert a["layer_02.png"] != b["layer_02.png"]
    assert load_stack(tmp_path / "b").layers[2].seed == 12345


def test_cancel_mid_denoise_stops_within_one_step_and_leaves_nothing(engine, tmp_path):
    cancel = CancelToken()
    events = []

    def progress(e):
        events.append(e)
        if e.phase == "denoise" and e.layer == 1 and e.step == 1:
            cancel.cancel("user cancelled")

    with pytest.raises(Cancelled, match="user cancelled"):
        engine.generate(request(steps=5), "tiny", tmp_path / "s", progress=progress, cancel=cancel)
    after = events[[i for i, e in enumerate(events) if e.phase == "denoise" and e.layer == 1
                    and e.step == 1][0] + 1:]
    assert not [e for e in after if e.phase == "denoise" and e.step > 0]
    assert not any(e.phase in ("decode", "save") for e in after)
    assert list(tmp_path.iterdir()) == []


def test_matches_plain_diffusers_pipeline(engine, tmp_path):
    """Our machinery adds nothing to the pictures: background = plain SDXL pipeline call,
    foreground = plain call on a UNet with the LayerDiffuse delta merged + transparent decode."""
    from diffusers import StableDiffusionXLPipeline

    from inference.prompts import combine_prompts, layer_seeds
    from inference.models import resolve_model
    from inference.sampling import decode_rgb, initial_noise, to_uint8
    from inference.sdxl_transparency import TransparencyPatch
    from inference.transparent_vae import decode_transparent

    req = request(layers=(LayerSpec("a red fox"),)).validated()
    engine.generate(req, "tiny", tmp_path / "s")
    loaded = engine.load("tiny")
    resolved = resolve_model("tiny", allow_download=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(resolved.base), local_files_only=True,
                                                     dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seeds = layer_seeds(req)

    def plain(prompt, seed):
        noise = initial_noise(seed, pipe.vae, pipe.unet, req.width, req.height, "cpu", torch.float32)
        return pipe(prompt=prompt, negative_prompt=None, width=req.width, height=req.height,
                    num_inference_steps=req.steps, guidance_scale=req.guidance, latents=noise,
                    output_type="latent").images

    bg = to_uint8(decode_rgb(pipe.vae, plain(combine_prompts(req.background, req.prompt), seeds[0]))[0])
    TransparencyPatch.from_file(resolved.files["unet_patch"], pipe.unet).merge_into(pipe.unet)
    pixels, z = decode_rgb(pipe.vae, plain(combine_prompts("a red fox", req.prompt), seeds[1]))
    fg = to_uint8(decode_transparent(loaded.decoder, pixels, z, passes=req.tta_passes))

    assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / "background.png")), bg)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / "layer_01.png")), fg)


def test_existing_output_is_refused(engine, tmp_path):
    from inference.errors import InvalidRequest

    (tmp_path / "s").mkdir()
    with pytest.raises(InvalidRequest, match="already exists"):
        engine.generate(request(), "tiny", tmp_path / "s")


def test_switching_model_frees_the_previous(engine, tmp_path):
    engine.load("tiny")
    assert engine.loaded_model == "tiny"
    engine.unload()
    assert engine.loaded_model is None
