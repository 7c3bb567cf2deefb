"""The canvas planner: exact frame aspect, multiples of 64, margins kept, the cap stated."""
import math

import pytest

from inference import canvas, request


def _aspect(plan):
    x0, y0, x1, y1 = plan.frame
    return (x1 - x0) * plan.width / ((y1 - y0) * plan.height)


@pytest.mark.parametrize("aspect", [1.0, 16 / 9, 2.39, 9 / 16, 1536 / 640, 2048 / 858, 0.1, 10.0])
@pytest.mark.parametrize("budget", [256 * 256, 512 * 512, 1024 * 1024])
@pytest.mark.parametrize("margins", [(0, 0, 0, 0), (0.2, 0, 0.05, 0), (0.1, 0.3, 0.1, 0.0), (1.0, 1.0, 1.0, 1.0)])
def test_frame_keeps_exact_aspect_inside_a_64_multiple_canvas(aspect, budget, margins):
    plan = canvas.plan_canvas(aspect, margins, budget)
    assert plan.width % 64 == 0 and plan.height % 64 == 0
    assert 256 <= plan.width <= 2048 and 256 <= plan.height <= 2048
    assert math.isclose(_aspect(plan), aspect, rel_tol=1e-9)
    x0, y0, x1, y1 = plan.frame
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    fw, fh = (x1 - x0), (y1 - y0)  # each requested margin fits beside the frame
    left, top, right, bottom = margins
    assert x0 >= left * fw - 1e-9 and 1 - x1 >= right * fw - 1e-9
    assert y0 >= top * fh - 1e-9 and 1 - y1 >= bottom * fh - 1e-9
    assert math.isclose(plan.frame_width, fw * plan.width) and math.isclose(plan.frame_height, fh * plan.height)
    # the frame fills the canvas on one axis (no pixels wasted beyond rounding)
    assert math.isclose(fw * (1 + left + right), 1.0) or math.isclose(fh * (1 + top + bottom), 1.0)
    if not plan.capped:
        assert plan.frame_width * plan.frame_height >= budget * (1 - 1e-9)


def test_square_static_frame_is_the_whole_canvas():
    plan = canvas.plan_canvas(1.0, (0, 0, 0, 0), 1024 * 1024)
    assert (plan.width, plan.height, plan.frame, plan.capped) == (1024, 1024, (0.0, 0.0, 1.0, 1.0), False)
    assert plan.whole


def test_render_percentage_plays_no_part_and_wide_frames_are_not_squashed():
    # 1536x640 at 25 % used to become 384x256 (aspect 2.4 -> 1.5); now the model's budget decides.
    plan = canvas.plan_canvas(1536 / 640, (0, 0, 0, 0), 1024 * 1024)
    assert (plan.width, plan.height) == (1600, 704)
    assert math.isclose(_aspect(plan), 2.4)


def test_cap_lowers_detail_uniformly_and_says_so():
    plan = canvas.plan_canvas(1.0, (1.5, 0, 1.5, 0), 1024 * 1024)  # 4 frames wide
    assert plan.width == 2048 and plan.capped
    assert math.isclose(_aspect(plan), 1.0)
    assert plan.frame_width == pytest.approx(512)


@pytest.mark.parametrize("bad, field", [((float("nan"),), "aspect"), ((0.0,), "aspect"), ((1.0, (0, 0, -0.1, 0)), "margins.right"),
                                        ((1.0, (0, 0, 0)), "four numbers"), ((1.0, (0, 9, 0, 0)), "margins.top")])
def test_bad_input_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        canvas.plan_canvas(*bad)


def test_box_maps_from_frame_to_canvas():
    assert canvas.frame_to_canvas((0, 0, 1, 1), (0.1, 0.2, 0.9, 0.8)) == (0.1, 0.2, 0.9, 0.8)
    assert canvas.frame_to_canvas((0.5, 0.5, 1, 1), (0, 0, 0.5, 0.5)) == (0.25, 0.25, 0.5, 0.5)


def test_canvas_limits_equal_the_request_limits():
    assert (canvas.CANVAS_MIN_SIDE, canvas.CANVAS_MAX_SIDE, canvas.CANVAS_MULTIPLE) == (
        request.MIN_SIZE, request.MAX_SIZE, request.SIZE_MULTIPLE)


