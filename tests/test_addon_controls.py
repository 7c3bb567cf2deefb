"""Every control explained (issue 11 part 5): each operator and each property of the
add-on's operators, settings and preferences has a tooltip and a label (enum items too),
checked in real Blender on 5.0 and 4.2; and the layout-box overlay: its rectangle maths
(pure, no Blender) and its draw handler's registration and unregistration."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402

from addon import overlay  # noqa: E402

# Blender's own Operator/ImportHelper properties, not the add-on's controls.
BLENDER_OWN = {"rna_type", "bl_idname", "name", "filepath", "filter_glob"}


# --------------------------------------------------------------------------- pure maths


def test_box_maps_top_left_fractions_into_the_projected_frame():
    frame = overlay.frame_rect([(500, 350), (500, 50), (100, 50), (100, 350)])  # view_frame's order
    assert frame == (100, 50, 500, 350)
    # left 0.25, top 0.1, right 0.75, bottom 0.6 of a 400 x 300 frame; region y grows upwards
    assert overlay.box_region_rect(frame, (0.25, 0.1, 0.75, 0.6)) == pytest.approx((200, 170, 400, 320))
    assert overlay.box_region_rect(frame, (0, 0, 1, 1)) == pytest.approx(frame)
    assert overlay.box_region_rect(frame, (0.5, 0.2, 0.5, 0.8)) is None  # empty
    assert overlay.box_region_rect(frame, (0.2, 0.8, 0.7, 0.3)) is None  # inside out


def test_frame_behind_the_view_or_degenerate_draws_nothing():
    assert overlay.frame_rect([(0, 0), None, (4, 4), (0, 4)]) is None
    assert overlay.frame_rect([(3, 1), (3, 1), (3, 1), (3, 1)]) is None
    assert overlay.frame_rect([]) is None


def test_outline_is_four_closed_edges_and_labels_are_short():
    segments = overlay.outline_segments((1, 2, 5, 7))
    assert len(segments) == 8
    edges = {tuple(sorted((segments[i], segments[i + 1]))) for i in range(0, 8, 2)}
    assert edges == {((1, 2), (5, 2)), ((5, 2), (5, 7)), ((1, 7), (5, 7)), ((1, 2), (1, 7))}
    assert overlay.layer_label(0, "  a red fox  ") == "1: a red fox"
    assert overlay.layer_label(2, "") == "Layer 3"
    long = overlay.layer_label(1, "x" * 100)
    assert len(long) == len("2: ") + overlay.LABEL_CHARS and long.endswith("…")


# --------------------------------------------------------------------------- inside Blender


def _add_on_classes():
    import importlib

    from multiplane import addon

    classes = []
    for name in addon._module_names:
        classes += list(getattr(importlib.import_module(f"multiplane.addon.{name}"), "CLASSES", ()))
    return classes


def scenario_controls_and_overlay() -> dict:
    import bpy

    helpers.reset_blender()
    package = helpers.register_as_extension()
    from multiplane.addon import overlay as live_overlay

    missing, checked = [], 0
    for cls in _add_on_classes():
        if issubclass(cls, bpy.types.Operator):
            module, _, function = cls.bl_idname.partition(".")
            rna = getattr(getattr(bpy.ops, module), function).get_rna_type()
            if not rna.description.strip():
                missing.append(f"{cls.__name__}: no tooltip")
        elif issubclass(cls, (bpy.types.PropertyGroup, bpy.types.AddonPreferences)):
            rna = cls.bl_rna
        else:
            continue
        for prop in rna.properties:
            if prop.identifier in BLENDER_OWN:
                continue
            checked += 1
            where = f"{cls.__name__}.{prop.identifier}"
            if not prop.description.strip():
                missing.append(f"{where}: no tooltip")
            if prop.name.strip() in ("", prop.identifier):
                missing.append(f"{where}: no label (shows {prop.name or prop.identifier!r})")
            if prop.type == "ENUM" and not prop.is_enum_flag:
                missing += [f"{where}[{item.identifier}]: no tooltip" for item in prop.enum_items
                            if not item.description.strip()]

    out = {"missing": missing, "checked": checked, "registered": live_overlay.is_registered()}
    handle = live_overlay._handle
    scene = bpy.context.scene
    layer = scene.multiplane.layers.add()
    layer.prompt, layer.use_box = "a boat", True
    live_overlay._draw()  # no viewport here (no region): draws nothing, raises nothing
    package.unregister()
    out["after_unregister"] = live_overlay.is_registered()
    try:
        bpy.types.SpaceView3D.draw_handler_remove(handle, "WINDOW")
        out["old_handle_still_there"] = True
    except ValueError:
        out["old_handle_still_there"] = False
    package.register()
    out["reregistered"] = live_overlay.is_registered()
    package.unregister()
    return out


@pytest.mark.parametrize("python", blender_pythons())
def test_every_control_has_a_tooltip_and_the_overlay_registers_cleanly(python):
    out = run_in_blender(__file__, "scenario_controls_and_overlay", python=python)
    assert out["missing"] == []
    assert out["checked"] > 60  # every settings group, the preferences and the operators' options
    assert out["registered"] and not out["after_unregister"] and not out["old_handle_still_there"]
    assert out["reregistered"]
