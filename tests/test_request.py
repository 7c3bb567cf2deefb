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
