"""bench/gpu is ready to run: its driver end to end on the tiny model (CPU smoke run), the
one-command script's syntax, and the wheel list (what a PyTorch-only machine lacks)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


MAIN_ROWS = {"plain_1_image", "plain_batch_5", "independent_bg_3fg", "joint_bg_3fg", "joint_forced_chunking",
             "joint_channels_last"}
LEVER_ROWS = {"lever_joint", "lever_joint_bfloat16", "lever_joint_compiled", "decode_tta1", "decode_tta8"}
LEAN_ROWS = {"lever_joint_lean_on", "lever_joint_lean_off"}


@pytest.mark.slow
def test_driver_runs_every_scenario_and_lever_on_the_tiny_model(tmp_path):
    from bench.gpu.__main__ import RATIOS, lean_available

    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--device", "cpu", "--steps", "1",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == report  # one JSON object on stdout
    assert report["model"] == "tiny" and report["device"] == "cpu" and report["steps"] == 1
    assert report["lever_steps"] == 1 and report["dtype"] == "float32"
    expected = MAIN_ROWS | LEVER_ROWS | (LEAN_ROWS if lean_available() else set())
    assert set(report["results"]) == expected and report["lean_activations"] == lean_available()
    for name, entry in report["results"].items():
        assert "error" not in entry and "skipped" not in entry, (name, entry)
        assert entry["seconds"] > 0 and entry["peak_vram_gib"] is None
        assert ("denoise_it_per_s" in entry) == (not name.startswith("decode_"))
    assert report["results"]["lever_joint_bfloat16"]["settings"] == {"dtype": "bfloat16"}
    compiled = report["results"]["lever_joint_compiled"]
    assert compiled["settings"]["compile"] is True and compiled["compile_warm_up_seconds"] > 0
    assert set(report["ratios"]) == set(RATIOS)
    for name, value in report["ratios"].items():
        missing = name.endswith("_peak_vram") or (name.startswith("lean_") and not lean_available())
        assert (value is None) == missing, name  # no VRAM on the CPU
        assert value is None or value > 0


def test_a_failing_row_is_reported_and_the_others_still_run(tmp_path):
    from bench.gpu.__main__ import Meter, Rows, ratios

    rows = Rows(Meter("cpu"), budget_s=600, out=tmp_path / "partial.json")
    calls = []
    rows.measure("plain_1_image", lambda n: calls.append(n), 3)

    def out_of_memory(_n):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    rows.measure("plain_batch_5", out_of_memory, 3)
    rows.measure("decode_tta1", lambda n: calls.append(n), None)
    assert calls == [2, 3, None, None]  # warm-up at 2 steps, then the timed run
    assert rows.results["plain_batch_5"] == {"error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
                                             "out_of_memory": True}
    assert rows.results["plain_1_image"]["steps"] == 3 and "denoise_it_per_s" in rows.results["plain_1_image"]
    assert "denoise_it_per_s" not in rows.results["decode_tta1"]
    assert json.loads((tmp_path / "partial.json").read_text()) == {"partial": True, "results": rows.results}
    assert ratios(rows.results)["joint_vs_plain_batch_5"] is None


def test_rows_past_the_budget_are_skipped():
    from bench.gpu.__main__ import Meter, Rows

    rows = Rows(Meter("cpu"), budget_s=0)
    rows.measure("plain_1_image", lambda n: pytest.fail("a row past the budget ran"), 3)
    assert rows.results == {"plain_1_image": {"skipped": "time budget (--budget-s) spent"}}
    rows = Rows(Meter("cpu"), budget_s=100)
    assert rows.skipped("lever_joint_compiled", needs_s=180)
    assert "needs about 180 s" in rows.results["lever_joint_compiled"]["skipped"]


def test_run_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "bench/gpu/run.sh")]).returncode == 0


def test_wheel_closure_leaves_out_what_torch_brings():
    from bench.gpu.fetch_wheels import closure

    wanted = closure(["diffusers", "transformers"])
    assert {"diffusers", "transformers", "huggingface-hub", "safetensors", "tokenizers"} <= set(wanted)
    assert not {"torch", "numpy", "filelock", "fsspec"} & set(wanted)
