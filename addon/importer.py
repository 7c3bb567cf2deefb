"""Turn a stack folder into camera-filling image planes (the work behind `multiplane.import_stack`).

One collection per stack ("Backdrop: <name>"), one plane per layer, back to front at
growing nearness, each sized by `geometry.fit_plane_to_camera` so the active camera sees
the stack's frame rectangle exactly filling its frame (the rest of the image, the margins
a camera move needs, extends beyond it). Planes live in world space (not parented) and face the
camera, so a moving camera sees real parallax. Materials are unlit by default: the texture's
colour through an Emission shader of strength 1, mixed with a Transparent BSDF by the straight
alpha - so a render with the Standard view transform gives back the image's own values (the
Shader option also offers a lit Principled BSDF and a camera-rays-only Shadeless emission).

Everything that can fail (reading the stack, the camera, the depths, copying files) is
checked before the first data-block is touched, so a failed import changes nothing.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import bpy
from mathutils import Matrix, Vector

from . import compat
from .geometry import (
    CameraSpec,
    GeometryError,
    PlaneFit,
    check_depth_order,
    default_layer_depths,
    fit_plane_to_camera,
)
from .stack_reader import LayerInfo, StackInfo, StackReadError, read_stack, safe_folder_name

# Custom properties that mark what the add-on made (read back by re-import, compositor, parallax).
PROP_STACK_NAME = "multiplane_stack"
PROP_STACK_FOLDER = "multiplane_stack_folder"
PROP_LAYER = "multiplane_layer"
PROP_LAYER_INDEX = "multiplane_layer_index"
PROP_DEPTH = "multiplane_depth"
PROP_OVERSCAN = "multiplane_overscan"
PROP_FIT_MODE = "multiplane_fit_mode"
PROP_IMAGE_SIZE = "multiplane_image_size"
PROP_FRAME = "multiplane_frame"  # the stack's frame rectangle: what part of the plane the start frame sees

IMAGE_FOLDER = "multiplane"  # images of saved files go to //multiplane/<stack>/
COLLECTION_PREFIX = "Backdrop: "


class ImportFailed(Exception):
    """A user-facing reason the import cannot go ahead (reported, never a traceback)."""


@dataclass(frozen=True)
class ImportSettings:
    """The operator's options, as plain values."""

    near: float = 4.0
    far: float = 40.0
    use_stack_depths: bool = True
    fit_mode: str = "FILL"
    overscan: float = 1.0
    interpolation: str = "Linear"
    render_method: str = "BLENDED"
    shader: str = "EMISSION"  # EMISSION (unlit) | PRINCIPLED (lit) | SHADELESS (camera rays only)
    emission_strength: float = 1.0
    relative_paths: bool = True  # saved .blend: the copied images by //-relative paths


@dataclass
class ImportResult:
    collection: bpy.types.Collection
    planes: list
    depths: list[float]
    packed: bool
    replaced: bool
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- camera


def camera_spec(scene: bpy.types.Scene, camera: bpy.types.Object) -> CameraSpec:
    """The plain-number camera description `geometry` works with."""
    data = camera.data
    if data.type not in ("PERSP", "ORTHO"):
        raise ImportFailed(f"camera {camera.name!r} is panoramic; backdrop planes need a perspective "
                           "or orthographic camera")
    render = scene.render
    return CameraSpec(
        projection=data.type,
        lens=data.lens,
        sensor_width=data.sensor_width,
        sensor_height=data.sensor_height,
        sensor_fit=data.sensor_fit,
        ortho_scale=data.ortho_scale,
        shift_x=data.shift_x,
        shift_y=data.shift_y,
        resolution_x=render.resolution_x,
        resolution_y=render.resolution_y,
        pixel_aspect_x=render.pixel_aspect_x,
        pixel_aspect_y=render.pixel_aspect_y,
    )


def camera_basis(camera: bpy.types.Object) -> Matrix:
    """The camera's world matrix without scale: camera-local coordinates to world."""
    return camera.matrix_world.normalized()


def plane_world_matrix(basis: Matrix, fit: PlaneFit) -> Matrix:
    """World matrix of a plane centred on `fit`, with the camera's orientation (facing it)."""
    location = basis @ Vector((fit.center_x, fit.center_y, -fit.distance))
    return Matrix.LocRotScale(location, basis.to_quaternion(), None)


