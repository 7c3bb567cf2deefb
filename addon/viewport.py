"""What Solid mode (Workbench) needs to show the layer planes as they render.

By default Solid mode colours objects by their material's viewport colour under studio
lighting: the planes show as grey, lit cards. With *Texture* colour it shows each
material's active Image Texture (the importer makes the layer image the active node) with
its alpha, and *Flat* lighting keeps the image's own values. Material Preview (EEVEE) uses
the planes' real material and needs nothing. Standard view transform: see importer's note.
"""
from __future__ import annotations


def _solid_shading_settings(scene, screen) -> list:
    """The Solid-mode shading settings of every 3D Viewport on `screen` (may be None), and
    the scene's own, which Workbench renders use."""
    found = [scene.display.shading]
    for area in getattr(screen, "areas", ()) or ():
        if area.type == "VIEW_3D":
            found += [space.shading for space in area.spaces if space.type == "VIEW_3D"]
    return found


def show_layers_in_solid_mode(scene, screen, standard_view: bool = True) -> int:
    """Flat lighting + texture colour for Solid mode; returns how many viewports changed."""
    settings = _solid_shading_settings(scene, screen)
    for shading in settings:
        shading.light = "FLAT"
        shading.color_type = "TEXTURE"
    if standard_view:
        scene.view_settings.view_transform = "Standard"
    return len(settings) - 1
