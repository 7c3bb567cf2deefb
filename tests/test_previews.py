"""Live previews (issue 11 part 2), engine and server side: the cheap latent → RGB map and
alpha estimate, the refresh cadence, previews from real tiny-model runs (independent and
joint), and a running job's previews through the API (status field + image endpoint),
gone once it finished. The add-on side: tests/test_addon_previews.py; the cost:
bench/previews.py."""
from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import previews
from inference.previews import PreviewCollector, collect_previews

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


# --------------------------------------------------------------------------- the maths


def test_latent_rgb_is_the_linear_map_and_alpha_reads_distance_from_empty():
    zeros = torch.zeros(1, 4, 2, 3)
    rgb = previews.latent_rgb(zeros, "sdxl")
    assert rgb.shape == (1, 2, 3, 3)
    assert rgb[0, 0, 0] == pytest.approx([(b + 1) / 2 for b in previews.LATENT_RGB_BIAS["sdxl"]], abs=1e-6)
    one = torch.zeros(1, 4, 1, 1)
    one[0, 0] = 1.0
    assert previews.latent_rgb(one, "sd15")[0, 0, 0] == pytest.approx(
        [(f + 1) / 2 for f in previews.LATENT_RGB["sd15"][0]], abs=1e-6)
    empty = torch.full((1, 4, 1, 1), 0.5)
    x0 = torch.full((1, 4, 4, 4), 0.5)
    x0[0, :, :2] = 3.0  # the top half is content, the bottom half "nothing here"
    alpha = previews.alpha_estimate(x0, empty)
    assert alpha[0, :2].min() == 1.0 and alpha[0, 2:].max() == 0.0
    assert previews.alpha_estimate(x0, None).min() == 1.0  # no empty latent: opaque


def test_foregrounds_show_over_a_checkerboard_and_a_blend_is_composited():
    empty = torch.zeros(1, 4, 1, 1)
    background = torch.full((1, 4, 8, 8), 0.8)
    foreground = torch.zeros(1, 4, 8, 8)  # all "empty": fully transparent
    pngs = previews.preview_pngs(torch.cat([background, foreground]), ["background", "layer_01"],
                                 ["background", "foreground"], empty)
    assert sorted(pngs) == ["background", "blended", "layer_01"]
    board = previews.checkerboard(8, 8) * 255
    assert np.abs(_image(pngs["layer_01"]) - np.round(board)).max() <= 1  # only the checkerboard
    assert np.abs(_image(pngs["blended"]) - _image(pngs["background"])).max() <= 1  # nothing over it
    assert previews.row_names(["background", "foreground", "foreground", "blended"]) == [
        "background", "layer_01", "layer_02", "blended"]


def test_refreshes_every_few_steps_and_only_with_a_collector():
    collector = PreviewCollector(lambda *a: None, refreshes=4)
    assert [s for s in range(1, 31) if collector.due(s, 30)] == [8, 16, 24, 30]
    assert [s for s in range(1, 4) if collector.due(s, 3)] == [1, 2, 3]
    got = []
    x0 = torch.zeros(1, 4, 2, 2)
    previews.offer_preview(30, 30, x0, ["background"])  # no collector: nothing happens
    with collect_previews(PreviewCollector(lambda step, total, pngs: got.append((step, sorted(pngs))), 4)):
        assert previews.collecting()
        for step in range(1, 31):
            previews.offer_preview(step, 30, x0, ["background"])
    assert not previews.collecting()
    assert got == [(8, ["background"]), (16, ["background"]), (24, ["background"]), (30, ["background"])]


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def engine():
    from bench.common import tiny_engine

    return tiny_engine()


def _request(method: str, layers: int, steps: int = 4):
    from inference.request import LayerSpec, StackRequest

    return StackRequest(prompt="a lake", background="hills", layers=tuple(LayerSpec(f"thing {i}") for i in range(layers)),
                        width=256, height=256, steps=steps, seed=1, tta_passes=1, method=method).validated()


