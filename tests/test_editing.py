"""Layer editing on the tiny model: regenerate one layer (others byte-identical), restyle."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.engine import Engine, EngineSettings
from inference.errors import Cancelled, InvalidRequest
from inference.progress import CancelToken
from inference.request import LayerSpec, StackRequest
from inference.stack import alpha_over, load_layer_images, load_stack


pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineSettings(device="cpu", allow_download=False))


@pytest.fixture(scope="module")
def source(engine, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("edit")
    req = StackRequest(prompt="a forest at dusk", background="pine trees",
                       layers=(LayerSpec("a red fox", box=(0.0, 0.25, 0.75, 1.0), depth=6.0), LayerSpec("a rock")),
                       width=256, height=256, steps=2, guidance=4.0, seed=3, tta_passes=1, method="joint",
                       name="Dusk forest", background_depth=40.0)
    engine.generate(req, "tiny", root / "src")
    return root / "src"


def read(folder: Path, name: str) -> bytes:
    return (folder / name).read_bytes()


def test_regenerate_foreground_keeps_others_byte_identical(engine, source, tmp_path):
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    events = []
    stack = engine.regenerate(source, 1, tmp_path / "e", new_prompt="a grey wolf", tta_passes=1,
                             progress=events.append)
    out = tmp_path / "e"
    for name in ("background.png", "layer_02.png", "mask_02.png"):
        assert read(out, name) == before[name], name
    assert read(out, "layer_01.png") != before["layer_01.png"]
    assert read(out, "blended.png") != before["blended.png"]
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # source untouched
    loaded = load_stack(out)
    src = load_stack(source)
    assert loaded.layers[1].prompt == "a grey wolf" and loaded.layers[1].seed == src.layers[1].seed
    assert [layer.seed for layer in loaded.layers] == [layer.seed for layer in src.layers]
    assert tuple(loaded.layers[1].box) == tuple(src.layers[1].box)
    assert stack.layers[1].mask == "mask_01.png"
    composite = np.asarray(Image.open(out / "composite.png"))
    assert np.array_equal(composite, alpha_over(load_layer_images(loaded, out)))
    assert any(e.phase == "denoise" for e in events)


def test_regenerated_layer_attends_to_kept_layers(engine, source, tmp_path):
    # Same edit against a stack whose kept background differs: the new layer must differ.
    altered = tmp_path / "altered"
    shutil.copytree(source, altered)
    bg = np.asarray(Image.open(altered / "background.png"))
    Image.fromarray(255 - bg).save(altered / "background.png")
    engine.regenerate(source, 2, tmp_path / "a", new_seed=77, tta_passes=1)
    engine.regenerate(altered, 2, tmp_path / "b", new_seed=77, tta_passes=1)
    assert read(tmp_path / "a", "layer_02.png") != read(tmp_path / "b", "layer_02.png")
    # ... and with layers not attending to each other the kept background cannot matter.
    engine.regenerate(source, 2, tmp_path / "c", new_seed=77, tta_passes=1, inter_layer_strength=0.0)
    engine.regenerate(altered, 2, tmp_path / "d", new_seed=77, tta_passes=1, inter_layer_strength=0.0)
    assert read(tmp_path / "c", "layer_02.png") == read(tmp_path / "d", "layer_02.png")


def test_the_engine_writes_depths_and_name_from_the_request_and_edits_keep_them(engine, source, tmp_path):
    # Generate: what the request says (a layer without a depth stays null for the importer).
    src = load_stack(source)
    assert src.name == "Dusk forest"
    assert [layer.depth for layer in src.layers] == [40.0, 6.0, None]
    # Edits are new versions of the same stack: the source's depths and name come through
    # their request, and the same writer puts them into the new stack.
    regenerated = engine.regenerate(source, 1, tmp_path / "e", new_seed=5, tta_passes=1)
    restyled = engine.restyle(source, "oil painting", tmp_path / "r", tta_passes=1)
    for folder, written in ((tmp_path / "e", regenerated), (tmp_path / "r", restyled)):
        loaded = load_stack(folder)
        assert [layer.depth for layer in loaded.layers] == [layer.depth for layer in written.layers] == [40.0, 6.0, None]
        assert loaded.name == written.name == "Dusk forest"


def test_regenerate_background_keeps_foregrounds(engine, source, tmp_path):
    engine.regenerate(source, 0, tmp_path / "e", new_seed=1234, tta_passes=1)
    out = tmp_path / "e"
    for name in ("layer_01.png", "layer_02.png", "mask_01.png", "mask_02.png"):
        assert read(out, name) == read(source, name)
    assert read(out, "background.png") != read(source, "background.png")
    assert load_stack(out).layers[0].seed == 1234


def test_restyle_keeps_seeds_boxes_and_masks(engine, source, tmp_path):
    stack = engine.restyle(source, "watercolor painting", tmp_path / "r", tta_passes=1)
    src = load_stack(source)
    assert stack.prompt == "a forest at dusk, watercolor painting"
    assert [layer.seed for layer in stack.layers] == [layer.seed for layer in src.layers]
    assert [layer.box for layer in stack.layers] == [layer.box for layer in src.layers]
    for name in ("mask_01.png", "mask_02.png"):
        assert read(tmp_path / "r", name) == read(source, name)
    for name in ("background.png", "layer_01.png", "layer_02.png"):
        assert read(tmp_path / "r", name) != read(source, name)


def test_bad_edits_are_refused_and_cancel_leaves_nothing(engine, source, tmp_path):
    with pytest.raises(InvalidRequest) as err:
        engine.regenerate(source, 3, tmp_path / "x", new_seed=1)
    assert err.value.field == "layer_index"
    with pytest.raises(InvalidRequest) as err:
        engine.regenerate(source, 1, tmp_path / "x")
    assert err.value.field == "new_prompt"
    with pytest.raises(InvalidRequest):
        engine.regenerate(source, 1, source, new_seed=1)
    token = CancelToken()

    def on_progress(event):
        if event.phase == "denoise" and event.step == 1:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.regenerate(source, 1, tmp_path / "x", new_seed=9, tta_passes=1, progress=on_progress,
                         cancel=token)
    assert list(tmp_path.iterdir()) == []
