"""The shot's geometry in plain numbers (addon/geometry.py, no Blender): planes fitted by a
stack's frame rectangle, the region of each plane a camera move sees (margins), and an
object's projected layout box and depth."""
from __future__ import annotations

import math

import pytest

from addon.geometry import (
    CameraPose,
    CameraSpec,
    GeometryError,
    camera_frame_size,
    check_frame,
    fit_plane_to_camera,
    frame_corners,
    frame_margins,
    missing_margins,
    project_to_frame,
    projected_box,
    region_margins,
    seen_region,
    shot_margins,
)

CAMERAS = {
    "persp": CameraSpec(lens=35.0, resolution_x=1920, resolution_y=1080),
    "persp_shift_vertical": CameraSpec(lens=50.0, sensor_fit="VERTICAL", shift_x=0.1, shift_y=-0.2,
                                       resolution_x=640, resolution_y=480, pixel_aspect_x=2.0),
    "persp_portrait_horizontal": CameraSpec(lens=24.0, sensor_fit="HORIZONTAL", shift_y=0.15,
                                            resolution_x=1080, resolution_y=1920),
    "ortho": CameraSpec(projection="ORTHO", ortho_scale=7.0, shift_x=-0.2, resolution_x=1536, resolution_y=640),
    "ortho_vertical": CameraSpec(projection="ORTHO", ortho_scale=3.0, sensor_fit="VERTICAL",
                                 resolution_x=400, resolution_y=300, pixel_aspect_y=1.5),
}
FRAMES = [(0.0, 0.0, 1.0, 1.0), (0.1, 0.05, 0.8, 0.95), (0.0, 0.3, 0.5, 1.0)]


def _yaw_right(angle: float):
    c, s = math.cos(angle), math.sin(angle)
    return ((c, 0.0, -s), (0.0, 1.0, 0.0), (s, 0.0, c))


# --------------------------------------------------------------------------- planes fitted by the frame


