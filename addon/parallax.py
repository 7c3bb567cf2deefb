"""A previs camera move over the backdrop (the work behind `multiplane.parallax_move`).

The camera is keyed from its pose at the scene's first frame to that pose moved by a
truck (right), pedestal (up) and dolly (forward), in its own axes, at the last frame. The
planes stay where they are in the world - that is what makes near layers slide faster
than far ones. A backdrop generated for the shot has the margins the move needs; when it
lacks them the move says so (`shot.backdrop_shortfall`) and leaves the planes alone - the
artist then extends the backdrop (`multiplane.extend_for_shot`) or, only when asked to
(`scale_planes`), each plane is re-fitted with the overscan it needs
(`geometry.parallax_overscan`), which magnifies the layers about the frame centre.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import bpy
from mathutils import Matrix, Vector

from . import compat
from .geometry import GeometryError, fit_plane_to_camera, parallax_overscan
from .importer import (
    PROP_FIT_MODE,
    PROP_FRAME,
    ImportFailed,
    PROP_IMAGE_SIZE,
    PROP_OVERSCAN,
    backdrop_planes,
    camera_basis,
    camera_spec,
    set_plane_size,
)
from .shot import Shortfall, ShotError, backdrop_shortfall

# How far (radians) a plane may be turned away from facing the camera before the move is refused.
_FACING_TOLERANCE = 1e-3


class ParallaxFailed(Exception):
    """A user-facing reason the move cannot be made."""


@dataclass
class ParallaxResult:
    frame_start: int
    frame_end: int
    overscans: dict[str, float]  # plane name -> overscan applied (empty: the planes were left alone)
    shortfall: Shortfall | None = None  # what the backdrop lacks for the move (not scaling)
    shortfall_error: str = ""  # why the shortfall could not be measured


def parallax_move(scene: bpy.types.Scene, collection: bpy.types.Collection, truck: float, pedestal: float,
                  dolly: float, margin: float = 0.0, interpolation: str = "BEZIER",
                  scale_planes: bool = False) -> ParallaxResult:
    """Key the scene camera's move over the frame range; with `scale_planes`, re-fit the
    planes of `collection` with the overscan the move needs, else measure what they lack."""
    camera = scene.camera
    if camera is None:
        raise ParallaxFailed("the scene has no active camera")
    planes = backdrop_planes(collection)
    if not planes:
        raise ParallaxFailed(f"collection {collection.name!r} has no Multiplane layer planes; import a stack first")
    frame_start, frame_end = scene.frame_start, scene.frame_end
    if frame_end <= frame_start:
        raise ParallaxFailed(f"the scene's frame range {frame_start}-{frame_end} is empty; "
                             "the move needs a last frame after the first")
    if truck == 0.0 and pedestal == 0.0 and dolly == 0.0:
        raise ParallaxFailed("truck, pedestal and dolly are all zero: nothing to move")

    move = (truck, pedestal, dolly)
    frame_before = scene.frame_current
    try:
        # Everything is worked out before anything changes.
        if scale_planes:
            start_matrix, new_sizes = _plan(scene, camera, planes, frame_start, frame_end, move, margin)
        else:
            start_matrix, new_sizes = _start_pose(scene, camera, planes, frame_start, dolly), {}
    finally:
        scene.frame_set(frame_before)
    basis = start_matrix.normalized()

    move_world = basis.to_3x3() @ Vector((truck, pedestal, -dolly))
    camera.matrix_world = start_matrix
    camera.keyframe_insert("location", frame=frame_start)
    camera.matrix_world = Matrix.Translation(move_world) @ start_matrix
    camera.keyframe_insert("location", frame=frame_end)
    for fcurve in compat.fcurves_of(camera):
        if fcurve.data_path != "location":
            continue
        for point in fcurve.keyframe_points:
            if point.co.x in (frame_start, frame_end):
                point.interpolation = interpolation
        fcurve.update()

    for plane in planes if scale_planes else ():
        width, height, overscan = new_sizes[plane.name]
        set_plane_size(plane, width, height)
        plane.scale = (1.0, 1.0, 1.0)  # the size lives in the mesh
        plane[PROP_OVERSCAN] = overscan
    scene.frame_set(frame_before)
    result = ParallaxResult(frame_start, frame_end, {name: size[2] for name, size in new_sizes.items()})
    if not scale_planes:
        try:
            result.shortfall = backdrop_shortfall(scene, collection)
        except ShotError as error:
            result.shortfall_error = str(error)
    return result


def _start_pose(scene: bpy.types.Scene, camera: bpy.types.Object, planes: list, frame_start: int,
                dolly: float) -> Matrix:
    """The camera's start matrix, after checking the dolly stops short of every plane."""
    scene.frame_set(frame_start)
    start_matrix = camera.matrix_world.copy()
    to_camera = camera_basis(camera).inverted()
    for plane in planes:
        distance = -(to_camera @ plane.matrix_world.translation).z
        if dolly >= distance:
            raise ParallaxFailed(f"a dolly of {dolly:g} would take the camera through the plane at "
                                 f"distance {distance:g}")
    return start_matrix


def _turn_angle(rotation) -> float:
    """Angle (radians) of a rotation quaternion, the same for q and -q."""
    return 2.0 * math.acos(min(1.0, abs(rotation.w)))


def _plan(scene: bpy.types.Scene, camera: bpy.types.Object, planes: list, frame_start: int, frame_end: int,
          move: tuple[float, float, float], margin: float) -> tuple[Matrix, dict]:
    """The camera's start matrix and, per plane, (width, height, overscan) for the move."""
    scene.frame_set(frame_end)
    end_rotation = camera.matrix_world.to_quaternion()
    scene.frame_set(frame_start)
    start_matrix = camera.matrix_world.copy()
    if _turn_angle(start_matrix.to_quaternion().rotation_difference(end_rotation)) > _FACING_TOLERANCE:
        raise ParallaxFailed(f"the camera turns between frames {frame_start} and {frame_end} (rotation keys or "
                             "constraints); a parallax move keeps the view direction fixed, so remove the turn first")
    try:
        spec = camera_spec(scene, camera)
    except ImportFailed as error:
        raise ParallaxFailed(str(error)) from None
    to_camera = camera_basis(camera).inverted()
    new_sizes = {}
    for plane in planes:
        local = to_camera @ plane.matrix_world
        if _turn_angle(local.to_3x3().normalized().to_quaternion()) > _FACING_TOLERANCE:
            raise ParallaxFailed(f"plane {plane.name!r} no longer faces the camera; re-import the stack "
                                 "from the camera's start pose first")
        center = local.to_translation()
        distance = -center.z
        image_size = tuple(plane.get(PROP_IMAGE_SIZE, (1, 1)))
        try:
            frame = tuple(plane.get(PROP_FRAME, (0.0, 0.0, 1.0, 1.0)))
            base = fit_plane_to_camera(spec, distance, 1.0, str(plane.get(PROP_FIT_MODE, "FILL")), image_size, frame)
            overscan = parallax_overscan(spec, distance, move, plane_size=(base.width, base.height),
                                         plane_center=(center.x, center.y))
        except GeometryError as error:
            raise ParallaxFailed(f"plane {plane.name!r}: {error}") from None
        overscan *= 1.0 + margin
        new_sizes[plane.name] = (base.width * overscan, base.height * overscan, overscan)
    return start_matrix, new_sizes
