"""Multiplane Blender extension entry point (see blender_manifest.toml).

Blender imports this package and calls register()/unregister(); the add-on itself is the
`addon` sub-package. Nothing here imports bpy at import time, so tools that import the
repository root without Blender (pytest, packaging) do not fail.
"""


def register() -> None:
    from .addon import register as register_addon

    register_addon()


def unregister() -> None:
    from .addon import unregister as unregister_addon

    unregister_addon()
