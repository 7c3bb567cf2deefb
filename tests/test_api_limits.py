"""The HTTP schemas publish exactly the limits the engine enforces, and refuse with the
engine's own message: field by field, each published bound is tried on both sides."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from inference import request as limits
from inference.errors import InvalidRequest
from inference.request import StackRequest
from server.schemas import ExtendIn, JobCreate, LayerIn, RegenerateIn

BASE = {"prompt": "a misty lake"}
BODY = {**BASE, "model": "tiny"}
JOB_SCHEMA = JobCreate.model_json_schema()
# Request fields with the same name and meaning in the engine's StackRequest.
ENGINE_FIELDS = ("prompt", "negative_prompt", "background", "width", "height", "steps", "guidance",
                 "seed", "background_seed", "method", "inter_layer_strength", "mask_guidance",
                 "tta_passes")


def published_bounds(prop: dict) -> tuple[list, list]:
    """(values the published constraints allow, values they forbid) at their edges."""
    good, bad = [], []
    if "enum" in prop:
        good += prop["enum"]
        bad.append(max(prop["enum"]) + 1 if isinstance(prop["enum"][0], int) else "no-such-choice")
    if "minimum" in prop:
        types = {prop.get("type")} | {option.get("type") for option in prop.get("anyOf", [])}
        step = prop.get("multipleOf", 1 if "integer" in types else 0.01)
        good += [prop["minimum"], prop["maximum"]]
        bad += [prop["minimum"] - step, prop["maximum"] + step]
        if "multipleOf" in prop:
            bad.append(prop["minimum"] + prop["multipleOf"] // 2)
    if "maxLength" in prop:
        good.append("x" * prop["maxLength"])
        bad.append("x" * (prop["maxLength"] + 1))
        if prop.get("minLength"):
            bad += ["", "   "]  # also refused by the published pattern \S
    return good, bad


def field_error(model, body: dict) -> dict:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    return errors[0]


def engine_message(field: str, value) -> str:
    with pytest.raises(InvalidRequest) as caught:
        StackRequest(**{**BASE, field: value}).validated()
    assert caught.value.field == field
    return caught.value.message


@pytest.mark.parametrize("field", ENGINE_FIELDS)
def test_each_published_bound_is_enforced_with_the_engines_message(field):
    prop = JOB_SCHEMA["properties"][field]
    good, bad = published_bounds(prop)
    assert good and bad, f"{field} publishes no limits: {prop}"
    for value in good:
        JobCreate.model_validate({**BODY, field: value})
        one_layer = (limits.LayerSpec("a heron"),)  # what 'harmonized' needs
        StackRequest(**{**BASE, field: value}, layers=one_layer).validated()
    for value in bad:
        error = field_error(JobCreate, {**BODY, field: value})
        assert error["loc"] == (field,)
        assert error["msg"] == engine_message(field, value)


def test_sizes_tta_and_methods_are_published_as_the_engine_has_them():
    for side in ("width", "height"):
        prop = JOB_SCHEMA["properties"][side]
        assert (prop["minimum"], prop["maximum"], prop["multipleOf"]) == (
            limits.MIN_SIZE, limits.MAX_SIZE, limits.SIZE_MULTIPLE)
    assert JOB_SCHEMA["properties"]["tta_passes"]["enum"] == list(limits.TTA_PASSES)
    assert JOB_SCHEMA["properties"]["method"]["enum"] == list(limits.METHODS)
    assert JOB_SCHEMA["properties"]["layers"]["maxItems"] == limits.MAX_FOREGROUNDS
    assert RegenerateIn.model_json_schema()["properties"]["tta_passes"]["enum"] == list(limits.TTA_PASSES)


def test_layer_fields_use_the_engines_checks():
    layer = LayerIn.model_json_schema()["properties"]
    assert layer["prompt"]["maxLength"] == limits.MAX_PROMPT_CHARS
    assert layer["name"]["maxLength"] == limits.MAX_NAME_CHARS
    error = field_error(LayerIn, {"prompt": "a fox", "box": [0.5, 0.1, 0.4, 0.9]})
    assert error["loc"] == ("box",) and error["msg"] == "needs x0 < x1 and y0 < y1"
    error = field_error(JobCreate, {**BODY, "layers": [{"prompt": "a", "name": "x"}, {"prompt": "b", "name": "x"}]})
    assert error["loc"] == ("layers",) and "'x' is used twice" in error["msg"]
    error = field_error(JobCreate, {**BODY, "layers": [{"prompt": "a", "name": "background"}]})
    assert error["loc"] == ("layers",) and "'background' is taken" in error["msg"]
    with pytest.raises(InvalidRequest, match="used twice"):
        StackRequest(prompt="p", layers=(limits.LayerSpec("a", name="x"), limits.LayerSpec("b", name="x"))).validated()


def test_layer_depth_is_published_and_refused_with_the_engines_message():
    assert LayerIn.model_json_schema()["properties"]["depth"]["exclusiveMinimum"] == 0
    for good in (0.001, 6, 6.5, 1e6):
        spec = JobCreate.model_validate({**BODY, "layers": [{"prompt": "a fox", "depth": good}]}).to_stack_request()
        assert spec.layers[0].depth == good and isinstance(spec.layers[0].depth, float)
    assert JobCreate.model_validate({**BODY, "layers": [{"prompt": "a fox"}]}).to_stack_request().layers[0].depth is None
    for bad in (0.0, -2.5, math.inf, math.nan):
        error = field_error(LayerIn, {"prompt": "a fox", "depth": bad})
        assert error["loc"] == ("depth",)
        with pytest.raises(InvalidRequest) as caught:
            StackRequest(**BASE, layers=(limits.LayerSpec("a fox", depth=bad),)).validated()
        assert caught.value.field == "layers[0].depth" and error["msg"] == caught.value.message
    assert field_error(LayerIn, {"prompt": "a fox", "depth": "6"})["loc"] == ("depth",)  # strict: no text


def test_harmonized_single_foreground_is_published():
    rule = JOB_SCHEMA["anyOf"]
    assert {"properties": {"method": {"not": {"const": "harmonized"}}}} in rule
    with pytest.raises(InvalidRequest, match="exactly one foreground"):
        JobCreate.model_validate({**BODY, "method": "harmonized"}).to_stack_request()


def test_regenerate_needs_a_prompt_or_a_seed_and_says_so_in_its_schema():
    schema = RegenerateIn.model_json_schema()
    assert [option["required"] for option in schema["anyOf"]] == [["prompt"], ["seed"]]
    assert schema["properties"]["layer_index"]["maximum"] == limits.MAX_FOREGROUNDS
    error = field_error(RegenerateIn, {"layer_index": 1})
    assert error["loc"] == ("prompt",) and error["msg"] == "give a new prompt and/or a new seed for the layer"
    error = field_error(RegenerateIn, {"layer_index": 1, "prompt": "  "})
    assert error["loc"] == ("prompt",) and error["msg"] == "must not be empty"
    error = field_error(RegenerateIn, {"layer_index": 9, "seed": 1})
    assert error["loc"] == ("layer_index",)
    assert RegenerateIn.model_validate({"layer_index": 0, "seed": 3}).seed == 3


def test_non_finite_numbers_are_refused():
    for field in ("guidance", "inter_layer_strength", "mask_guidance"):
        error = field_error(JobCreate, {**BODY, field: math.nan})
        assert error["loc"] == (field,) and error["msg"] == engine_message(field, math.nan)


def test_frame_is_published_and_refused_with_the_engines_message():
    prop = JOB_SCHEMA["properties"]["frame"]
    assert prop["items"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    for bad in ([0.5, 0.0, 0.4, 1.0], [0.0, 0.0, 1.0, 1.5]):
        error = field_error(JobCreate, {**BODY, "frame": bad})
        assert error["loc"] == ("frame",) and error["msg"] == engine_message("frame", tuple(bad))
    assert JobCreate.model_validate({**BODY, "frame": [0.1, 0.0, 0.9, 1.0]}).to_stack_request().frame == \
        (0.1, 0.0, 0.9, 1.0)


def test_extend_margins_are_published_and_checked_by_the_engine():
    from inference.canvas import MAX_MARGIN

    prop = ExtendIn.model_json_schema()["properties"]["margins"]
    assert prop["items"] == {"type": "number", "minimum": 0.0, "maximum": MAX_MARGIN}
    assert prop["minItems"] == prop["maxItems"] == 4
    ExtendIn.model_validate({"margins": [0.0, 0.0, MAX_MARGIN, 0.5]})
    for bad, side in (([MAX_MARGIN + 0.01, 0, 0, 0], "left"), ([0, -0.01, 0, 0], "top"),
                      ([0, 0, math.inf, 0], "right")):
        error = field_error(ExtendIn, {"margins": bad})
        assert error["loc"] == ("margins",) and f"margins.{side}" in error["msg"]
