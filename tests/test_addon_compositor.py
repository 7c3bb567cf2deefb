"""multiplane.build_compositor: the Alpha Over chain's wiring, and what the compositor
actually outputs when Blender renders with it."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import load_rgb, make_stack, run_in_blender  # noqa: E402

LAYERS = ["background", "layer_01", "layer_02", "layer_03"]
CG_SRGB = (60, 130, 200)  # colour of the stand-in "CG render": an opaque emissive card


def _source_name(socket) -> str:
    """What feeds an input socket: a layer name, 'render', or the Alpha Over node before."""
    link = socket.links[0]
    node = link.from_node
    if node.bl_idname == "CompositorNodeRLayers":
        return "render"
    if node.bl_idname == "CompositorNodeScale":
        image_node = node.inputs[0].links[0].from_node
        return image_node.image.name.split(": ", 1)[1]
    return node.name


def _add_cg_card(scene):
    """An opaque emissive card filling the view: the stand-in for the CG render."""
    import bpy

    from addon import compat

    mesh = bpy.data.meshes.new("CG")
    mesh.from_pydata([(-5, -5, -2), (5, -5, -2), (5, 5, -2), (-5, 5, -2)], [], [(0, 1, 2, 3)])
    card = bpy.data.objects.new("CG", mesh)
    scene.collection.objects.link(card)
    material = bpy.data.materials.new("CG")
    tree = compat.material_node_tree(material)
    tree.nodes.clear()
    emission = tree.nodes.new("ShaderNodeEmission")
    linear = helpers.srgb_to_linear(np.array(CG_SRGB) / 255.0)
    emission.inputs["Color"].default_value = (*linear, 1.0)
    output = tree.nodes.new("ShaderNodeOutputMaterial")
    tree.links.new(emission.outputs[0], output.inputs["Surface"])
    mesh.materials.append(material)
    return card


def blender_compositor(stack_dir: str, out_dir: str, runs: list[dict]) -> list[dict]:
    import bpy

    from addon import compat

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    helpers.add_camera(scene)
    helpers.setup_exact_render(scene, 64, 48, samples=1)
    bpy.ops.multiplane.import_stack(filepath=stack_dir)

    card = _add_cg_card(scene)

    results = []
    for i, run in enumerate(runs):
        card.hide_render = not run["cg"]
        entry: dict = {}
        try:
            bpy.ops.multiplane.build_compositor(behind=run["behind"])
        except RuntimeError as error:
            entry["error"] = str(error)
            results.append(entry)
            continue
        tree = scene.compositing_node_group if compat.uses_compositor_node_group() else scene.node_tree
        overs = sorted((n for n in tree.nodes if n.bl_idname == "CompositorNodeAlphaOver"),
                       key=lambda n: int(n.name.rsplit(" ", 1)[1]))
        chain = []
        for over in overs:
            background, foreground, factor = compat.alpha_over_inputs(over)
            chain.append({
                "name": over.name,
                "background": _source_name(background),
                "foreground": _source_name(foreground),
                "factor": factor.default_value,
                "straight": (over.inputs["Straight Alpha"].default_value if "Straight Alpha" in over.inputs
                             else over.use_premultiply),
                "output_to": [link.to_node.bl_idname for link in over.outputs[0].links],
            })
        entry.update(
            chain=chain,
            node_count=len(tree.nodes),
            image_nodes=sorted(n.image.name for n in tree.nodes if n.bl_idname == "CompositorNodeImage"),
            film_transparent=scene.render.film_transparent,
            planes_hidden=bpy.data.collections["Backdrop: Test Stack"].hide_render,
            use_compositing=scene.render.use_compositing,
        )
        if run.get("render", True):
            path = str(Path(out_dir) / f"composited_{i}.png")
            helpers.render_to(scene, path)
            entry["path"] = path
        results.append(entry)
    return results


def _expected_linear(layers: list[np.ndarray], behind: int, cg: bool) -> np.ndarray:
    """Linear-light alpha-over of layers[:behind], the render, layers[behind:] (float 0..255)."""
    height, width = layers[0].shape[:2]
    inputs = []
    for i, layer in enumerate(layers):
        if i == behind:
            inputs.append("render")
        inputs.append(layer)
    if behind == len(layers):
        inputs.append("render")
    result = np.zeros((height, width, 3))
    for item in inputs:
        if isinstance(item, str):
            if cg:
                result = np.broadcast_to(helpers.srgb_to_linear(np.array(CG_SRGB) / 255.0), result.shape).copy()
            continue
        rgb = helpers.srgb_to_linear(item[..., :3] / 255.0)
        alpha = item[..., 3:4] / 255.0 if item.shape[-1] == 4 else 1.0
        result = rgb * alpha + result * (1.0 - alpha)
    return helpers.linear_to_srgb(result) * 255.0


@pytest.fixture(scope="module")
def compositor_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compositor")
    stack = make_stack(tmp / "stack", 64, 48, name="Test Stack")
    runs = [
        {"behind": 1, "cg": False},
        {"behind": 1, "cg": True},
        {"behind": 0, "cg": True},
        {"behind": 4, "cg": True},
        {"behind": 1, "cg": True, "render": False},  # rebuilding must not pile up nodes
        {"behind": 5, "cg": False},
    ]
    results = run_in_blender(__file__, "blender_compositor", stack_dir=str(stack), out_dir=str(tmp), runs=runs)
    return stack, runs, results


def test_chain_is_wired_back_to_front_around_the_render(compositor_runs):
    _stack, runs, results = compositor_runs
    expected_orders = {1: ["background", "render", *LAYERS[1:]], 0: ["render", *LAYERS], 4: [*LAYERS, "render"]}
    for run, result in zip(runs[:4], results[:4]):
        order = expected_orders[run["behind"]]
        chain = result["chain"]
        assert len(chain) == len(order) - 1
        assert chain[0]["background"] == order[0]
        for step, link in enumerate(chain):
            assert link["foreground"] == order[step + 1], (run, chain)
            if step:
                assert link["background"] == chain[step - 1]["name"]
            assert link["factor"] == 1.0
            assert link["straight"] is False, "Image and Render Layers outputs are premultiplied already"
        assert chain[-1]["output_to"] in (["NodeGroupOutput"], ["CompositorNodeComposite"])
        assert all(other["output_to"] == ["CompositorNodeAlphaOver"] for other in chain[:-1])
        assert result["image_nodes"] == [f"Test Stack: {name}" for name in LAYERS]
        assert result["planes_hidden"] and result["use_compositing"]
        if run["behind"] > 0:
            assert result["film_transparent"], "layers behind the render need a transparent film"
    assert results[4]["node_count"] == results[1]["node_count"]


def test_bad_insertion_point_is_reported(compositor_runs):
    result = compositor_runs[2][5]
    assert "error" in result
    assert re.search(r"Cannot build the compositor: layers behind the render must be between 0 and 4, got 5",
                     result["error"])


def test_compositor_output_equals_the_composite_over_an_empty_render(compositor_runs):
    stack, _runs, results = compositor_runs
    output = load_rgb(Path(results[0]["path"]))
    layers = helpers.stack_layers(64, 48)
    composite = load_rgb(stack / "composite.png")
    assert np.abs(output - composite).mean() <= 2.0
    # Exactly the linear-light alpha-over (straight alpha handled once, not twice).
    assert np.abs(output - _expected_linear(layers, 1, cg=False)).max() <= 1.0


@pytest.mark.parametrize("run_index, behind", [(1, 1), (2, 0), (3, 4)])
def test_insertion_point_puts_the_render_between_the_right_layers(compositor_runs, run_index, behind):
    _stack, _runs, results = compositor_runs
    output = load_rgb(Path(results[run_index]["path"]))
    layers = helpers.stack_layers(64, 48)
    expected = _expected_linear(layers, behind, cg=True)
    assert np.abs(output - expected).max() <= 1.0
    # And not what another insertion point would give.
    for other in {0, 1, 4} - {behind}:
        assert np.abs(output - _expected_linear(layers, other, cg=True)).mean() > 5.0
