"""Live previews' cost: the same jobs with a preview collector installed (what the server does
per job) and without, interleaved in one run, for the independent and joint methods.

The tiny model makes a UNet step far cheaper than SDXL's, so this ratio is an upper bound of
what previews cost a real job (their work, a latent → RGB map and a few PNGs at 1/8 of the
image size, does not grow with the model). Target: at most 1.02 (2 %).

`python -m bench.previews` prints one JSON line.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from bench.common import alternate, tiny_engine

SIZE, STEPS, REPEATS = 256, 20, 4
LAYERS = ("a red fox", "a moss-covered rock", "hanging fern leaves")


def make_request(method: str):
    from inference.request import LayerSpec, StackRequest

    return StackRequest(prompt="a forest clearing at dusk", background="pine trees",
                        layers=tuple(LayerSpec(p) for p in LAYERS), width=SIZE, height=SIZE,
                        steps=STEPS, seed=3, tta_passes=1, method=method).validated()


def run() -> dict:
    from inference.previews import PreviewCollector, collect_previews

    engine = tiny_engine()
    published = []
    collector = PreviewCollector(lambda step, total, pngs: published.append(len(pngs)))
    result = {"benchmark": "live previews on vs off (tiny model: an upper bound of the real cost)",
              "size": SIZE, "steps": STEPS, "target_ratio": 1.02}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for method in ("independent", "joint"):
            request = make_request(method)
            counter = iter(range(10**6))

            def off():
                engine.generate(request, "tiny", root / f"{method}-off-{next(counter)}")

            def on():
                with collect_previews(collector):
                    engine.generate(request, "tiny", root / f"{method}-on-{next(counter)}")

            on()  # warm-up (and the transparent pixel's latent is encoded once)
            published.clear()
            samples = alternate({"off": off, "on": on}, REPEATS)
            off_s, on_s = statistics.median(samples["off"]), statistics.median(samples["on"])
            result[method] = {"seconds_off": round(off_s, 3), "seconds_on": round(on_s, 3),
                              "ratio": round(on_s / off_s, 4),
                              "refreshes_per_job": len(published) // REPEATS}
    return result


if __name__ == "__main__":
    print(json.dumps(run()))
