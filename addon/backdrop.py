"""The operators on a backdrop: import a stack as planes, build its compositor, key a
parallax camera move. Thin: options, reports, undo; the work lives in importer,
compositor and parallax.

User mistakes (no camera, not a stack, bad depths) end as one ERROR report and
CANCELLED, never as a traceback.
"""
from dataclasses import fields

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty
from bpy.types import Operator
from bpy_extras.io_utils import ImportHelper

from . import compositor, importer, parallax, shot, viewport

DEFAULTS = importer.ImportSettings()


def _backdrop_or_report(operator: Operator, scene: bpy.types.Scene):
    collection = importer.find_backdrop(scene)
    if collection is None:
        operator.report({"ERROR"}, "No Multiplane backdrop to work on: import a layer stack first "
                                   "(or pick one as the scene's Multiplane backdrop)")
    return collection


class ImportOptions:
    """The import options as operator properties, one per field of importer.ImportSettings
    (whose values are the defaults), so the redo panel shows and remembers them."""

    near: FloatProperty(
        name="Near",
        description="Distance of the nearest foreground layer from the camera",
        default=DEFAULTS.near, min=0.001, soft_max=100.0, unit="LENGTH",
    )
    far: FloatProperty(
        name="Far",
        description="Distance of the background from the camera (foregrounds spread between Near and Far)",
        default=DEFAULTS.far, min=0.002, soft_max=1000.0, unit="LENGTH",
    )
    use_stack_depths: BoolProperty(
        name="Use Stack Depths",
        description="Place layers at the depths stored in the stack where it has them",
        default=DEFAULTS.use_stack_depths,
    )
    fit_mode: EnumProperty(
        name="Fit",
        description="How each layer's image is fitted to the camera frame when their aspects differ",
        items=(
            ("FILL", "Fill Frame", "Stretch each layer to exactly fill the camera frame"),
            ("COVER", "Cover Frame", "Keep the layer's proportions and cover the frame, cropping the overflow"),
        ),
        default=DEFAULTS.fit_mode,
    )
    overscan: FloatProperty(
        name="Overscan",
        description="Make every plane this much larger than the frame (1 = exact fit)",
        default=DEFAULTS.overscan, min=1.0, soft_max=3.0,
    )
    interpolation: EnumProperty(
        name="Interpolation",
        description="Texture filtering of the layer images",
        items=(
            ("Linear", "Linear", "Smooth texture filtering"),
            ("Closest", "Closest", "No filtering: sharp texels"),
            ("Cubic", "Cubic", "Cubic texture filtering"),
        ),
        default=DEFAULTS.interpolation,
    )
    render_method: EnumProperty(
        name="Render Method",
        description="How EEVEE draws the layers' transparency",
        items=(
            ("BLENDED", "Blended", "Smooth alpha blending, sorted back to front"),
            ("DITHERED", "Dithered", "Dithered alpha: works with render passes and ray tracing"),
        ),
        default=DEFAULTS.render_method,
    )

    shader: EnumProperty(
        name="Shader",
        description="How the planes are shaded (as in Import Images as Planes)",
        items=(
            ("EMISSION", "Emission (Unlit)", "The image's own colours, unaffected by lights: renders give them back"),
            ("PRINCIPLED", "Principled", "A Principled BSDF coloured by the image: scene lights shade the planes"),
            ("SHADELESS", "Shadeless", "Unlit and seen only by the camera: the planes light and reflect nothing"),
        ),
        default=DEFAULTS.shader,
    )
    emission_strength: FloatProperty(
        name="Emission Strength",
        description="Brightness of the Emission and Shadeless shaders (1: the image's own values)",
        default=DEFAULTS.emission_strength, min=0.0, soft_max=10.0,
    )
    relative_paths: BoolProperty(
        name="Relative Paths",
        description="In a saved .blend, refer to the copied images relative to it (//multiplane/…), "
                    "so the folder can move; off: absolute paths",
        default=DEFAULTS.relative_paths,
    )

    def import_settings(self) -> importer.ImportSettings:
        return importer.ImportSettings(**{f.name: getattr(self, f.name) for f in fields(importer.ImportSettings)})


