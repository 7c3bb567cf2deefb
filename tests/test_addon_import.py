"""Importing a stack: the stdlib reader, the planes and materials, re-import in place, clear
errors, register/unregister, and - by rendering with Cycles - that every plane fills the
camera frame exactly."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import load_rgb, make_stack, run_in_blender  # noqa: E402

from addon.stack_reader import MANIFEST_FILE, StackReadError, read_stack, safe_folder_name  # noqa: E402


@pytest.fixture
def stack_dir(tmp_path) -> Path:
    return make_stack(tmp_path / "stack", 64, 48, name="Test Stack")


# --------------------------------------------------------------------------- the reader (no Blender)


def test_reader_reads_layers_back_to_front(stack_dir):
    stack = read_stack(stack_dir)
    assert stack.name == "Test Stack" and (stack.width, stack.height) == (64, 48)
    assert [layer.name for layer in stack.layers] == ["background", "layer_01", "layer_02", "layer_03"]
    assert stack.layers[0].is_background and not any(layer.is_background for layer in stack.layers[1:])
    assert all(layer.path.is_file() for layer in stack.layers)
    assert read_stack(stack_dir / "stack.json").layers == stack.layers


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "stack.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="something.else"), "not a Multiplane layer stack"),
    (lambda d: d.update(format_version=2), "format version 2.*update the Multiplane add-on"),
    (lambda d: d.update(width="64"), "'width' must be an integer"),
    (lambda d: d.update(layers=[]), "'layers' must be a non-empty list"),
    (lambda d: d["layers"].reverse(), r"layers\[0\] must be the background"),
    (lambda d: d["layers"][2].update(kind="background"), r"layers\[2\] is a second background"),
    (lambda d: d["layers"][2].update(name="layer_01"), "repeats"),
    (lambda d: d["layers"][1].update(file="../layer_01.png"), "plain file name"),
    (lambda d: d["layers"][1].update(depth=-3), "positive number"),
    (lambda d: d["layers"][1].update(file="missing.png"), "missing.png is missing"),
    (lambda d: d.update(width=65), "is 64x48 pixels, but the stack is 65x48"),
    (lambda d: d.update(frame=[0.5, 0.0, 0.4, 1.0]), r"'frame' must be null or \[x0, y0, x1, y1\].*0 <= x0 < x1 <= 1"),
    (lambda d: d.update(frame=[0.0, 0.0, 1.0]), "'frame' must be null or"),
    (lambda d: d.update(frame=[0.0, -0.1, 1.0, 1.0]), "'frame' must be null or"),
    (lambda d: d.update(frame="whole"), "'frame' must be null or"),
])
def test_reader_refuses_bad_manifests_with_a_precise_message(stack_dir, change, message):
    _edit_manifest(stack_dir, change)
    with pytest.raises(StackReadError, match=message):
        read_stack(stack_dir)


def test_reader_reads_the_frame_and_its_margins(stack_dir):
    assert read_stack(stack_dir).frame == (0.0, 0.0, 1.0, 1.0)  # absent: the whole image
    _edit_manifest(stack_dir, lambda d: d.update(frame=None))
    assert read_stack(stack_dir).frame == (0.0, 0.0, 1.0, 1.0) and read_stack(stack_dir).margins == (0, 0, 0, 0)
    _edit_manifest(stack_dir, lambda d: d.update(frame=[0.25, 0, 0.75, 1]))
    stack = read_stack(stack_dir)
    assert stack.frame == (0.25, 0.0, 0.75, 1.0) and stack.margins == pytest.approx((0.5, 0.0, 0.5, 0.0))


def test_reader_refuses_foregrounds_without_alpha_and_non_stacks(stack_dir, tmp_path):
    Image.open(stack_dir / "layer_02.png").convert("RGB").save(stack_dir / "layer_02.png")
    with pytest.raises(StackReadError, match="layer_02.png has no alpha channel"):
        read_stack(stack_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackReadError, match="has no stack.json"):
        read_stack(tmp_path / "empty")
    with pytest.raises(StackReadError, match="does not exist"):
        read_stack(tmp_path / "nowhere" / "thing.txt")
    (stack_dir / "background.png").write_bytes(b"not a png at all, just text....")
    with pytest.raises(StackReadError, match="is not a PNG"):
        read_stack(stack_dir)


# Modules that parse JSON that is not a stack: the server's HTTP answers, its ready line.
JSON_NOT_STACKS = {"client.py": "HTTP answers", "backend.py": "the server's ready line",
                   "library.py": "the add-on's own job record beside a stack"}


def _stack_reading(module: Path) -> list[str]:
    """Where `module` names the manifest file (`"stack.json"` as a value, not in a sentence)
    or parses JSON itself: what only the stack reader should do."""
    import ast

    found = []
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value == MANIFEST_FILE:
            found.append(f"{module.name}:{node.lineno} names {MANIFEST_FILE!r}")
        if (isinstance(node, ast.Attribute) and node.attr in ("load", "loads")
                and isinstance(node.value, ast.Name) and node.value.id == "json"
                and module.name not in JSON_NOT_STACKS):
            found.append(f"{module.name}:{node.lineno} calls json.{node.attr}")
    return found


def test_only_the_stack_reader_reads_stacks():
    """One reader of stack.json on the add-on side: the others take its StackInfo, so a format
    change is made (and checked) in one place, and nothing rewrites what the engine wrote."""
    modules = sorted((helpers.REPO_ROOT / "addon").glob("*.py"))
    assert len(modules) > 10 and any(m.name == "watcher.py" for m in modules)
    assert _stack_reading(helpers.REPO_ROOT / "addon" / "stack_reader.py")  # the check sees a reader
    found = [where for module in modules if module.name != "stack_reader.py" for where in _stack_reading(module)]
    assert found == []


def test_safe_folder_name():
    assert safe_folder_name("Forest at dusk / v2") == "Forest_at_dusk_v2"
    assert safe_folder_name("../..") == "stack"


# --------------------------------------------------------------------------- inside Blender


def blender_import_structure(stack_dir: str) -> dict:
    import bpy
    from bpy_extras.object_utils import world_to_camera_view

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    camera = helpers.add_camera(scene, location=(1.0, -2.0, 0.5), rotation=(1.3, 0.0, 0.4), shift=(0.1, 0.0))
    scene.render.resolution_x, scene.render.resolution_y = 64, 48
    result = bpy.ops.multiplane.import_stack(filepath=stack_dir, near=3.0, far=30.0, interpolation="Closest",
                                             render_method="DITHERED")
    collection = bpy.data.collections["Backdrop: Test Stack"]
    objects = []
    to_camera = camera.matrix_world.normalized().inverted()
    for obj in sorted(collection.objects, key=lambda o: o["multiplane_layer_index"]):
        material = obj.active_material
        nodes = {node.bl_idname: node for node in material.node_tree.nodes}
        texture = nodes["ShaderNodeTexImage"]
        local = to_camera @ obj.matrix_world
        objects.append({
            "name": obj.name,
            "layer": obj["multiplane_layer"],
            "parent": obj.parent.name if obj.parent else None,
            "distance": -local.to_translation().z,
            "facing_dot": (local.to_3x3().normalized() @ __import__("mathutils").Vector((0, 0, 1))).z,
            "corners": [list(world_to_camera_view(scene, camera, obj.matrix_world @ v.co))[:2]
                        for v in obj.data.vertices],
            "visible_shadow": obj.visible_shadow,
            "material": material.name,
            "render_method": material.surface_render_method,
            "node_types": sorted(nodes),
            "emission_strength": nodes["ShaderNodeEmission"].inputs["Strength"].default_value,
            "emission_color_from_texture": nodes["ShaderNodeEmission"].inputs["Color"].links[0].from_node == texture,
            "mix_fac_from_alpha": nodes["ShaderNodeMixShader"].inputs["Fac"].links[0].from_socket.name,
            "interpolation": texture.interpolation,
            "extension": texture.extension,
            "image": texture.image.name,
            "alpha_mode": texture.image.alpha_mode,
            "colorspace": texture.image.colorspace_settings.name,
            "packed": texture.image.packed_file is not None,
        })
    return {
        "result": sorted(result),
        "in_scene": collection.name in scene.collection.children,
        "objects": objects,
        "backdrop": scene.multiplane.backdrop.name if scene.multiplane.backdrop else None,
        "transparent_bounces": scene.cycles.transparent_max_bounces,
    }


def test_import_builds_world_space_planes_with_unlit_straight_alpha_materials(stack_dir):
    info = run_in_blender(__file__, "blender_import_structure", stack_dir=str(stack_dir))
    assert info["result"] == ["FINISHED"] and info["in_scene"]
    assert info["backdrop"] == "Backdrop: Test Stack"
    objects = info["objects"]
    assert [o["layer"] for o in objects] == ["background", "layer_01", "layer_02", "layer_03"]
    distances = [o["distance"] for o in objects]
    assert distances[0] == pytest.approx(30.0) and distances[-1] == pytest.approx(3.0)
    assert all(a > b for a, b in zip(distances, distances[1:]))
    for obj in objects:
        assert obj["parent"] is None
        assert obj["facing_dot"] == pytest.approx(1.0)
        assert np.allclose(obj["corners"], [[0, 0], [1, 0], [1, 1], [0, 1]], atol=1e-5), obj["corners"]
        assert obj["visible_shadow"] is False
        assert obj["render_method"] == "DITHERED"
        assert {"ShaderNodeTexImage", "ShaderNodeEmission", "ShaderNodeBsdfTransparent", "ShaderNodeMixShader",
                "ShaderNodeOutputMaterial"} == set(obj["node_types"])
        assert obj["emission_strength"] == 1.0 and obj["emission_color_from_texture"]
        assert obj["mix_fac_from_alpha"] == "Alpha"
        assert (obj["interpolation"], obj["extension"]) == ("Closest", "CLIP")
        assert (obj["alpha_mode"], obj["colorspace"]) == ("STRAIGHT", "sRGB")
        assert obj["packed"], "an unsaved file keeps its images packed"
    assert info["transparent_bounces"] >= 5


def blender_fit_many_cameras(stack_dir: str, cases: list[dict]) -> list[list[list[float]]]:
    """Import under each camera setting; return every plane's projected corners."""
    import bpy
    from bpy_extras.object_utils import world_to_camera_view

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    camera = helpers.add_camera(scene, location=(0.3, 0.2, 5.0), rotation=(0.2, -0.1, 2.0))
    out = []
    for case in cases:
        camera.data.type = case["projection"]
        camera.data.sensor_fit = case["sensor_fit"]
        camera.data.shift_x, camera.data.shift_y = case["shift"]
        camera.data.lens = case["lens"]
        camera.data.ortho_scale = 5.0
        scene.render.resolution_x, scene.render.resolution_y = case["resolution"]
        scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = case["pixel_aspect"]
        bpy.context.view_layer.update()
        bpy.ops.multiplane.import_stack(filepath=stack_dir, use_stack_depths=False)
        corners = []
        for obj in bpy.data.collections["Backdrop: Test Stack"].objects:
            corners.append([list(world_to_camera_view(scene, camera, obj.matrix_world @ v.co))[:2]
                            for v in obj.data.vertices])
        out.append(corners)
    return out


