"""The shot, read from the scene: the active camera over the frame range, and what it means
for a backdrop - the margins a canvas needs, what an imported backdrop lacks, and where a
proxy object sits in the frame.

Blender is only sampled here (every frame, through `scene.frame_set` and the evaluated
camera, so keys, constraints, drivers and `multiplane.parallax_move` all count); the maths
is `geometry`'s (seen regions, margins, projected boxes), tested without Blender. The shot
starts at the scene's first frame: that is where planes are fitted and boxes are read.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import bpy
from mathutils import Matrix, Vector

from .canvas import CanvasPlan, model_pixel_budget, plan_canvas
from .geometry import (
    CameraPose,
    CameraSpec,
    GeometryError,
    Margins,
    default_layer_depths,
    missing_margins,
    project_to_frame,
    projected_box,
    shot_margins,
)
from .importer import PROP_LAYER, ImportFailed, ImportSettings, backdrop_planes, camera_spec

NO_MARGINS: Margins = (0.0, 0.0, 0.0, 0.0)
SIDES = ("left", "top", "right", "bottom")


class ShotError(ValueError):
    """The shot cannot be read or served (no camera, a view no plane can fill); artist-facing."""


@dataclass(frozen=True)
class Shot:
    """The camera over the frame range: its start pose and settings, and every frame's pose
    relative to the start."""

    start_basis: Matrix
    start_spec: CameraSpec
    poses: tuple[CameraPose, ...]
    frame_start: int
    frame_end: int


@contextmanager
def frame_kept(scene: bpy.types.Scene):
    """Let the body change the scene's frame; the artist's current frame comes back after."""
    frame, subframe = scene.frame_current, scene.frame_subframe
    try:
        yield
    finally:
        scene.frame_set(frame, subframe=subframe)


def _depsgraph(scene: bpy.types.Scene):
    """The evaluated depsgraph of `scene` (the watcher imports into a scene that need not be
    the context's)."""
    if bpy.context.scene == scene:
        return bpy.context.evaluated_depsgraph_get()
    return scene.view_layers[0].depsgraph


def _evaluated_camera(scene: bpy.types.Scene, camera: bpy.types.Object) -> tuple[Matrix, CameraSpec]:
    evaluated = camera.evaluated_get(_depsgraph(scene))
    try:
        spec = camera_spec(scene, evaluated)
    except (ImportFailed, GeometryError) as error:
        raise ShotError(str(error)) from None
    return evaluated.matrix_world.normalized(), spec


def _camera_or_error(scene: bpy.types.Scene) -> bpy.types.Object:
    if scene.camera is None:
        raise ShotError("the scene has no active camera: add one and make it active "
                        "(View > Cameras > Set Active Object as Camera)")
    return scene.camera


def camera_at_start(scene: bpy.types.Scene) -> tuple[Matrix, CameraSpec]:
    """The active camera's world basis (no scale) and settings at the shot's first frame."""
    camera = _camera_or_error(scene)
    with frame_kept(scene):
        scene.frame_set(scene.frame_start)
        return _evaluated_camera(scene, camera)


def read_shot(scene: bpy.types.Scene) -> Shot:
    """Sample the active camera at every frame of the scene's range."""
    camera = _camera_or_error(scene)
    first, last = scene.frame_start, max(scene.frame_start, scene.frame_end)
    poses = []
    with frame_kept(scene):
        scene.frame_set(first)
        start_basis, start_spec = _evaluated_camera(scene, camera)
        to_start = start_basis.inverted()
        for frame in range(first, last + 1):
            scene.frame_set(frame)
            basis, spec = _evaluated_camera(scene, camera)
            relative = to_start @ basis
            rotation = tuple(tuple(row) for row in relative.to_3x3())
            poses.append(CameraPose(spec, rotation, tuple(relative.translation), frame))
    return Shot(start_basis, start_spec, tuple(poses), first, last)


def margins_for(shot: Shot, distances) -> Margins:
    """The margins one canvas needs for planes at `distances` over the shot (ShotError if
    the camera sees past a plane)."""
    try:
        return shot_margins(shot.start_spec, list(distances), shot.poses)
    except GeometryError as error:
        raise ShotError(str(error)) from None


def describe_margins(margins: Margins) -> str:
    """"left 0.12, right 0.30" (fractions of the frame), or "none"."""
    parts = [f"{side} {value:.2f}" for side, value in zip(SIDES, margins) if value > 0]
    return ", ".join(parts) if parts else "none"


# --------------------------------------------------------------------------- Generate


def frame_aspect(scene: bpy.types.Scene) -> float:
    """The render's exact aspect (pixel aspect included, percentage ignored)."""
    render = scene.render
    return (render.resolution_x * render.pixel_aspect_x) / (render.resolution_y * render.pixel_aspect_y)


def generation_distances(foreground_depths) -> list[float]:
    """Where the importer will put a new stack's planes, back to front: its defaults (Near
    and Far of `ImportSettings`), with each foreground's own depth where it has one (> 0)."""
    defaults = ImportSettings()
    distances = default_layer_depths(len(foreground_depths) + 1, defaults.near, defaults.far)
    return [distances[0]] + [depth if depth > 0 else default
                             for depth, default in zip(foreground_depths, distances[1:])]


def plan_for_scene(scene: bpy.types.Scene, model: str, margins: Margins) -> CanvasPlan:
    """The canvas for the scene's render aspect, `margins` and the model's pixel budget."""
    try:
        return plan_canvas(frame_aspect(scene), margins, model_pixel_budget(model))
    except ValueError as error:
        raise ShotError(f"cannot plan the canvas: {error}. Make the camera move smaller, or put the "
                        "layers farther away") from None


# --------------------------------------------------------------------------- an imported backdrop


def available_margins(plane: bpy.types.Object, to_start: Matrix, spec: CameraSpec) -> tuple[Margins, float]:
    """The margins a plane has around the start frame (fractions of the frame, from its
    actual corners: frame, overscan and all), and its distance from the start camera."""
    corners = [to_start @ (plane.matrix_world @ vertex.co) for vertex in plane.data.vertices]
    distance = -sum(corner.z for corner in corners) / len(corners)
    try:
        projected = [project_to_frame(spec, (c.x, c.y, -distance)) for c in corners]
    except GeometryError as error:
        raise ShotError(f"plane {plane.name!r}: {error}") from None
    us, vs = [p[0] for p in projected], [p[1] for p in projected]
    return (-min(us), -min(vs), max(us) - 1.0, max(vs) - 1.0), distance


@dataclass(frozen=True)
class Shortfall:
    """What a backdrop lacks for the shot: per plane (layer name) and for one canvas."""

    needed: Margins  # the union over the planes, for the planes' own depths
    missing: dict  # layer name -> Margins missing (only planes that lack some)

    @property
    def lacking(self) -> bool:
        return bool(self.missing)


def backdrop_shortfall(scene: bpy.types.Scene, collection: bpy.types.Collection, shot: Shot | None = None) -> Shortfall:
    """Does the shot see past the edges of the backdrop's planes? (ShotError: unreadable)."""
    shot = shot or read_shot(scene)
    to_start = shot.start_basis.inverted()
    missing, needed_all = {}, []
    for plane in backdrop_planes(collection):
        available, distance = available_margins(plane, to_start, shot.start_spec)
        needed = margins_for(shot, [distance])
        needed_all.append(needed)
        lack = missing_margins(needed, available)
        if any(lack):
            missing[str(plane.get(PROP_LAYER))] = lack
    union = tuple(max((m[i] for m in needed_all), default=0.0) for i in range(4))
    return Shortfall(union, missing)


def describe_shortfall(shortfall: Shortfall) -> str:
    names = ", ".join(sorted(shortfall.missing))
    worst = tuple(max(m[i] for m in shortfall.missing.values()) for i in range(4))
    return (f"the camera move sees past the edges of {names} (missing {describe_margins(worst)} "
            f"of the frame): use Extend for Shot to outpaint the backdrop, or Scale Planes to enlarge them")


# --------------------------------------------------------------------------- proxies as layers


def object_bound_corners(obj: bpy.types.Object) -> list[Vector]:
    """The eight local corners of an object's bounding box; an empty (whose bounding box is a
    point) spans its display size."""
    if obj.type == "EMPTY":
        size = obj.empty_display_size
        return [Vector((x, y, z)) for x in (-size, size) for y in (-size, size) for z in (-size, size)]
    return [Vector(corner) for corner in obj.bound_box]


def object_layout(scene: bpy.types.Scene, obj: bpy.types.Object, start: tuple[Matrix, CameraSpec]
                  ) -> tuple[tuple[float, float, float, float], float]:
    """(box in frame coordinates, distance from the camera) of an object at the shot's start:
    its camera-projected bounding box, clamped to the frame, and its centre's depth."""
    basis, spec = start
    to_camera = basis.inverted()
    evaluated = obj.evaluated_get(_depsgraph(scene))
    corners = [to_camera @ (evaluated.matrix_world @ corner) for corner in object_bound_corners(evaluated)]
    try:
        return projected_box(spec, [tuple(c) for c in corners])
    except GeometryError as error:
        raise ShotError(f"object {obj.name!r}: {error}") from None


def layouts_at_start(scene: bpy.types.Scene, objects) -> list[tuple[tuple[float, float, float, float], float]]:
    """object_layout for each of `objects`, evaluated at the shot's first frame."""
    camera = _camera_or_error(scene)
    with frame_kept(scene):
        scene.frame_set(scene.frame_start)
        start = _evaluated_camera(scene, camera)
        return [object_layout(scene, obj, start) for obj in objects]
