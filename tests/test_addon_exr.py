"""stack.exr in real Blender (bpy 5.0 and 4.2): it opens as a multilayer image whose passes are
the stack's layers with their pixels (read back through the compositor into a float EXR), the
compositor's Image node has one output per layer, and `multiplane.build_compositor` from the
EXR renders the linear composite, like the PNG path (tests/test_addon_compositor.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, load_rgb, run_in_blender  # noqa: E402
from test_addon_compositor import _expected_linear  # noqa: E402

EXR_FILE = "stack.exr"

WIDTH, HEIGHT = 64, 48
NAMES = ["background", "far.hills", "tree", "Composite"]  # a dot and a clash with the composite
EXR_NAMES = ["background", "far_hills", "tree", "Composite 2", "Composite"]
HALF_EPSILON = 2.0 ** -11


# --------------------------------------------------------------------------- inside Blender


def _compositor_output(scene):
    from addon import compat

    return compat.compositor_tree(scene, "Test Compositor")


def blender_exr_passes(exr_path: str, out_dir: str) -> dict:
    """Open the EXR, list its Image node outputs, and render each output into a float EXR."""
    import bpy

    helpers.reset_blender()
    scene = bpy.context.scene
    helpers.add_camera(scene)
    helpers.setup_exact_render(scene, WIDTH, HEIGHT, samples=1)
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.image_settings.color_depth = "32"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.film_transparent = True
    scene.render.use_compositing = True
    image = bpy.data.images.load(exr_path)
    tree, output_socket = _compositor_output(scene)
    node = tree.nodes.new("CompositorNodeImage")
    node.image = image
    image.reload()
    result = {"type": image.type, "outputs": [socket.name for socket in node.outputs],
              "colorspace": image.colorspace_settings.name, "renders": {}}
    for socket in node.outputs:
        for link in list(output_socket.links):
            tree.links.remove(link)
        tree.links.new(socket, output_socket)
        path = str(Path(out_dir) / f"pass_{len(result['renders'])}.exr")
        helpers.render_to(scene, path)
        result["renders"][socket.name] = path
    return result


def _image_node_count(scene) -> int:
    from addon import compat

    tree = scene.compositing_node_group if compat.uses_compositor_node_group() else scene.node_tree
    return sum(1 for n in tree.nodes if n.bl_idname == "CompositorNodeImage")


def blender_exr_compositor(stack_dir: str, plain_stack_dir: str, out_dir: str, runs: list[dict]) -> list[dict]:
    import bpy

    from addon import compat
    from test_addon_compositor import _add_cg_card

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    helpers.add_camera(scene)
    helpers.setup_exact_render(scene, WIDTH, HEIGHT, samples=1)
    bpy.ops.multiplane.import_stack(filepath=stack_dir)
    card = _add_cg_card(scene)
    results = []
    for i, run in enumerate(runs):
        card.hide_render = not run["cg"]
        bpy.ops.multiplane.build_compositor(behind=run["behind"], source="EXR")
        tree = scene.compositing_node_group if compat.uses_compositor_node_group() else scene.node_tree
        image_nodes = [n for n in tree.nodes if n.bl_idname == "CompositorNodeImage"]
        path = str(Path(out_dir) / f"exr_composited_{i}.png")
        helpers.render_to(scene, path)
        results.append({"path": path, "image_nodes": len(image_nodes),
                        "image_type": image_nodes[0].image.type if image_nodes else None,
                        "overs": sum(1 for n in tree.nodes if n.bl_idname == "CompositorNodeAlphaOver")})
    # The default (Automatic) takes the EXR when the stack has one, the PNGs when not.
    bpy.ops.multiplane.build_compositor(behind=1)
    results.append({"auto_exr": _image_node_count(scene)})
    bpy.ops.multiplane.import_stack(filepath=plain_stack_dir)
    bpy.ops.multiplane.build_compositor(behind=1)
    results.append({"auto_png": _image_node_count(scene)})
    # A stack written without an EXR: a clear report, nothing half built.
    try:
        bpy.ops.multiplane.build_compositor(behind=1, source="EXR")
        results.append({"error": ""})
    except RuntimeError as error:
        results.append({"error": str(error)})
    return results


# --------------------------------------------------------------------------- pytest side


def _write_stack(folder: Path, export_exr: bool, name: str = "EXR Stack") -> Path:
    from inference.stack import LayerStack, StackLayer, write_stack  # the engine's side: not in Blender

    images = helpers.stack_layers(WIDTH, HEIGHT)
    layers = [StackLayer(name=layer, kind="background" if i == 0 else "foreground")
              for i, layer in enumerate(NAMES)]
    write_stack(folder, LayerStack(name=name, width=WIDTH, height=HEIGHT, layers=layers),
                images[0], images[1:], export_exr=export_exr)
    return folder


def _premultiplied_linear(image: np.ndarray) -> np.ndarray:
    alpha = image[..., 3:4] / 255.0 if image.shape[2] == 4 else np.ones(image.shape[:2] + (1,))
    return np.concatenate([helpers.srgb_to_linear(image[..., :3] / 255.0) * alpha, alpha], axis=2)


def _read_rgba(path: str) -> np.ndarray:
    import OpenEXR

    with OpenEXR.File(path, separate_channels=True) as document:
        channels = {name: channel.pixels.astype(np.float64) for name, channel in document.channels().items()}
    suffix = {name.rsplit(".", 1)[-1]: name for name in channels}
    return np.stack([channels[suffix[c]] for c in "RGBA"], axis=2)


@pytest.fixture(scope="module", params=blender_pythons())
def python(request):
    return request.param


@pytest.fixture(scope="module")
def exr_stack(tmp_path_factory):
    return _write_stack(tmp_path_factory.mktemp("exr-stack") / "stack", export_exr=True)


def test_blender_opens_the_exr_as_one_pass_per_layer_with_its_pixels(exr_stack, python, tmp_path):
    result = run_in_blender(__file__, "blender_exr_passes", python=python, timeout=300,
                            exr_path=str(exr_stack / EXR_FILE), out_dir=str(tmp_path))
    assert result["type"] == "MULTILAYER"
    assert sorted(result["outputs"]) == sorted(EXR_NAMES), "one Image node output per layer + the composite"
    images = helpers.stack_layers(WIDTH, HEIGHT)
    expected = dict(zip(EXR_NAMES, [_premultiplied_linear(image) for image in images]))
    composite = expected["background"]
    for image in images[1:]:
        front = _premultiplied_linear(image)
        composite = front + composite * (1.0 - front[..., 3:4])
    expected["Composite"] = composite
    for name, path in result["renders"].items():
        rendered = _read_rgba(path)
        error = np.abs(rendered - expected[name])
        assert (error <= np.abs(expected[name]) * 2 * HALF_EPSILON + 1e-4).all(), (name, error.max())
    # The layers are really different images (a mix-up would not pass by accident).
    assert np.abs(expected["tree"] - expected["far_hills"]).max() > 0.5


def test_compositor_from_the_exr_renders_the_linear_composite(exr_stack, python, tmp_path):
    plain = _write_stack(tmp_path / "plain", export_exr=False, name="Plain Stack")
    runs = [{"behind": 1, "cg": False}, {"behind": 2, "cg": True}]
    results = run_in_blender(__file__, "blender_exr_compositor", python=python, timeout=300,
                             stack_dir=str(exr_stack), plain_stack_dir=str(plain), out_dir=str(tmp_path),
                             runs=runs)
    layers = helpers.stack_layers(WIDTH, HEIGHT)
    for run, result in zip(runs, results):
        assert result["image_nodes"] == 1 and result["image_type"] == "MULTILAYER"
        assert result["overs"] == len(layers)
        output = load_rgb(Path(result["path"]))
        assert np.abs(output - _expected_linear(layers, run["behind"], cg=run["cg"])).max() <= 1.0
    assert results[-3] == {"auto_exr": 1} and results[-2] == {"auto_png": len(layers)}
    assert "Cannot build the compositor: the stack 'Plain Stack' has no multilayer EXR" in results[-1]["error"]


def blender_export_options() -> dict:
    import bpy

    from addon import generate

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    settings = scene.multiplane
    settings.prompt = "a harbour at night"
    bodies = {"default": generate.build_request(scene)}
    settings.export_exr = True
    bodies["exr"] = generate.build_request(scene)
    settings.export_psd = True
    bodies["both"] = generate.build_request(scene)
    return bodies


def test_panel_export_options_reach_the_request(python):
    from server.schemas import JobCreate

    bodies = run_in_blender(__file__, "blender_export_options", python=python)
    assert "export_exr" not in bodies["default"] and "export_psd" not in bodies["default"]
    assert bodies["exr"]["export_exr"] is True and "export_psd" not in bodies["exr"]
    assert bodies["both"]["export_exr"] is True and bodies["both"]["export_psd"] is True
    job = JobCreate.model_validate(bodies["both"])  # the server takes the body as sent
    assert job.export_exr and job.export_psd