def test_planes_fill_the_frame_exactly_for_any_camera(stack_dir):
    cases = [
        {"projection": p, "sensor_fit": f, "shift": s, "lens": lens, "resolution": r, "pixel_aspect": a}
        for p, f, s, lens, r, a in [
            ("PERSP", "AUTO", (0.0, 0.0), 50.0, (64, 48), (1, 1)),
            ("PERSP", "AUTO", (0.2, -0.1), 24.0, (48, 64), (1, 1)),
            ("PERSP", "VERTICAL", (-0.1, 0.3), 85.0, (64, 48), (2, 1)),
            ("PERSP", "HORIZONTAL", (0.0, 0.2), 35.0, (48, 64), (1, 3)),
            ("ORTHO", "AUTO", (0.1, 0.1), 50.0, (48, 64), (1, 1)),
            ("ORTHO", "VERTICAL", (0.3, 0.0), 50.0, (64, 48), (1, 2)),
        ]
    ]
    results = run_in_blender(__file__, "blender_fit_many_cameras", stack_dir=str(stack_dir), cases=cases)
    for case, planes in zip(cases, results):
        assert len(planes) == 4
        for corners in planes:
            assert np.allclose(corners, [[0, 0], [1, 0], [1, 1], [0, 1]], atol=1e-5), (case, corners)


