"""Composite the stack's layers around the CG render (the work behind `multiplane.build_compositor`).

Instead of (or besides) rendering the planes, the layers can go in at compositing time:
Image nodes (one per layer PNG, or one on the stack's multilayer EXR with an output per
layer), each layer stretched to the render size, joined with the Render Layers by a chain
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
from .importer import PROP_STACK_FOLDER, backdrop_planes, plane_image
from .stack_reader import StackReadError, exr_layer_names, read_stack

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
    source: str = "PNG"  # what the layers were read from: "PNG" or "EXR"


def chain_order(layer_names: list[str], behind: int) -> list[str]:
    """Back-to-front order of the inputs: the first `behind` layers, the render, the rest."""
    if not 0 <= behind <= len(layer_names):
        raise CompositorFailed(f"layers behind the render must be between 0 and {len(layer_names)}, got {behind}")
    return [*layer_names[:behind], "render", *layer_names[behind:]]


def _remove_own_nodes(tree: bpy.types.NodeTree) -> None:
    for node in [n for n in tree.nodes if n.name.startswith(NODE_PREFIX)]:
        tree.nodes.remove(node)


def build_compositor(scene: bpy.types.Scene, collection: bpy.types.Collection, behind: int,
                     hide_planes: bool = True, source: str = "PNG") -> CompositorResult:
    """(Re)build the Multiplane part of the scene's compositor for the backdrop `collection`.

    `source`: "PNG", an Image node per layer (the planes' images), "EXR", one Image node
    on the stack's multilayer `stack.exr` whose outputs are the layers, or "AUTO": the EXR
    when the stack has one, else the PNGs. Nodes made here are
    named "Multiplane ..." and replaced on every call; other nodes in the tree are left
    alone, only the output's input link is taken over.
    """
    planes = backdrop_planes(collection)
    if not planes:
        raise CompositorFailed(f"collection {collection.name!r} has no Multiplane layer planes; import a stack first")
    names = [str(plane.get("multiplane_layer")) for plane in planes]
    order = chain_order(names, behind)
    if source == "AUTO":
        source = "EXR" if _has_exr(collection) else "PNG"
    if source == "EXR":
        exr_image, exr_names = _stack_exr(collection, names)
    elif source == "PNG":
        images = _plane_images(planes)
    else:
        raise CompositorFailed(f"source must be 'AUTO', 'PNG' or 'EXR', got {source!r}")

    tree, output_socket = compat.compositor_tree(scene, GROUP_NAME)
    _remove_own_nodes(tree)
    for link in list(output_socket.links):
        tree.links.remove(link)

    render_layers = tree.nodes.new("CompositorNodeRLayers")
    render_layers.name = render_layers.label = f"{NODE_PREFIX} Render Layers"
    render_layers.scene = scene
    render_layers.location = (-700, 300)
    if source == "EXR":
        sources, image_nodes = _exr_sources(tree, names, exr_image, exr_names)
    else:
        sources, image_nodes = _png_sources(tree, names, images)
    sources["render"] = render_layers.outputs["Image"]

    alpha_over_nodes = _alpha_over_chain(tree, order, sources, output_socket)
    scene.render.use_compositing = True
    if behind > 0:
        # The layers behind the render only show through a transparent film.
        scene.render.film_transparent = True
    if hide_planes:
        collection.hide_render = True
    return CompositorResult(tree=tree, render_layers=render_layers, image_nodes=image_nodes,
                            alpha_over_nodes=alpha_over_nodes, order=order, source=source)


def _plane_images(planes: list) -> list:
    images = []
    for plane in planes:
        image = plane_image(plane)
        if image is None:
            raise CompositorFailed(f"plane {plane.name!r} has no image in its material; re-import the stack")
        images.append(image)
    return images


def _has_exr(collection: bpy.types.Collection) -> bool:
    try:
        path = read_stack(str(collection.get(PROP_STACK_FOLDER) or ""), check_images=False).exr_path
    except StackReadError:
        return False
    return path is not None and path.is_file()


def _stack_exr(collection: bpy.types.Collection, names: list[str]) -> tuple[bpy.types.Image, dict[str, str]]:
    """The backdrop's stack.exr as a (multilayer) image, and each plane's EXR layer name."""
    folder = collection.get(PROP_STACK_FOLDER)
    try:
        stack = read_stack(str(folder or ""), check_images=False)
    except StackReadError as error:
        raise CompositorFailed(f"cannot read the backdrop's stack: {error}") from None
    path = stack.exr_path
    if path is None or not path.is_file():
        raise CompositorFailed(f"the stack {stack.name!r} has no multilayer EXR (stack.exr): generate it with "
                               "'Multilayer EXR' on, or build the compositor from the layer PNGs")
    stack_names = [layer.name for layer in stack.layers]
    missing = [name for name in names if name not in stack_names]
    if missing:
        raise CompositorFailed(f"layer(s) {', '.join(missing)} of the backdrop are not in {stack.folder}: "
                               "re-import the stack")
    exr_names = dict(zip(stack_names, exr_layer_names(stack_names)))
    # Float EXRs load as linear (scene-linear Rec.709) and premultiplied: what the file holds.
    image = bpy.data.images.load(str(path), check_existing=True)
    return image, {name: exr_names[name] for name in names}


def _png_sources(tree: bpy.types.NodeTree, names: list[str], images: list) -> tuple[dict, list]:
    """An Image node per layer, each stretched to the render size: {name: socket}, nodes."""
    sources, image_nodes = {}, []
    for row, (name, image) in enumerate(zip(names, images)):
        image_node = tree.nodes.new("CompositorNodeImage")
        image_node.name = image_node.label = f"{NODE_PREFIX} Image {name}"
        image_node.image = image
        image_node.location = (-700, -250 * row)
        sources[name] = _scaled(tree, name, image_node.outputs["Image"], row)
        image_nodes.append(image_node)
    return sources, image_nodes


def _exr_sources(tree: bpy.types.NodeTree, names: list[str], image: bpy.types.Image,
                 exr_names: dict[str, str]) -> tuple[dict, list]:
    """One Image node on the multilayer EXR; each layer's output stretched to the render size."""
    image_node = tree.nodes.new("CompositorNodeImage")
    image_node.name = image_node.label = f"{NODE_PREFIX} Image EXR"
    image_node.image = image
    image_node.location = (-700, 0)
    sockets = {socket.name: socket for socket in image_node.outputs}
    sources = {}
    for row, name in enumerate(names):
        socket = sockets.get(exr_names[name])
        if socket is None:
            tree.nodes.remove(image_node)
            raise CompositorFailed(f"{image.filepath} has no layer {exr_names[name]!r} (it has "
                                   f"{', '.join(sockets) or 'none'}); it is not this stack's EXR")
        sources[name] = _scaled(tree, name, socket, row)
    return sources, [image_node]


def _scaled(tree: bpy.types.NodeTree, name: str, socket: bpy.types.NodeSocket, row: int) -> bpy.types.NodeSocket:
    scale = compat.new_scale_to_render_node(tree)
    scale.name = scale.label = f"{NODE_PREFIX} Scale {name}"
    scale.location = (-450, -250 * row)
    tree.links.new(socket, scale.inputs[0])
    return scale.outputs[0]


def _alpha_over_chain(tree: bpy.types.NodeTree, order: list[str], sources: dict,
                      output_socket: bpy.types.NodeSocket) -> list:
    """Alpha Over nodes joining `sources` back to front in `order`, into `output_socket`."""
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
    return alpha_over_nodes
