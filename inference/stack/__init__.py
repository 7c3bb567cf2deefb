"""The layer stack on disk: the contract between the engine (writer) and the Blender add-on (reader).

`docs/stack-format.md` is its specification. The package needs only numpy and Pillow (psd-tools
only when a PSD is written or read, OpenEXR only when an EXR is written), so the server can list, validate and serve stacks without torch.

- `manifest`: the format's names, the `LayerStack`/`StackLayer` dataclasses, the one validator
- `composite`: `alpha_over` (composite.png, exports) and the pixel-array check
- `files`: fsync'd writes and the deterministic PNG encoding
- `writer`: `write_stack`, all-or-nothing through a hidden temp folder
- `reader`: `load_stack` and friends, naming the file and field of the first problem
- `folder`: an output folder of stacks: listing, cleaning up after interrupted writes
- `export`: layered PSD and OpenRaster files for painting programs, the multilayer EXR of a stack
- `exr`: the multilayer OpenEXR for compositors (linear, premultiplied, half float)
- `layered_import`: a layered PSD or OpenRaster file back in as a new stack (`import_layered`)
"""
from .composite import alpha_over, check_image_array
from .export import export_exr, export_ora, export_psd, ora_bytes
from .folder import cleanup_temp, list_stacks
from .manifest import (
    BACKGROUND_NAME,
    BLENDED_FILE,
    COMPOSITE_FILE,
    EXR_FILE,
    FORMAT,
    FORMAT_VERSION,
    IMPORTED_METHOD,
    KINDS,
    MANIFEST_FILE,
    ORA_FILE,
    PSD_FILE,
    Box,
    LayerStack,
    StackLayer,
    created_timestamp,
    layer_file_name,
    layer_name,
    mask_file_name,
    scratch_path,
)
from .reader import load_layer_images, load_png, load_stack
from .writer import StackExists, write_stack

__all__ = [
    "BACKGROUND_NAME", "BLENDED_FILE", "COMPOSITE_FILE", "EXR_FILE", "FORMAT", "FORMAT_VERSION",
    "IMPORTED_METHOD", "KINDS", "MANIFEST_FILE", "ORA_FILE", "PSD_FILE", "Box", "LayerStack", "StackExists",
    "StackLayer", "alpha_over", "check_image_array", "cleanup_temp", "created_timestamp", "export_exr", "export_ora",
    "export_psd", "layer_file_name", "layer_name", "list_stacks", "load_layer_images", "load_png",
    "load_stack", "mask_file_name", "ora_bytes", "scratch_path", "write_stack",
]