def blender_saved_file(stack_dir: str, blend_path: str) -> dict:
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    helpers.add_camera(scene)
    bpy.ops.wm.save_as_mainfile(filepath=blend_path)
    bpy.ops.multiplane.import_stack(filepath=stack_dir)
    images = [img for img in bpy.data.images if img.name.startswith("Test Stack")]
    return {
        "filepaths": sorted(img.filepath for img in images),
        "packed": [img.packed_file is not None for img in images],
        "resolved": sorted(bpy.path.abspath(img.filepath) for img in images),
        "sizes": [list(img.size) for img in images],
    }


def test_saved_file_gets_its_images_beside_it_with_relative_paths(stack_dir, tmp_path):
    blend = tmp_path / "shot" / "shot.blend"
    blend.parent.mkdir()
    info = run_in_blender(__file__, "blender_saved_file", stack_dir=str(stack_dir), blend_path=str(blend))
    names = ["background.png", "layer_01.png", "layer_02.png", "layer_03.png"]
    assert info["filepaths"] == [f"//multiplane/Test_Stack/{name}" for name in names]
    assert info["packed"] == [False] * 4
    for name, resolved in zip(names, info["resolved"]):
        copied = Path(resolved)
        assert copied.parent == blend.parent / "multiplane" / "Test_Stack"
        assert copied.read_bytes() == (stack_dir / name).read_bytes()
    assert info["sizes"] == [[64, 48]] * 4


