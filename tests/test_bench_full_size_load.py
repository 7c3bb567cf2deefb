"""bench/full_size_load.py on the tiny model: its children report every figure, a warm load
reads the factors instead of factoring (counted, not timed), and the full-size cache is
written once and rebuilt only when the builder's plan changes or a file is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import full_size_load
from tools.full_size import PlannedFile, fake_commit, repo_cache_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def multiplane_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multiplane-cache")


@pytest.fixture
def isolated_cache(monkeypatch, multiplane_cache):
    monkeypatch.setenv("MULTIPLANE_CACHE_DIR", str(multiplane_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return multiplane_cache


def test_registered_in_make_bench():
    from bench.__main__ import BENCHMARKS

    assert "bench.full_size_load" in BENCHMARKS


def test_tiny_run_reports_load_resident_and_first_steps(multiplane_cache):
    env = dict(os.environ, MULTIPLANE_CACHE_DIR=str(multiplane_cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "bench.full_size_load", "--tiny", "--dtype", "float32"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    load = report["load"]
    for state in ("before_cold_factor_cache", "after_warm_factor_cache"):
        entry = load[state]
        assert set(entry["steps_s"]) == {"pipeline", "transparency_patch", "transparent_vae", "resolve_and_rest"}
        assert entry["load_s"] > 0 and entry["peak_rss_gib"] >= entry["rss_before_gib"] > 0
        # the tiny patch is too small to factor: the cache is never used
        assert entry["factor_cache"] == {"entry_existed": False, "written": False, "matrices_factored": 0}

    assert load["page_cache_warm_up_load_s"] > 0

    resident = report["resident"]
    components = {"unet", "text_encoders", "vae", "transparent_decoder", "transparent_encoder",
                  "transparency_factors"}
    assert set(resident["measured_gib"]) == set(resident["modelled_gib"]) == components
    assert resident["measured_over_modelled"] == 1.0  # loaded objects = the configs' architectures
    assert resident["before_gib"]["total"] > resident["after_total_gib"] > 0
    assert resident["after_over_before"] < 1
    assert resident["float32_modelled_gib"]["after_total"] == resident["after_total_gib"]  # it ran in float32

    first = report["first_step"]
    for job in ("joint_first_job", "joint_warm", "independent"):
        assert first[job]["first_step_s"] > first[job]["first_event_s"] >= 0
    assert first["independent"]["foreground_step_1_s"] > 0 and first["independent"]["background_step_1_s"] > 0
    assert first["independent"]["foreground_first_step_s"] > first["independent"]["first_step_s"]
    assert first["peak_rss_gib"] > 0 and first["patch_swap_in_out_s"] > 0
    assert set(first["first_joint_step_from_load_start_s"]) == {"before", "after", "after_over_before"}


def test_warm_load_reads_the_factors_instead_of_factoring(isolated_cache, monkeypatch):
    """With the rank lowered to 4 the tiny patch is factored: the cold load factors every
    matrix and writes the cache entry, the warm one reads it and factors nothing."""
    import inference.sdxl_transparency as transparency

    monkeypatch.setattr(transparency, "PATCH_RANK", 4)
    factorings = []
    real = transparency.factor_low_rank
    monkeypatch.setattr(transparency, "factor_low_rank", lambda d, r: factorings.append(1) or real(d, r))

    cold, _, _ = full_size_load.measure_load("tiny", "float32", cold=True)
    assert cold["factor_cache"]["written"] and not cold["factor_cache"]["entry_existed"]
    assert cold["factor_cache"]["matrices_factored"] == len(factorings) == 64

    factorings.clear()
    warm, _, loaded = full_size_load.measure_load("tiny", "float32", cold=False)
    assert warm["factor_cache"] == {"entry_existed": True, "written": False, "matrices_factored": 0}
    assert factorings == []
    resident = full_size_load.resident_bytes(loaded)
    assert resident["measured"]["transparency_factors"] == resident["modelled"]["transparency_factors"] > 0
    assert resident["before_patched_copies"] > 0

    again, _, _ = full_size_load.measure_load("tiny", "float32", cold=True)  # cold deletes the entry
    assert again["factor_cache"]["written"] and len(factorings) == 64


def _plan(content: bytes) -> list[PlannedFile]:
    return [PlannedFile("org/model", "model_index.json", content=content),
            PlannedFile("org/model", "unet/diffusion_pytorch_model.fp16.safetensors", shapes={"w": (4, 2)})]


def _snapshot_file(root: Path, f: PlannedFile) -> Path:
    return repo_cache_dir(root / "hf" / "hub", f.repo_id) / "snapshots" / fake_commit(f.repo_id) / f.filename


def test_full_size_cache_is_written_once_and_rebuilt_when_stale(tmp_path):
    root = tmp_path / "full-size"
    planned = _plan(b"{}")
    assert not full_size_load.cache_is_complete(root, planned)
    assert full_size_load.ensure_cache(root, planned, log=lambda _: None) is not None
    weights = _snapshot_file(root, planned[1]).resolve()
    stamp = weights.stat().st_ino, weights.stat().st_mtime_ns
    assert full_size_load.cache_is_complete(root, planned)

    assert full_size_load.ensure_cache(root, planned, log=lambda _: None) is None  # reused, not rewritten
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp

    changed = _plan(b'{"changed": true}')  # the builder's plan changed: rebuilt from nothing
    assert not full_size_load.cache_is_complete(root, changed)
    assert full_size_load.ensure_cache(root, changed, log=lambda _: None) is not None
    assert json.loads(_snapshot_file(root, changed[0]).read_bytes()) == {"changed": True}

    _snapshot_file(root, changed[1]).unlink()  # a file went missing
    assert not full_size_load.cache_is_complete(root, changed)
    full_size_load.ensure_cache(root, changed, log=lambda _: None)
    assert full_size_load.cache_is_complete(root, changed)


def test_a_full_size_run_without_the_memory_is_skipped_not_attempted(monkeypatch, tmp_path):
    monkeypatch.setattr(full_size_load, "_available_ram_gb", lambda: 4.0)
    built = []
    monkeypatch.setattr(full_size_load, "ensure_cache", lambda *a, **k: built.append(1))
    report = full_size_load.run(root=tmp_path)
    assert "RAM" in report["skipped"] and "bfloat16" in report["skipped"] and not built
