"""Development tools that never ship: test helpers, the demo driver, the extension packager,
the full-size check and where the reference data lives.

Nothing in `addon/`, `inference/` or `server/` imports this package; the extension manifest
leaves it out of the zip and the inference environment's requirements do not cover it.
"""
