"""The shot in real Blender (bpy 5.0 and 4.2): the camera's motion read over the frame range
(keyframed with rotation, constrained, made by parallax_move, an orthographic truck) gives
the margins a backdrop needs, and a stack made with them never shows a plane edge at any
frame, while its frame still maps exactly onto the camera frame at the start; proxies lay
layers out (box and depth from the camera's view) and are read again at Generate."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402

SHOTS = ("keyed_rotation", "constrained", "parallax_move", "ortho_truck")


# --------------------------------------------------------------------------- inside Blender


def setup_shot(scene, kind: str, size=(64, 36), frames=(1, 24)):
    """A camera and its move over the frame range (parallax_move is keyed by the caller)."""
    import bpy

    ortho = kind == "ortho_truck"
    camera = helpers.add_camera(scene, projection="ORTHO" if ortho else "PERSP", lens=35.0, ortho_scale=6.0,
                                shift=(0.05, -0.03), location=(0.0, -10.0, 1.5),
                                rotation=(math.radians(88.0), 0.0, 0.0))
    scene.render.resolution_x, scene.render.resolution_y = size
    scene.frame_start, scene.frame_end = frames
    first, last = frames
    if kind == "keyed_rotation":
        camera.keyframe_insert("location", frame=first)
        camera.keyframe_insert("rotation_euler", frame=first)
        camera.location.x += 0.6
        camera.rotation_euler.z += math.radians(4.0)
        camera.keyframe_insert("location", frame=(first + last) // 2)
        camera.keyframe_insert("rotation_euler", frame=(first + last) // 2)
        camera.location.y += 1.5
        camera.rotation_euler.x += math.radians(3.0)
        camera.rotation_euler.y += math.radians(5.0)  # a roll
        camera.keyframe_insert("location", frame=last)
        camera.keyframe_insert("rotation_euler", frame=last)
    elif kind == "constrained":
        target = bpy.data.objects.new("Look At", None)
        scene.collection.objects.link(target)
        target.location = (0.0, 20.0, 1.0)
        constraint = camera.constraints.new("TRACK_TO")
        constraint.target, constraint.track_axis, constraint.up_axis = target, "TRACK_NEGATIVE_Z", "UP_Y"
        camera.keyframe_insert("location", frame=first)
        camera.location.x += 2.0
        camera.keyframe_insert("location", frame=last)
    elif kind == "ortho_truck":
        camera.keyframe_insert("location", frame=first)
        camera.location.x += 1.2
        camera.location.z -= 0.4
        camera.keyframe_insert("location", frame=last)
    bpy.context.view_layer.update()
    return camera


def _projected(scene, camera, plane, points=None) -> list:
    from bpy_extras.object_utils import world_to_camera_view

    points = points if points is not None else [v.co for v in plane.data.vertices]
    return [list(world_to_camera_view(scene, camera, plane.matrix_world @ p))[:2] for p in points]


def _frame_rect_points(plane, frame) -> list:
    """The plane's frame rectangle corners in its local coordinates (image y runs down)."""
    from mathutils import Vector

    xs = [v.co.x for v in plane.data.vertices]
    ys = [v.co.y for v in plane.data.vertices]
    left, top, width, height = min(xs), max(ys), max(xs) - min(xs), max(ys) - min(ys)
    x0, y0, x1, y1 = frame
    return [Vector((left + x * width, top - y * height, 0.0)) for x, y in ((x0, y1), (x1, y1), (x1, y0), (x0, y0))]


