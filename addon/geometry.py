"""Camera frame math in plain numbers, so it can be tested without Blender.

Blender's camera (camera.cc, `BKE_camera_params_compute_viewplane`) decides what it sees
from a handful of numbers: the projection, the lens and sensor (or the orthographic
scale), the sensor fit, the render resolution with its pixel aspect, and the lens shift.
This module reproduces that computation, then uses it to size backdrop planes so that,
seen from the camera, each one's frame rectangle fills the frame exactly; to find what a
camera move sees of each plane (the margins a canvas needs, `seen_region`) or, the old
way, how much bigger a plane has to be for the move never to reveal its edges; and to
place an object in the frame (`projected_box`).

Coordinates are camera-local, as in Blender: x to the right, y up, the camera looks down
-z. A "distance" is measured along the view axis (-z), not along the ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

PROJECTIONS = ("PERSP", "ORTHO")
SENSOR_FITS = ("AUTO", "HORIZONTAL", "VERTICAL")
FIT_MODES = ("FILL", "COVER")

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1, normalized, origin top-left, y down
Margins = tuple[float, float, float, float]  # left, top, right, bottom: fractions of the frame's width/height
WHOLE_FRAME: Rect = (0.0, 0.0, 1.0, 1.0)


class GeometryError(ValueError):
    """A camera or placement that no plane can be fitted to (bad numbers, plane behind camera)."""


@dataclass(frozen=True)
class CameraSpec:
    """The camera and render settings that decide the camera frame.

    Mirrors `bpy.types.Camera` (`type`, `lens`, `sensor_width`, `sensor_height`,
    `sensor_fit`, `ortho_scale`, `shift_x`, `shift_y`) and `scene.render` (`resolution_x`,
    `resolution_y`, `pixel_aspect_x`, `pixel_aspect_y`). The resolution percentage is left
    out: it scales both axes and does not change the frame.
    """

    projection: str = "PERSP"
    lens: float = 50.0
    sensor_width: float = 36.0
    sensor_height: float = 24.0
    sensor_fit: str = "AUTO"
    ortho_scale: float = 6.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    resolution_x: int = 1920
    resolution_y: int = 1080
    pixel_aspect_x: float = 1.0
    pixel_aspect_y: float = 1.0

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise GeometryError(
                f"camera projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r} "
                "(panoramic cameras have no flat frame to fit a plane to)"
            )
        if self.sensor_fit not in SENSOR_FITS:
            raise GeometryError(f"sensor fit must be one of {', '.join(SENSOR_FITS)}, got {self.sensor_fit!r}")
        positive = {
            "resolution_x": self.resolution_x,
            "resolution_y": self.resolution_y,
            "pixel_aspect_x": self.pixel_aspect_x,
            "pixel_aspect_y": self.pixel_aspect_y,
        }
        if self.projection == "PERSP":
            positive.update(lens=self.lens, sensor_width=self.sensor_width, sensor_height=self.sensor_height)
        else:
            positive.update(ortho_scale=self.ortho_scale)
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise GeometryError(f"camera {name} must be a positive number, got {value!r}")
        for name in ("shift_x", "shift_y"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise GeometryError(f"camera {name} must be a finite number, got {value!r}")

    @property
    def is_ortho(self) -> bool:
        return self.projection == "ORTHO"

    @property
    def aspect_size(self) -> tuple[float, float]:
        """Resolution corrected by the pixel aspect: the frame's true proportions."""
        return self.resolution_x * self.pixel_aspect_x, self.resolution_y * self.pixel_aspect_y


@dataclass(frozen=True)
class PlaneFit:
    """A plane facing the camera: its size and the camera-local centre at its distance."""

    width: float
    height: float
    center_x: float
    center_y: float
    distance: float


def fit_axis(spec: CameraSpec) -> str:
    """'HORIZONTAL' or 'VERTICAL': the frame axis the sensor (or ortho scale) spans.

    AUTO picks the larger side of the pixel-aspect-corrected resolution (ties go
    horizontal, as in Blender).
    """
    if spec.sensor_fit != "AUTO":
        return spec.sensor_fit
    ax, ay = spec.aspect_size
    return "HORIZONTAL" if ax >= ay else "VERTICAL"


def frame_extent(spec: CameraSpec, distance: float) -> float:
    """Length of the frame along the fit axis, at `distance` in front of the camera.

    Perspective: distance * sensor / lens, where the sensor is the height only with an
    explicit VERTICAL fit (AUTO always uses the width, even when it fits vertically).
    Orthographic: the ortho scale, whatever the distance.
    """
    if spec.is_ortho:
        return float(spec.ortho_scale)
    _check_distance(distance)
    sensor = spec.sensor_height if spec.sensor_fit == "VERTICAL" else spec.sensor_width
    return distance * sensor / spec.lens


