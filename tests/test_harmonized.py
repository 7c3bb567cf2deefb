"""Method `harmonized` (LayerFusion-style): mask math on synthetic maps, end to end on tiny."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import Engine, EngineSettings
from inference.masks import box_mask
from inference.methods.harmonized import fusion_masks
from inference.request import LayerSpec, StackRequest
from inference.stack import alpha_over, load_layer_images, load_stack


def test_fusion_masks_on_synthetic_maps():
    h = w = 8
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[2:5, 3:7] = True
    # Object tokens attend compactly (spread 0.05 of the keys), the rest diffusely (0.9).
    spread = torch.where(obj, torch.tensor(0.05), torch.tensor(0.9))
    # The layer's words are heard strongly on the object, a little on a distractor patch.
    cross = torch.full((h, w), 0.01)
    cross[obj] = 0.6
    cross[6:, :2] = 0.3  # distractor: diffuse attention there, so structure should veto it
    soft, hard = fusion_masks(spread, cross, box_mask(None, h, w))
    assert soft[obj].min() == pytest.approx(1.0)
    assert soft[~obj].max() == pytest.approx(0.0)
    assert torch.equal(hard.bool(), obj)
    # A box removes what lies outside it.
    box = box_mask((0.0, 0.0, 0.75, 1.0), h, w)  # columns 0..5
    soft_b, hard_b = fusion_masks(spread, cross, box)
    assert soft_b[:, 6:].max() == 0 and torch.equal(hard_b[:, :6].bool(), obj[:, :6])
    # Soft mask grades with the evidence: weaker content → lower but non-zero mask.
    cross2 = cross.clone()
    cross2[2, 3] = 0.35
    soft2, hard2 = fusion_masks(spread, cross2, box_mask(None, h, w))
    assert 0.4 < soft2[2, 3] < 0.7 and soft2[3, 4] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineSettings(device="cpu", allow_download=False))


def request(**kw) -> StackRequest:
    base = dict(prompt="a quiet meadow", background="green grass", layers=(LayerSpec("a white horse"),),
                width=256, height=256, steps=2, guidance=4.0, seed=8, tta_passes=1, method="harmonized")
    base.update(kw)
    return StackRequest(**base)


@pytest.mark.slow
def test_harmonized_end_to_end(engine, tmp_path):
    unet = engine.load("tiny").pipeline.unet
    batches = []
    handle = unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    events = []
    try:
        engine.generate(request(), "tiny", tmp_path / "s", progress=events.append)
    finally:
        handle.remove()
    assert batches == [2, 2, 6, 6]  # prior pass (fg, CFG) then fg + bg + blended, one call per step
    denoise = [e.step for e in events if e.phase == "denoise"]
    assert denoise == [0, 1, 2, 3, 4]
    stack = load_stack(tmp_path / "s")
    assert stack.method == "harmonized" and stack.blended == "blended.png"
    assert stack.layers[1].mask == "mask_01.png"
    mask = np.asarray(Image.open(tmp_path / "s" / "mask_01.png"))
    assert mask.max() > 200 and mask.min() < 30  # minmax-normalized soft mask (bilinear upsampled)
    composite = np.asarray(Image.open(tmp_path / "s" / "composite.png"))
    assert np.array_equal(composite, alpha_over(load_layer_images(stack, tmp_path / "s")))
    engine.generate(request(), "tiny", tmp_path / "t")
    for name in ("background.png", "layer_01.png", "blended.png", "mask_01.png"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()
    # The background attends only to itself: the same as in a joint run without inter-layer
    # attention would not hold (different batch); but it must not depend on the foreground prompt.
    engine.generate(request(layers=(LayerSpec("a black cat"),)), "tiny", tmp_path / "u")
    assert (tmp_path / "u" / "background.png").read_bytes() == (tmp_path / "s" / "background.png").read_bytes()
    assert (tmp_path / "u" / "blended.png").read_bytes() != (tmp_path / "s" / "blended.png").read_bytes()
