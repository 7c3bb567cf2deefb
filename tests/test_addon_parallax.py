"""multiplane.parallax_move: the camera is keyed and the planes stay put in the world. With
Scale Planes no plane edge comes into view at any frame of the move; without it (the
default) the planes are not touched and a backdrop lacking the margins is reported."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import make_stack, run_in_blender  # noqa: E402

MOVE = {"truck": 1.5, "pedestal": -0.4, "dolly": 1.2}
CHECK_FRAMES = (1, 13, 25, 37, 48)


def blender_parallax(stack_dir: str, projection: str, margin: float) -> dict:
    import bpy
    from bpy_extras.object_utils import world_to_camera_view

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    camera = helpers.add_camera(scene, projection=projection, ortho_scale=5.0, shift=(0.05, -0.1),
                                location=(2.0, -1.0, 1.5), rotation=(1.4, 0.0, 0.3))
    scene.render.resolution_x, scene.render.resolution_y = 64, 48
    scene.frame_start, scene.frame_end = 1, 48
    bpy.ops.multiplane.import_stack(filepath=stack_dir)
    planes = sorted(bpy.data.collections["Backdrop: Test Stack"].objects, key=lambda o: o["multiplane_layer_index"])
    before = {p.name: [list(row) for row in p.matrix_world] for p in planes}
    original_corners = {p.name: [v.co.copy() for v in p.data.vertices] for p in planes}
    start_location = list(camera.matrix_world.translation)
    camera_axes = [list(camera.matrix_world.to_3x3().normalized().col[i]) for i in range(3)]

    bpy.ops.multiplane.parallax_move(margin=margin, scale_planes=True, **MOVE)

    def project(corners_by_plane) -> dict:
        return {name: [list(world_to_camera_view(scene, camera, matrix @ co))[:2] for co in corners]
                for name, (matrix, corners) in corners_by_plane.items()}

    frames = {}
    frames_unscaled = {}
    for frame in CHECK_FRAMES:
        scene.frame_set(frame)
        frames[frame] = project({p.name: (p.matrix_world, [v.co for v in p.data.vertices]) for p in planes})
        frames_unscaled[frame] = project({p.name: (p.matrix_world, original_corners[p.name]) for p in planes})
    scene.frame_set(48)
    end_location = list(camera.matrix_world.translation)
    after = {p.name: [list(row) for row in p.matrix_world] for p in planes}
    from addon import compat

    keys = {fc.array_index: [(kp.co.x, kp.interpolation) for kp in fc.keyframe_points]
            for fc in compat.fcurves_of(camera) if fc.data_path == "location"}
    errors = {}
    for key, kwargs in {"through_plane": {"dolly": 4.5}, "no_move": {"truck": 0.0}}.items():
        try:
            bpy.ops.multiplane.parallax_move(**kwargs)
            errors[key] = None
        except RuntimeError as error:
            errors[key] = str(error)
    camera.keyframe_insert("rotation_euler", frame=1)
    camera.rotation_euler.z += 0.2
    camera.keyframe_insert("rotation_euler", frame=48)
    try:
        bpy.ops.multiplane.parallax_move(truck=1.0, scale_planes=True)
        errors["camera_turns"] = None
    except RuntimeError as error:
        errors["camera_turns"] = str(error)
    scene.frame_end = 1
    try:
        bpy.ops.multiplane.parallax_move(truck=1.0)
        errors["empty_range"] = None
    except RuntimeError as error:
        errors["empty_range"] = str(error)
    return {
        "frames": {str(k): v for k, v in frames.items()},
        "frames_unscaled": {str(k): v for k, v in frames_unscaled.items()},
        "before": before, "after": after,
        "start_location": start_location, "end_location": end_location, "camera_axes": camera_axes,
        "keys": {str(k): v for k, v in keys.items()},
        "overscans": {p.name: p["multiplane_overscan"] for p in planes},
        "errors": errors,
    }


def _coverage_gap(corners: list[list[float]]) -> float:
    """How far the plane's projection falls short of covering [0,1]^2 (<= 0 means covered)."""
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return max(min(xs), min(ys), 1.0 - max(xs), 1.0 - max(ys))


@pytest.fixture(scope="module", params=["PERSP", "ORTHO"])
def parallax(request, tmp_path_factory):
    stack = make_stack(tmp_path_factory.mktemp("parallax") / "stack", 64, 48, name="Test Stack")
    tight = run_in_blender(__file__, "blender_parallax", stack_dir=str(stack), projection=request.param, margin=0.0)
    return request.param, tight


