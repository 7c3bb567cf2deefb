"""Lean activations (inference/lean_unet.py): the same UNet result in less memory, installed
and removed exactly; the planner's choice of it; the offload parking of the decoders."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from inference.engine import Engine, EngineSettings
from inference.errors import InvalidRequest
from inference.lean_unet import RowChunked, TokenChunked, lean_activations, lean_targets
from tests.test_chunked_unet import BOX, assert_same_layers, request, run_method
from tests.test_joint import engine, sd15_loaded  # noqa: F401 (fixtures: the tiny SD 1.5 model)


@pytest.fixture(scope="module")
def loaded():
    return Engine(EngineSettings(device="cpu", allow_download=False)).load("tiny")


def sd15_unet():
    """A tiny UNet of SD 1.5's topology (cross-attention down blocks, a plain last one)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=32, block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
                                cross_attention_dim=32, attention_head_dim=2).eval()


def random_inputs(unet, batch: int, size: int = 32) -> dict:
    from inference.memory_model import unet_meta_inputs

    meta = unet_meta_inputs(unet.config, batch, (size, size), torch.float32)
    g = torch.Generator().manual_seed(1)

    def real(v):
        return torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.tensor(500)

    return {k: ({n: real(t) for n, t in v.items()} if isinstance(v, dict) else real(v)) for k, v in meta.items()}


def call(unet, inputs):
    with torch.inference_mode():
        return unet(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_lean_call_equals_plain_call(loaded, family):
    unet = loaded.pipeline.unet if family == "sdxl" else sd15_unet()
    inputs = random_inputs(unet, 4)
    plain = call(unet, inputs)
    resnet = next(m for n, m in unet.named_modules() if n.endswith("resnets.0"))
    ff = next(m for n, m in unet.named_modules() if n.endswith(".ff"))
    seen = {"resnet": [], "ff": []}
    hooks = [resnet.register_forward_pre_hook(lambda _m, a: seen["resnet"].append(a[0].shape[0])),
             ff.register_forward_pre_hook(lambda _m, a: seen["ff"].append(tuple(a[0].shape[:2])))]
    try:
        with lean_activations(unet, tokens=64) as wrapped:
            lean = call(unet, inputs)
    finally:
        for h in hooks:
            h.remove()
    assert wrapped > 0
    assert set(seen["resnet"]) == {1}  # the original module ran row by row
    assert all(rows * tokens <= 64 for rows, tokens in seen["ff"]) and len(seen["ff"]) > 1
    assert torch.allclose(lean, plain, atol=1e-5, rtol=1e-4)


def test_row_chunked_block_returns_what_the_block_returns(loaded):
    """A plain down block split by rows: the same hidden states and skips, and its hidden
    states still the very tensor of its last skip (one buffer, as unsplit)."""
    from diffusers.models.unets.unet_2d_blocks import DownBlock2D

    block = next(m for m in loaded.pipeline.unet.down_blocks if isinstance(m, DownBlock2D))
    channels = block.resnets[0].in_channels
    x, temb = torch.randn(3, channels, 16, 16), torch.randn(3, block.resnets[0].time_emb_proj.in_features)
    with torch.inference_mode():
        plain_h, plain_skips = block(x, temb)
        lean_h, lean_skips = RowChunked(block)(x, temb)
    assert (lean_h is lean_skips[-1]) == (plain_h is plain_skips[-1])
    assert torch.allclose(lean_h, plain_h, atol=1e-5) and len(lean_skips) == len(plain_skips)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(lean_skips, plain_skips))


