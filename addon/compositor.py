"""Composite the stack's layers around the CG render (the work behind `multiplane.build_compositor`).

Instead of (or besides) rendering the planes, the layers can go in at compositing time:
Image nodes, each stretched to the render size, joined with the Render Layers by a chain
of Alpha Over nodes, back to front. `behind` says how many stack layers go behind the
render (1: the background behind the CG, every foreground over it).

Alpha: Blender's Image node hands the compositor premultiplied colour whatever the file
holds (an image with alpha mode STRAIGHT is premultiplied on load), and so does Render
Layers, so Alpha Over must *not* treat its foreground as straight; the tests check the
result numerically against the stack's own composite.
"""
from __future__ import annotations

from dataclasses import dataclass

import bpy

from . import compat
from .importer import backdrop_planes, plane_image

NODE_PREFIX = "Multiplane"
GROUP_NAME = "Multiplane Compositor"


class CompositorFailed(Exception):
    """A user-facing reason the compositor cannot be built."""


@dataclass
class CompositorResult:
    tree: bpy.types.NodeTree
    render_layers: bpy.types.Node
    image_nodes: list
    alpha_over_nodes: list
    order: list[str]  # what goes in, back to front: layer names and "render"


def chain_order(layer_names: list[str], behind: int) -> list[str]:
    """Back-to-front order of the inputs: the first `behind` layers, the render, the rest."""
    if not 0 <= behind <= len(layer_names):
        raise CompositorFailed(f"layers behind the render must be between 0 and {len(layer_names)}, got {behind}")
    return [*layer_names[:behind], "render", *layer_names[behind:]]


def _remove_own_nodes(tree: bpy.types.NodeTree) -> None:
    for node in [n for n in tree.nodes if n.name.startswith(NODE_PREFIX)]:
        tree.nodes.remove(node)


def build_compositor(scene: bpy.types.Scene, collection: bpy.types.Collection, behind: int,
                     hide_planes: bool = True) -> CompositorResult:
    """(Re)build the Multiplane part of the scene's compositor for the backdrop `collection`.

    Nodes made here are named "Multiplane ..." and replaced on every call; other nodes in
    the tree are left alone, only the output's input link is taken over.
    """
    planes = backdrop_planes(collection)
    if not planes:
        raise CompositorFailed(f"collection {collection.name!r} has no Multiplane layer planes; import a stack first")
    images = []
    for plane in planes:
        image = plane_image(plane)
        if image is None:
            raise CompositorFailed(f"plane {plane.name!r} has no image in its material; re-import the stack")
        images.append(image)
    names = [str(plane.get("multiplane_layer")) for plane in planes]
    order = chain_order(names, behind)

    tree, output_socket = compat.compositor_tree(scene, GROUP_NAME)
    _remove_own_nodes(tree)
    for link in list(output_socket.links):
        tree.links.remove(link)

    render_layers = tree.nodes.new("CompositorNodeRLayers")
    render_layers.name = render_layers.label = f"{NODE_PREFIX} Render Layers"
    render_layers.scene = scene

    sources = {"render": render_layers.outputs["Image"]}
    image_nodes = []
    for row, (name, image) in enumerate(zip(names, images)):
        image_node = tree.nodes.new("CompositorNodeImage")
        image_node.name = image_node.label = f"{NODE_PREFIX} Image {name}"
        image_node.image = image
        image_node.location = (-700, -250 * row)
        scale = compat.new_scale_to_render_node(tree)
        scale.name = scale.label = f"{NODE_PREFIX} Scale {name}"
        scale.location = (-450, -250 * row)
        tree.links.new(image_node.outputs["Image"], scale.inputs[0])
        sources[name] = scale.outputs[0]
        image_nodes.append(image_node)
    render_layers.location = (-700, 300)

    result_socket = sources[order[0]]
    alpha_over_nodes = []
    for step, name in enumerate(order[1:], start=1):
        over = tree.nodes.new("CompositorNodeAlphaOver")
        over.name = over.label = f"{NODE_PREFIX} Over {step}"
        over.location = (-200 + 200 * step, 0)
        compat.set_alpha_over_straight(over, False)
        background, foreground, factor = compat.alpha_over_inputs(over)
        factor.default_value = 1.0
        tree.links.new(result_socket, background)
        tree.links.new(sources[name], foreground)
        result_socket = over.outputs[0]
        alpha_over_nodes.append(over)
    tree.links.new(result_socket, output_socket)
    output_socket.node.location = (-200 + 200 * len(order), 0)

    scene.render.use_compositing = True
    if behind > 0:
        # The layers behind the render only show through a transparent film.
        scene.render.film_transparent = True
    if hide_planes:
        collection.hide_render = True
    return CompositorResult(tree=tree, render_layers=render_layers, image_nodes=image_nodes,
                            alpha_over_nodes=alpha_over_nodes, order=order)