# --------------------------------------------------------------------------- depths


def layer_depths(stack: StackInfo, settings: ImportSettings) -> list[float]:
    """Distances back to front: the stack's own `depth` where given (if allowed), else the defaults."""
    try:
        depths = default_layer_depths(len(stack.layers), settings.near, settings.far)
        if settings.use_stack_depths:
            depths = [layer.depth if layer.depth is not None else default
                      for layer, default in zip(stack.layers, depths)]
        check_depth_order(depths)
    except GeometryError as error:
        hint = " (turn off 'Use Stack Depths' to use Near/Far)" if settings.use_stack_depths else ""
        raise ImportFailed(f"{error}{hint}") from None
    return depths


# --------------------------------------------------------------------------- data-blocks


def find_backdrop(scene: bpy.types.Scene, stack_name: str | None = None) -> bpy.types.Collection | None:
    """The backdrop collection of `stack_name`, else the scene's chosen one, else the only one."""
    if stack_name is not None:
        return next((c for c in bpy.data.collections if c.get(PROP_STACK_NAME) == stack_name), None)
    settings = getattr(scene, "multiplane", None)
    chosen = getattr(settings, "backdrop", None) if settings is not None else None
    if chosen is not None:
        return chosen
    found = [c for c in scene.collection.children_recursive if c.get(PROP_STACK_NAME) is not None]
    return found[0] if len(found) == 1 else None


def backdrop_planes(collection: bpy.types.Collection) -> list:
    """The collection's layer planes, back to front."""
    planes = [obj for obj in collection.objects if obj.get(PROP_LAYER) is not None and obj.type == "MESH"]
    return sorted(planes, key=lambda obj: int(obj.get(PROP_LAYER_INDEX, 0)))


def plane_image(obj: bpy.types.Object) -> bpy.types.Image | None:
    """The image shown by a plane made by this add-on (its material's Image Texture)."""
    material = obj.active_material
    if material is None or material.node_tree is None:
        return None
    for node in material.node_tree.nodes:
        if node.bl_idname == "ShaderNodeTexImage" and node.image is not None:
            return node.image
    return None


def _data_name(stack: StackInfo, layer: LayerInfo) -> str:
    return f"{stack.name}: {layer.name}"


def _set_quad(mesh: bpy.types.Mesh, width: float, height: float) -> None:
    """Make `mesh` one width x height quad centred on the origin, UVs covering the image."""
    hw, hh = width / 2.0, height / 2.0
    corners = [(-hw, -hh, 0.0), (hw, -hh, 0.0), (hw, hh, 0.0), (-hw, hh, 0.0)]
    if len(mesh.vertices) == 4 and len(mesh.polygons) == 1 and mesh.uv_layers:
        mesh.vertices.foreach_set("co", [c for corner in corners for c in corner])
        mesh.update()
        return
    mesh.clear_geometry()
    mesh.from_pydata(corners, [], [(0, 1, 2, 3)])
    uv_layer = mesh.uv_layers.new(name="UVMap")
    uv_layer.data.foreach_set("uv", (0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0))
    mesh.update()


def set_plane_size(obj: bpy.types.Object, width: float, height: float) -> None:
    """Resize a backdrop plane about its own centre (its location does not change)."""
    _set_quad(obj.data, width, height)


def _surface_shader(tree: bpy.types.NodeTree, texture: bpy.types.Node, settings: ImportSettings) -> bpy.types.NodeSocket:
    """The plane's opaque surface for `settings.shader` (its output socket): unlit Emission of
    the texture's colour; a lit Principled BSDF; or Shadeless, an emission only camera rays
    see (other rays pass through, so the plane lights and reflects nothing)."""
    nodes, links = tree.nodes, tree.links
    if settings.shader == "PRINCIPLED":
        principled = nodes.new("ShaderNodeBsdfPrincipled")
        principled.location = (0, -120)
        links.new(texture.outputs["Color"], principled.inputs["Base Color"])
        return principled.outputs["BSDF"]
    emission = nodes.new("ShaderNodeEmission")
    emission.location = (-160, -200)
    emission.inputs["Strength"].default_value = settings.emission_strength
    links.new(texture.outputs["Color"], emission.inputs["Color"])
    if settings.shader != "SHADELESS":
        return emission.outputs["Emission"]
    light_path = nodes.new("ShaderNodeLightPath")
    light_path.location = (-160, -400)
    unseen = nodes.new("ShaderNodeBsdfTransparent")
    unseen.location = (-160, -60)
    camera_only = nodes.new("ShaderNodeMixShader")
    camera_only.location = (100, -200)
    links.new(light_path.outputs["Is Camera Ray"], camera_only.inputs["Fac"])
    links.new(unseen.outputs["BSDF"], camera_only.inputs[1])
    links.new(emission.outputs["Emission"], camera_only.inputs[2])
    return camera_only.outputs["Shader"]


