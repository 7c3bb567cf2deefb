"""Per-scene Multiplane settings: `scene.multiplane`.

Only what the operators share lives here (options of a single operator stay on the
operator, where the redo panel remembers them). Further settings (prompts, layers, jobs)
go in as more annotations on `MultiplaneSceneSettings`, or as their own PropertyGroup
hung under it with a PointerProperty; register such groups before this one.
"""
import bpy
from bpy.props import PointerProperty, StringProperty
from bpy.types import PropertyGroup


def _is_backdrop(_self, collection: bpy.types.Collection) -> bool:
    return collection.get("multiplane_stack") is not None


class MultiplaneSceneSettings(PropertyGroup):
    """Multiplane settings of one scene."""

    stack_path: StringProperty(
        name="Stack",
        description="Layer stack folder (or its stack.json) to import",
        subtype="FILE_PATH",
        default="",
    )
    backdrop: PointerProperty(
        name="Backdrop",
        description="Imported backdrop the compositor and previs operators work on",
        type=bpy.types.Collection,
        poll=_is_backdrop,
    )


CLASSES = (MultiplaneSceneSettings,)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.multiplane = PointerProperty(type=MultiplaneSceneSettings)


def unregister() -> None:
    if hasattr(bpy.types.Scene, "multiplane"):
        del bpy.types.Scene.multiplane
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