def scenario_moving_shot(out_dir: str, kind: str) -> dict:
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    from addon import generate, importer, shot

    scene = bpy.context.scene
    camera = setup_shot(scene, kind)
    settings = scene.multiplane
    for _ in range(2):
        settings.layers.add().prompt = "a thing"
    out_dir = Path(out_dir)
    static_layers = helpers.smooth_layers(64, 36)
    static = helpers.make_stack(out_dir / "static", 64, 36, name="Static", layers=static_layers)
    bpy.ops.multiplane.import_stack(filepath=str(static))
    if kind == "parallax_move":
        bpy.ops.multiplane.parallax_move(truck=1.0, pedestal=0.3, dolly=1.0)
    static_shortfall = shot.backdrop_shortfall(scene, bpy.data.collections["Backdrop: Static"])

    plan, margins = generate.plan_request_canvas(scene)
    stack = helpers.make_framed_stack(out_dir / "moving", plan.width, plan.height, plan.frame, name="Shot",
                                      layers=helpers.smooth_layers(plan.width, plan.height))
    bpy.ops.multiplane.import_stack(filepath=str(stack))
    moving = importer.backdrop_planes(bpy.data.collections["Backdrop: Shot"])
    statics = importer.backdrop_planes(bpy.data.collections["Backdrop: Static"])
    gaps, static_gaps = [], []
    for frame in range(scene.frame_start, scene.frame_end + 1):
        scene.frame_set(frame)
        gaps.append(max(helpers.covers_frame(_projected(scene, camera, p)) for p in moving))
        static_gaps.append(max(helpers.covers_frame(_projected(scene, camera, p)) for p in statics))
    scene.frame_set(scene.frame_start)
    start_rects = [_projected(scene, camera, p, _frame_rect_points(p, plan.frame)) for p in moving]
    return {
        "margins": list(margins), "plan": [plan.width, plan.height, list(plan.frame)],
        "stored_margins": list(settings.shot_margins),
        "gaps": gaps, "static_gaps": static_gaps, "start_rects": start_rects,
        "depths": [-(camera.matrix_world.normalized().inverted() @ p.matrix_world.translation).z for p in moving],
        "static_lacking": sorted(static_shortfall.missing),
        "moving_lacking": sorted(shot.backdrop_shortfall(scene, bpy.data.collections["Backdrop: Shot"]).missing),
        "frame_current": scene.frame_current,
    }


def scenario_static_and_read_shot() -> dict:
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    from addon import generate, shot_operators

    scene = bpy.context.scene
    camera = helpers.add_camera(scene, location=(0.0, -10.0, 1.5), rotation=(math.radians(88.0), 0.0, 0.0))
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 1920, 1080, 25
    scene.frame_start, scene.frame_end = 1, 30
    scene.frame_set(7)
    settings = scene.multiplane
    settings.model = "sd15"
    plan, margins = generate.plan_request_canvas(scene)
    static = {"margins": list(margins), "plan": [plan.width, plan.height, list(plan.frame)],
              "frame_current": scene.frame_current}
    camera.keyframe_insert("location", frame=1)
    camera.location.x += 1.0
    camera.keyframe_insert("location", frame=30)
    result, reports = helpers.execute_recording(shot_operators.MULTIPLANE_OT_read_shot, bpy.context)
    read = {"result": result, "reports": reports, "stored": list(settings.shot_margins),
            "frame_current": scene.frame_current}
    settings.use_shot_margins = False
    off = list(generate.plan_request_canvas(scene)[1])
    settings.use_shot_margins = True
    camera.data.type = "PANO"
    result, reports = helpers.execute_recording(shot_operators.MULTIPLANE_OT_read_shot, bpy.context)
    pano = {"result": result, "reports": reports}
    camera.data.type = "PERSP"
    settings.layers.add().prompt = "a boat"  # at the importer's Near, 4 in front of the camera
    camera.location.y += 12.0  # the camera flies through that layer's plane
    camera.keyframe_insert("location", frame=30)
    try:
        settings.prompt = "a lake"
        generate.build_request(scene)
        through = ""
    except ValueError as error:
        through = str(error)
    return {"static": static, "read": read, "off": off, "pano": pano, "through": through}


