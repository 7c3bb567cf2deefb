"""Issue 10 on the engine side, on the tiny model: boxes given in frame coordinates land in
the frame's part of the canvas, and extending a stack (outpainting) grows every layer around
the same frame in one joint run with the old pixels held (byte-identical away from the seam)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.canvas import extension_offset, plan_extension
from inference.engine import Engine, EngineSettings
from inference.errors import InvalidRequest
from inference.methods.editing import SEAM_PIXELS, paste_known
from inference.progress import CancelToken, ignore_progress
from inference.request import LayerSpec, StackRequest
from inference.stack import alpha_over, load_layer_images, load_png, load_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineSettings(device="cpu", allow_download=False))


@pytest.fixture(scope="module")
def source(engine, tmp_path_factory) -> Path:
    """A joint stack (blended, masks) whose canvas is its frame, like a static shot's."""
    root = tmp_path_factory.mktemp("shot")
    req = StackRequest(prompt="a forest at dusk", background="pine trees",
                       layers=(LayerSpec("a red fox", box=(0.0, 0.25, 0.75, 1.0), depth=6.0, name="fox"),
                               LayerSpec("a rock", depth=9.0)),
                       width=256, height=256, steps=2, guidance=4.0, seed=3, tta_passes=1, method="joint",
                       name="Dusk forest", background_depth=40.0)
    engine.generate(req, "tiny", root / "src")
    return root / "src"


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_boxes_in_frame_coordinates_confine_to_the_frames_part_of_the_canvas(engine):
    """A box covering the whole frame, the frame being the canvas's top-right quarter: the
    foreground's latent stays empty outside that quarter (as a canvas box there would)."""
    from inference.layered_sampler import LayeredSampler, LayeredSettings, empty_latent
    from inference.methods.joint import joint_items
    from inference.prompts import layer_seeds
    from inference.sampling import job_pipeline

    loaded = engine.load("tiny")
    pipe = job_pipeline(loaded.pipeline)
    req = StackRequest(prompt="a forest", layers=(LayerSpec("a red fox", box=(0.0, 0.0, 1.0, 1.0)),),
                       width=256, height=256, steps=2, guidance=4.0, seed=5, frame=(0.5, 0.0, 1.0, 0.5)).validated()
    items = joint_items(pipe, req, layer_seeds(req), pipe.vae, pipe.unet, loaded.device, pipe.unet.dtype)
    assert tuple(items[1].box) == (0.5, 0.0, 1.0, 0.5)
    result = LayeredSampler(loaded, pipe, items, LayeredSettings.from_request(req))(
        progress=ignore_progress, cancel=CancelToken(), layers=2)
    energy = (result.latents[1].float() - empty_latent(loaded, pipe.vae)[0]).pow(2).sum(dim=0)
    inside, outside = energy[:16, 16:], energy[16:, :]
    assert outside.max() <= 1e-6 * inside.mean()


def test_held_region_ends_as_the_known_latents_and_the_rest_is_generated(engine):
    from inference.layered_sampler import HeldRegion, LayeredOptions, LayeredSampler, LayeredSettings
    from inference.methods.joint import joint_items
    from inference.prompts import layer_seeds
    from inference.sampling import job_pipeline

    loaded = engine.load("tiny")
    pipe = job_pipeline(loaded.pipeline)
    req = StackRequest(prompt="a forest", layers=(LayerSpec("a fox"),), width=256, height=256, steps=3,
                       guidance=4.0, seed=2).validated()

    def run(held=None):
        items = joint_items(pipe, req, layer_seeds(req), pipe.vae, pipe.unet, loaded.device, pipe.unet.dtype)
        return LayeredSampler(loaded, pipe, items, LayeredSettings.from_request(req), LayeredOptions(held=held))(
            progress=ignore_progress, cancel=CancelToken(), layers=2).latents

    free = run()
    known = free.flip(-1).clone() * 0.5  # anything that is not what the free run makes
    mask = np.zeros((32, 32), np.float32)
    mask[:, :20] = 1.0
    import torch

    held = run(HeldRegion(latents=known, mask=torch.from_numpy(mask)))
    assert torch.equal(held[..., :20], known[..., :20].to(held.dtype))
    assert not torch.allclose(held[..., 20:], free[..., 20:])  # the generated side saw the held one
    assert (held[..., 20:] - known[..., 20:]).abs().mean() > 0.05


def test_paste_known_is_exact_away_from_the_seam_and_ramps_across_it():
    rng = np.random.default_rng(1)
    new = rng.integers(0, 256, (96, 128, 4), dtype=np.uint8)
    old = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    out = paste_known(new, old, (64, 16))  # touches the right edge: no seam there
    region = out[16:80, 64:128]
    s = SEAM_PIXELS
    np.testing.assert_array_equal(region[s:-s, s:], old[s:-s, s:])  # right border: exact to the edge
    assert (region[:s, s:] != old[:s, s:]).any() and (region[:, :s] != old[:, :s]).any()
    np.testing.assert_array_equal(out[:16], new[:16])  # outside the old canvas: the new pixels
    np.testing.assert_array_equal(out[:, :64], new[:, :64])
    # Along the left seam the opaque mix moves from the new pixel toward the old one.
    flat_new = np.zeros((8, 16, 3), np.uint8)
    flat_old = np.full((8, 8, 3), 250, np.uint8)
    ramp = paste_known(flat_new, flat_old, (8, 0))[4, 8:, 0].tolist()
    assert ramp == [50, 100, 150, 200, 250, 250, 250, 250]
    # A clear pixel's colour does not bleed into the mix (premultiplied).
    clear_new = np.zeros((4, 8, 4), np.uint8)
    clear_new[..., 0] = 255  # red, alpha 0
    blue_old = np.zeros((4, 4, 4), np.uint8)
    blue_old[..., 2], blue_old[..., 3] = 255, 255
    mixed = paste_known(clear_new, blue_old, (4, 0))[1, 4]
    assert mixed[0] == 0 and mixed[2] == 255 and mixed[3] == 51