def test_lean_restores_the_exact_modules_also_after_an_error(loaded):
    unet = loaded.pipeline.unet
    before = dict(unet.named_modules())
    state = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    params = sorted(p.data_ptr() for p in unet.parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with lean_activations(unet):
            modules = list(unet.modules())
            assert any(isinstance(m, RowChunked) for m in modules)
            assert any(isinstance(m, TokenChunked) for m in modules)
            assert sorted(p.data_ptr() for p in unet.parameters()) == params  # held, never copied
            raise RuntimeError("boom")
    after = dict(unet.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not any(isinstance(m, (RowChunked, TokenChunked)) for m in unet.modules())
    assert {k: v.data_ptr() for k, v in unet.state_dict().items()} == state


def test_lean_wraps_outermost_row_wise_modules_once(loaded):
    from diffusers.models.resnet import ResnetBlock2D

    unet = loaded.pipeline.unet
    names = [n for n, _ in lean_targets(unet)]
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)  # none nested
    covered = [n for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
    assert all(any(n == t or n.startswith(t + ".") for t in names) for n in covered)
    with lean_activations(unet):
        with lean_activations(unet) as again:  # nothing wrapped twice
            assert again == 0


def test_lean_works_under_an_offload_hook_and_around_a_hooked_inner(loaded):
    """accelerate's model-offload hook sits on the top-level UNet (as diffusers puts it);
    the wrappers call the inner module itself, so its hooks (and an in-place compile,
    which goes through the same `__call__`) still run."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    unet = loaded.pipeline.unet
    inputs = random_inputs(unet, 3)
    plain = call(unet, inputs)
    inner = unet.up_blocks[0].resnets[0]
    calls = []
    handle = inner.register_forward_hook(lambda *_: calls.append(1))
    cpu_offload_with_hook(unet, execution_device="cpu")
    try:
        with lean_activations(unet):
            lean = call(unet, inputs)
    finally:
        remove_hook_from_module(unet)
        handle.remove()
    assert len(calls) == 3 and torch.allclose(lean, plain, atol=1e-5, rtol=1e-4)


def test_traced_lean_peak_is_below_the_plain_one(loaded):
    from inference.memory_model import meta_unet, traced_peak, unet_activation_model, unet_meta_inputs

    unet = loaded.pipeline.unet
    size, rows = (64, 64), 8
    meta = meta_unet(unet.config, torch.float32)
    plain = traced_peak(lambda: meta(**unet_meta_inputs(unet.config, rows, size, torch.float32)))
    with lean_activations(meta):
        lean = traced_peak(lambda: meta(**unet_meta_inputs(unet.config, rows, size, torch.float32)))
    assert lean < 0.8 * plain
    per_row, fixed = unet_activation_model(unet.config, size, torch.float32, lean=True)
    assert abs(fixed + rows * per_row - lean) < 0.1 * lean  # slope and intercept (from 2 and 4 rows) hold at 8


def test_planner_picks_lean_on_accelerators_and_on_the_cpu_only_when_short(loaded, monkeypatch):
    from inference import memory_model
    from inference.memory_model import HEADROOM, unet_activation_model, unet_call_plan

    unet = loaded.pipeline.unet
    size = (64, 64)
    plain_row, _ = unet_activation_model(unet.config, size, unet.dtype)
    lean_row, lean_fixed = unet_activation_model(unet.config, size, unet.dtype, lean=True)
    plan = lambda device, **kw: unet_call_plan(unet, size, device, 8, **kw)  # noqa: E731
    free = {"now": HEADROOM + 100 * plain_row}
    monkeypatch.setattr(memory_model, "free_memory", lambda device: free["now"])
    assert plan("cuda") == (8, True)  # plenty of memory: still lean on a GPU
    assert plan("cpu") == (8, False)  # ... but not on the CPU
    free["now"] = HEADROOM + int(3.5 * plain_row)  # 3 plain rows fit; lean ones more
    rows, lean = plan("cpu")
    assert lean and rows == min(8, int((3.5 * plain_row - lean_fixed) // lean_row)) > 3
    assert plan("cpu", lean="off") == (3, False)
    assert plan("cpu", lean="on") == (rows, True)
    assert plan("cpu", max_batch=2) == (2, False)  # 2 plain rows fit: no need
    assert plan("cuda", max_batch=2, lean="off") == (2, False)
    monkeypatch.setattr(memory_model, "free_memory", lambda device: None)
    assert plan("mps") == (8, True)  # unknown free memory: one call, lean
    with pytest.raises(ValueError, match="lean must be one of"):
        plan("cpu", lean="sometimes")


@pytest.mark.slow
def test_a_short_cpu_run_turns_lean_on_by_itself(loaded, monkeypatch):
    """auto on the CPU: when the plain call of a step's 8 rows does not fit, the sampler
    runs the UNet in lean activations, with the rows the lean model allows."""
    from inference import memory_model

    unet = loaded.pipeline.unet
    plain_row, _ = memory_model.unet_activation_model(unet.config, (32, 32), unet.dtype)
    monkeypatch.setattr(memory_model, "free_memory", lambda device: memory_model.HEADROOM + int(7.5 * plain_row))
    seen, handle = lean_batches(unet)
    try:
        _, batches = run_method(loaded, request(steps=1), max_batch=None)
    finally:
        handle.remove()
    assert set(seen) == {1}  # lean: the ResNet blocks ran row by row
    assert sum(batches) == 8 and max(batches) <= 7


def lean_batches(unet) -> tuple[list, object]:
    """The batch sizes the first ResNet block sees (1s: lean activations are on)."""
    seen: list[int] = []
    return seen, unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))


@pytest.mark.slow
@pytest.mark.parametrize("method, max_batch", [("joint", None), ("joint", 3), ("harmonized", None)])
def test_lean_run_equals_plain_run(loaded, method, max_batch):
    kw = dict(method=method, steps=3) if method == "joint" else \
        dict(method=method, layers=(type(request().layers[0])("a white horse", box=BOX),), steps=3)
    req = request(**kw)
    results = {}
    for lean in ("off", "on"):
        seen, handle = lean_batches(loaded.pipeline.unet)
        try:
            results[lean], batches = run_method(dataclasses.replace(loaded, lean_activations=lean), req, max_batch)
        finally:
            handle.remove()
        assert (set(seen) == {1}) == (lean == "on")
        assert max_batch is None or max(batches) <= max(max_batch, 4)
    assert_same_layers(results["off"], results["on"])


@pytest.mark.slow
def test_sd15_joint_run_with_lean_equals_plain(sd15_loaded):
    """SD 1.5's frame triples (attention sharing processors) under lean activations."""
    from inference.methods.joint import generate_joint
    from inference.progress import CancelToken, ignore_progress
    from tests.test_joint import request as sd15_request

    runs = {}
    for lean in ("off", "on"):
        seen, handle = lean_batches(sd15_loaded.pipeline.unet)
        try:
            runs[lean] = generate_joint(SimpleNamespace(**{**vars(sd15_loaded), "lean_activations": lean}),
                                        sd15_request(steps=2), progress=ignore_progress, cancel=CancelToken())
        finally:
            handle.remove()
        assert (set(seen) == {1}) == (lean == "on")
    for a, b in [(runs["off"].background, runs["on"].background), (runs["off"].blended, runs["on"].blended),
                 *zip(runs["off"].foregrounds, runs["on"].foregrounds)]:
        assert abs(a.astype(int) - b.astype(int)).max() <= 1


def test_engine_setting_is_checked_and_reaches_the_model(tmp_path):
    with pytest.raises(InvalidRequest, match="lean_activations: must be one of auto, on, off, got 'yes'"):
        EngineSettings(lean_activations="yes")
    engine = Engine(EngineSettings(device="cpu", allow_download=False, lean_activations="on"))
    assert engine.load("tiny").lean_activations == "on"


@pytest.mark.slow
def test_cli_refuses_a_bad_lean_choice(tmp_path):
    from tests.test_cli import GOOD, run_cli

    out = tmp_path / "stack"
    result = run_cli("generate", *GOOD, "--lean-activations", "maybe", "--out", str(out), "--offline", "--quiet")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lean_activations: must be one of auto, on, off" in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_serve_refuses_a_bad_lean_choice_before_ready(tmp_path):
    from tests.test_server_lifecycle import _serve, one_line_failure

    line = one_line_failure(_serve(["--port", "0", "--device", "cpu", "--lean-activations", "always"], tmp_path))
    assert "lean_activations: must be one of auto, on, off" in line


# ------------------------------------------------------------------ offload parking
class Located(torch.nn.Module):
    """A module that records where `.to(...)` sends it."""

    def __init__(self):
        super().__init__()
        self.moves: list[str] = []
        self.where = "cpu"

    def to(self, device, *args, **kwargs):
        self.where = str(torch.device(device))
        self.moves.append(self.where)
        return self


def test_codecs_wait_in_host_memory_under_offload():
    from inference.models import HOST, codecs_on_device

    loaded = SimpleNamespace(decoder=Located(), encoder=Located(), device=torch.device("meta"), offloaded=True)
    with codecs_on_device(loaded):
        assert loaded.decoder.where == loaded.encoder.where == "meta"
        with codecs_on_device(loaded):  # nested: moved once
            pass
        assert loaded.decoder.where == "meta"
    assert loaded.decoder.moves == loaded.encoder.moves == ["meta", HOST]
    with pytest.raises(RuntimeError):
        with codecs_on_device(loaded):
            raise RuntimeError("decode failed")
    assert loaded.decoder.where == HOST  # back home after an error too
    resident = SimpleNamespace(decoder=Located(), encoder=None, device=torch.device("meta"), offloaded=False)
    with codecs_on_device(resident):
        pass
    assert resident.decoder.moves == []  # without offload nothing moves


@pytest.mark.slow
def test_joint_run_decodes_with_the_decoder_brought_over_and_denoises_without_it(loaded, monkeypatch):
    """Under offload the decoder is on the device only while it decodes (a joint run): its
    moves are recorded (not applied: this CPU is both host and device) and checked at every
    UNet call and every transparent decode."""
    import inference.transparent_vae as tv
    from inference.methods import run_method as run
    from inference.progress import CancelToken, ignore_progress

    where = {"decoder": "host", "encoder": "host"}
    moved = []

    def recorder(name, module):
        def to(device, *a, **k):
            where[name] = str(device)
            moved.append((name, str(device)))
            return module
        return to

    monkeypatch.setattr("inference.models.HOST", "host")
    monkeypatch.setattr(loaded.decoder, "to", recorder("decoder", loaded.decoder))
    monkeypatch.setattr(loaded.encoder, "to", recorder("encoder", loaded.encoder))
    at_decode, at_unet = [], []
    decode = tv.decode_transparent
    monkeypatch.setattr(tv, "decode_transparent", lambda *a, **k: at_decode.append(where["decoder"]) or decode(*a, **k))
    handle = loaded.pipeline.unet.register_forward_pre_hook(lambda *_: at_unet.append(dict(where)))
    try:
        run(dataclasses.replace(loaded, offloaded=True), request(steps=2), progress=ignore_progress,
            cancel=CancelToken())
    finally:
        handle.remove()
    assert at_decode and set(at_decode) == {"cpu"}  # brought onto the device to decode
    assert at_unet and all(w == {"decoder": "host", "encoder": "host"} for w in at_unet)  # parked meanwhile
    assert ("decoder", "cpu") in moved and where == {"decoder": "host", "encoder": "host"}
