"""Each method's declared WorkPlan (what the server's progress fraction is computed from)
matches what it really reports on the tiny model: the same shape, steps and decodes, so
the fraction climbs steadily and reaches the save share exactly at the last decode."""
from __future__ import annotations

import pytest

from inference import request as limits
from inference.engine import Engine, EngineSettings
from inference.methods import edit_plan, work_plan
from inference.progress import Progress, WorkPlan
from inference.request import LayerSpec, StackRequest
from server.progress import SAVE_START, overall_fraction

pytestmark = pytest.mark.slow


def request(method: str, layers: int) -> StackRequest:
    return StackRequest(prompt="a quiet lake", background="hills", method=method, width=256, height=256,
                        steps=3, seed=5, tta_passes=2,
                        layers=tuple(LayerSpec(f"thing {i}", box=(0.1, 0.2, 0.8, 0.9)) for i in range(layers)))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineSettings(device="cpu", allow_download=False))


def check_reports_follow_plan(plan: WorkPlan, events: list[Progress]) -> None:
    work = [p for p in events if p.phase in ("denoise", "decode")]
    denoise = [p for p in work if p.phase == "denoise"]
    decoded = list(dict.fromkeys(p.layer for p in work if p.phase == "decode"))
    assert {p.layers for p in work} == {plan.layers}
    if plan.joint:
        assert {p.layer for p in denoise} == {None}
        assert {p.total for p in denoise} == {plan.runs * plan.steps}
        assert denoise[-1].step == plan.runs * plan.steps
        assert work.index(denoise[-1]) < min(i for i, p in enumerate(work) if p.phase == "decode")
    else:
        assert list(dict.fromkeys(p.layer for p in denoise)) == list(range(plan.layers))
        assert {p.total for p in denoise} == {plan.steps}
    assert decoded == list(plan.decoded_layers)
    fractions = [overall_fraction(plan, p) for p in events]
    assert fractions == sorted(fractions), fractions
    assert overall_fraction(plan, work[-1]) == pytest.approx(SAVE_START)


def test_every_method_declares_its_shape():
    plans = {method: work_plan(request(method, 1)) for method in limits.METHODS}
    assert set(plans) == {"independent", "joint", "harmonized"}
    assert {m: (p.joint, p.runs) for m, p in plans.items()} == {
        "independent": (False, 1), "joint": (True, 1), "harmonized": (True, 2)}


@pytest.mark.parametrize("method,layers", [("independent", 2), ("joint", 2), ("harmonized", 1)])
def test_methods_report_what_they_declare(engine, tmp_path, method, layers):
    req = request(method, layers)
    events: list[Progress] = []
    engine.generate(req, "tiny", tmp_path / "stack", progress=events.append)
    check_reports_follow_plan(work_plan(req), events)


@pytest.mark.parametrize("layer_index", [0, 2])
def test_regenerate_reports_what_edit_plan_declares(engine, tmp_path, layer_index):
    req = request("joint", 2)
    engine.generate(req, "tiny", tmp_path / "source")
    events: list[Progress] = []
    engine.regenerate(tmp_path / "source", layer_index, tmp_path / "edit", new_seed=9, tta_passes=2,
                     progress=events.append)
    check_reports_follow_plan(edit_plan(3, req.steps, layer_index), events)


def test_restyle_reports_what_edit_plan_declares(engine, tmp_path):
    req = request("joint", 2)
    engine.generate(req, "tiny", tmp_path / "source")
    events: list[Progress] = []
    engine.restyle(tmp_path / "source", "watercolour", tmp_path / "styled", tta_passes=2,
                  progress=events.append)
    check_reports_follow_plan(edit_plan(3, req.steps), events)


def test_extend_reports_what_edit_plan_declares(engine, tmp_path):
    req = request("joint", 2)
    engine.generate(req, "tiny", tmp_path / "source")
    events: list[Progress] = []
    engine.extend(tmp_path / "source", (0.3, 0.0, 0.0, 0.0), tmp_path / "grown", tta_passes=2,
                  progress=events.append)
    check_reports_follow_plan(edit_plan(3, req.steps), events)
