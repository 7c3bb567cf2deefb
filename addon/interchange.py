"""Layered files back in: import a PSD or OpenRaster file (edited in Photoshop, Krita, GIMP,
Affinity...) as a new stack through the running backend, and its planes in place of the
backdrop's. Thin: the server turns the file into a stack (`POST /v1/imports`), the job
watcher fetches it, imports the planes and adds it to the history, as for a generated one.
"""
from __future__ import annotations

import os

import bpy
from bpy.props import BoolProperty, StringProperty
from bpy.types import Operator
from bpy_extras.io_utils import ImportHelper

from .backdrop import import_menu_registration
from .generate import backend_settings_or_report, ready_to_start_or_report
from .importer import PROP_DEPTH, PROP_LAYER, PROP_STACK_NAME, backdrop_planes, find_backdrop
from .limits import MAX_NAME_CHARS
from .watcher import JobPlan, ensure_timer, watcher

LAYERED_SUFFIXES = (".psd", ".psb", ".ora")


def build_import_request(path: str, backdrop_name: str, replace_backdrop: bool, export_exr: bool,
                         depths: dict[str, float] | None = None) -> dict:
    """The POST /v1/imports body; ValueError (artist-facing) for a file that cannot be one.

    With `replace_backdrop` the new stack takes the backdrop's stack name, so its planes
    replace that backdrop's in place (layers missing from the file are removed), and its
    planes' `depths` (layer name → distance), so the layers kept stay where they are."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"Choose a layered file to import: {path or 'nothing'} is not a file")
    if not path.lower().endswith(LAYERED_SUFFIXES):
        raise ValueError(f"{os.path.basename(path)} is not a layered file: choose a .psd or .ora file")
    body = {"path": os.path.abspath(path), "export_exr": bool(export_exr)}
    if replace_backdrop and backdrop_name:
        body["name"] = backdrop_name[:MAX_NAME_CHARS]
        if depths:
            body["depths"] = {name: float(depth) for name, depth in depths.items()}
    return body


class MULTIPLANE_OT_import_layered_file(Operator, ImportHelper):
    """Import a layered PSD or OpenRaster file as a new stack (bottom layer = background) through the inference server, replacing the backdrop's planes in place"""

    bl_idname = "multiplane.import_layered_file"
    bl_label = "Import Layered File"

    filter_glob: StringProperty(default="*.psd;*.psb;*.ora", options={"HIDDEN"})
    replace_backdrop: BoolProperty(
        name="Replace Backdrop",
        description="Give the new stack the current backdrop's name, so its planes replace that backdrop's "
                    "in place (off: a new backdrop named after the file)",
        default=True,
    )
    export_exr: BoolProperty(name="Multilayer EXR", description="Also write the stack's stack.exr", default=False)

    def execute(self, context):
        scene = context.scene
        if not ready_to_start_or_report(self, scene):
            return {"CANCELLED"}
        backdrop = find_backdrop(scene)
        backdrop_name = str(backdrop.get(PROP_STACK_NAME, "")) if backdrop is not None else ""
        depths = {str(plane[PROP_LAYER]): float(plane[PROP_DEPTH]) for plane in backdrop_planes(backdrop)
                  if plane.get(PROP_DEPTH)} if backdrop is not None else {}
        try:
            body = build_import_request(bpy.path.abspath(self.filepath), backdrop_name, self.replace_backdrop,
                                        self.export_exr, depths)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        settings = backend_settings_or_report(self, context)
        if settings is None:
            return {"CANCELLED"}
        history = {"prompt": f"imported from {os.path.basename(body['path'])}", "method": "imported",
                   "name": body.get("name", "")}
        watcher.start(JobPlan(body=body, settings=settings, scene_name=scene.name, history_fields=history,
                              import_file=True))
        ensure_timer()
        target = f"in place of {backdrop_name!r}" if "name" in body else "as a new backdrop"
        self.report({"INFO"}, f"Importing {os.path.basename(body['path'])} {target}")
        return {"FINISHED"}


def _menu_import(self, _context):
    self.layout.operator(MULTIPLANE_OT_import_layered_file.bl_idname, text="Multiplane Layered File (.psd/.ora)")


CLASSES = (MULTIPLANE_OT_import_layered_file,)
register, unregister = import_menu_registration(CLASSES, _menu_import)
