"""Multiplane's Blender side: import layer stacks as camera-filling planes, composite them,
and preview parallax camera moves.

Uses bpy and the standard library only (never the engine in `inference/`). The bpy-free
modules (`geometry`, `stack_reader`, `limits`, `client`, `backend`, `installer`, and `overlay`'s maths) import without Blender, so they can be tested and
reused anywhere; the Blender modules load when the add-on registers. A module joins by
having `register()` and `unregister()` and being listed in `_module_names`.
"""
import importlib

# Registered in this order, unregistered in reverse.
_module_names = ("properties", "backdrop", "preferences", "generate", "layer_list", "history", "history_library",
                 "interchange", "shot_operators", "panel", "overlay", "watcher")


def _modules() -> list:
    return [importlib.import_module(f"{__name__}.{name}") for name in _module_names]


def register() -> None:
    done = []
    try:
        for module in _modules():
            module.register()
            done.append(module)
    except Exception:
        # Leave Blender as it was, so enabling again after a fix works.
        for module in reversed(done):
            module.unregister()
        raise


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