def _build_material(material: bpy.types.Material, image: bpy.types.Image, settings: ImportSettings) -> None:
    """Straight-alpha material: the surface `settings.shader` picks, mixed with Transparent
    by the texture's alpha. The texture is the active node, so Solid mode's Texture colour
    shows it (viewport.py)."""
    tree = compat.material_node_tree(material)
    nodes, links = tree.nodes, tree.links
    nodes.clear()
    output = nodes.new("ShaderNodeOutputMaterial")
    output.location = (600, 0)
    texture = nodes.new("ShaderNodeTexImage")
    texture.location = (-400, 0)
    texture.image = image
    texture.interpolation = settings.interpolation
    texture.extension = "CLIP"
    nodes.active = texture
    transparent = nodes.new("ShaderNodeBsdfTransparent")
    transparent.location = (0, 80)
    mix = nodes.new("ShaderNodeMixShader")
    mix.location = (300, 0)
    links.new(texture.outputs["Alpha"], mix.inputs["Fac"])
    links.new(transparent.outputs["BSDF"], mix.inputs[1])
    links.new(_surface_shader(tree, texture, settings), mix.inputs[2])
    links.new(mix.outputs["Shader"], output.inputs["Surface"])
    compat.set_surface_render_method(material, settings.render_method)
    material.use_backface_culling = False
    if hasattr(material, "use_transparent_shadow"):
        material.use_transparent_shadow = True


def _load_image(existing: bpy.types.Image | None, name: str, filepath: str, pack: bool) -> bpy.types.Image:
    """Point `existing` (or a new image) at `filepath`; pack it into the .blend if asked.

    Re-using the data-block keeps everything that shows it (compositor nodes, other
    materials) in step with a re-import.
    """
    if existing is None:
        image = bpy.data.images.load(filepath, check_existing=False)
        image.name = name
    else:
        image = existing
        if image.packed_file is not None:
            image.unpack(method="REMOVE")
        image.source = "FILE"
        image.filepath = filepath
        image.reload()
    image.alpha_mode = "STRAIGHT"
    image.colorspace_settings.name = "sRGB"
    if pack:
        image.pack()
    return image


def _image_destination(stack: StackInfo) -> tuple[Path, str] | None:
    """(absolute folder, blend-relative folder) for this stack's images, or None when unsaved."""
    if not bpy.data.filepath:
        return None
    relative = f"//{IMAGE_FOLDER}/{safe_folder_name(stack.name)}/"
    return Path(bpy.path.abspath(relative)), relative


def _copy_images(stack: StackInfo, destination: Path) -> None:
    try:
        destination.mkdir(parents=True, exist_ok=True)
        for layer in stack.layers:
            target = destination / layer.file
            if target.exists() and os.path.samefile(target, layer.path):
                continue
            shutil.copyfile(layer.path, target)
    except OSError as error:
        raise ImportFailed(f"cannot copy the stack's images to {destination}: {error}") from None


def _remove_plane(obj: bpy.types.Object) -> None:
    """Delete a plane and whatever of its mesh, material and image nothing else uses."""
    mesh, material = obj.data, obj.active_material
    image = plane_image(obj)
    bpy.data.objects.remove(obj)
    if mesh is not None and mesh.users == 0:
        bpy.data.meshes.remove(mesh)
    if material is not None and material.users == 0:
        bpy.data.materials.remove(material)
    if image is not None and image.users == 0:
        bpy.data.images.remove(image)


