"""Request limits: each bad field is refused with an error naming it."""
import pytest

from inference.errors import InvalidRequest
from inference.prompts import derive_seed
from inference.request import LayerSpec, StackRequest


def ok(**kw):
    base = dict(prompt="a forest", layers=(LayerSpec("a fox"),), width=512, height=256, steps=4)
    base.update(kw)
    return StackRequest(**base)


def test_valid_request_passes():
    r = ok().validated()
    assert r.layers[0].prompt == "a fox"


@pytest.mark.parametrize("kw, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(prompt="x" * 1001), "prompt"),
    (dict(width=500), "width"),
    (dict(height=192), "height"),
    (dict(width=2112), "width"),
    (dict(steps=0), "steps"),
    (dict(steps=151), "steps"),
    (dict(guidance=30.5), "guidance"),
    (dict(guidance=-1), "guidance"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(method="magic"), "method"),
    (dict(tta_passes=3), "tta_passes"),
    (dict(layers=tuple(LayerSpec(f"l{i}") for i in range(9))), "layers"),
    (dict(layers=(LayerSpec(""),)), "layers[0].prompt"),
    (dict(layers=(LayerSpec("a", box=(0.5, 0.1, 0.4, 0.9)),)), "layers[0].box"),
    (dict(layers=(LayerSpec("a", box=(0.0, 0.1, 1.2, 0.9)),)), "layers[0].box"),
    (dict(layers=(LayerSpec("a", seed=-5),)), "layers[0].seed"),
    (dict(layers=(LayerSpec("a", depth=0.0),)), "layers[0].depth"),
    (dict(layers=(LayerSpec("a"), LayerSpec("b", depth=-3.0))), "layers[1].depth"),
    (dict(layers=(LayerSpec("a", depth=float("inf")),)), "layers[0].depth"),
    (dict(layers=(LayerSpec("a", depth=float("nan")),)), "layers[0].depth"),
    (dict(layers=(LayerSpec("a", depth=True),)), "layers[0].depth"),
    (dict(background_depth=0), "background_depth"),
    (dict(frame=(0.5, 0.1, 0.4, 0.9)), "frame"),
    (dict(frame=(0.0, 0.0, 1.0, 1.5)), "frame"),
    (dict(frame=(0.0, float("nan"), 1.0, 1.0)), "frame"),
    (dict(frame=(0.0, 0.0, float("inf"), 1.0)), "frame"),
    (dict(frame=(0.0, 0.0, 1.0)), "frame"),
])
def test_each_bad_field_is_named(kw, field):
    with pytest.raises(InvalidRequest) as err:
        ok(**kw).validated()
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_size_error_suggests_neighbours():
    with pytest.raises(InvalidRequest, match="multiple of 64.*try 448 or 512"):
        ok(width=500).validated()


def test_derived_seeds_are_stable_distinct_and_in_range():
    seeds = [derive_seed(123, i) for i in range(9)]
    assert len(set(seeds)) == 9
    assert all(0 <= s < 2**32 for s in seeds)
    assert seeds == [derive_seed(123, i) for i in range(9)]
    assert derive_seed(124, 0) != seeds[0]


def test_frame_is_optional_and_maps_boxes_from_frame_to_canvas():
    plain = ok(layers=(LayerSpec("a fox", box=(0.0, 0.5, 0.5, 1.0)),)).validated()
    assert plain.frame is None and plain.canvas_box(plain.layers[0].box) == (0.0, 0.5, 0.5, 1.0)
    framed = ok(layers=plain.layers, frame=(0.25, 0.0, 0.75, 0.5)).validated()
    assert framed.frame == (0.25, 0.0, 0.75, 0.5)
    # The frame's left half, lower half → a quarter of the canvas inside the frame rectangle.
    assert framed.canvas_box(framed.layers[0].box) == (0.25, 0.25, 0.5, 0.5)
    assert framed.canvas_box(None) is None


def test_margins_are_checked_by_side_name():
    from inference.request import validate_margins

    validate_margins("margins", (0.0, 0.1, 4.0, 0.25))
    for bad, side in (((-0.1, 0, 0, 0), "left"), ((0, 5, 0, 0), "top"), ((0, 0, float("nan"), 0), "right"),
                      ((0, 0, 0, float("inf")), "bottom")):
        with pytest.raises(InvalidRequest, match=f"margins.{side}") as err:
            validate_margins("margins", bad)
        assert err.value.field == "margins"
    with pytest.raises(InvalidRequest, match="four numbers"):
        validate_margins("margins", (0.1, 0.1))
