"""The few places where Blender 4.2-4.5 and 5.x differ, each behind one small function.

Every switch tests for the feature itself (an RNA property, a node type, a socket name)
rather than a version number, so point releases that back-port or drop a feature still
take the right branch.
"""
from __future__ import annotations

import bpy


def _has_rna_property(rna_type, name: str) -> bool:
    return name in rna_type.bl_rna.properties


# --------------------------------------------------------------------------- materials


def material_node_tree(material: bpy.types.Material) -> bpy.types.NodeTree:
    """The material's shader tree; 4.x creates it only when `use_nodes` is switched on
    (5.x materials always have one and deprecate `use_nodes`)."""
    if material.node_tree is None:
        material.use_nodes = True
    return material.node_tree


def set_surface_render_method(material: bpy.types.Material, method: str) -> None:
    """EEVEE transparency: 'BLENDED' or 'DITHERED' (4.2+), `blend_method` before that."""
    if _has_rna_property(bpy.types.Material, "surface_render_method"):
        material.surface_render_method = method
    else:  # pre-4.2 EEVEE Legacy
        material.blend_method = "BLEND" if method == "BLENDED" else "HASHED"


# --------------------------------------------------------------------------- compositor


def uses_compositor_node_group() -> bool:
    """5.x: the compositor is a node group assigned to the scene (no `scene.node_tree`)."""
    return _has_rna_property(bpy.types.Scene, "compositing_node_group")


def compositor_tree(scene: bpy.types.Scene, group_name: str) -> tuple[bpy.types.NodeTree, bpy.types.NodeSocket]:
    """The scene's compositor tree (created when missing) and the input socket its result goes to.

    5.x: the scene's node group (a new `group_name` group if it has none) and the first
    input of its Group Output, whose interface gets an "Image" colour output if it has
    no output yet. 4.x: `scene.node_tree` with `use_nodes` on, and a Composite node's
    Image input.
    """
    if uses_compositor_node_group():
        tree = scene.compositing_node_group
        if tree is None:
            tree = bpy.data.node_groups.new(group_name, "CompositorNodeTree")
            scene.compositing_node_group = tree
        if not any(item.item_type == "SOCKET" and item.in_out == "OUTPUT" for item in tree.interface.items_tree):
            tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
        output = next((n for n in tree.nodes if n.bl_idname == "NodeGroupOutput"), None)
        if output is None:
            output = tree.nodes.new("NodeGroupOutput")
        output.is_active_output = True
        return tree, output.inputs[0]
    scene.use_nodes = True
    tree = scene.node_tree
    output = next((n for n in tree.nodes if n.bl_idname == "CompositorNodeComposite"), None)
    if output is None:
        output = tree.nodes.new("CompositorNodeComposite")
    return tree, output.inputs["Image"]


def alpha_over_inputs(node: bpy.types.Node) -> tuple[bpy.types.NodeSocket, bpy.types.NodeSocket, bpy.types.NodeSocket]:
    """(background, foreground, factor) of an Alpha Over node.

    5.x names them Background/Foreground/Factor; 4.x has two inputs both called "Image",
    so there they are taken by position: [0] Fac, [1] background, [2] foreground.
    """
    inputs = node.inputs
    if "Background" in inputs and "Foreground" in inputs:
        return inputs["Background"], inputs["Foreground"], inputs["Fac"] if "Fac" in inputs else inputs["Factor"]
    return inputs[1], inputs[2], inputs[0]


def set_alpha_over_straight(node: bpy.types.Node, straight: bool) -> None:
    """Whether Alpha Over treats its foreground as straight (un-premultiplied) alpha.

    5.x: the "Straight Alpha" input; 4.x: "Convert Premultiplied" (`use_premultiply`),
    with the premultiply mix (`premul`) left at 0.
    """
    if "Straight Alpha" in node.inputs:
        node.inputs["Straight Alpha"].default_value = straight
    else:
        node.use_premultiply = straight
        node.premul = 0.0


def new_scale_to_render_node(tree: bpy.types.NodeTree) -> bpy.types.Node:
    """A Scale node that stretches its image to the render size (menu inputs in 5.x,
    `space`/`frame_method` properties in 4.x)."""
    node = tree.nodes.new("CompositorNodeScale")
    if "Type" in node.inputs:
        node.inputs["Type"].default_value = "Render Size"
        node.inputs["Frame Type"].default_value = "Stretch"
    else:
        node.space = "RENDER_SIZE"
        node.frame_method = "STRETCH"
    return node


# --------------------------------------------------------------------------- animation


def fcurves_of(id_data: bpy.types.ID) -> list:
    """The F-curves animating `id_data`: through the action's channelbag for its slot
    (layered actions, 4.4+, the only way in 5.x) or `action.fcurves` before that."""
    anim = id_data.animation_data
    if anim is None or anim.action is None:
        return []
    action = anim.action
    slot = getattr(anim, "action_slot", None)
    if slot is not None:
        from bpy_extras import anim_utils

        get_channelbag = getattr(anim_utils, "action_get_channelbag_for_slot", None)
        if get_channelbag is not None:
            channelbag = get_channelbag(action, slot)
            return list(channelbag.fcurves) if channelbag is not None else []
    return list(action.fcurves)