def test_extend_grows_every_layer_around_the_same_frame(engine, source, tmp_path):
    before = files(source)
    events = []
    margins = (0.25, 0.1, 0.0, 0.0)
    stack = engine.extend(source, margins, tmp_path / "ext", tta_passes=1, progress=events.append)
    out = tmp_path / "ext"
    assert files(source) == before  # the old stack is untouched
    src = load_stack(source)
    plan = plan_extension(256, 256, None, margins)
    ox, oy = extension_offset(256, 256, None, margins)
    loaded = load_stack(out)
    assert (loaded.width, loaded.height) == (plan.width, plan.height) == (320, 320)
    assert loaded.frame == pytest.approx(plan.frame) and (ox, oy) == (64, 64)
    assert loaded.shot["margins"] == list(margins) and loaded.shot["extended_from"]["offset"] == [64, 64]
    # The same layers: names, kinds, prompts, seeds, depths, boxes (frame coordinates), name.
    for key in ("name", "kind", "prompt", "seed", "depth", "box"):
        assert [getattr(layer, key) for layer in loaded.layers] == [getattr(layer, key) for layer in src.layers]
    assert loaded.name == src.name and loaded.method == "joint" and stack == loaded
    # Old pixels: byte-identical away from the seam (the top and left borders face new pixels).
    old_images, new_images = load_layer_images(src, source), load_layer_images(loaded, out)
    s = SEAM_PIXELS
    for old, new in zip(old_images, new_images):
        region = new[oy:oy + 256, ox:ox + 256]
        np.testing.assert_array_equal(region[s:, s:], old[s:, s:])
    assert new_images[0][:oy].std() > 0 and new_images[0][:, :ox].std() > 0  # the margins were generated
    for i in (1, 2):  # stored masks pasted back the same way
        old_mask = load_png(source / src.layers[i].mask, "L", 256, 256)
        new_mask = load_png(out / loaded.layers[i].mask, "L", 320, 320)
        np.testing.assert_array_equal(new_mask[oy + s:, ox + s:], old_mask[s:, s:])
    old_blend = load_png(source / src.blended, "RGB", 256, 256)
    np.testing.assert_array_equal(load_png(out / loaded.blended, "RGB", 320, 320)[oy + s:, ox + s:], old_blend[s:, s:])
    composite = np.asarray(Image.open(out / "composite.png"))
    np.testing.assert_array_equal(composite, alpha_over(new_images))
    assert any(e.phase == "denoise" for e in events) and any(e.phase == "decode" for e in events)

    # An edit of the extended stack keeps its canvas and frame.
    edited = engine.regenerate(out, 2, tmp_path / "edit", new_seed=77, tta_passes=1)
    assert (edited.width, edited.height, edited.frame) == (loaded.width, loaded.height, loaded.frame)

    # Extending again (a framed stack now) keeps that frame's pixels and recomputes it.
    again = engine.extend(out, (0.5, 0.1, 0.2, 0.1), tmp_path / "ext2", tta_passes=1)
    plan2 = plan_extension(320, 320, loaded.frame, (0.5, 0.1, 0.2, 0.1))
    ox2, oy2 = extension_offset(320, 320, loaded.frame, (0.5, 0.1, 0.2, 0.1))
    assert (again.width, again.height) == (plan2.width, plan2.height) and again.frame == pytest.approx(plan2.frame)
    inner = load_layer_images(again, tmp_path / "ext2")[0][oy2 + s:oy2 + 320 - s, ox2 + s:ox2 + 320 - s]
    np.testing.assert_array_equal(inner, new_images[0][s:320 - s, s:320 - s])


@pytest.mark.parametrize("margins, needle", [
    ((0.25, -0.1, 0.0, 0.0), "margins.top = -0.1 is outside 0..4"),
    ((0.25, 0.0, float("inf"), 0.0), "margins.right must be a finite number"),
    ((0.25, 0.0), "four numbers"),
    ((4.0, 0.0, 4.0, 0.0), "needs 2304 pixels, more than the cap of 2048"),
    ((0.0, 0.0, 0.0, 0.0), "already holds these margins"),
])
def test_extend_refuses_bad_margins_by_name_and_writes_nothing(engine, source, tmp_path, margins, needle):
    with pytest.raises(InvalidRequest) as err:
        engine.extend(source, margins, tmp_path / "bad", tta_passes=1)
    assert err.value.field == "margins" and needle in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_a_cancelled_extension_leaves_nothing(engine, source, tmp_path):
    from inference.errors import Cancelled

    cancel = CancelToken()

    def stop_at_first_step(p):
        if p.phase == "denoise" and p.step == 1:
            cancel.cancel("stop")

    with pytest.raises(Cancelled):
        engine.extend(source, (0.3, 0.0, 0.0, 0.0), tmp_path / "cut", tta_passes=1, progress=stop_at_first_step,
                      cancel=cancel)
    assert list(tmp_path.iterdir()) == []