@pytest.mark.parametrize("camera", sorted(CAMERAS))
@pytest.mark.parametrize("frame", FRAMES)
def test_the_frame_rectangle_of_the_plane_is_exactly_the_camera_frame(camera, frame):
    spec = CAMERAS[camera]
    fit = fit_plane_to_camera(spec, 7.5, frame=frame)
    left, top = fit.center_x - fit.width / 2, fit.center_y + fit.height / 2
    x0, y0, x1, y1 = frame
    # The frame rectangle's corners on the plane (image y runs down) ...
    corners = [(left + x * fit.width, top - y * fit.height) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    # ... are the camera frame's corners at that distance.
    for got, want in zip(corners, frame_corners(spec, 7.5)):
        assert got == pytest.approx(want, abs=1e-12)
    # The image keeps its own proportions: no axis is scaled differently.
    frame_w, frame_h = camera_frame_size(spec, 7.5)
    assert fit.width * (x1 - x0) == pytest.approx(frame_w) and fit.height * (y1 - y0) == pytest.approx(frame_h)


def test_without_a_frame_the_fit_is_the_old_whole_image_fit():
    spec = CAMERAS["persp_shift_vertical"]
    whole = fit_plane_to_camera(spec, 3.0)
    assert whole == fit_plane_to_camera(spec, 3.0, frame=(0, 0, 1, 1))
    assert (whole.width, whole.height) == pytest.approx(camera_frame_size(spec, 3.0))


def test_overscan_and_cover_keep_the_frame_centred():
    spec = CAMERAS["persp"]
    frame = (0.2, 0.1, 0.9, 0.8)
    exact = fit_plane_to_camera(spec, 5.0, frame=frame)
    bigger = fit_plane_to_camera(spec, 5.0, overscan=1.5, frame=frame)
    assert bigger.width == pytest.approx(1.5 * exact.width)
    # The frame's centre stays where it was (scaling about the frame centre).
    for fit in (exact, bigger):
        cx = fit.center_x - fit.width / 2 + 0.55 * fit.width
        assert cx == pytest.approx(0.0, abs=1e-12)
    cover = fit_plane_to_camera(spec, 5.0, mode="COVER", image_size=(1000, 1000), frame=frame)
    frame_w, frame_h = camera_frame_size(spec, 5.0)
    # The frame rectangle is 700x700 pixels: square, so it covers the 16:9 frame by its width.
    assert cover.width * 0.7 == pytest.approx(frame_w) and cover.height * 0.7 == pytest.approx(frame_w)
    assert frame_w > frame_h


@pytest.mark.parametrize("frame", [(0.5, 0, 0.5, 1), (0, 0, 1.2, 1), (-0.1, 0, 1, 1), (0, 0, 1), (0, 0, 1, math.nan)])
def test_bad_frames_are_refused(frame):
    with pytest.raises(GeometryError, match="frame"):
        check_frame(frame)
    with pytest.raises(GeometryError):
        fit_plane_to_camera(CAMERAS["persp"], 5.0, frame=frame)


def test_frame_margins():
    assert frame_margins((0.0, 0.0, 1.0, 1.0)) == (0.0, 0.0, 0.0, 0.0)
    assert frame_margins((0.2, 0.1, 0.7, 0.6)) == pytest.approx((0.4, 0.2, 0.6, 0.8))


# --------------------------------------------------------------------------- what a shot sees


@pytest.mark.parametrize("camera", sorted(CAMERAS))
def test_a_static_camera_needs_no_margins(camera):
    spec = CAMERAS[camera]
    poses = [CameraPose(spec, frame=f) for f in range(1, 25)]
    assert seen_region(spec, 12.0, poses) == pytest.approx((0.0, 0.0, 1.0, 1.0))
    assert shot_margins(spec, [40.0, 4.0], poses) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("camera", sorted(CAMERAS))
def test_a_truck_and_pedestal_need_what_they_move_over_the_frame_at_that_depth(camera):
    spec = CAMERAS[camera]
    poses = [CameraPose(spec, location=(0.3 * t, -0.1 * t, 0.0), frame=t) for t in range(0, 5)]
    for distance in (2.0, 9.0):
        width, height = camera_frame_size(spec, distance)
        margins = region_margins(seen_region(spec, distance, poses))
        assert margins == pytest.approx((0.0, 0.0, 1.2 / width, 0.4 / height))
    if spec.is_ortho:  # parallel rays: every depth needs the same margins
        assert shot_margins(spec, [2.0], poses) == pytest.approx(shot_margins(spec, [9.0], poses))
    else:  # near planes slide more: the union is the nearest one's
        assert shot_margins(spec, [2.0, 9.0], poses) == pytest.approx(shot_margins(spec, [2.0], poses))


def test_a_dolly_out_needs_margins_on_every_side():
    spec = CAMERAS["persp"]
    poses = [CameraPose(spec, location=(0.0, 0.0, 2.0))]  # 2 units backwards
    left, top, right, bottom = shot_margins(spec, [8.0], poses)
    # At 10 units the frame is 10/8 as large: an eighth of the frame more on each side.
    assert (left, top, right, bottom) == pytest.approx((0.125, 0.125, 0.125, 0.125))
    ortho = CAMERAS["ortho"]
    assert shot_margins(ortho, [8.0], [CameraPose(ortho, location=(0.0, 0.0, 2.0))]) == (0.0, 0.0, 0.0, 0.0)


def test_a_pan_needs_the_rotated_frames_footprint():
    spec = CameraSpec(lens=50.0, sensor_width=36.0, resolution_x=1600, resolution_y=900)
    angle, distance = math.radians(8.0), 6.0
    region = seen_region(spec, distance, [CameraPose(spec, rotation=_yaw_right(angle), frame=10)])
    half_x, half_y = 0.5 * 36.0 / 50.0, 0.5 * 36.0 / 50.0 * 900 / 1600  # tan of the half angles
    right_edge = distance * math.tan(math.atan(half_x) + angle)
    corner_y = distance * half_y / (math.cos(angle) - half_x * math.sin(angle))
    assert region[2] == pytest.approx((right_edge + distance * half_x) / (2 * distance * half_x))
    assert region[1] == pytest.approx((distance * half_y - corner_y) / (2 * distance * half_y))
    assert region[0] == pytest.approx(0.0) and region[1] < 0.0 and region[3] > 1.0


def test_an_animated_lens_zooming_out_needs_margins():
    spec = CAMERAS["persp"]
    wider = CameraSpec(lens=28.0, resolution_x=1920, resolution_y=1080)
    margins = shot_margins(spec, [5.0], [CameraPose(wider)])
    assert margins == pytest.approx((0.125,) * 4)  # 35/28 = 1.25: an eighth more per side


def test_views_that_no_plane_can_fill_are_refused():
    spec = CAMERAS["persp"]
    with pytest.raises(GeometryError, match="at frame 7 the camera sees past the edge of the plane at distance 3"):
        seen_region(spec, 3.0, [CameraPose(spec, location=(0.0, 0.0, -3.5), frame=7)])
    with pytest.raises(GeometryError, match="turns away"):
        seen_region(spec, 3.0, [CameraPose(spec, rotation=_yaw_right(math.radians(80.0)))])


def test_missing_margins():
    assert missing_margins((0.1, 0.0, 0.3, 0.0), (0.2, 0.0, 0.1, 0.05)) == pytest.approx((0.0, 0.0, 0.2, 0.0))
    assert missing_margins((0.1, 0.0, 0.0, 0.0), (0.1, 0.0, 0.0, 0.0)) == (0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- objects as layers


@pytest.mark.parametrize("camera", sorted(CAMERAS))
def test_projected_points_land_where_the_frame_corners_say(camera):
    spec = CAMERAS[camera]
    corners = frame_corners(spec, 4.0)
    (left, top), (right, _), _, (_, bottom) = corners
    point = (left + 0.25 * (right - left), top - 0.75 * (top - bottom), -4.0)
    assert project_to_frame(spec, point) == pytest.approx((0.25, 0.75, 4.0))


def test_projected_box_of_a_box_in_front_of_a_perspective_camera():
    spec = CameraSpec(lens=50.0, sensor_width=36.0, resolution_x=1000, resolution_y=1000)
    # A 1-unit cube centred 0.5 to the right, 10 units away: the frame is 7.2 units wide there.
    cube = [(x, y, z) for x in (0.0, 1.0) for y in (-0.5, 0.5) for z in (-9.5, -10.5)]
    box, depth = projected_box(spec, cube)
    assert depth == pytest.approx(10.0)
    # Its nearest face (9.5 units, frame 6.84 wide) is the widest on screen.
    assert box == pytest.approx((0.5, 0.5 - 0.5 / 6.84, 0.5 + 1.0 / 6.84, 0.5 + 0.5 / 6.84))


def test_projected_box_on_an_orthographic_camera_ignores_depth_and_clamps_to_the_frame():
    spec = CameraSpec(projection="ORTHO", ortho_scale=4.0, resolution_x=400, resolution_y=200)
    near = [(x, y, z) for x in (1.0, 3.0) for y in (0.0, 0.5) for z in (-2.0, -4.0)]
    box, depth = projected_box(spec, near)
    assert box == pytest.approx((0.75, 0.25, 1.0, 0.5)) and depth == pytest.approx(3.0)


def test_objects_behind_or_beside_the_camera_are_refused():
    spec = CAMERAS["persp"]
    with pytest.raises(GeometryError, match="not in front of the camera"):
        projected_box(spec, [(0.0, 0.0, -1.0), (0.0, 0.0, 1.0)])
    with pytest.raises(GeometryError, match="outside the camera frame"):
        projected_box(spec, [(50.0, 0.0, -5.0), (51.0, 1.0, -6.0)])