class MULTIPLANE_OT_import_stack(Operator, ImportHelper, ImportOptions):
    """Import a layer stack as image planes that exactly fill the active camera's view"""

    bl_idname = "multiplane.import_stack"
    bl_label = "Import Layer Stack"
    bl_options = {"REGISTER", "UNDO"}

    # The file browser shows stack.json files; a stack folder works as well as its manifest.
    filename_ext = ".json"
    filter_glob: StringProperty(default="*.json", options={"HIDDEN"})

    def invoke(self, context, event):
        # Open the file browser at the scene's last stack; buttons that already know the stack
        # call the operator with EXEC_DEFAULT and a filepath instead.
        if context.scene.multiplane.stack_path:
            self.filepath = context.scene.multiplane.stack_path
        return ImportHelper.invoke(self, context, event)

    def execute(self, context):
        scene = context.scene
        if not self.filepath.strip():
            self.report({"ERROR"}, "Cannot import the layer stack: no stack given. Pick a stack's stack.json "
                                   "(or its folder) in the file "
                                   "browser; to import a generated stack again, use Import in the "
                                   "Stacks Library")
            return {"CANCELLED"}
        path = bpy.path.abspath(self.filepath)
        try:
            result = importer.import_stack(context, path, self.import_settings())
        except importer.ImportFailed as error:
            self.report({"ERROR"}, f"Cannot import the layer stack: {error}")
            return {"CANCELLED"}
        scene.multiplane.backdrop = result.collection
        scene.multiplane.stack_path = path
        verb = "Re-imported" if result.replaced else "Imported"
        storage = "packed into the .blend" if result.packed else "saved beside the .blend"
        self.report({"INFO"}, f"{verb} {len(result.planes)} layers into {result.collection.name!r} "
                              f"at {result.depths[0]:g} to {result.depths[-1]:g} from the camera; images {storage}")
        for note in result.notes:
            self.report({"WARNING"}, note)
        return {"FINISHED"}


class MULTIPLANE_OT_show_layers_in_solid_mode(Operator):
    """Make Solid mode show the layer images with their transparency: flat lighting and texture colour in this window's 3D Viewports and for Workbench renders (Material Preview needs nothing)"""

    bl_idname = "multiplane.show_layers_in_solid_mode"
    bl_label = "Show Layers in Solid Mode"
    bl_options = {"REGISTER", "UNDO"}

    standard_view: BoolProperty(
        name="Standard View Transform",
        description="Also set the scene's view transform to Standard, so the layers show their own colours",
        default=True,
    )

    def execute(self, context):
        changed = viewport.show_layers_in_solid_mode(context.scene, context.screen, self.standard_view)
        self.report({"INFO"}, f"Solid mode shows the layer textures (flat lighting) in {changed} viewport(s) "
                              "and Workbench renders")
        return {"FINISHED"}


class MULTIPLANE_OT_build_compositor(Operator):
    """Composite the backdrop's layers around the render with Alpha Over nodes"""

    bl_idname = "multiplane.build_compositor"
    bl_label = "Build Backdrop Compositor"
    bl_options = {"REGISTER", "UNDO"}

    behind: IntProperty(
        name="Layers Behind Render",
        description="How many stack layers, from the back, go behind the rendered image (1: the background)",
        default=1, min=0, soft_max=8,
    )
    hide_planes: BoolProperty(
        name="Hide Planes in Render",
        description="Exclude the backdrop's planes from the render, so the layers are not there twice",
        default=True,
    )
    source: EnumProperty(
        name="Layers From",
        description="Which files of the stack the compositor reads",
        items=(
            ("AUTO", "Automatic", "The stack's multilayer EXR when it has one, else the layer PNGs"),
            ("PNG", "Layer PNGs", "One Image node per layer (the images the planes show)"),
            ("EXR", "Multilayer EXR", "One Image node on the stack's stack.exr, one output per layer "
                                      "(generate with 'Multilayer EXR' on)"),
        ),
        default="AUTO",
    )

    def execute(self, context):
        scene = context.scene
        collection = _backdrop_or_report(self, scene)
        if collection is None:
            return {"CANCELLED"}
        try:
            result = compositor.build_compositor(scene, collection, self.behind, self.hide_planes, self.source)
        except compositor.CompositorFailed as error:
            self.report({"ERROR"}, f"Cannot build the compositor: {error}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Compositor (from {result.source}): " + " < ".join(reversed(result.order))
                    + " (front to back)")
        return {"FINISHED"}