def blender_reimport(stack_dir: str, changed_dir: str) -> dict:
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    helpers.add_camera(scene)

    def snapshot() -> dict:
        collection = bpy.data.collections.get("Backdrop: Test Stack")
        return {
            "collections": len(bpy.data.collections),
            "collection_pointer": collection.as_pointer() if collection else None,
            "objects": sorted((o.name, o.as_pointer()) for o in bpy.data.objects if o.type == "MESH"),
            "meshes": len(bpy.data.meshes),
            "materials": len(bpy.data.materials),
            "images": sorted(img.name for img in bpy.data.images),
            "first_pixel": list(bpy.data.images["Test Stack: layer_01"].pixels[:4])
            if "Test Stack: layer_01" in bpy.data.images else None,
        }

    bpy.ops.multiplane.import_stack(filepath=stack_dir)
    first = snapshot()
    bpy.ops.multiplane.import_stack(filepath=stack_dir, far=60.0)
    second = snapshot()
    bpy.ops.multiplane.import_stack(filepath=changed_dir)
    third = snapshot()
    return {"first": first, "second": second, "third": third}


def test_reimport_replaces_in_place_without_orphans(stack_dir, tmp_path):
    # The same stack name with one layer fewer and a different first foreground.
    layers = helpers.stack_layers(64, 48)[:3]
    layers[1] = layers[1].copy()
    layers[1][..., :3] = (10, 250, 250)
    layers[1][..., 3] = 255
    changed = make_stack(tmp_path / "changed", 64, 48, name="Test Stack", layers=layers)
    info = run_in_blender(__file__, "blender_reimport", stack_dir=str(stack_dir), changed_dir=str(changed))
    first, second, third = info["first"], info["second"], info["third"]
    assert len(first["objects"]) == 4 and first["meshes"] == 4 and first["materials"] == 4
    assert len(first["images"]) == 4
    assert second == first, "re-importing the same stack changes nothing but the placement"
    assert third["collection_pointer"] == first["collection_pointer"]
    assert third["collections"] == first["collections"]
    assert len(third["objects"]) == 3 and third["meshes"] == 3 and third["materials"] == 3
    assert "Test Stack: layer_03" not in third["images"] and len(third["images"]) == 3
    assert {tuple(o) for o in third["objects"]} <= {tuple(o) for o in first["objects"]}, "kept layers keep their objects"
    assert first["first_pixel"][:3] == pytest.approx([230 / 255, 40 / 255, 30 / 255], abs=0.3)
    # The image data-block now shows the new pixels (cyan, opaque; bottom-left pixel).
    assert third["first_pixel"] == pytest.approx([10 / 255, 250 / 255, 250 / 255, 1.0], abs=1e-3)


