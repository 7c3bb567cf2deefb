"""Per-scene Multiplane settings: `scene.multiplane`.

Only what the operators share lives here (options of a single operator stay on the
operator, where the redo panel remembers them). Further settings (prompts, layers, jobs)
go in as more annotations on `MultiplaneSceneSettings`, or as their own PropertyGroup
hung under it with a PointerProperty; register such groups before this one.
"""
import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty,
                       FloatVectorProperty, IntProperty, PointerProperty, StringProperty)
from bpy.types import PropertyGroup

from . import limits

METHOD_LABELS = {
    "joint": ("Joint", "All layers denoised together, attending to each other: the most coherent scene"),
    "independent": ("Independent", "Each layer on its own: fastest, least coherent"),
    "harmonized": ("Harmonized", "A prior pass plans the scene, then layers are blended for consistency"),
}
METHOD_ITEMS = tuple((method, *METHOD_LABELS[method]) for method in limits.METHODS)
MODELS = (
    ("sdxl", "SDXL", "Stable Diffusion XL with LayerDiffuse transparency (best quality, ~9 GB download)"),
    ("sd15", "SD 1.5", "Stable Diffusion 1.5 with LayerDiffuse transparency (smaller, faster)"),
    ("tiny", "Tiny (test)", "Random-weight test model: noise images in seconds; checks the pipeline"),
)
TTA_CHOICES = tuple((str(passes), str(passes), f"{passes} transparent-decoder pass{'es' if passes > 1 else ''} "
                     f"(flipped and rotated copies averaged)") for passes in limits.TTA_PASSES)


REGENERATE_SEED_MODES = (
    ("KEEP", "Keep Seed", "Keep the layer's seed (then give a new prompt)"),
    ("RANDOM", "Random Seed", "A new random seed for the layer"),
    ("SET", "This Seed", "The seed below"),
)

# Blender keeps only pointers to the strings of dynamic enum items: keep them alive here.
_regenerate_layer_items: list = []


def history_layer_items(item) -> list[tuple[str, str, str]]:
    """(identifier, label, description) per layer of a history item: "0" = background."""
    items = []
    for index, layer in enumerate(item.layers):
        kind = "Background" if index == 0 else f"Layer {index}"
        prompt = layer.prompt.strip() or layer.name
        items.append((str(index), f"{kind}: {prompt[:40]}" if prompt else kind, layer.prompt))
    return items


def _regenerate_layer_enum(self, _context):
    items = []
    if 0 <= self.history_index < len(self.history):
        items = history_layer_items(self.history[self.history_index])
    if not items:
        items = [("0", "Background", ""), ("1", "Layer 1", "")]
    _regenerate_layer_items[:] = items
    return _regenerate_layer_items


def _redraw_viewports(_self, context) -> None:
    """Layout boxes are drawn in the viewport (overlay.py): show an edit at once."""
    for area in getattr(context.screen, "areas", ()):
        if area.type == "VIEW_3D":
            area.tag_redraw()


def _is_backdrop(_self, collection: bpy.types.Collection) -> bool:
    return collection.get("multiplane_stack") is not None


class MultiplaneLayer(PropertyGroup):
    """One foreground layer to generate (back to front)."""

    prompt: StringProperty(name="Prompt", description="What this layer shows (the global prompt is added)",
                           default="", maxlen=limits.MAX_PROMPT_CHARS)
    use_box: BoolProperty(name="Box", description="Confine the layer to a layout box", default=False,
                          update=_redraw_viewports)
    box: FloatVectorProperty(
        name="Box", description="Layout box: left, top, right, bottom, as fractions of the camera frame at the "
                                "shot's first frame (top-left origin; the canvas's margins lie outside it)",
        size=4, min=0.0, max=1.0, default=(0.25, 0.25, 0.75, 0.75), subtype="NONE", update=_redraw_viewports)
    depth: FloatProperty(
        name="Depth", description="Distance from the camera when imported (0: spread automatically)",
        default=0.0, min=0.0, soft_max=100.0, unit="LENGTH")
    proxy: PointerProperty(
        name="Proxy", type=bpy.types.Object,
        description="Blockout object this layer is laid out from: its box and depth are read again from the "
                    "object's place in the camera frame at the shot's first frame on every Generate")


class MultiplaneHistoryLayer(PropertyGroup):
    """One layer of a generated stack as stack.json lists it (name = file stem), so the
    regenerate-one-layer menu can name the layers without reading files at every redraw."""

    prompt: StringProperty(name="Prompt", description="The layer's prompt, as stack.json records it")
    file: StringProperty(name="File", description="The layer's image (for its thumbnail)", subtype="FILE_PATH")


class MultiplaneHistoryItem(PropertyGroup):
    """A stack generated for this scene (name = display name)."""

    path: StringProperty(name="Folder", description="The stack's folder (its PNGs and stack.json)",
                        subtype="DIR_PATH")
    job_id: StringProperty(name="Job", description="The job's id on the server that made the stack")
    server: StringProperty(name="Server", description="Which server knows the job: "
                           "'REMOTE <url>' or 'LOCAL <output folder>'")
    layers: CollectionProperty(type=MultiplaneHistoryLayer, name="Layers",
                               description="The stack's layers, background first")
    created: StringProperty(name="Created", description="When the stack was made (UTC, from its stack.json)")
    prompt: StringProperty(name="Prompt", description="The whole scene's prompt the stack was made from")
    model: StringProperty(name="Model", description="The model that made the stack")
    method: StringProperty(name="Method", description="The method that made the stack")
    request: StringProperty(name="Request", description="The submitted request, as JSON")
    size: StringProperty(name="Size", description="The stack's width x height in pixels")
    thumbnail: StringProperty(name="Thumbnail", description="The stack's composite image (its thumbnail)",
                              subtype="FILE_PATH")