# ------------------------------------------------------------------ extension (outpainting)
EXTEND_MARGINS = [(0.0, 0.0, 0.0, 0.0), (0.25, 0.0, 0.0, 0.0), (0.0, 0.0, 0.3, 0.1), (0.1, 0.1, 0.1, 0.1),
                  (0.5, 0.2, 0.05, 0.0), (0.0, 0.45, 0.0, 0.45), (1.0, 0.0, 1.0, 0.0)]


@pytest.mark.parametrize("aspect, start", [(1.0, (0, 0, 0, 0)), (16 / 9, (0.1, 0, 0.1, 0)), (2.39, (0, 0.2, 0, 0)),
                                           (9 / 16, (0.05, 0.05, 0.3, 0.0))])
@pytest.mark.parametrize("margins", EXTEND_MARGINS)
def test_extension_keeps_the_old_pixels_at_their_scale_and_fits_the_margins(aspect, start, margins):
    from inference.canvas import CANVAS_MAX_SIDE, EXTENSION_ALIGN, extension_offset, plan_extension

    old = canvas.plan_canvas(aspect, start, 256 * 256)
    try:
        new = plan_extension(old.width, old.height, old.frame, margins)
    except ValueError as error:
        assert str(error).startswith("margins:") and str(CANVAS_MAX_SIDE) in str(error)
        return
    ox, oy = extension_offset(old.width, old.height, old.frame, margins)
    assert new.width % 64 == 0 and new.height % 64 == 0 and not new.capped
    assert ox % EXTENSION_ALIGN == 0 and oy % EXTENSION_ALIGN == 0
    assert 0 <= ox <= new.width - old.width and 0 <= oy <= new.height - old.height  # old canvas inside
    # The frame: same pixels (no resampling), shifted by the offset.
    assert new.frame_width == pytest.approx(old.frame_width) and new.frame_height == pytest.approx(old.frame_height)
    assert new.frame[0] * new.width == pytest.approx(ox + old.frame[0] * old.width)
    assert new.frame[1] * new.height == pytest.approx(oy + old.frame[1] * old.height)
    assert new.frame[2] * new.width == pytest.approx(ox + old.frame[2] * old.width)
    assert new.frame[3] * new.height == pytest.approx(oy + old.frame[3] * old.height)
    # Every requested margin fits around the same frame (in pixels of the frame's extent).
    fx0, fy0, fx1, fy1 = (v * s for v, s in zip(new.frame, (new.width, new.height) * 2))
    left, top, right, bottom = margins
    assert fx0 >= left * new.frame_width - 1e-6 and new.width - fx1 >= right * new.frame_width - 1e-6
    assert fy0 >= top * new.frame_height - 1e-6 and new.height - fy1 >= bottom * new.frame_height - 1e-6
    # Minimal: one tile (64) less on a grown axis would not hold the old canvas plus the need.
    if new.width > old.width:
        need = max(0.0, left * new.frame_width - old.frame[0] * old.width) + \
            max(0.0, right * new.frame_width - (1 - old.frame[2]) * old.width)
        assert new.width - 64 < old.width + need + 2 * EXTENSION_ALIGN


def test_extension_of_margins_that_already_fit_is_the_same_canvas():
    from inference.canvas import extension_offset, plan_extension

    old = canvas.plan_canvas(2.0, (0.2, 0.1, 0.2, 0.1), 256 * 256)
    same = plan_extension(old.width, old.height, old.frame, (0.1, 0.05, 0.2, 0.0))
    assert (same.width, same.height) == (old.width, old.height)
    assert same.frame == pytest.approx(old.frame)
    assert extension_offset(old.width, old.height, old.frame, (0.1, 0.05, 0.2, 0.0)) == (0, 0)
    whole = plan_extension(256, 256, None, (0.25, 0, 0, 0))
    assert (whole.width, whole.height, whole.frame) == (320, 256, (0.2, 0.0, 1.0, 1.0))


def test_extension_refuses_bad_margins_by_name_and_past_the_cap():
    from inference.canvas import plan_extension

    with pytest.raises(ValueError, match=r"margins\.top = -0.1 is outside"):
        plan_extension(256, 256, None, (0.0, -0.1, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"margins\.right must be a finite number"):
        plan_extension(256, 256, None, (0.0, 0.0, float("nan"), 0.0))
    with pytest.raises(ValueError, match=r"margins: extending the 1024-pixel horizontal canvas needs 2112 pixels"):
        plan_extension(1024, 512, None, (0.5, 0.0, 0.5625, 0.0))
    assert plan_extension(1024, 512, None, (0.5, 0.0, 0.5, 0.0)).width == 2048  # exactly the cap is fine
