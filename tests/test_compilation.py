"""`--compile`: the UNet's attention-free blocks compiled in place (tiny model, CPU, inductor).

The module compiles one tiny engine once (about a minute of inductor on this CPU, most of it
C++ builds that inductor caches on disk) and every test reuses it against an eager engine.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.engine import Engine, EngineSettings
from inference.errors import InvalidRequest
from inference.progress import CancelToken, ignore_progress
from inference.request import LayerSpec, StackRequest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NO_COMPILER = {**{k: v for k, v in os.environ.items() if k != "MULTIPLANE_TOKEN"},
               "CXX": "/nonexistent/c++"}  # inductor's C++ compiler ($CXX) missing


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled():
    """The compiled tiny model; past dynamo's recompile limit a block would silently run
    eager (no new graph counted), so here hitting it raises instead."""
    import torch._dynamo.config as dynamo_config

    messages = []
    engine = Engine(EngineSettings(device="cpu", allow_download=False, compile=True))
    loaded = engine.load("tiny", progress=lambda p: messages.append(p.message))
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        yield loaded, messages


@pytest.fixture(scope="module")
def eager():
    return Engine(EngineSettings(device="cpu", allow_download=False)).load("tiny")


def unet_inputs(unet, rows: int, latent_size: tuple[int, int], seed: int = 0) -> dict:
    from inference.memory_model import unet_meta_inputs

    generator = torch.Generator().manual_seed(seed)
    meta = unet_meta_inputs(unet.config, rows, latent_size, torch.float32)
    inputs = {k: ({n: torch.randn(t.shape, generator=generator) for n, t in v.items()} if isinstance(v, dict)
                  else torch.randn(v.shape, generator=generator)) for k, v in meta.items()}
    inputs["timestep"] = torch.tensor(700)
    return inputs


def call(unet, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return unet(**inputs).sample


def test_load_compiles_only_attention_free_blocks_and_reports_the_warm_up(compiled):
    from diffusers.models.attention_processor import Attention

    from inference.compilation import COMPILING_MESSAGE, compilable_blocks

    loaded, messages = compiled
    unet = loaded.pipeline.unet
    blocks = compilable_blocks(unet)
    kinds = {type(b).__name__ for b in blocks}
    assert kinds == {"ResnetBlock2D", "FeedForward", "Downsample2D", "Upsample2D"}
    assert all(b._compiled_call_impl is not None for b in blocks)
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert attention and all(m._compiled_call_impl is None for m in attention)
    assert unet._compiled_call_impl is None  # the UNet itself stays eager: processors swap per job
    assert COMPILING_MESSAGE in messages
    done = [m for m in messages if m.startswith(f"compiled {len(blocks)} UNet blocks in ")]
    assert len(done) == 1 and done[0].endswith(" s (once per loaded model)")


@pytest.mark.parametrize("rows, latent_size", [(3, (32, 32)), (7, (24, 40)), (2, (16, 48))])
def test_compiled_unet_call_equals_eager_without_recompiling(compiled, eager, rows, latent_size):
    unet = compiled[0].pipeline.unet
    inputs = unet_inputs(unet, rows, latent_size, seed=rows)
    graphs = unique_graphs()
    got = call(unet, inputs)
    assert unique_graphs() == graphs  # another batch size and canvas reuse the warm-up's graphs
    torch.testing.assert_close(got, call(eager.pipeline.unet, inputs), atol=1e-4, rtol=1e-4)


def test_one_row_calls_are_warmed_up_too(compiled, eager):
    """A batch of 1 has graphs of its own (size 1 broadcasts): the warm-up compiles them."""
    unet = compiled[0].pipeline.unet
    graphs = unique_graphs()
    for seed, latent_size in enumerate(((24, 40), (32, 16))):
        inputs = unet_inputs(unet, 1, latent_size, seed=11 + seed)
        got = call(unet, inputs)
        torch.testing.assert_close(got, call(eager.pipeline.unet, inputs), atol=1e-4, rtol=1e-4)
    assert unique_graphs() == graphs


def test_attention_processors_still_run_and_capture_under_compile(compiled, eager):
    from inference.layered_attention import AttentionCapture, LayeredAttentionState, layered_attention

    maps = []
    for loaded in (compiled[0], eager):
        unet = loaded.pipeline.unet
        capture = AttentionCapture({1: [1, 2]}, self_items=[1])
        state = LayeredAttentionState(["background", "foreground"], 1, (32, 32), inter_layer_strength=0.5,
                                      capture=capture)
        with layered_attention(unet, state):
            call(unet, unet_inputs(unet, 2, (32, 32), seed=3))
        maps.append((capture.cross_map(1, (32, 32)), capture.spread_map(1, (32, 32))))
    (cross, spread), (eager_cross, eager_spread) = maps
    assert cross is not None and spread is not None and cross.abs().sum() > 0
    torch.testing.assert_close(cross, eager_cross, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spread, eager_spread, atol=1e-4, rtol=1e-4)


def run_joint(loaded, max_batch, **changes):
    from inference.methods import run_method

    req = StackRequest(prompt="a forest at dusk", background="pine trees",
                       layers=(LayerSpec("a red fox", box=(0.5, 0.0, 1.0, 0.5)),), width=256, height=256,
                       steps=3, guidance=4.0, seed=5, tta_passes=1, method="joint").validated()
    return run_method(dataclasses.replace(loaded, max_batch=max_batch, **changes), req, progress=ignore_progress,
                      cancel=CancelToken())


def test_compiled_joint_run_equals_eager_with_chunks_and_no_recompile(compiled, eager):
    graphs = unique_graphs()
    got = run_joint(compiled[0], max_batch=2)  # chunks of 3 rows (whole halves), then of 2 and 1
    assert unique_graphs() == graphs
    want = run_joint(eager, max_batch=None)
    pairs = [(got.background, want.background), (got.blended, want.blended),
             *zip(got.foregrounds, want.foregrounds), *zip(got.masks, want.masks)]
    for a, b in pairs:
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # one 8-bit level


def test_compiled_blocks_run_inside_lean_activations_wrappers(compiled, eager, monkeypatch):
    """Lean activations wrap the compiled blocks (row by row, feed-forwards in token pieces)
    and call them: the same layers as eager without lean, and nothing recompiled."""
    from inference import lean_unet

    calls = []
    row_chunked = lean_unet.RowChunked.forward
    monkeypatch.setattr(lean_unet.RowChunked, "forward",
                        lambda self, *a, **kw: calls.append(1) or row_chunked(self, *a, **kw))
    graphs = unique_graphs()
    got = run_joint(compiled[0], max_batch=None, lean_activations="on")
    assert calls and unique_graphs() == graphs  # the wrappers ran, the compiled blocks inside them
    want = run_joint(eager, max_batch=None, lean_activations="off")
    for a, b in [(got.background, want.background), (got.blended, want.blended),
                 *zip(got.foregrounds, want.foregrounds), *zip(got.masks, want.masks)]:
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_settings_refuse_a_non_boolean_compile():
    with pytest.raises(InvalidRequest) as error:
        EngineSettings(compile="yes")
    assert error.value.field == "compile" and "true or false" in error.value.message


def test_missing_cpu_compiler_is_refused_when_the_engine_is_made(monkeypatch):
    from inference import compilation

    monkeypatch.setattr(compilation, "_cpu_compiler_found", lambda: False)
    with pytest.raises(InvalidRequest) as error:
        Engine(EngineSettings(device="cpu", allow_download=False, compile=True))
    assert error.value.field == "compile" and "C++ compiler" in error.value.message
    assert "without --compile" in error.value.message


def test_unsupported_device_is_refused():
    from inference.compilation import check_compile_support

    with pytest.raises(InvalidRequest) as error:
        check_compile_support(torch.device("mps"))
    assert error.value.field == "compile" and "mps" in error.value.message


def test_a_backend_failing_at_warm_up_is_one_clear_error(monkeypatch, eager):
    from inference import compilation

    unet = eager.pipeline.unet

    def broken_warm_up(*_args, **_kw):
        raise RuntimeError("C++ compile error: cannot find -lgomp")

    monkeypatch.setattr(compilation, "warm_up", broken_warm_up)
    monkeypatch.setattr(compilation, "compile_unet_blocks", lambda _unet: 0)
    with pytest.raises(InvalidRequest) as error:
        compilation.compile_loaded_unet(unet, "cpu", ignore_progress)
    assert error.value.field == "compile" and "cannot find -lgomp" in error.value.message


def one_error_line(args, tmp_path) -> str:
    """`python -m server ARGS` without a C++ compiler: exit 2, one line, nothing on stdout."""
    proc = subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, env=NO_COMPILER, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: compile: "), proc.stderr
    return lines[0]


def test_cli_generate_with_compile_and_no_compiler_exits_2(tmp_path):
    line = one_error_line(["generate", "--prompt", "a forest", "--width", "256", "--height", "256", "--steps", "1",
                           "--model", "tiny", "--device", "cpu", "--compile", "--offline", "--quiet",
                           "--out", str(tmp_path / "stack")], tmp_path)
    assert "C++ compiler" in line and "without --compile" in line
    assert list(tmp_path.iterdir()) == []


def test_serve_with_compile_and_no_compiler_fails_before_ready(tmp_path):
    line = one_error_line(["serve", "--port", "0", "--device", "cpu", "--compile",
                           "--output-root", str(tmp_path / "stacks")], tmp_path)
    assert "C++ compiler" in line
