"""addon/geometry.py: the camera frame maths, by hand and against Blender's own `view_frame`."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blender_helpers import run_in_blender  # noqa: E402

from addon.geometry import (  # noqa: E402
    CameraSpec,
    GeometryError,
    camera_frame_center,
    camera_frame_size,
    check_depth_order,
    default_layer_depths,
    fit_axis,
    fit_plane_to_camera,
    parallax_overscan,
)


# --------------------------------------------------------------------------- by hand


def test_perspective_frame_from_lens_and_sensor():
    spec = CameraSpec(lens=50.0, sensor_width=36.0, resolution_x=1920, resolution_y=1080)
    width, height = camera_frame_size(spec, 10.0)
    assert width == pytest.approx(10.0 * 36.0 / 50.0)
    assert height == pytest.approx(width * 1080 / 1920)
    # Frame grows linearly with distance.
    assert camera_frame_size(spec, 20.0)[0] == pytest.approx(2 * width)


def test_orthographic_frame_ignores_distance():
    spec = CameraSpec(projection="ORTHO", ortho_scale=8.0, resolution_x=400, resolution_y=800)
    assert fit_axis(spec) == "VERTICAL"
    assert camera_frame_size(spec, 1.0) == pytest.approx((4.0, 8.0))
    assert camera_frame_size(spec, 123.0) == pytest.approx((4.0, 8.0))


def test_auto_fit_follows_pixel_aspect_not_just_resolution():
    square_pixels = CameraSpec(resolution_x=100, resolution_y=80)
    tall_pixels = CameraSpec(resolution_x=100, resolution_y=80, pixel_aspect_y=2.0)
    assert fit_axis(square_pixels) == "HORIZONTAL"
    assert fit_axis(tall_pixels) == "VERTICAL"
    # AUTO still uses the sensor *width* when it fits vertically (Blender's rule).
    spec = CameraSpec(lens=50.0, sensor_width=36.0, sensor_height=10.0, resolution_x=100, resolution_y=200)
    assert camera_frame_size(spec, 50.0)[1] == pytest.approx(36.0)
    explicit = CameraSpec(lens=50.0, sensor_width=36.0, sensor_height=10.0, sensor_fit="VERTICAL",
                          resolution_x=100, resolution_y=200)
    assert camera_frame_size(explicit, 50.0)[1] == pytest.approx(10.0)


def test_shift_is_in_units_of_the_fit_axis_extent():
    landscape = CameraSpec(lens=36.0, sensor_width=36.0, shift_x=0.25, shift_y=0.1,
                           resolution_x=200, resolution_y=100)
    assert camera_frame_center(landscape, 4.0) == pytest.approx((1.0, 0.4))  # extent 4 (the width)
    portrait = CameraSpec(lens=36.0, sensor_width=36.0, shift_x=0.25, shift_y=0.1,
                          resolution_x=100, resolution_y=200)
    assert camera_frame_center(portrait, 4.0) == pytest.approx((1.0, 0.4))  # extent 4 (the height)


def test_fill_fit_is_the_frame_and_overscan_scales_about_its_centre():
    spec = CameraSpec(lens=35.0, shift_x=0.1, shift_y=-0.2, resolution_x=640, resolution_y=360)
    fit = fit_plane_to_camera(spec, 12.0)
    assert (fit.width, fit.height) == pytest.approx(camera_frame_size(spec, 12.0))
    assert (fit.center_x, fit.center_y) == pytest.approx(camera_frame_center(spec, 12.0))
    bigger = fit_plane_to_camera(spec, 12.0, overscan=1.5)
    assert (bigger.width, bigger.height) == pytest.approx((1.5 * fit.width, 1.5 * fit.height))
    assert (bigger.center_x, bigger.center_y) == pytest.approx((fit.center_x, fit.center_y))


def test_cover_fit_keeps_image_proportions_and_covers_the_frame():
    spec = CameraSpec(resolution_x=1920, resolution_y=1080)
    frame_w, frame_h = camera_frame_size(spec, 5.0)
    square = fit_plane_to_camera(spec, 5.0, mode="COVER", image_size=(1024, 1024))
    assert square.width == pytest.approx(square.height)
    assert square.width == pytest.approx(frame_w) and square.height > frame_h
    tall = fit_plane_to_camera(spec, 5.0, mode="COVER", image_size=(512, 1024))
    assert tall.width / tall.height == pytest.approx(0.5)
    assert tall.width == pytest.approx(frame_w) and tall.height > frame_h
    wide = fit_plane_to_camera(spec, 5.0, mode="COVER", image_size=(4000, 1000))
    assert wide.height == pytest.approx(frame_h) and wide.width == pytest.approx(4 * frame_h)


def test_default_depths_are_back_to_front_and_even_in_inverse_depth():
    depths = default_layer_depths(4, near=2.0, far=20.0)
    assert depths[0] == 20.0 and depths[-1] == 2.0
    assert all(a > b for a, b in zip(depths, depths[1:]))
    steps = [1 / b - 1 / a for a, b in zip(depths[1:], depths[2:])]
    assert steps[0] == pytest.approx(steps[1])
    assert default_layer_depths(1, 2.0, 20.0) == [20.0]
    with pytest.raises(GeometryError, match="near < far"):
        default_layer_depths(3, near=5.0, far=5.0)


def test_depth_order_must_get_nearer():
    check_depth_order([10.0, 5.0, 1.0])
    with pytest.raises(GeometryError, match="layer 2 depth 6 is not nearer than layer 1 depth 5"):
        check_depth_order([10.0, 5.0, 6.0])
    with pytest.raises(GeometryError, match="positive"):
        check_depth_order([10.0, -1.0])


@pytest.mark.parametrize("kwargs, message", [
    ({"projection": "PANO"}, "panoramic"),
    ({"sensor_fit": "DIAGONAL"}, "sensor fit"),
    ({"lens": 0.0}, "lens"),
    ({"projection": "ORTHO", "ortho_scale": -1.0}, "ortho_scale"),
    ({"resolution_x": 0}, "resolution_x"),
    ({"shift_x": math.nan}, "shift_x"),
])
def test_bad_cameras_are_refused_clearly(kwargs, message):
    with pytest.raises(GeometryError, match=message):
        CameraSpec(**kwargs)


def test_bad_fits_are_refused_clearly():
    spec = CameraSpec()
    with pytest.raises(GeometryError, match="overscan"):
        fit_plane_to_camera(spec, 5.0, overscan=0.5)
    with pytest.raises(GeometryError, match="in front of the camera"):
        fit_plane_to_camera(spec, -1.0)
    with pytest.raises(GeometryError, match="image size"):
        fit_plane_to_camera(spec, 5.0, mode="COVER")


def test_overscan_for_an_orthographic_truck_is_one_plus_twice_the_move_over_the_width():
    spec = CameraSpec(projection="ORTHO", ortho_scale=10.0, resolution_x=200, resolution_y=100)
    # Frame 10 x 5; a truck of 1 needs half-width 5 + 1 -> 12/10; the height is untouched.
    assert parallax_overscan(spec, 7.0, (1.0, 0.0, 0.0)) == pytest.approx(1.2)
    assert parallax_overscan(spec, 7.0, (0.0, 1.0, 0.0)) == pytest.approx((2.5 + 1.0) / 2.5)
    assert parallax_overscan(spec, 7.0, (0.0, 0.0, 3.0)) == pytest.approx(1.0)  # ortho: dolly changes nothing


def test_perspective_overscan_shrinks_with_distance_and_dolly_out_needs_more():
    spec = CameraSpec(lens=50.0, sensor_width=36.0, resolution_x=160, resolution_y=90)
    near = parallax_overscan(spec, 4.0, (1.0, 0.0, 0.0))
    far = parallax_overscan(spec, 40.0, (1.0, 0.0, 0.0))
    width_near = camera_frame_size(spec, 4.0)[0]
    assert near == pytest.approx(1.0 + 2.0 / width_near)
    assert far < near
    assert parallax_overscan(spec, 10.0, (0.0, 0.0, 2.0)) == pytest.approx(1.0)  # dolly in: frame shrinks
    assert parallax_overscan(spec, 10.0, (0.0, 0.0, -2.0)) == pytest.approx(12.0 / 10.0)  # dolly out
    with pytest.raises(GeometryError, match="through the plane"):
        parallax_overscan(spec, 3.0, (0.0, 0.0, 3.0))


# --------------------------------------------------------------------------- against Blender


def blender_view_frames(cases: list[dict]) -> list[list[list[float]]]:
    """Runs inside Blender: `camera.data.view_frame(scene=scene)` for each camera setting."""
    import bpy

    from blender_helpers import add_camera, reset_blender

    reset_blender()
    scene = bpy.context.scene
    camera = add_camera(scene)
    frames = []
    for case in cases:
        data = camera.data
        data.type = case["projection"]
        data.lens = case["lens"]
        data.sensor_width, data.sensor_height = case["sensor"]
        data.sensor_fit = case["sensor_fit"]
        data.ortho_scale = case["ortho_scale"]
        data.shift_x, data.shift_y = case["shift"]
        scene.render.resolution_x, scene.render.resolution_y = case["resolution"]
        scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = case["pixel_aspect"]
        frames.append([list(corner) for corner in data.view_frame(scene=scene)])
    return frames


def _cases() -> list[dict]:
    cases = []
    for projection, fit, resolution, aspect, shift in itertools.product(
        ("PERSP", "ORTHO"),
        ("AUTO", "HORIZONTAL", "VERTICAL"),
        ((64, 48), (48, 64), (100, 100), (1920, 817)),
        ((1.0, 1.0), (2.0, 1.0), (1.0, 3.0)),
        ((0.0, 0.0), (0.3, -0.2)),
    ):
        n = len(cases)
        cases.append({
            "projection": projection, "sensor_fit": fit, "resolution": resolution,
            "pixel_aspect": aspect, "shift": shift,
            "lens": (18.0, 35.0, 50.0, 135.0)[n % 4],
            "sensor": ((36.0, 24.0), (23.5, 15.6), (12.0, 30.0))[n % 3],
            "ortho_scale": (2.0, 7.5, 31.0)[n % 3],
        })
    return cases


def test_frame_matches_blender_view_frame_for_every_camera_setting():
    cases = _cases()
    frames = run_in_blender(__file__, "blender_view_frames", cases=cases)
    assert len(frames) == len(cases) == 144
    mismatches = []
    for case, frame in zip(cases, frames):
        spec = CameraSpec(
            projection=case["projection"], lens=case["lens"], sensor_width=case["sensor"][0],
            sensor_height=case["sensor"][1], sensor_fit=case["sensor_fit"], ortho_scale=case["ortho_scale"],
            shift_x=case["shift"][0], shift_y=case["shift"][1], resolution_x=case["resolution"][0],
            resolution_y=case["resolution"][1], pixel_aspect_x=case["pixel_aspect"][0],
            pixel_aspect_y=case["pixel_aspect"][1],
        )
        depth = -frame[0][2]  # view_frame draws the frame at some depth: compare at that depth
        blender = (min(c[0] for c in frame), max(c[0] for c in frame),
                   min(c[1] for c in frame), max(c[1] for c in frame))
        (width, height), (cx, cy) = camera_frame_size(spec, depth), camera_frame_center(spec, depth)
        ours = (cx - width / 2, cx + width / 2, cy - height / 2, cy + height / 2)
        scale = max(abs(v) for v in blender)
        if any(abs(a - b) > 1e-5 * scale for a, b in zip(ours, blender)):
            mismatches.append((case, ours, blender))
    assert not mismatches, f"{len(mismatches)} settings differ, first: {mismatches[0]}"