def camera_frame_size(spec: CameraSpec, distance: float) -> tuple[float, float]:
    """(width, height) of the camera frame at `distance`, in scene units."""
    extent = frame_extent(spec, distance)
    ax, ay = spec.aspect_size
    if fit_axis(spec) == "HORIZONTAL":
        return extent, extent * ay / ax
    return extent * ax / ay, extent


def camera_frame_center(spec: CameraSpec, distance: float) -> tuple[float, float]:
    """Camera-local (x, y) of the frame centre at `distance`: the lens shift.

    Shift is measured in units of the frame extent along the fit axis, for both x and y.
    """
    extent = frame_extent(spec, distance)
    return spec.shift_x * extent, spec.shift_y * extent


def fit_plane_to_camera(
    spec: CameraSpec,
    distance: float,
    overscan: float = 1.0,
    mode: str = "FILL",
    image_size: tuple[int, int] | None = None,
    frame: Rect = WHOLE_FRAME,
) -> PlaneFit:
    """The plane at `distance` whose `frame` rectangle the camera sees exactly filling its frame.

    `frame` is where the camera frame sits inside the image (x0, y0, x1, y1, normalized,
    origin top-left, y down; the whole image by default): that part of the plane maps onto
    the camera frame, the rest of the image (the margins) extends beyond it. mode FILL
    stretches the frame rectangle to the camera frame (pixel for pixel when the render
    resolution equals its size); COVER keeps its own proportions (`image_size` in pixels)
    and lets it overflow the frame on one axis. `overscan` scales the plane about the frame
    centre (1.0 = exact fit), so a moving camera keeps seeing image rather than its edges.
    """
    if mode not in FIT_MODES:
        raise GeometryError(f"fit mode must be one of {', '.join(FIT_MODES)}, got {mode!r}")
    if not (math.isfinite(overscan) and overscan >= 1.0):
        raise GeometryError(f"overscan must be a number >= 1.0, got {overscan!r}")
    _check_distance(distance)
    fx0, fy0, fx1, fy1 = check_frame(frame)
    span_x, span_y = fx1 - fx0, fy1 - fy0
    width, height = camera_frame_size(spec, distance)
    if mode == "COVER":
        if image_size is None or min(image_size) <= 0:
            raise GeometryError(f"COVER fit needs the image size in pixels, got {image_size!r}")
        image_aspect = (image_size[0] * span_x) / (image_size[1] * span_y)
        if image_aspect > width / height:
            width = height * image_aspect
        else:
            height = width / image_aspect
    width, height = width / span_x, height / span_y  # the whole image, margins included
    # From the frame's centre to the image's centre (image y runs down, camera y up).
    offset_x = (0.5 - (fx0 + fx1) / 2.0) * width
    offset_y = ((fy0 + fy1) / 2.0 - 0.5) * height
    cx, cy = camera_frame_center(spec, distance)
    return PlaneFit(width * overscan, height * overscan, cx + offset_x * overscan, cy + offset_y * overscan,
                    float(distance))


def check_frame(frame: Rect) -> Rect:
    """A frame rectangle inside the image, checked: 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1."""
    values = tuple(frame)
    if len(values) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                               for v in values):
        raise GeometryError(f"a frame is four finite numbers x0, y0, x1, y1, got {frame!r}")
    x0, y0, x1, y1 = (float(v) for v in values)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise GeometryError(f"a frame needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 inside the image, got {frame!r}")
    return x0, y0, x1, y1


def frame_margins(frame: Rect) -> Margins:
    """The margins an image has around its `frame`: left, top, right, bottom, as fractions of
    the frame's width (left/right) and height (top/bottom)."""
    x0, y0, x1, y1 = check_frame(frame)
    width, height = x1 - x0, y1 - y0
    return x0 / width, y0 / height, (1.0 - x1) / width, (1.0 - y1) / height


def default_layer_depths(layer_count: int, near: float, far: float) -> list[float]:
    """Distances for a stack of `layer_count` layers, back to front.

    The background sits at `far`, the nearest foreground at `near`, the others between
    them evenly in 1/distance. Screen motion under a camera move goes as 1/distance, so
    this spacing gives evenly stepped parallax between neighbouring layers.
    """
    if layer_count < 1:
        raise GeometryError(f"a stack has at least one layer, got {layer_count}")
    if not (0.0 < near < far) or not math.isfinite(far):
        raise GeometryError(f"depths need 0 < near < far, got near={near!r}, far={far!r}")
    foregrounds = layer_count - 1
    depths = [float(far)]
    for i in range(1, foregrounds + 1):
        inverse = 1.0 / far + (1.0 / near - 1.0 / far) * i / foregrounds
        depths.append(1.0 / inverse)
    if foregrounds:
        depths[-1] = float(near)
    return depths


