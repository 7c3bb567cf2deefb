"""Developer tools that never ship: not in the Blender extension, not needed by the runtime."""
