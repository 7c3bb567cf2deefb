"""`make demo`: the main job, headless — generate a backdrop stack end to end.

Uses the real default model (sdxl) when its weights are on disk; otherwise the tiny
random-weight model, and says so loudly (its pictures are noise-like by design).
"""
from __future__ import annotations

import sys
from pathlib import Path

DEMO_PROMPT = "a quiet forest clearing at dusk, soft volumetric light, painterly"
DEMO_BACKGROUND = "tall pine trees and distant mountains"
DEMO_LAYERS = ("a moss-covered boulder", "a red fox sitting", "hanging fern leaves")


def choose_model(requested: str | None) -> tuple[str, str]:
    """(model, why): the requested one, else sdxl if complete on disk, else tiny."""
    if requested:
        return requested, "requested"
    from inference.models import preset_availability

    sdxl = next((p for p in preset_availability(None) if p["name"] == "sdxl"), None)
    if sdxl is not None and sdxl["available"]:
        return "sdxl", "SDXL weights found on disk"
    return "tiny", "SDXL + LayerDiffuse weights are not on this machine"


def run_demo(out: Path, model: str | None = None, device: str = "auto") -> int:
    from inference.engine import Engine, EngineSettings
    from inference.request import LayerSpec, StackRequest

    from .cli import ProgressBar

    model, why = choose_model(model)
    if model == "tiny":
        banner = ("=" * 72 + "\n"
                  f"DEMO USES THE TINY RANDOM-WEIGHT MODEL ({why}).\n"
                  "The images are meaningless noise; the pipeline, files and format are real.\n"
                  "Run `python -m server generate --model sdxl ...` (downloads ~9 GB) or put the\n"
                  "weights in the Hugging Face cache to get real pictures.\n" + "=" * 72)
        print(banner, file=sys.stderr)
    big = model != "tiny"
    request = StackRequest(
        prompt=DEMO_PROMPT, background=DEMO_BACKGROUND,
        layers=tuple(LayerSpec(prompt=p) for p in DEMO_LAYERS),
        width=1024 if big else 512, height=576 if big else 320,
        steps=30 if big else 4, guidance=5.0, seed=7, tta_passes=8 if big else 2,
        name="Forest clearing")
    out = Path(out)
    stack_dir = out / "stack"
    if stack_dir.exists():
        import shutil

        shutil.rmtree(stack_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(EngineSettings(device=device))
    bar = ProgressBar()
    try:
        stack = engine.generate(request, model, stack_dir, progress=bar, export_psd=True)
    finally:
        bar.close()
    print(f"demo: wrote {stack_dir} with model {model!r}: "
          + ", ".join(layer.file for layer in stack.layers) + f", {stack.composite}")
    return 0
