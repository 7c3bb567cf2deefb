"""It looks right in every viewport mode (issue 11 part 6), in real Blender on 5.0 and 4.2:
after "Show Layers in Solid Mode", a Workbench render (what Solid mode draws) differs from
the linear composite by no more than an EEVEE render (what Material Preview draws) does,
while Workbench's default look is far off; and the import options an artist knows from
Import Images as Planes: shader (Emission / Principled / Shadeless), emission strength,
relative paths."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, load_rgb, make_stack, run_in_blender  # noqa: E402

WIDTH, HEIGHT = 64, 48


# --------------------------------------------------------------------------- inside Blender


def _scene_with_stack(stack_dir: str, samples: int = 16):
    import bpy

    helpers.reset_blender()
    helpers.register_addon()
    scene = bpy.context.scene
    helpers.add_camera(scene)
    helpers.setup_exact_render(scene, WIDTH, HEIGHT, samples=samples)
    scene.render.filter_size = 0.0  # EEVEE and Workbench: one sample position per pixel
    scene.display.render_aa = "OFF"
    return scene


def _render(scene, engine: str, path: str) -> str:
    scene.render.engine = engine
    helpers.render_to(scene, path)
    return path


def scenario_solid_and_material_preview(stack_dir: str, out_dir: str) -> dict:
    import bpy

    scene = _scene_with_stack(stack_dir)
    bpy.ops.multiplane.import_stack(filepath=stack_dir)
    scene.view_settings.view_transform = "AgX"  # Blender's default, which the operator also fixes
    out = {"default": _render(scene, "BLENDER_WORKBENCH", str(Path(out_dir) / "workbench_default.png"))}
    out["operator"] = sorted(bpy.ops.multiplane.show_layers_in_solid_mode())
    shading = scene.display.shading
    out["shading"] = [shading.light, shading.color_type, scene.view_settings.view_transform]
    out["solid"] = _render(scene, "BLENDER_WORKBENCH", str(Path(out_dir) / "workbench.png"))
    eevee = "BLENDER_EEVEE" if "BLENDER_EEVEE" in {e.identifier for e in bpy.types.RenderSettings.bl_rna
                                                   .properties["engine"].enum_items} else "BLENDER_EEVEE_NEXT"
    scene.eevee.taa_render_samples = 8
    out["eevee"] = _render(scene, eevee, str(Path(out_dir) / "eevee.png"))
    return out


def scenario_shader_options(stack_dir: str, out_dir: str, blend: str) -> dict:
    import bpy

    scene = _scene_with_stack(stack_dir, samples=64)
    out = {}
    for shader, strength in (("EMISSION", 1.0), ("SHADELESS", 1.0), ("EMISSION", 2.0), ("PRINCIPLED", 1.0)):
        bpy.ops.multiplane.import_stack(filepath=stack_dir, shader=shader, emission_strength=strength)
        material = scene.multiplane.backdrop.objects[0].active_material
        nodes = material.node_tree.nodes
        out[f"{shader}-{strength}"] = {
            "nodes": sorted(n.bl_idname for n in nodes),
            "active": nodes.active.bl_idname if nodes.active else "",
            "strengths": [n.inputs["Strength"].default_value for n in nodes if n.bl_idname == "ShaderNodeEmission"],
            "render": _render(scene, "CYCLES", str(Path(out_dir) / f"{shader}-{strength}.png")),
        }
    bpy.ops.wm.save_as_mainfile(filepath=blend)
    for relative in (True, False):
        bpy.ops.multiplane.import_stack(filepath=stack_dir, relative_paths=relative)
        out[f"paths-{relative}"] = sorted({i.filepath for i in bpy.data.images if i.source == "FILE"})
    return out


# --------------------------------------------------------------------------- pytest side


def _mae(path: str, reference: np.ndarray) -> float:
    return float(np.abs(load_rgb(Path(path)) - reference).mean())


@pytest.mark.parametrize("python", blender_pythons())
def test_workbench_after_one_click_is_no_worse_than_eevee(tmp_path, python):
    stack = make_stack(tmp_path / "stack", WIDTH, HEIGHT)
    linear = helpers.composite_linear(helpers.stack_layers(WIDTH, HEIGHT))
    out = run_in_blender(__file__, "scenario_solid_and_material_preview", timeout=300, python=python,
                         stack_dir=str(stack), out_dir=str(tmp_path))
    assert out["operator"] == ["FINISHED"]
    assert out["shading"] == ["FLAT", "TEXTURE", "Standard"]
    errors = {name: _mae(out[name], linear) for name in ("default", "solid", "eevee")}
    assert errors["solid"] <= errors["eevee"], errors
    assert errors["default"] > 3 * errors["solid"], errors  # the grey studio-lit cards it fixes


@pytest.mark.parametrize("python", blender_pythons())
def test_import_shader_strength_and_relative_path_options(tmp_path, python):
    stack = make_stack(tmp_path / "stack", WIDTH, HEIGHT)
    linear = helpers.composite_linear(helpers.stack_layers(WIDTH, HEIGHT))
    blend = tmp_path / "scene folder" / "shot.blend"
    blend.parent.mkdir()
    out = run_in_blender(__file__, "scenario_shader_options", timeout=300, python=python,
                         stack_dir=str(stack), out_dir=str(tmp_path), blend=str(blend))
    emission, shadeless = out["EMISSION-1.0"], out["SHADELESS-1.0"]
    assert "ShaderNodeEmission" in emission["nodes"] and "ShaderNodeBsdfPrincipled" not in emission["nodes"]
    assert "ShaderNodeLightPath" in shadeless["nodes"]
    assert "ShaderNodeBsdfPrincipled" in out["PRINCIPLED-1.0"]["nodes"]
    assert "ShaderNodeEmission" not in out["PRINCIPLED-1.0"]["nodes"]
    assert all(run["active"] == "ShaderNodeTexImage" for key, run in out.items() if key[0].isupper())
    assert out["EMISSION-2.0"]["strengths"] == [2.0]
    # Emission and Shadeless give the image's own values back to the camera.
    assert _mae(emission["render"], linear) <= 0.5
    assert _mae(shadeless["render"], linear) <= 0.5
    # Strength 2 doubles the linear-light background where nothing covers it (top-left corner).
    doubled = load_rgb(Path(out["EMISSION-2.0"]["render"]))[2:6, 2:6]
    expected = helpers.linear_to_srgb(2 * helpers.srgb_to_linear(linear[2:6, 2:6] / 255.0)) * 255.0
    assert np.abs(doubled - expected).mean() <= 1.0
    # The Principled planes are lit by a black world: no longer the image's values.
    assert _mae(out["PRINCIPLED-1.0"]["render"], linear) > 20
    relative, absolute = out["paths-True"], out["paths-False"]
    assert relative and all(path.startswith("//multiplane/") for path in relative), relative
    assert absolute and all(Path(path).is_absolute() and Path(path).is_file() for path in absolute), absolute