def scenario_layers_from_selected(projection: str) -> dict:
    import bpy
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    helpers.reset_blender()
    helpers.register_addon()
    from addon import generate, shot_operators

    scene = bpy.context.scene
    camera = helpers.add_camera(scene, projection=projection, ortho_scale=12.0, lens=30.0, shift=(0.1, 0.0),
                                location=(0.0, -2.0, 1.0), rotation=(math.radians(85.0), 0.0, math.radians(5.0)))
    scene.render.resolution_x, scene.render.resolution_y = 160, 90
    scene.frame_start, scene.frame_end = 1, 10
    proxies = []
    for name, location, size in (("Tree", (-2.0, 8.0, 1.0), 1.5), ("Rock", (1.5, 14.0, 0.0), 2.0),
                                 ("Hut", (3.0, 25.0, 1.5), 3.0)):
        bpy.ops.mesh.primitive_cube_add(size=size, location=location)
        obj = bpy.context.active_object
        obj.name = name
        proxies.append(obj)
    empty = bpy.data.objects.new("Marker", None)
    scene.collection.objects.link(empty)
    empty.location = (-1.0, 18.0, 2.0)
    empty.empty_display_size = 0.8
    proxies.append(empty)
    bpy.context.view_layer.update()

    def truth(obj) -> dict:
        if obj.type == "EMPTY":  # an empty's bounding box is its display cube
            size = obj.empty_display_size
            local = [Vector((x, y, z)) for x in (-size, size) for y in (-size, size) for z in (-size, size)]
        else:
            local = [Vector(c) for c in obj.bound_box]
        corners = [obj.matrix_world @ c for c in local]
        view = [world_to_camera_view(scene, camera, c) for c in corners]
        us, vs = [p.x for p in view], [1.0 - p.y for p in view]
        centre = sum(corners, Vector()) / 8.0
        depth = -(camera.matrix_world.normalized().inverted() @ centre).z
        return {"box": [max(0.0, min(us)), max(0.0, min(vs)), min(1.0, max(us)), min(1.0, max(vs))], "depth": depth}

    for obj in bpy.data.objects:
        obj.select_set(obj in proxies or obj == camera)
    result, reports = helpers.execute_recording(shot_operators.MULTIPLANE_OT_layers_from_selected, bpy.context,
                                                hide_proxies=True)
    settings = scene.multiplane
    layers = [{"name": layer.name, "proxy": layer.proxy.name, "box": list(layer.box), "depth": layer.depth,
               "use_box": layer.use_box} for layer in settings.layers]
    expected = {obj.name: truth(obj) for obj in proxies}
    hidden = {obj.name: obj.hide_render for obj in proxies}
    for index, layer in enumerate(settings.layers):
        layer.prompt = f"prompt {index}"
    settings.prompt = "a village"
    # Move a proxy: Generate reads it again.
    bpy.data.objects["Rock"].location.x -= 1.0
    bpy.context.view_layer.update()
    body = generate.build_request(scene)
    moved = truth(bpy.data.objects["Rock"])
    # Again on the same objects: the layers are updated, not doubled.
    again, _reports = helpers.execute_recording(shot_operators.MULTIPLANE_OT_layers_from_selected, bpy.context,
                                                hide_proxies=False)
    count_after_again = len(settings.layers)
    bpy.data.objects["Hut"].location = (0.0, -10.0, 0.0)  # behind the camera
    bpy.context.view_layer.update()
    try:
        generate.build_request(scene)
        behind = ""
    except ValueError as error:
        behind = str(error)
    for obj in bpy.data.objects:
        obj.select_set(False)
    nothing, nothing_reports = helpers.execute_recording(shot_operators.MULTIPLANE_OT_layers_from_selected,
                                                         bpy.context, hide_proxies=True)
    return {"result": result, "reports": reports, "layers": layers, "expected": expected, "hidden": hidden,
            "body_layers": body["layers"], "moved": moved, "again": again, "count_after_again": count_after_again,
            "behind": behind, "nothing": [nothing, nothing_reports]}


# --------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module", params=helpers.per_blender(SHOTS))
def moving_shot(request, tmp_path_factory):
    kind, python = request.param
    out = tmp_path_factory.mktemp(kind)
    return kind, run_in_blender(__file__, "scenario_moving_shot", python=python, out_dir=str(out),
                                kind=kind)


def test_a_stack_with_the_shots_margins_shows_no_edge_at_any_frame(moving_shot):
    kind, info = moving_shot
    assert len(info["gaps"]) == 24
    assert max(info["gaps"]) <= 0.0, (kind, info["gaps"], info["margins"])
    assert info["moving_lacking"] == []
    assert info["stored_margins"] == pytest.approx(info["margins"], abs=1e-6)
    assert info["frame_current"] == 1


def test_without_the_margins_the_move_shows_edges(moving_shot):
    # Control: the static stack (no margins) shows its edges during the same move, and the
    # shortfall check says so for every plane.
    kind, info = moving_shot
    assert max(info["static_gaps"]) > 0.01, (kind, info["static_gaps"])
    assert info["static_lacking"], kind
    assert any(m > 0.01 for m in info["margins"]), info["margins"]


def test_the_frame_still_maps_exactly_onto_the_start_frame(moving_shot):
    _kind, info = moving_shot
    for rect in info["start_rects"]:
        assert [c for corner in rect for c in corner] == pytest.approx([0, 0, 1, 0, 1, 1, 0, 1], abs=1e-5)


def test_margins_follow_the_direction_of_the_move(moving_shot):
    kind, info = moving_shot
    left, top, right, bottom = info["margins"]
    if kind in ("constrained", "ortho_truck"):
        assert right > 0.05 and left < right  # trucking right sees more on the right
    if kind == "ortho_truck":
        assert bottom > 0.05 and top == 0.0 and left == 0.0  # ... and down: more at the bottom
    if kind == "parallax_move":
        assert right > 0.05 and top > 0.0