def blender_errors(stack_dir: str, bad_dir: str, newer_dir: str, reversed_dir: str) -> dict:
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    out = {}

    def attempt(key: str, **kwargs) -> None:
        before = (len(bpy.data.collections), len(bpy.data.objects), len(bpy.data.images),
                  len(bpy.data.materials), len(bpy.data.meshes))
        try:
            result = bpy.ops.multiplane.import_stack(**kwargs)
            message = None
        except RuntimeError as error:  # bpy.ops turns an ERROR report into RuntimeError
            result, message = ["CANCELLED"], str(error)
        after = (len(bpy.data.collections), len(bpy.data.objects), len(bpy.data.images),
                 len(bpy.data.materials), len(bpy.data.meshes))
        out[key] = {"result": sorted(result), "message": message, "unchanged": before == after}

    attempt("no_camera", filepath=stack_dir)
    helpers.add_camera(scene)
    attempt("not_a_stack", filepath=bad_dir)
    attempt("empty_path", filepath="")
    attempt("newer_format", filepath=newer_dir)
    attempt("reversed_depths", filepath=reversed_dir)
    attempt("near_beyond_far", filepath=stack_dir, near=50.0, far=10.0)
    attempt("reversed_depths_ignored", filepath=reversed_dir, use_stack_depths=False)
    scene.camera.data.type = "PANO"
    attempt("panoramic", filepath=stack_dir)
    return out


def test_bad_input_is_reported_clearly_and_changes_nothing(stack_dir, tmp_path):
    bad = tmp_path / "photos"
    bad.mkdir()
    (bad / "holiday.jpg").write_bytes(b"jpeg")
    newer = tmp_path / "newer"
    shutil.copytree(stack_dir, newer)
    _edit_manifest(newer, lambda d: d.update(format_version=7))
    reversed_depths = make_stack(tmp_path / "reversed", 64, 48, name="Reversed", depths=[5.0, 8.0, None, None])
    info = run_in_blender(__file__, "blender_errors", stack_dir=str(stack_dir), bad_dir=str(bad),
                          newer_dir=str(newer), reversed_dir=str(reversed_depths))
    expected = {
        "no_camera": "the scene has no active camera",
        "not_a_stack": "is not a stack folder: it has no stack.json",
        "empty_path": "no stack given",
        "newer_format": "format version 7",
        "reversed_depths": "layer 1 depth 8 is not nearer than layer 0 depth 5.*Use Stack Depths",
        "near_beyond_far": "0 < near < far",
        "panoramic": "panoramic",
    }
    for key, pattern in expected.items():
        entry = info[key]
        assert entry["result"] == ["CANCELLED"], key
        assert entry["message"] is not None and "Cannot import the layer stack" in entry["message"], key
        assert __import__("re").search(pattern, entry["message"]), (key, entry["message"])
        assert "Traceback" not in entry["message"]
        assert entry["unchanged"], f"{key}: a failed import must not leave data behind"
    assert info["reversed_depths_ignored"]["result"] == ["FINISHED"]


def blender_register_twice() -> dict:
    import bpy

    import addon

    helpers.reset_blender()
    states = []
    for _ in range(2):
        addon.register()
        states.append({
            "operators": [hasattr(bpy.types, name) for name in (
                "MULTIPLANE_OT_import_stack", "MULTIPLANE_OT_build_compositor", "MULTIPLANE_OT_parallax_move")],
            "scene_settings": hasattr(bpy.context.scene, "multiplane"),
            "callable": "multiplane" in dir(bpy.ops) and hasattr(bpy.ops.multiplane, "import_stack"),
        })
        addon.unregister()
        states.append({
            "operators": [hasattr(bpy.types, name) for name in (
                "MULTIPLANE_OT_import_stack", "MULTIPLANE_OT_build_compositor", "MULTIPLANE_OT_parallax_move")],
            "scene_settings": hasattr(bpy.context.scene, "multiplane"),
        })
    # The extension entry point (the repository root package) registers the same way.
    root = helpers.import_module_from(helpers.REPO_ROOT / "__init__.py", "multiplane_extension_root")
    states.append(root.__name__)
    return {"states": states}


def test_register_and_unregister_twice_cleanly():
    states = run_in_blender(__file__, "blender_register_twice")["states"]
    registered = {"operators": [True, True, True], "scene_settings": True, "callable": True}
    unregistered = {"operators": [False, False, False], "scene_settings": False}
    assert states[:4] == [registered, unregistered, registered, unregistered]


# --------------------------------------------------------------------------- rendered proof of the fit