class MultiplaneSceneSettings(PropertyGroup):
    """Multiplane settings of one scene."""

    stack_name: StringProperty(name="Name", description="Name of the generated stack and its backdrop "
                               "collection (empty: the scene's name)", default="", maxlen=limits.MAX_NAME_CHARS)
    prompt: StringProperty(name="Prompt", description="The whole scene, shared by every layer",
                           default="", maxlen=limits.MAX_PROMPT_CHARS)
    negative_prompt: StringProperty(name="Negative", description="What no layer should show",
                                    default="", maxlen=limits.MAX_PROMPT_CHARS)
    background_prompt: StringProperty(name="Background", description="The background layer's own prompt",
                                      default="", maxlen=limits.MAX_PROMPT_CHARS)
    layers: CollectionProperty(type=MultiplaneLayer, name="Foreground Layers",
                               description="The foreground layers to generate, back to front")
    layer_index: IntProperty(name="Active Layer", description="The selected foreground layer", default=0, min=0,
                             update=_redraw_viewports)
    show_layout_boxes: BoolProperty(
        name="Show Boxes in Camera View",
        description="Draw each boxed layer's layout box and name over the camera frame in the 3D Viewport "
                    "(camera view only; the selected layer's box is highlighted)",
        default=True, update=_redraw_viewports)
    method: EnumProperty(name="Method", description="How the layers are made together", items=METHOD_ITEMS,
                         default="joint")
    model: EnumProperty(name="Model", description="The diffusion model (weights are downloaded once)",
                        items=MODELS, default="sdxl")
    steps: IntProperty(name="Steps", description="Denoising steps", default=30,
                        min=limits.MIN_STEPS, max=limits.MAX_STEPS)
    guidance: FloatProperty(name="Guidance", description="How strictly to follow the prompts (CFG scale)",
                            default=5.0, min=limits.MIN_GUIDANCE, max=limits.MAX_GUIDANCE)
    seed: IntProperty(name="Seed", description="Same seed and settings: same stack", default=0, min=0)
    randomize_seed: BoolProperty(name="New Seed Each Time", description="Pick a random seed on every Generate",
                                 default=False)
    tta_passes: EnumProperty(
        name="Decoder Passes", description="Transparent decoder passes (more: cleaner alpha edges, slower)",
        items=TTA_CHOICES, default="4")
    export_psd: BoolProperty(
        name="Layered PSD", description="Also write stack.psd, a layer per stack layer, to finish the backdrop "
        "in a painting program and bring it back with Import Layered File", default=False)
    export_exr: BoolProperty(
        name="Multilayer EXR", description="Also write stack.exr: every layer and the composite in one "
        "linear, premultiplied OpenEXR, for compositors (Build Compositor can use it)", default=False)
    history: CollectionProperty(type=MultiplaneHistoryItem, name="History",
                                description="Stacks generated for this scene, newest first")
    history_index: IntProperty(name="Active Stack", description="The selected stack of the history", default=0, min=0)
    regenerate_layer: EnumProperty(name="Layer", description="The layer of the selected stack to regenerate "
                                   "(the others stay exactly as they are)", items=_regenerate_layer_enum)
    regenerate_prompt: StringProperty(name="New Prompt", description="The layer's new prompt (empty: keep it)",
                                      default="", maxlen=limits.MAX_PROMPT_CHARS)
    regenerate_seed_mode: EnumProperty(name="Seed", description="Which seed the regenerated layer gets",
                                       items=REGENERATE_SEED_MODES, default="KEEP")
    regenerate_seed: IntProperty(name="New Seed", description="The layer's seed when Seed is This Seed",
                                  default=0, min=0)

    use_shot_margins: BoolProperty(
        name="Margins for the Camera Move",
        description="Generate beyond the camera frame as far as the camera's motion over the scene's frame range "
                    "sees (read at every Generate), so the move never shows a plane's edge",
        default=True)
    shot_margins: FloatVectorProperty(
        name="Shot Margins", size=4, min=0.0, default=(0.0, 0.0, 0.0, 0.0),
        description="Margins the camera move needed when last read: left, top, right, bottom, as fractions "
                    "of the frame (Read Shot or Generate updates them)")
    shot_warning: StringProperty(
        name="Shot Warning",
        description="What the backdrop lacks for the camera move, as Read Shot or Parallax Camera Move last found "
                    "(empty: nothing)")

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


CLASSES = (MultiplaneLayer, MultiplaneHistoryLayer, MultiplaneHistoryItem, MultiplaneSceneSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.multiplane = PointerProperty(type=MultiplaneSceneSettings)


def unregister() -> None:
    if hasattr(bpy.types.Scene, "multiplane"):
        del bpy.types.Scene.multiplane
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