@pytest.mark.parametrize("python", blender_pythons())
def test_a_static_camera_gets_no_margins_and_read_shot_reports(python):
    out = run_in_blender(__file__, "scenario_static_and_read_shot", python=python)
    static = out["static"]
    assert static["margins"] == [0.0, 0.0, 0.0, 0.0]
    width, height, frame = static["plan"]
    # 16:9 at SD 1.5's 512^2 budget, the 25 % ignored: 704 x 384, the frame exactly 16:9 inside.
    assert (width, height) == (704, 384)
    assert (frame[2] - frame[0]) * width / ((frame[3] - frame[1]) * height) == pytest.approx(16 / 9)
    assert static["frame_current"] == 7  # sampling the shot gives the artist's frame back
    read = out["read"]
    assert read["result"] == ["FINISHED"] and read["frame_current"] == 7
    # A 1-unit truck seen on the background plane (Far, 40: the frame is 40 * 36 / 50 wide there).
    assert read["stored"] == pytest.approx([0.0, 0.0, 1.0 / 28.8, 0.0], abs=1e-6)
    assert "Frames 1-30" in read["reports"][0][1] and "right" in read["reports"][0][1]
    assert out["off"] == [0.0, 0.0, 0.0, 0.0]
    assert out["pano"]["result"] == ["CANCELLED"] and "panoramic" in out["pano"]["reports"][0][1]
    assert "sees past the edge of the plane" in out["through"], out["through"]


@pytest.mark.parametrize("python", blender_pythons())
@pytest.mark.parametrize("projection", ["PERSP", "ORTHO"])
def test_layers_from_selected_objects(projection, python):
    out = run_in_blender(__file__, "scenario_layers_from_selected", python=python, projection=projection)
    assert out["result"] == ["FINISHED"], out["reports"]
    layers, expected = out["layers"], out["expected"]
    assert sorted(layer["proxy"] for layer in layers) == ["Hut", "Marker", "Rock", "Tree"]  # not the camera
    assert [layer["proxy"] for layer in layers] == ["Hut", "Marker", "Rock", "Tree"]  # far to near
    for layer in layers:
        want = expected[layer["proxy"]]
        assert layer["name"] == layer["proxy"] and layer["use_box"]
        assert layer["box"] == pytest.approx(want["box"], abs=1e-5), layer
        assert layer["depth"] == pytest.approx(want["depth"], rel=1e-5), layer
    assert all(out["hidden"].values())
    rock = next(item for item in out["body_layers"] if item.get("name") == "Rock")
    assert rock["box"] == pytest.approx(out["moved"]["box"], abs=1e-5)
    assert rock["depth"] == pytest.approx(out["moved"]["depth"], rel=1e-5)
    assert rock["box"] != pytest.approx(expected["Rock"]["box"], abs=1e-3)
    assert out["again"] == ["FINISHED"] and out["count_after_again"] == 4
    assert "proxy" in out["behind"] and "not in front of the camera" in out["behind"], out["behind"]
    nothing_result, nothing_reports = out["nothing"]
    assert nothing_result == ["CANCELLED"] and "Select the blockout objects" in nothing_reports[0][1]


def test_framed_planes_fill_the_frame_for_any_camera(tmp_path):
    """The import test's camera grid (projections, sensor fits, shifts, pixel aspects) on a stack
    whose frame is an off-centre part of its canvas: the frame rectangle fills the camera frame."""
    frame = (0.1, 0.25, 0.7, 0.9)
    stack = helpers.make_framed_stack(tmp_path / "stack", 64, 48, frame)
    cases = [
        {"projection": p, "sensor_fit": f, "shift": s, "lens": lens, "resolution": r, "pixel_aspect": a}
        for p, f, s, lens, r, a in [
            ("PERSP", "AUTO", (0.0, 0.0), 50.0, (64, 48), (1, 1)),
            ("PERSP", "VERTICAL", (-0.1, 0.3), 85.0, (64, 48), (2, 1)),
            ("PERSP", "HORIZONTAL", (0.0, 0.2), 35.0, (48, 64), (1, 3)),
            ("ORTHO", "AUTO", (0.1, 0.1), 50.0, (48, 64), (1, 1)),
            ("ORTHO", "VERTICAL", (0.3, 0.0), 50.0, (64, 48), (1, 2)),
        ]
    ]
    results = run_in_blender(str(Path(__file__).with_name("test_addon_import.py")), "blender_fit_many_cameras",
                             stack_dir=str(stack), cases=cases)
    x0, y0, x1, y1 = frame

    def view(cx: float, cy: float) -> list:  # image coordinates -> camera view (y up)
        return [(cx - x0) / (x1 - x0), 1.0 - (cy - y0) / (y1 - y0)]

    expected = [c for corner in (view(0, 1), view(1, 1), view(1, 0), view(0, 0)) for c in corner]
    for case, planes in zip(cases, results):
        assert len(planes) == 4
        for corners in planes:
            assert [c for corner in corners for c in corner] == pytest.approx(expected, abs=1e-5), case
