"""The chunked UNet of layered runs: the same result as one call per step (tiny model), the
chunk plan (whole guidance halves while the layers see each other), and the chunk size."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inference.engine import Engine, EngineSettings
from inference.progress import CancelToken, ignore_progress
from inference.request import LayerSpec, StackRequest

pytestmark = pytest.mark.slow

BOX = (0.5, 0.0, 1.0, 0.5)


@pytest.fixture(scope="module")
def loaded():
    engine = Engine(EngineSettings(device="cpu", allow_download=False))
    return engine.load("tiny")


def request(**kw) -> StackRequest:
    base = dict(prompt="a forest at dusk", background="pine trees",
                layers=(LayerSpec("a red fox", box=BOX), LayerSpec("a rock")),
                width=256, height=256, steps=4, guidance=4.0, seed=5, tta_passes=1, method="joint")
    base.update(kw)
    return StackRequest(**base).validated()


def run_method(loaded, req: StackRequest, max_batch):
    """The method's layers with `max_batch` rows per UNet call, and every call's batch size."""
    from inference.methods import run_method as run

    unet = loaded.pipeline.unet
    batches: list[int] = []
    handle = unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    chunked = dataclasses.replace(loaded, max_batch=max_batch)
    try:
        layers = run(chunked, req, progress=ignore_progress, cancel=CancelToken())
    finally:
        handle.remove()
    return layers, batches


def assert_same_layers(a, b) -> None:
    """Equal within float tolerance: uint8 images at most one level apart."""
    pairs = [(a.background, b.background), (a.blended, b.blended), *zip(a.foregrounds, b.foregrounds),
             *zip(a.masks or [], b.masks or [])]
    for x, y in pairs:
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def whole_joint(loaded):
    return run_method(loaded, request(), max_batch=None)


@pytest.mark.parametrize("max_batch", [1, 3, 5])
def test_chunked_joint_equals_one_call_per_step(loaded, whole_joint, max_batch):
    req = request()
    whole, whole_batches = whole_joint
    chunked, batches = run_method(loaded, req, max_batch=max_batch)
    assert whole_batches == [8] * 4  # CFG × (background + 2 foregrounds + blended)
    # Steps 0–1 (inter-layer attention): whole halves of 4 rows, packed up to max_batch;
    # steps 2–3: rows of at most max_batch, the two captured foreground rows together.
    inter = [4, 4] if max_batch < 8 else [8]
    assert batches[:2 * len(inter)] == inter * 2
    assert all(b <= max(max_batch, 2) for b in batches[2 * len(inter):])
    assert sum(batches) == 8 * 4
    assert_same_layers(whole, chunked)


def test_chunked_harmonized_equals_one_call_per_step(loaded):
    req = request(method="harmonized", layers=(LayerSpec("a white horse", box=BOX),), steps=3)
    whole, _ = run_method(loaded, req, max_batch=None)
    chunked, batches = run_method(loaded, req, max_batch=1)
    # Prior pass (one item): rows one by one, the captured conditional row alone; main pass:
    # the composite mixes a half's items, so each half (3 rows) is one call.
    assert batches == [1, 1] * 3 + [3, 3] * 3
    assert_same_layers(whole, chunked)


def test_pack_chunks_keeps_units_whole():
    from inference.layered_sampler import pack_chunks

    assert pack_chunks([[0, 1, 2], [3, 4, 5]], 4) == [[0, 1, 2], [3, 4, 5]]
    assert pack_chunks([[0], [1], [2, 3], [4]], 3) == [[0, 1], [2, 3, 4]]
    assert pack_chunks([[0], [1]], 1) == [[0], [1]]


def test_sdxl_chunk_units_follow_the_step():
    from inference.families.sdxl import SDXLLayered
    from inference.layered_attention import AttentionCapture, LayeredAttentionState

    capture = AttentionCapture({4: [1], 5: [2]})
    state = LayeredAttentionState(["background", "foreground", "foreground"], 2, (4, 4),
                                  inter_layer_strength=0.3, capture=capture)
    family = SDXLLayered()
    assert family.chunk_units(state, 3, 2) == [[0, 1, 2], [3, 4, 5]]
    state.set_inter_layer_strength(0.0)
    assert family.chunk_units(state, 3, 2) == [[0], [1], [2], [3], [4, 5]]
    capture.enabled = False
    assert family.chunk_units(state, 3, 2) == [[r] for r in range(6)]


def test_state_refuses_mixing_attention_on_a_partial_half():
    from inference.layered_attention import LayeredAttentionState

    state = LayeredAttentionState(["background", "foreground"], 2, (4, 4), inter_layer_strength=0.3,
                                  transparency_scale=[0.0, 1.0])
    state.select_rows([2, 3])
    assert state.whole_groups("x") == 1 and state.row_items == (0, 1) and state.patched_rows.tolist() == [1]
    state.select_rows([1, 2])
    with pytest.raises(ValueError, match="whole halves"):
        state.whole_groups("inter-layer attention")
    assert state.patched_rows.tolist() == [0]
    with pytest.raises(ValueError, match="chunk rows"):
        state.select_rows([4])
    with pytest.raises(ValueError, match="one chunk"):
        state.local_rows([1, 3], "cpu")


def test_rows_that_fit_follow_free_memory(loaded, monkeypatch):
    from inference import memory_model

    unet = loaded.pipeline.unet
    per_row, fixed = memory_model.unet_activation_model(unet.config, (32, 32), unet.dtype)
    assert per_row > 0
    free = int(fixed + 3.5 * per_row + memory_model.HEADROOM)
    assert memory_model.usable_memory(free) == int(fixed + 3.5 * per_row)
    monkeypatch.setattr(memory_model, "free_memory", lambda device: free)
    assert memory_model.unet_rows_that_fit(unet, (32, 32), "cpu") == 3
    monkeypatch.setattr(memory_model, "free_memory", lambda device: 0)
    assert memory_model.unet_rows_that_fit(unet, (32, 32), "cpu") == 1
    monkeypatch.setattr(memory_model, "free_memory", lambda device: None)
    assert memory_model.unet_rows_that_fit(unet, (32, 32), "cpu") is None


def test_free_memory_chunks_a_run_automatically(loaded, monkeypatch):
    """No max_batch: the memory model's rows-that-fit decides the chunks."""
    from inference import memory_model

    monkeypatch.setattr(memory_model, "unet_rows_that_fit", lambda *a, **k: 2)
    _, batches = run_method(loaded, request(steps=2), max_batch=None)
    assert batches == [4, 4, 2, 2, 2, 2]  # step 0: halves of 4 rows (layers see each other); step 1: pairs