def check_depth_order(depths: Sequence[float]) -> None:
    """Layers are stacked back to front, so each must be strictly nearer than the last."""
    for i, depth in enumerate(depths):
        _check_distance(depth, f"layer {i} depth")
        if i and not depth < depths[i - 1]:
            raise GeometryError(
                f"layer {i} depth {depth:g} is not nearer than layer {i - 1} depth {depths[i - 1]:g}; "
                "stack layers must get nearer from back to front"
            )


def parallax_overscan(
    spec: CameraSpec,
    distance: float,
    move: tuple[float, float, float],
    plane_size: tuple[float, float] | None = None,
    plane_center: tuple[float, float] | None = None,
) -> float:
    """Factor (>= 1) to scale a plane about its centre so a camera move never shows its edge.

    The plane is at `distance` from the camera's start position, parallel to the image
    plane (size `plane_size`, camera-local centre `plane_center`; both default to the
    exact frame fit). `move` = (truck, pedestal, dolly) is the camera's translation in
    its own axes: right, up and forward. The camera does not rotate, so along the move
    every frame edge is a linear function of the camera position and the extremes are
    at the two ends: checking the start and end positions is exact for any path that
    stays on the segment between them (linear or eased keys).
    """
    _check_distance(distance)
    truck, pedestal, dolly = (float(v) for v in move)
    if plane_size is None or plane_center is None:
        fit = fit_plane_to_camera(spec, distance)
        plane_size = plane_size or (fit.width, fit.height)
        plane_center = plane_center or (fit.center_x, fit.center_y)
    half_w, half_h = plane_size[0] / 2.0, plane_size[1] / 2.0
    if half_w <= 0 or half_h <= 0:
        raise GeometryError(f"plane size must be positive, got {plane_size!r}")
    need_x = need_y = 0.0
    for t in (0.0, 1.0):
        seen_distance = distance - t * dolly
        if seen_distance <= 0:
            raise GeometryError(
                f"a dolly of {dolly:g} would take the camera through the plane at distance {distance:g}"
            )
        width, height = camera_frame_size(spec, seen_distance)
        shift_x, shift_y = camera_frame_center(spec, seen_distance)
        center_x = t * truck + shift_x - plane_center[0]
        center_y = t * pedestal + shift_y - plane_center[1]
        need_x = max(need_x, abs(center_x) + width / 2.0)
        need_y = max(need_y, abs(center_y) + height / 2.0)
    return max(1.0, need_x / half_w, need_y / half_h)


# --------------------------------------------------------------------------- the shot

IDENTITY: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
_EPSILON = 1e-9


@dataclass(frozen=True)
class CameraPose:
    """The camera at one frame of a shot, relative to its pose at the shot's start.

    `rotation` (three rows of a 3x3 rotation matrix) and `location` take this pose's
    camera-local coordinates to the start camera's; `spec` is the camera at this frame (a
    lens or shift may be animated). The start frame itself is the identity.
    """

    spec: CameraSpec
    rotation: tuple[tuple[float, float, float], ...] = IDENTITY
    location: tuple[float, float, float] = (0.0, 0.0, 0.0)
    frame: int = 0


def _rotate(rotation, vector) -> tuple[float, float, float]:
    return tuple(sum(row[i] * vector[i] for i in range(3)) for row in rotation)  # type: ignore[return-value]


def frame_corners(spec: CameraSpec, distance: float = 1.0) -> list[tuple[float, float]]:
    """Camera-local (x, y) of the frame's corners at `distance`: top-left, top-right,
    bottom-right, bottom-left."""
    width, height = camera_frame_size(spec, distance)
    cx, cy = camera_frame_center(spec, distance)
    hw, hh = width / 2.0, height / 2.0
    return [(cx - hw, cy + hh), (cx + hw, cy + hh), (cx + hw, cy - hh), (cx - hw, cy - hh)]


def _plane_hits(pose: CameraPose, distance: float) -> list[tuple[float, float]]:
    """Where the rays through `pose`'s frame corners meet the plane z = -distance of the
    start camera (start-camera x, y), or GeometryError when one misses it."""
    hits = []
    for x, y in frame_corners(pose.spec, 1.0):
        if pose.spec.is_ortho:
            offset = _rotate(pose.rotation, (x, y, 0.0))
            origin = tuple(pose.location[i] + offset[i] for i in range(3))
            direction = _rotate(pose.rotation, (0.0, 0.0, -1.0))
        else:
            origin, direction = pose.location, _rotate(pose.rotation, (x, y, -1.0))
        travel = -distance - origin[2]
        if direction[2] >= -_EPSILON or travel / direction[2] <= 0.0:
            raise GeometryError(
                f"at frame {pose.frame} the camera sees past the edge of the plane at distance {distance:g} "
                "(it turns away from it or moves through it): no backdrop can fill that view")
        t = travel / direction[2]
        hits.append((origin[0] + t * direction[0], origin[1] + t * direction[1]))
    return hits