def import_stack(context: bpy.types.Context, path: str, settings: ImportSettings) -> ImportResult:
    """Import (or re-import in place) the stack at `path` in front of the scene's camera."""
    scene = context.scene
    camera = scene.camera
    if camera is None:
        raise ImportFailed("the scene has no active camera: add one and make it active "
                           "(View > Cameras > Set Active Object as Camera)")
    from .shot import ShotError, camera_at_start  # shot builds on this module

    try:
        stack = read_stack(path)
        basis, spec = camera_at_start(scene)  # planes are fitted to the shot's first frame
    except (StackReadError, GeometryError, ShotError) as error:
        raise ImportFailed(str(error)) from None
    depths = layer_depths(stack, settings)
    try:
        fits = [fit_plane_to_camera(spec, depth, settings.overscan, settings.fit_mode,
                                    (stack.width, stack.height), stack.frame) for depth in depths]
    except GeometryError as error:
        raise ImportFailed(str(error)) from None
    destination = _image_destination(stack)
    if destination is not None:
        _copy_images(stack, destination[0])

    # --- from here on, data-blocks change.
    collection_name = COLLECTION_PREFIX + stack.name
    collection = find_backdrop(scene, stack.name)
    replaced = collection is not None
    if collection is None:
        collection = bpy.data.collections.new(collection_name)
    if collection not in scene.collection.children_recursive:
        scene.collection.children.link(collection)
    collection[PROP_STACK_NAME] = stack.name
    collection[PROP_STACK_FOLDER] = str(stack.folder)

    existing = {obj.get(PROP_LAYER): obj for obj in collection.objects if obj.get(PROP_LAYER) is not None}
    for layer_name in set(existing) - {layer.name for layer in stack.layers}:
        _remove_plane(existing.pop(layer_name))

    planes = []
    for layer, depth, fit in zip(stack.layers, depths, fits):
        name = _data_name(stack, layer)
        obj = existing.get(layer.name)
        if obj is None:
            mesh = bpy.data.meshes.new(name)
            obj = bpy.data.objects.new(name, mesh)
            collection.objects.link(obj)
        material = obj.active_material
        if material is None:
            material = bpy.data.materials.new(name)
            obj.data.materials.clear()
            obj.data.materials.append(material)
        if destination is not None:
            folder = destination[1] if settings.relative_paths else str(destination[0]) + os.sep
            filepath, pack = folder + layer.file, False
        else:
            filepath, pack = str(layer.path), True
        image = _load_image(plane_image(obj), name, filepath, pack)
        _build_material(material, image, settings)
        _set_quad(obj.data, fit.width, fit.height)
        obj.matrix_world = plane_world_matrix(basis, fit)
        obj.visible_shadow = False
        obj[PROP_LAYER] = layer.name
        obj[PROP_LAYER_INDEX] = layer.index
        obj[PROP_DEPTH] = depth
        obj[PROP_OVERSCAN] = settings.overscan
        obj[PROP_FIT_MODE] = settings.fit_mode
        obj[PROP_IMAGE_SIZE] = (stack.width, stack.height)
        obj[PROP_FRAME] = stack.frame
        planes.append(obj)

    result = ImportResult(collection=collection, planes=planes, depths=depths,
                          packed=destination is None, replaced=replaced)
    _check_scene_settings(scene, camera, depths, result.notes)
    return result


def _check_scene_settings(scene: bpy.types.Scene, camera: bpy.types.Object, depths: list[float],
                          notes: list[str]) -> None:
    """Fix what would hide planes (Cycles transparent bounces) and point out what changes their look."""
    cycles = getattr(scene, "cycles", None)
    needed = len(depths) + 1
    if cycles is not None and cycles.transparent_max_bounces < needed:
        cycles.transparent_max_bounces = needed
        notes.append(f"raised Cycles transparent bounces to {needed} so every layer shows")
    data = camera.data
    if max(depths) > data.clip_end:
        notes.append(f"the background is at {max(depths):g}, beyond the camera's Clip End "
                     f"({data.clip_end:g}); raise Clip End to see it")
    if min(depths) < data.clip_start:
        notes.append(f"the nearest layer is at {min(depths):g}, inside the camera's Clip Start "
                     f"({data.clip_start:g}); lower Clip Start to see it")
    if scene.view_settings.view_transform != "Standard":
        notes.append(f"view transform is {scene.view_settings.view_transform}: use Standard to render "
                     "the layers with their own colours")
