"""addon/canvas.py (bpy-free, stdlib only) plans exactly what the engine's inference/canvas.py
plans: the add-on cannot import the engine, so this test keeps the mirror from drifting."""
import dataclasses
import itertools

import pytest

from addon import canvas as addon_canvas
from inference import canvas as engine_canvas
from inference.models import PRESETS

ASPECTS = [0.1, 0.37, 9 / 16, 0.75, 1.0, 4 / 3, 16 / 9, 2.0, 2.39, 1536 / 640, 2048 / 858, 10.0]
MARGINS = [(0, 0, 0, 0), (0.2, 0, 0.05, 0), (0.1, 0.3, 0.1, 0.0), (1.0, 1.0, 1.0, 1.0), (0, 0, 4.0, 0),
           (0.013, 0.5, 0.0, 0.27)]
BUDGETS = [256 * 256, 512 * 512, 1024 * 1024, 1500 * 1500]


@pytest.mark.parametrize("aspect, margins, budget", list(itertools.product(ASPECTS, MARGINS, BUDGETS)))
def test_the_mirror_plans_the_same_canvas(aspect, margins, budget):
    mine = addon_canvas.plan_canvas(aspect, margins, budget)
    engine = engine_canvas.plan_canvas(aspect, margins, budget)
    assert (mine.width, mine.height, mine.frame, mine.frame_width, mine.frame_height, mine.capped) == (
        engine.width, engine.height, engine.frame, engine.frame_width, engine.frame_height, engine.capped)
    box = (0.1, 0.2, 0.7, 0.9)
    assert addon_canvas.frame_to_canvas(box, mine.frame) == engine_canvas.frame_to_canvas(box, engine.frame)


def test_the_mirror_refuses_what_the_engine_refuses():
    for bad in [(float("nan"), (0, 0, 0, 0)), (20.0, (0, 0, 0, 0)), (1.0, (0, 0, 5.0, 0)), (1.0, (0, -1, 0, 0)),
                (1.0, (0, 0, 0))]:
        with pytest.raises(ValueError) as engine_error:
            engine_canvas.plan_canvas(*bad)
        with pytest.raises(ValueError) as mine_error:
            addon_canvas.plan_canvas(*bad)
        assert str(mine_error.value) == str(engine_error.value)


def test_the_mirrored_constants_equal_the_engines():
    names = [name for name in vars(engine_canvas) if name.isupper()]
    assert {"CANVAS_MULTIPLE", "CANVAS_MIN_SIDE", "CANVAS_MAX_SIDE", "MAX_MARGIN"} <= set(names)
    for name in names:
        assert getattr(addon_canvas, name) == getattr(engine_canvas, name), name


def test_model_budgets_are_the_presets_native_sizes():
    assert addon_canvas.MODEL_DEFAULT_SIZES == {name: preset.default_size for name, preset in PRESETS.items()}
    assert addon_canvas.model_pixel_budget("sd15") == 512 * 512
    assert addon_canvas.model_pixel_budget("/my/own/diffusers/folder") == 1024 * 1024


EXTENSION_CANVASES = [(256, 256, None), (384, 256, (0.0, 0.078125, 1.0, 0.921875)), (1408, 768, (0.015, 0.0, 0.985, 1.0)),
                      (512, 320, (0.1, 0.2, 0.7, 0.9))]
EXTENSION_MARGINS = [(0, 0, 0, 0), (0, 0, 0.3, 0), (0.25, 0.1, 0.25, 0.1), (0.013, 0.5, 0.0, 0.27), (1.0, 0, 0, 1.0)]


@pytest.mark.parametrize("canvas, margins", list(itertools.product(EXTENSION_CANVASES, EXTENSION_MARGINS)))
def test_the_mirror_plans_the_same_extension(canvas, margins):
    width, height, frame = canvas
    try:
        engine = engine_canvas.plan_extension(width, height, frame, margins)
    except ValueError as error:  # beyond the cap: refused the same way
        with pytest.raises(ValueError) as mine_error:
            addon_canvas.plan_extension(width, height, frame, margins)
        assert str(mine_error.value) == str(error)
        return
    mine = addon_canvas.plan_extension(width, height, frame, margins)
    assert dataclasses.astuple(mine) == dataclasses.astuple(engine)
    assert addon_canvas.extension_offset(width, height, frame, margins) == engine_canvas.extension_offset(
        width, height, frame, margins)