RENDER_CASES = {
    "persp_landscape": dict(size=(64, 48), camera=dict(projection="PERSP", lens=50.0, shift=(0.1, -0.05),
                                                        location=(1.0, 2.0, 3.0), rotation=(1.2, 0.1, 0.5))),
    "persp_portrait": dict(size=(48, 64), camera=dict(projection="PERSP", lens=28.0, shift=(0.0, 0.08),
                                                       rotation=(1.5708, 0.0, 0.0)), depths=[12.0, 9.0, 6.5, 2.5]),
    "ortho_landscape": dict(size=(64, 48), camera=dict(projection="ORTHO", ortho_scale=4.0, sensor_fit="HORIZONTAL",
                                                        shift=(-0.1, 0.05), location=(0.0, 0.0, 10.0))),
    "ortho_portrait": dict(size=(48, 64), camera=dict(projection="ORTHO", ortho_scale=9.0,
                                                       rotation=(0.4, 0.3, 0.2))),
    "persp_pixel_aspect": dict(size=(64, 48), pixel_aspect=(2.0, 1.0),
                               camera=dict(projection="PERSP", lens=40.0, sensor_fit="VERTICAL")),
}
SAMPLES = 64


def blender_render(stack_dir: str, out_dir: str, case: dict, overscans: list[float]) -> list[str]:
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    camera_args = dict(case["camera"])
    camera_args["shift"] = tuple(camera_args.get("shift", (0.0, 0.0)))
    helpers.add_camera(scene, **camera_args)
    width, height = case["size"]
    helpers.setup_exact_render(scene, width, height, samples=SAMPLES)
    scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = case.get("pixel_aspect", (1.0, 1.0))
    paths = []
    for i, overscan in enumerate(overscans):
        bpy.ops.multiplane.import_stack(filepath=stack_dir, overscan=overscan)
        path = str(Path(out_dir) / f"render_{i}.png")
        helpers.render_to(scene, path)
        paths.append(path)
    return paths


def _render_errors(render: np.ndarray, layers: list[np.ndarray], composite: np.ndarray) -> dict:
    linear_light = helpers.composite_linear(layers)
    height, width = render.shape[:2]
    y, x = np.mgrid[0:height, 0:width]
    cx, cy = (x + 0.5) / width, (y + 0.5) / height
    checker = (cx > 0.06) & (cx < 0.45) & (cy > 0.55) & (cy < 0.94)
    opaque_only = np.all([(layer[..., 3] == 0) | (layer[..., 3] == 255) for layer in layers[1:]], axis=0)
    return {
        "mae_composite": float(np.abs(render - composite).mean()),
        "mae_linear": float(np.abs(render - linear_light).mean()),
        "mae_checker": float(np.abs(render - linear_light)[checker].mean()),
        "mae_border": float(np.abs(render - linear_light)[[0, -1]].mean()),
        "mae_opaque": float(np.abs(render - composite)[opaque_only].mean()),
    }


@pytest.mark.parametrize("name", sorted(RENDER_CASES))
def test_render_from_the_camera_reproduces_the_composite(name, tmp_path):
    case = RENDER_CASES[name]
    width, height = case["size"]
    stack = make_stack(tmp_path / "stack", width, height, name="Test Stack", depths=case.get("depths"))
    layers = helpers.stack_layers(width, height)
    composite = load_rgb(stack / "composite.png")
    overscans = [1.0, 1.02] if name == "persp_landscape" else [1.0]
    paths = run_in_blender(__file__, "blender_render", stack_dir=str(stack), out_dir=str(tmp_path),
                           case=case, overscans=overscans)
    errors = _render_errors(load_rgb(Path(paths[0])), layers, composite)
    # The format's composite blends encoded sRGB values; a renderer blends in linear light,
    # which differs a little on the soft edges only - hence the linear-light reference too.
    assert errors["mae_composite"] <= 2.0, errors
    assert errors["mae_linear"] <= 0.5, errors
    assert errors["mae_checker"] <= 1.0, errors  # a 2-pixel checker: any sub-pixel misfit shows
    assert errors["mae_border"] <= 1.0, errors  # the 1-pixel white border is all there
    assert errors["mae_opaque"] <= 0.5, errors
    if len(paths) > 1:
        # Control: planes only 2% too large are caught by the same measures.
        control = _render_errors(load_rgb(Path(paths[1])), layers, composite)
        assert control["mae_checker"] > 10.0 and control["mae_border"] > 20.0, control