class MULTIPLANE_OT_parallax_move(Operator):
    """Key a camera move over the scene's frame range and say whether the backdrop's margins cover it (planes are enlarged only with Scale Planes)"""

    bl_idname = "multiplane.parallax_move"
    bl_label = "Parallax Camera Move"
    bl_options = {"REGISTER", "UNDO"}

    truck: FloatProperty(
        name="Truck", description="Sideways move, along the camera's right axis",
        default=1.0, soft_min=-10.0, soft_max=10.0, unit="LENGTH",
    )
    pedestal: FloatProperty(
        name="Pedestal", description="Vertical move, along the camera's up axis",
        default=0.0, soft_min=-10.0, soft_max=10.0, unit="LENGTH",
    )
    dolly: FloatProperty(
        name="Dolly", description="Move forward, along the view axis (negative: backward)",
        default=0.0, soft_min=-10.0, soft_max=10.0, unit="LENGTH",
    )
    scale_planes: BoolProperty(
        name="Scale Planes",
        description="Enlarge the planes about the frame centre until the move shows no edge. This magnifies "
                    "the layers (frame 1 no longer matches the approved framing); without it, a backdrop that "
                    "lacks margins for the move is reported, to be extended with Extend for Shot",
        default=False,
    )
    margin: FloatProperty(
        name="Margin", description="Extra overscan on top of what the move needs (with Scale Planes)",
        default=0.01, min=0.0, max=1.0, subtype="FACTOR",
    )
    interpolation: EnumProperty(
        name="Easing",
        description="How the camera speeds up and slows down between the first and the last frame",
        items=(
            ("BEZIER", "Ease In/Out", "Start and stop smoothly"),
            ("LINEAR", "Linear", "Constant speed"),
        ),
        default="BEZIER",
    )

    def execute(self, context):
        scene = context.scene
        if scene.camera is None:
            self.report({"ERROR"}, "The scene has no active camera to move")
            return {"CANCELLED"}
        collection = _backdrop_or_report(self, scene)
        if collection is None:
            return {"CANCELLED"}
        try:
            result = parallax.parallax_move(scene, collection, self.truck, self.pedestal, self.dolly,
                                            self.margin, self.interpolation, self.scale_planes)
        except parallax.ParallaxFailed as error:
            self.report({"ERROR"}, f"Cannot make the camera move: {error}")
            return {"CANCELLED"}
        keyed = f"Keyed the camera move on frames {result.frame_start}-{result.frame_end}"
        settings = scene.multiplane
        settings.shot_warning = ""
        if not self.scale_planes:
            if result.shortfall_error:
                settings.shot_warning = f"The backdrop cannot fill this move: {result.shortfall_error}"
                self.report({"WARNING"}, f"{keyed}, but the backdrop cannot fill it: {result.shortfall_error}")
            elif result.shortfall is not None and result.shortfall.lacking:
                settings.shot_warning = f"{collection.name}: {shot.describe_shortfall(result.shortfall)}"
                self.report({"WARNING"}, f"{keyed}; {shot.describe_shortfall(result.shortfall)}")
            else:
                self.report({"INFO"}, f"{keyed}; the backdrop's margins cover it (planes unchanged)")
            return {"FINISHED"}
        largest = max(result.overscans.values())
        self.report({"INFO"}, f"{keyed}; "
                              f"planes enlarged up to {largest:.3f}x so their edges stay out of view "
                              "(the layers are magnified: frame 1 no longer matches the framing before the move)")
        if largest > 2.0:
            self.report({"WARNING"}, f"overscan {largest:.2f}x stretches the nearest layer a lot; "
                                     "a smaller move or farther layers keep it sharper")
        return {"FINISHED"}


def _menu_import(self, _context):
    self.layout.operator(MULTIPLANE_OT_import_stack.bl_idname, text="Multiplane Layer Stack (stack.json)")


CLASSES = (
    MULTIPLANE_OT_import_stack,
    MULTIPLANE_OT_show_layers_in_solid_mode,
    MULTIPLANE_OT_build_compositor,
    MULTIPLANE_OT_parallax_move,
)



def import_menu_registration(classes, draw_menu):
    """(register, unregister) of a module's `classes` plus its File › Import entry
    `draw_menu` (the entry goes after the classes and comes off before them)."""
    register_classes, unregister_classes = bpy.utils.register_classes_factory(classes)

    def register() -> None:
        register_classes()
        bpy.types.TOPBAR_MT_file_import.append(draw_menu)

    def unregister() -> None:
        bpy.types.TOPBAR_MT_file_import.remove(draw_menu)
        unregister_classes()

    return register, unregister


register, unregister = import_menu_registration(CLASSES, _menu_import)