def test_no_plane_edge_enters_the_frame_during_the_move(parallax):
    _projection, info = parallax
    for frame, planes in info["frames"].items():
        for name, corners in planes.items():
            assert _coverage_gap(corners) <= 1e-6, (frame, name, corners)


def test_overscan_is_no_larger_than_needed(parallax):
    _projection, info = parallax
    # With no margin, some plane edge touches the frame edge at the first or last frame.
    touching = [
        min(-_coverage_gap(corners) for corners in info["frames"][str(frame)].values())
        for frame in (CHECK_FRAMES[0], CHECK_FRAMES[-1])
    ]
    assert min(touching) == pytest.approx(0.0, abs=1e-5)
    assert all(value >= 1.0 for value in info["overscans"].values())


def test_without_the_refit_the_move_would_show_plane_edges(parallax):
    # Control for the coverage check: the planes at their import size do reveal their edges.
    _projection, info = parallax
    gaps = [_coverage_gap(corners) for corners in info["frames_unscaled"][str(CHECK_FRAMES[-1])].values()]
    assert max(gaps) > 0.01


def test_planes_stay_fixed_and_the_camera_moves_by_truck_pedestal_dolly(parallax):
    projection, info = parallax
    for name, matrix in info["before"].items():
        assert np.allclose(matrix, info["after"][name], atol=1e-6), name
    right, up, back = (np.array(axis) for axis in info["camera_axes"])
    expected = np.array(info["start_location"]) + MOVE["truck"] * right + MOVE["pedestal"] * up - MOVE["dolly"] * back
    assert np.allclose(info["end_location"], expected, atol=1e-5)
    assert sorted(info["keys"]) == ["0", "1", "2"]
    for keys in info["keys"].values():
        assert [frame for frame, _ in keys] == [1.0, 48.0]
        assert {interpolation for _, interpolation in keys} == {"BEZIER"}
    overscans = [info["overscans"][name] for name in sorted(info["overscans"])]
    if projection == "PERSP":
        # Near layers slide more, so they need more overscan than the background.
        by_layer = sorted(info["overscans"].items())
        assert dict(by_layer)["Test Stack: layer_03"] > dict(by_layer)["Test Stack: background"]
    assert all(o > 1.0 for o in overscans)


def test_impossible_moves_are_reported(parallax):
    _projection, info = parallax
    errors = info["errors"]
    assert errors["through_plane"] is not None
    assert "Cannot make the camera move" in errors["through_plane"]
    assert "through the plane at distance 4" in errors["through_plane"]
    assert "nothing to move" in errors["no_move"]
    assert "frame range 1-1 is empty" in errors["empty_range"]
    assert "the camera turns between frames 1 and 48" in errors["camera_turns"]
    for message in filter(None, errors.values()):
        assert "Traceback" not in message


def blender_parallax_without_scaling(stack_dir: str) -> dict:
    """The default move on a backdrop made for a static shot: planes untouched, shortfall said."""
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    helpers.add_camera(scene, location=(2.0, -1.0, 1.5), rotation=(1.4, 0.0, 0.3))
    scene.render.resolution_x, scene.render.resolution_y = 64, 48
    scene.frame_start, scene.frame_end = 1, 12
    bpy.ops.multiplane.import_stack(filepath=stack_dir)
    planes = bpy.data.collections["Backdrop: Test Stack"].objects

    def geometry() -> dict:
        return {p.name: [list(p.matrix_world.col[3]), [list(v.co) for v in p.data.vertices]] for p in planes}

    before = geometry()
    from addon import backdrop

    result, reports = helpers.execute_recording(
        backdrop.MULTIPLANE_OT_parallax_move, bpy.context, truck=0.5, pedestal=0.0, dolly=0.0, margin=0.01,
        interpolation="BEZIER", scale_planes=False)
    return {"result": result, "unchanged": geometry() == before, "reports": reports,
            "panel_warning": scene.multiplane.shot_warning}


def test_without_scale_planes_the_planes_stay_and_the_shortfall_is_reported(tmp_path):
    stack = make_stack(tmp_path / "stack", 64, 48, name="Test Stack")
    info = run_in_blender(__file__, "blender_parallax_without_scaling", stack_dir=str(stack))
    assert info["result"] == ["FINISHED"]
    assert info["unchanged"], "the planes must not be scaled unless the artist asks"
    kinds, message = info["reports"][-1]
    assert kinds == ["WARNING"], info["reports"]
    assert "sees past the edges of" in message and "right" in message and "Extend for Shot" in message, message
    assert "left" not in message.split("missing")[1].split(")")[0], message  # a truck right needs the right side
    assert "Extend for Shot" in info["panel_warning"] and "Backdrop: Test Stack" in info["panel_warning"]
