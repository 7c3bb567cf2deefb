"""bench/gpu is ready to run: its driver end to end on the tiny model (CPU smoke run), the
one-command script's syntax, and the wheel list (what a PyTorch-only machine lacks)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_driver_runs_every_scenario_on_the_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--device", "cpu", "--steps", "1",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["device"] == "cpu" and report["steps"] == 1
    assert set(report["results"]) == {"plain_1_image", "plain_batch_5", "independent_bg_3fg", "joint_bg_3fg",
                                      "joint_forced_chunking", "joint_channels_last"}
    assert all(r["seconds"] > 0 and r["peak_vram_gib"] is None for r in report["results"].values())
    assert set(report["ratios"]) == {"independent_vs_4_plain_images", "joint_vs_plain_batch_5",
                                     "joint_vs_independent", "forced_chunking_vs_joint",
                                     "channels_last_vs_joint"}
    assert all(v > 0 for v in report["ratios"].values())


def test_run_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "bench/gpu/run.sh")]).returncode == 0


def test_wheel_closure_leaves_out_what_torch_brings():
    from bench.gpu.fetch_wheels import closure

    wanted = closure(["diffusers", "transformers"])
    assert {"diffusers", "transformers", "huggingface-hub", "safetensors", "tokenizers"} <= set(wanted)
    assert not {"torch", "numpy", "filelock", "fsspec"} & set(wanted)