def seen_region(start: CameraSpec, distance: float, poses: Sequence[CameraPose]) -> Rect:
    """The part of a plane that a shot sees, in the start frame's normalized coordinates.

    The plane is fixed in the world where the start camera placed it: at `distance`,
    facing the camera, with its frame rectangle exactly filling the start frame. The result
    is the bounding box (x0, y0, x1, y1; origin top-left of the start frame, y down; [0, 1]
    = the start frame) of every pose's frame on that plane. Each pose's frame is a convex
    quadrilateral on the plane, so its corners bound it exactly.
    """
    _check_distance(distance)
    width, height = camera_frame_size(start, distance)
    cx, cy = camera_frame_center(start, distance)
    left, top = cx - width / 2.0, cy + height / 2.0
    us, vs = [0.0, 1.0], [0.0, 1.0]  # the start frame is part of every shot
    for pose in poses:
        for x, y in _plane_hits(pose, distance):
            us.append((x - left) / width)
            vs.append((top - y) / height)
    return min(us), min(vs), max(us), max(vs)


def region_margins(region: Rect) -> Margins:
    """The margins (left, top, right, bottom, fractions of the frame) a region around the
    frame [0, 1]^2 needs; float noise of a static camera is no margin."""
    x0, y0, x1, y1 = region
    sides = (-x0, -y0, x1 - 1.0, y1 - 1.0)
    return tuple(side if side > 1e-7 else 0.0 for side in sides)  # type: ignore[return-value]


def shot_margins(start: CameraSpec, distances: Sequence[float], poses: Sequence[CameraPose]) -> Margins:
    """The margins one canvas needs so that no plane at any of `distances` shows its edge
    during the shot: the union (per side, the largest) over the planes."""
    margins = [region_margins(seen_region(start, distance, poses)) for distance in distances]
    return tuple(max(m[side] for m in margins) for side in range(4))  # type: ignore[return-value]


def missing_margins(needed: Margins, available: Margins, tolerance: float = 1e-4) -> Margins:
    """How much of `needed` the `available` margins lack, per side (zeros: nothing missing)."""
    return tuple(n - a if n - a > tolerance else 0.0 for n, a in zip(needed, available))  # type: ignore[return-value]


# --------------------------------------------------------------------------- objects as layers


def project_to_frame(spec: CameraSpec, point: tuple[float, float, float]) -> tuple[float, float, float]:
    """A camera-local point → (u, v, distance): its place in the frame (normalized, origin
    top-left, y down; [0, 1] = inside) and its distance along the view axis."""
    x, y, z = (float(c) for c in point)
    distance = -z
    if not spec.is_ortho and distance <= _EPSILON:
        raise GeometryError(f"the point {tuple(point)!r} is not in front of the camera")
    (left, top), (right, _), _, (_, bottom) = frame_corners(spec, distance if distance > 0 else 1.0)
    return (x - left) / (right - left), (top - y) / (top - bottom), distance


def projected_box(spec: CameraSpec, points: Sequence[tuple[float, float, float]]) -> tuple[Rect, float]:
    """The frame box (clamped to the frame) that camera-local `points` (an object's bounding
    box corners) cover, and the distance of their centre along the view axis."""
    if not points:
        raise GeometryError("an object needs a bounding box to lay a layer out from")
    distance = -sum(p[2] for p in points) / len(points)
    if not (math.isfinite(distance) and distance > 0):
        raise GeometryError(f"it is not in front of the camera (its centre is at {distance:g} along the view axis)")
    projected = [project_to_frame(spec, point) for point in points]
    us, vs = [p[0] for p in projected], [p[1] for p in projected]
    box = (max(0.0, min(us)), max(0.0, min(vs)), min(1.0, max(us)), min(1.0, max(vs)))
    if not (box[0] < box[2] and box[1] < box[3]):
        raise GeometryError("it is outside the camera frame at the shot's start")
    return box, distance


def _check_distance(distance: float, what: str = "distance") -> None:
    if not (isinstance(distance, (int, float)) and math.isfinite(distance) and distance > 0):
        raise GeometryError(f"{what} must be a positive number in front of the camera, got {distance!r}")