@pytest.mark.parametrize("method,expected", [
    ("independent", {"background", "layer_01", "layer_02"}),
    ("joint", {"background", "layer_01", "layer_02", "blended"}),
])
def test_real_runs_publish_previews_of_every_layer(engine, tmp_path, method, expected):
    published = []
    collector = PreviewCollector(lambda step, total, pngs: published.append((step, total, pngs)))
    with collect_previews(collector):
        engine.generate(_request(method, 2), "tiny", tmp_path / "stack")
    names = set().union(*(pngs for _s, _t, pngs in published))
    assert names == expected
    assert collector.family == "sdxl"  # the tiny model is SDXL-family: set by the engine
    for _step, _total, pngs in published:
        for png in pngs.values():
            assert Image.open(io.BytesIO(png)).size == (32, 32)  # 1/8 of the image
    assert published[-1][0] == published[-1][1]  # the last step is always shown


def test_a_running_job_serves_its_previews_then_drops_them(engine, tmp_path):
    from test_server_api import AUTH, Api

    api = Api(tmp_path / "out", engine=engine)
    try:
        job = api.submit(layers=[{"prompt": "a boat"}], steps=40, method="joint")
        deadline, seen = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            snapshot = api.job(job["id"])
            if snapshot.get("previews") or snapshot["status"] in ("succeeded", "failed", "cancelled"):
                seen = snapshot
                break
            time.sleep(0.02)
        assert seen is not None and seen["status"] == "running", seen
        listed = seen["previews"]
        assert set(listed["layers"]) == {"background", "layer_01", "blended"} and listed["step"] >= 1
        image = api.client.get(f"/v1/jobs/{job['id']}/previews/layer_01", headers=AUTH)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (32, 32)
        missing = api.client.get(f"/v1/jobs/{job['id']}/previews/nothing", headers=AUTH)
        assert missing.status_code == 404 and "no live preview" in missing.json()["detail"]
        done = api.wait(job["id"], timeout=180)
        assert done["status"] == "succeeded" and done["previews"] is None
        after = api.client.get(f"/v1/jobs/{job['id']}/previews/layer_01", headers=AUTH)
        assert after.status_code == 404
    finally:
        api.close()


def test_independent_previews_show_the_clean_estimate_not_the_noisy_latent(engine, monkeypatch):
    """The pipeline path offers x̂0: solved independently from two Euler latents
    (x_next = x + (σ_next − σ)(x − x̂0)/σ), it differs clearly from the noisy latent."""
    from inference import sampling
    from inference.progress import CancelToken

    loaded = engine._loaded
    pipe = sampling.job_pipeline(loaded.pipeline)
    noise = sampling.initial_noise(3, pipe.vae, pipe.unet, 256, 256, loaded.device, pipe.unet.dtype)
    offered = []
    monkeypatch.setattr(previews, "preview_pngs", lambda x0, *a, **k: offered.append(x0.clone()) or {})
    args = dict(prompt="hills", negative_prompt="", width=256, height=256, steps=4, guidance=5.0)
    with collect_previews(PreviewCollector(lambda *a: None, refreshes=4)):
        sampling.denoise(pipe, noise=noise.clone(), progress=lambda p: None, cancel=CancelToken(),
                         layer=0, layers=1, **args)
    assert pipe.scheduler.__class__.__name__ == "EulerDiscreteScheduler"  # the real one is back

    latents = []  # the same run through the plain pipeline, keeping each step's latent
    pipe(prompt=args["prompt"], width=256, height=256, num_inference_steps=4, guidance_scale=5.0,
         latents=noise.clone(), output_type="latent", return_dict=False,
         callback_on_step_end=lambda _p, _i, _t, kw: latents.append(kw["latents"].clone()) or kw)
    sigma, sigma_next = pipe.scheduler.sigmas[0], pipe.scheduler.sigmas[1]
    start = noise * pipe.scheduler.init_noise_sigma
    clean = start - sigma * (latents[0] - start) / (sigma_next - sigma)
    assert len(offered) == 4
    error = (offered[0] - clean).abs().max()
    assert error < 1e-3 * clean.abs().max()
    assert (latents[0] - clean).abs().max() > 100 * error  # the old preview: the noisy latent