def test_live_bytes_counts_allocations_and_frees():
    from inference.memory_model import traced_peak

    def work():
        a = torch.empty(1024, device="meta")  # 4 KiB
        b = a * 2  # 8 KiB alive
        del a
        c = b.view(32, 32).t()  # a view: nothing new
        d = torch.empty(2048, device="meta")  # 4 + 8 = 12 KiB alive
        del b, c, d
        return torch.empty(256, device="meta")

    assert traced_peak(work) == 12 * 1024


def test_vae_decode_tiles_only_when_it_does_not_fit(loaded, monkeypatch):
    from inference import memory_model
    from inference.sampling import decode_rgb

    vae = loaded.pipeline.vae
    calls = []
    original = type(vae).tiled_decode
    monkeypatch.setattr(type(vae), "tiled_decode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    latents = torch.randn(1, 4, 80, 80, generator=torch.Generator().manual_seed(0))
    before = (vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size)
    whole, _ = decode_rgb(vae, latents)
    assert calls == []  # plenty of free memory
    monkeypatch.setattr(memory_model, "free_memory", lambda device: 0)
    tiled, _ = decode_rgb(vae, latents)
    assert calls and tiled.shape == whole.shape
    assert (vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size) == before  # put back
    assert (tiled - whole).abs().mean() < 0.1  # blended tiles: close to the untiled decode
    small, _ = decode_rgb(vae, latents[:, :, :32, :32])
    assert len(calls) == 1  # small latents never tile


def test_bfloat16_on_the_cpu_runs_joint_end_to_end(tmp_path):
    """`--dtype bfloat16` (half the resident bytes on a CPU): a joint stack of varied images."""
    from inference.stack import load_layer_images, load_stack

    engine = Engine(EngineSettings(device="cpu", allow_download=False, dtype="bfloat16"))
    assert engine.load("tiny").pipeline.unet.dtype == torch.bfloat16
    engine.generate(request(steps=2), "tiny", tmp_path / "s")
    stack = load_stack(tmp_path / "s")
    for image in load_layer_images(stack, tmp_path / "s"):
        assert np.asarray(image).std() > 0


def test_dtype_choice_is_checked():
    from inference.devices import run_dtype
    from inference.errors import InvalidRequest

    assert run_dtype("cpu") == torch.float32 and run_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(InvalidRequest, match="dtype: .*float16 is not supported on the CPU"):
        run_dtype("cpu", "float16")
    with pytest.raises(InvalidRequest, match="dtype: unknown dtype 'half'"):
        run_dtype("cpu", "half")
