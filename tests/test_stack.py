"""The on-disk layer stack: round trip, compositing, determinism, atomic writes, strict reading,
PSD/ORA exports. Small images (64x48) keep this fast."""
from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image

from inference.errors import Cancelled, StackFormatError
from inference.progress import CancelToken
from inference.stack import (
    FORMAT_VERSION,
    LayerStack,
    StackExists,
    StackLayer,
    alpha_over,
    cleanup_temp,
    export_ora,
    export_psd,
    list_stacks,
    load_layer_images,
    load_png,
    load_stack,
    ora_bytes,
    write_stack,
)
from inference.stack import writer as stack_writer

H, W = 48, 64
SHA = "sha256:" + "ab" * 32


def make_layers(seed: int = 0, foregrounds: int = 2):
    """Random pixels with alpha that covers 0, 255 and everything in between."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    fgs = []
    for _ in range(foregrounds):
        fg = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
        fg[:8, :, 3] = 0
        fg[8:16, :, 3] = 255
        fgs.append(fg)
    return background, fgs


def make_stack(foregrounds: int = 2, **overrides) -> LayerStack:
    layers = [StackLayer(name="", kind="background", prompt="a misty valley", seed=11)]
    for i in range(foregrounds):
        layers.append(StackLayer(name="" if i else "old oak", kind="foreground", prompt=f"thing {i}",
                                 seed=100 + i, box=(0.1, 0.2, 0.6, 0.9) if i == 0 else None,
                                 depth=4.5 if i == 0 else None))
    fields = dict(
        name="Valley", method="independent", width=W, height=H, prompt="fantasy landscape",
        negative_prompt="blurry", seed=7, steps=20, guidance=5.5,
        model={"preset": "sdxl", "base": "stabilityai/sdxl", "files": {"unet.safetensors": SHA, "vae": None}},
        layers=layers, timings={"load": 1.25, "denoise": 3.5},
    )
    fields.update(overrides)
    return LayerStack(**fields)


@pytest.fixture
def written(tmp_path):
    """A valid stack folder with a mask and a blend; returns (folder, manifest, arrays)."""
    background, fgs = make_layers()
    mask = (np.arange(H * W, dtype=np.uint32).reshape(H, W) % 256).astype(np.uint8)
    blended = 255 - background
    folder = tmp_path / "out" / "valley"
    result = write_stack(folder, make_stack(), background, fgs, masks=[None, mask], blended=blended)
    return folder, result, dict(background=background, foregrounds=fgs, mask=mask, blended=blended)


def hidden_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- round trip


def test_round_trip(written):
    folder, result, arrays = written
    loaded = load_stack(folder)
    assert loaded == result
    assert load_stack(folder / "stack.json") == result
    assert [layer.file for layer in loaded.layers] == ["background.png", "layer_01.png", "layer_02.png"]
    assert [layer.name for layer in loaded.layers] == ["background", "old oak", "layer_02"]
    assert loaded.layers[1].box == (0.1, 0.2, 0.6, 0.9) and loaded.layers[1].depth == 4.5
    assert loaded.layers[2].mask == "mask_02.png" and loaded.layers[1].mask is None
    assert loaded.blended == "blended.png" and loaded.composite == "composite.png"
    assert loaded.model["files"] == {"unet.safetensors": SHA, "vae": None}
    assert loaded.timings["denoise"] == 3.5 and loaded.timings["save"] > 0
    assert loaded.name == "Valley" and loaded.format_version == FORMAT_VERSION
    assert loaded.created.endswith("Z")

    images = load_layer_images(loaded, folder)
    np.testing.assert_array_equal(images[0], arrays["background"])
    for got, want in zip(images[1:], arrays["foregrounds"]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(load_png(folder / "mask_02.png", "L", W, H), arrays["mask"])
    np.testing.assert_array_equal(load_png(folder / "blended.png", "RGB", W, H), arrays["blended"])
    # Only what the format lists is in the folder.
    assert sorted(os.listdir(folder)) == ["background.png", "blended.png", "composite.png", "layer_01.png",
                                          "layer_02.png", "mask_02.png", "stack.json"]


def test_frame_round_trips_and_old_stacks_mean_the_whole_image(tmp_path):
    background, fgs = make_layers()
    stack = make_stack(frame=(0.125, 0.0, 0.875, 0.75), shot={"margins": [0.1, 0, 0.1, 0.33]})
    written = write_stack(tmp_path / "framed", stack, background, fgs)
    data = json.loads((tmp_path / "framed" / "stack.json").read_text())
    assert data["frame"] == [0.125, 0.0, 0.875, 0.75] and data["shot"] == {"margins": [0.1, 0, 0.1, 0.33]}
    loaded = load_stack(tmp_path / "framed")
    assert loaded == written and loaded.frame == (0.125, 0.0, 0.875, 0.75)
    assert loaded.layers[1].box == (0.1, 0.2, 0.6, 0.9)  # boxes stay in frame coordinates
    # A stack written before frames existed has no key at all: the whole image.
    plain = tmp_path / "plain"
    write_stack(plain, make_stack(), background, fgs)
    data = json.loads((plain / "stack.json").read_text())
    assert data["frame"] is None
    del data["frame"], data["shot"]
    (plain / "stack.json").write_text(json.dumps(data))
    old = load_stack(plain)
    assert old.frame is None and old.shot is None and old.frame_rect == (0.0, 0.0, 1.0, 1.0)


def test_json_round_trip_and_unknown_keys_ignored():
    stack = make_stack(created="2025-01-02T03:04:05Z")
    stack.layers[0].file = "background.png"
    for i, layer in enumerate(stack.layers[1:], start=1):
        layer.file = f"layer_{i:02d}.png"
    stack.layers[0].name = "background"
    stack.layers[2].name = "layer_02"
    again = LayerStack.from_json(stack.to_json())
    assert again.to_dict() == stack.to_dict()
    data = json.loads(stack.to_json())
    data["future_optional_key"] = {"x": 1}
    data["layers"][1]["future_layer_key"] = 3
    assert LayerStack.from_dict(data).to_dict() == stack.to_dict()


def test_caller_stack_not_modified(tmp_path):
    background, fgs = make_layers()
    stack = make_stack()
    before = stack.to_dict()
    write_stack(tmp_path / "s", stack, background, fgs)
    assert stack.to_dict() == before


# --------------------------------------------------------------------------- compositing


def _srgb_decode(value: int) -> float:
    """Independent sRGB decode of one 8-bit value (IEC 61966-2-1), plain Python floats."""
    c = value / 255.0
    return c / 12.92 if c <= 0.04045 else math.pow((c + 0.055) / 1.055, 2.4)


def _srgb_encode(linear: float) -> int:
    """Independent sRGB encode to the nearest 8-bit value, by searching the decode table:
    the code whose decoded value is nearest in encoded space (so no second copy of the curve)."""
    linear = min(max(linear, 0.0), 1.0)
    encoded = 1.055 * linear ** (1 / 2.4) - 0.055 if linear > 0.0031308 else 12.92 * linear
    return int(math.floor(encoded * 255.0 + 0.5))


def _linear_over_pixel(background, foregrounds) -> list[int]:
    """One pixel composited in linear light with plain Python floats, channel by channel."""
    out = []
    for ch in range(3):
        value = _srgb_decode(int(background[ch]))
        for fg in foregrounds:
            a = int(fg[3]) / 255.0
            value = _srgb_decode(int(fg[ch])) * a + value * (1.0 - a)
        out.append(_srgb_encode(value))
    return out


def test_alpha_over_is_the_linear_light_over_of_an_independent_implementation():
    background, fgs = make_layers(seed=3, foregrounds=3)
    ours = alpha_over([background, *fgs])
    assert ours.dtype == np.uint8 and ours.shape == (H, W, 3)
    rng = np.random.default_rng(7)
    pixels = [(y, x) for y in range(0, H, 5) for x in range(0, W, 3)] + \
        [tuple(p) for p in rng.integers(0, (H, W), (200, 2))]
    for y, x in pixels:
        want = _linear_over_pixel(background[y, x], [fg[y, x] for fg in fgs])
        assert ours[y, x].tolist() == want, (y, x)


def test_alpha_over_differs_from_the_encoded_value_over_only_where_partly_transparent():
    background, fgs = make_layers(seed=5, foregrounds=1)
    fg = fgs[0]
    ours = alpha_over([background, fg]).astype(int)
    canvas = Image.fromarray(np.dstack([background, np.full((H, W), 255, np.uint8)]), "RGBA")
    encoded = np.asarray(Image.alpha_composite(canvas, Image.fromarray(fg, "RGBA")))[..., :3].astype(int)
    opaque, clear = fg[..., 3] == 255, fg[..., 3] == 0
    np.testing.assert_array_equal(ours[opaque], fg[..., :3][opaque])
    np.testing.assert_array_equal(ours[clear], background[clear])
    partial = ~(opaque | clear)
    assert np.abs(ours - encoded)[partial].mean() > 3  # really a different blend, not a copy


def test_alpha_over_edge_values():
    background = np.zeros((2, 2, 3), np.uint8)
    background[..., 1] = 255  # green
    fg = np.zeros((2, 2, 4), np.uint8)
    fg[..., 0] = 255  # red
    fg[0, 0, 3] = 0      # invisible: background unchanged
    fg[0, 1, 3] = 255    # opaque: foreground exactly
    fg[1, 0, 3] = 128    # linear 0.502 red + 0.498 green -> sRGB 188, 187 (encoded-value over: 128, 127)
    fg[1, 1, 3] = 51     # linear 0.2 red + 0.8 green -> 124, 231
    out = alpha_over([background, fg])
    assert out[0, 0].tolist() == [0, 255, 0]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[1, 0].tolist() == [188, 187, 0]
    assert out[1, 1].tolist() == [124, 231, 0]
    np.testing.assert_array_equal(alpha_over([background]), background)


@pytest.mark.parametrize("layers, message", [
    ([], "at least the background"),
    ([np.zeros((4, 4, 4), np.uint8)], "(H, W, 3)"),
    ([np.zeros((4, 4, 3), np.float32)], "uint8"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)], "layers_back_to_front[1]"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 4), np.uint8)], "4x4"),
])
def test_alpha_over_rejects_bad_input(layers, message):
    with pytest.raises(ValueError, match=None) as info:
        alpha_over(layers)
    assert message in str(info.value)


def test_composite_file_is_alpha_over_of_layers(written):
    folder, result, arrays = written
    composite = load_png(folder / result.composite, "RGB", W, H)
    np.testing.assert_array_equal(composite, alpha_over([arrays["background"], *arrays["foregrounds"]]))
    for y, x in ((0, 0), (10, 5), (20, 33), (47, 63)):
        want = _linear_over_pixel(arrays["background"][y, x], [fg[y, x] for fg in arrays["foregrounds"]])
        assert composite[y, x].tolist() == want


# --------------------------------------------------------------------------- determinism


def png_chunk_types(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        types.append(data[offset + 4:offset + 8])
        offset += 12 + length
    return types


def test_bytes_are_deterministic(tmp_path):
    background, fgs = make_layers(seed=9)
    mask = np.full((H, W), 77, np.uint8)
    first = write_stack(tmp_path / "one", make_stack(), background, fgs, masks=[mask, None],
                        export_psd=True, export_ora=True)
    second = write_stack(tmp_path / "two", make_stack(), background.copy(), [f.copy() for f in fgs],
                         masks=[mask.copy(), None], export_psd=True, export_ora=True)
    files = sorted(os.listdir(tmp_path / "one"))
    assert files == sorted(os.listdir(tmp_path / "two"))
    for name in files:
        if name == "stack.json":
            continue
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
        if name.endswith(".png"):
            types = png_chunk_types((tmp_path / "one" / name).read_bytes())
            assert types[0] == b"IHDR" and types[-1] == b"IEND"
            assert set(types) == {b"IHDR", b"IDAT", b"IEND"}, (name, types)
    # Manifests differ only in the time of writing.
    one, two = first.to_dict(), second.to_dict()
    for d in (one, two):
        d.pop("created"), d["timings"].pop("save"), d.pop("name")
    assert one == two
    # Different pixels give different bytes (the comparison above can fail).
    fgs[0][20, 20, 0] ^= 1
    write_stack(tmp_path / "three", make_stack(), background, fgs)
    assert (tmp_path / "three" / "layer_01.png").read_bytes() != (tmp_path / "one" / "layer_01.png").read_bytes()


# --------------------------------------------------------------------------- atomicity


def failing_after(monkeypatch, calls: int, action):
    """Replace the PNG writer so that call number `calls` runs `action` first."""
    real = stack_writer.write_png
    count = {"n": 0}

    def writer(path, array):
        count["n"] += 1
        if count["n"] == calls:
            action()
        real(path, array)

    monkeypatch.setattr(stack_writer, "write_png", writer)
    return count


@pytest.mark.parametrize("writers", [1, 4])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, writers):
    monkeypatch.setattr(stack_writer, "PNG_WRITERS", writers)
    background, fgs = make_layers()

    def boom():
        raise OSError("disk full (simulated)")

    count = failing_after(monkeypatch, 3, boom)
    with pytest.raises(OSError, match="disk full"):
        write_stack(tmp_path / "s", make_stack(), background, fgs)
    total = 1 + len(fgs) + 1  # layers + composite
    assert count["n"] == 3 if writers == 1 else 3 <= count["n"] <= total
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writers", [1, 4])
def test_cancel_between_files_leaves_nothing(tmp_path, monkeypatch, writers):
    monkeypatch.setattr(stack_writer, "PNG_WRITERS", writers)
    background, fgs = make_layers()
    token = CancelToken()
    count = failing_after(monkeypatch, 2, lambda: token.cancel("user pressed stop"))
    with pytest.raises(Cancelled, match="user pressed stop"):
        write_stack(tmp_path / "s", make_stack(), background, fgs, cancel=token)
    # No file starts after the cancel; with parallel writers the ones already running finish.
    assert count["n"] == 2 if writers == 1 else count["n"] <= 2 + writers - 1
    assert list(tmp_path.iterdir()) == []


def test_cancel_before_start_writes_nothing(tmp_path):
    background, fgs = make_layers()
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        write_stack(tmp_path / "s", make_stack(), background, fgs, cancel=token)
    assert list(tmp_path.iterdir()) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_existing_dest_refused_and_untouched(written):
    folder, _, _ = written
    before = snapshot(folder)
    background, fgs = make_layers(seed=1)
    with pytest.raises(StackExists, match="already exists; choose another name"):
        write_stack(folder, make_stack(), background, fgs)
    assert snapshot(folder) == before
    assert hidden_entries(folder.parent) == []


def test_dest_appearing_during_write_is_not_replaced(tmp_path, monkeypatch):
    background, fgs = make_layers()
    dest = tmp_path / "s"

    def someone_else_writes():
        dest.mkdir()
        (dest / "theirs.txt").write_text("keep me")

    failing_after(monkeypatch, 2, someone_else_writes)
    with pytest.raises(StackExists, match="already exists"):
        write_stack(dest, make_stack(), background, fgs)
    assert sorted(os.listdir(dest)) == ["theirs.txt"]
    assert hidden_entries(tmp_path) == []


# --------------------------------------------------------------------------- write-side validation


@pytest.mark.parametrize("mutate, error, message", [
    (lambda a: a.update(background=a["background"][:, :, :2]), ValueError, "background: expected shape (H, W, 3)"),
    (lambda a: a.update(background=a["background"].astype(np.float32)), ValueError, "background: expected dtype uint8"),
    (lambda a: a.update(background=a["background"][:-1]), ValueError, "background: expected height x width 48x64"),
    (lambda a: a["foregrounds"].__setitem__(1, a["foregrounds"][1][..., :3]), ValueError, "foregrounds[1] (layer_02)"),
    (lambda a: a["foregrounds"].pop(), ValueError, "stack.layers has 3 entries"),
    (lambda a: a.update(masks=[None]), ValueError, "masks has 1 entries"),
    (lambda a: a.update(masks=[None, np.zeros((H, W, 1), np.uint8)]), ValueError, "masks[1]"),
    (lambda a: a.update(blended=np.zeros((H, W, 4), np.uint8)), ValueError, "blended"),
    (lambda a: a["stack"].layers[1].__setattr__("box", (0.5, 0.0, 0.2, 1.0)), StackFormatError, "layers[1].box"),
    (lambda a: a["stack"].layers[2].__setattr__("seed", -1), StackFormatError, "layers[2].seed"),
    (lambda a: a["stack"].layers[2].__setattr__("kind", "background"), StackFormatError, "layers[2].kind"),
    (lambda a: a["stack"].layers[2].__setattr__("name", "old oak"), StackFormatError, "duplicate name 'old oak'"),
    (lambda a: a["stack"].__setattr__("steps", "20"), StackFormatError, "steps"),
    (lambda a: a["stack"].__setattr__("guidance", float("nan")), StackFormatError, "guidance"),
    (lambda a: a["stack"].model.__setitem__("files", {"x": "md5:00"}), StackFormatError, "model.files['x']"),
    (lambda a: a.update(dest_name=".hidden"), ValueError, "hidden"),
])
def test_write_rejects_bad_input(tmp_path, mutate, error, message):
    background, fgs = make_layers()
    args = dict(stack=make_stack(), background=background, foregrounds=fgs, masks=None, blended=None,
                dest_name="s")
    mutate(args)
    dest = tmp_path / args.pop("dest_name")
    with pytest.raises(error) as info:
        write_stack(dest, **args)
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- read-side validation


def edit_manifest(folder: Path, edit) -> Path:
    path = folder / "stack.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


MANIFEST_CASES = [
    (lambda d: d.update(format="something.else"), "format"),
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), "format_version"),
    (lambda d: d.update(format_version="1"), "format_version"),
    (lambda d: d.pop("width"), "width: missing"),
    (lambda d: d.pop("model"), "model: missing"),
    (lambda d: d["model"].pop("base"), "model.base: missing"),
    (lambda d: d.update(steps="20"), "steps: must be an integer"),
    (lambda d: d.update(seed=True), "seed: must be an integer"),
    (lambda d: d.update(height=0), "height: must be >= 1"),
    (lambda d: d.update(guidance="high"), "guidance: must be a finite number"),
    (lambda d: d.update(prompt=3), "prompt: must be a string"),
    (lambda d: d.update(created="yesterday"), "created: must be an ISO 8601"),
    (lambda d: d.update(layers=[]), "layers: must be a non-empty list"),
    (lambda d: d.update(layers={"a": 1}), "layers: must be a non-empty list"),
    (lambda d: d["layers"].reverse(), "layers[0].kind"),
    (lambda d: d["layers"][1].update(kind="background"), "layers[1].kind"),
    (lambda d: d["layers"][1].update(kind="sky"), "layers[1].kind: must be one of"),
    (lambda d: d["layers"][2].update(name="old oak"), "layers[2].name: duplicate name 'old oak'"),
    (lambda d: d["layers"][2].update(name=""), "layers[2].name: must not be empty"),
    (lambda d: d["layers"][1].pop("seed"), "layers[1].seed: missing"),
    (lambda d: d["layers"][1].update(file="sub/layer_01.png"), "layers[1].file"),
    (lambda d: d["layers"][1].update(file="..\\layer_01.png"), "layers[1].file"),
    (lambda d: d["layers"][1].update(file=".."), "layers[1].file"),
    (lambda d: d["layers"][1].update(file="/etc/passwd.png"), "layers[1].file"),
    (lambda d: d["layers"][1].update(file="layer_01.jpg"), "layers[1].file: 'layer_01.jpg' must be a .png"),
    (lambda d: d["layers"][2].update(file="layer_01.png"), "layers[2].file: 'layer_01.png' is already used"),
    (lambda d: d.update(composite="background.png"), "composite: 'background.png' is already used"),
    (lambda d: d["layers"][1].update(box=[0.1, 0.2, 1.5, 0.9]), "layers[1].box: coordinates must lie in [0, 1]"),
    (lambda d: d["layers"][1].update(box=[0.6, 0.2, 0.1, 0.9]), "layers[1].box: needs x0 < x1"),
    (lambda d: d["layers"][1].update(box=[0.1, 0.2, 0.6]), "layers[1].box: must be null or [x0, y0, x1, y1]"),
    (lambda d: d["layers"][1].update(box=[0.1, "a", 0.6, 0.9]), "layers[1].box[1]"),
    (lambda d: d["layers"][1].update(depth=-2), "layers[1].depth: must be > 0"),
    (lambda d: d["layers"][2].update(mask="../mask.png"), "layers[2].mask"),
    (lambda d: d["model"]["files"].update(x="deadbeef"), "model.files['x']"),
    (lambda d: d["timings"].update(total=-1), "timings.total: must be >= 0"),
    (lambda d: d.update(exports="stack.psd"), "exports: must be a list"),
    (lambda d: d.update(exports=["../stack.psd"]), "exports[0]"),
    (lambda d: d.update(blended=7), "blended: must be a string"),
    (lambda d: d.update(frame=[0.1, 0.2, 0.05, 0.9]), "frame: needs x0 < x1"),
    (lambda d: d.update(frame=[0.0, 0.0, 1.0, 1.25]), "frame: coordinates must lie in [0, 1]"),
    (lambda d: d.update(frame=[0.0, 0.0, 1.0]), "frame: must be null or [x0, y0, x1, y1]"),
    (lambda d: d.update(frame=[0.0, "a", 1.0, 1.0]), "frame[1]"),
    (lambda d: d.update(frame="whole"), "frame: must be null or [x0, y0, x1, y1]"),
    (lambda d: d.update(shot=[1]), "shot: must be null or an object"),
]


@pytest.mark.parametrize("edit, field", MANIFEST_CASES)
def test_load_names_bad_field(written, edit, field):
    folder, _, _ = written
    path = edit_manifest(folder, edit)
    with pytest.raises(StackFormatError) as info:
        load_stack(folder)
    message = str(info.value)
    assert str(path) in message
    assert field in message


def test_load_missing_manifest(tmp_path):
    with pytest.raises(StackFormatError, match="stack.json: missing"):
        load_stack(tmp_path)


def test_load_bad_json(written):
    folder, _, _ = written
    (folder / "stack.json").write_text('{"format": "multiplane.stack",\n  "width": 64,,}')
    with pytest.raises(StackFormatError, match=r"stack.json: invalid JSON at line 2"):
        load_stack(folder)


def test_load_refuses_nan_and_non_object(written):
    folder, _, _ = written
    text = (folder / "stack.json").read_text().replace('"guidance": 5.5', '"guidance": NaN')
    (folder / "stack.json").write_text(text)
    with pytest.raises(StackFormatError, match="NaN"):
        load_stack(folder)
    (folder / "stack.json").write_text("[1, 2]")
    with pytest.raises(StackFormatError, match="must be a JSON object"):
        load_stack(folder)


def test_newer_version_message_says_update(written):
    folder, _, _ = written
    edit_manifest(folder, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(StackFormatError, match=f"format version {FORMAT_VERSION + 1}.*update"):
        load_stack(folder)


def save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


@pytest.mark.parametrize("damage, file_name, field, message", [
    (lambda f: (f / "layer_02.png").unlink(), "layer_02.png", "layers[2].file", "file is missing"),
    (lambda f: (f / "mask_02.png").unlink(), "mask_02.png", "layers[2].mask", "file is missing"),
    (lambda f: (f / "composite.png").unlink(), "composite.png", "composite", "file is missing"),
    (lambda f: (f / "blended.png").unlink(), "blended.png", "blended", "file is missing"),
    (lambda f: save_png(f / "layer_01.png", np.zeros((H, W + 1, 4), np.uint8)), "layer_01.png", "layers[1].file",
     "image is 65x48, but the stack's width x height is 64x48"),
    (lambda f: save_png(f / "background.png", np.zeros((H, W, 4), np.uint8)), "background.png", "layers[0].file",
     "mode is RGBA, expected RGB"),
    (lambda f: save_png(f / "layer_01.png", np.zeros((H, W, 3), np.uint8)), "layer_01.png", "layers[1].file",
     "mode is RGB, expected RGBA"),
    (lambda f: save_png(f / "mask_02.png", np.zeros((H, W, 3), np.uint8)), "mask_02.png", "layers[2].mask",
     "expected L"),
    (lambda f: save_png(f / "composite.png", np.zeros((H, W), np.uint8)), "composite.png", "composite",
     "expected RGB"),
    (lambda f: (f / "layer_01.png").write_bytes(b"not an image"), "layer_01.png", "layers[1].file",
     "not a readable image"),
    (lambda f: Image.fromarray(np.zeros((H, W, 4), np.uint8)).save(f / "layer_01.png", format="TIFF"),
     "layer_01.png", "layers[1].file", "expected a PNG file"),
])
def test_load_names_bad_image(written, damage, file_name, field, message):
    folder, _, _ = written
    damage(folder)
    with pytest.raises(StackFormatError) as info:
        load_stack(folder)
    text = str(info.value)
    assert str(folder / file_name) in text and field in text and message in text


def test_missing_export_and_truncated_png(written):
    folder, _, _ = written
    edit_manifest(folder, lambda d: d.update(exports=["stack.psd"]))
    with pytest.raises(StackFormatError, match=r"stack.psd \(exports\[0\]\): file is missing"):
        load_stack(folder)
    edit_manifest(folder, lambda d: d.update(exports=[]))
    data = (folder / "layer_01.png").read_bytes()
    (folder / "layer_01.png").write_bytes(data[: len(data) // 2])
    stack = load_stack(folder)  # headers are intact: listing stays cheap ...
    with pytest.raises(StackFormatError, match=r"layer_01.png \(layers\[1\].file\): cannot decode"):
        load_layer_images(stack, folder)  # ... decoding names the broken file


# --------------------------------------------------------------------------- output roots


def test_list_stacks_and_cleanup(tmp_path, caplog):
    background, fgs = make_layers(foregrounds=1)
    root = tmp_path / "outputs"
    write_stack(root / "first", make_stack(foregrounds=1, created="2025-01-01T00:00:00Z"), background, fgs)
    write_stack(root / "second", make_stack(foregrounds=1, created="2025-06-01T00:00:00Z"), background, fgs)
    write_stack(root / "broken", make_stack(foregrounds=1), background, fgs)
    (root / "broken" / "layer_01.png").unlink()
    (root / "notes").mkdir()
    # Leftovers of crashed runs.
    write_stack(root / "tmpdir", make_stack(foregrounds=1), background, fgs)
    os.rename(root / "tmpdir", root / ".whole.tmp-89abcdef")               # crash just before the rename
    (root / ".half.tmp-deadbeef").mkdir()
    (root / ".half.tmp-deadbeef" / "background.png").write_bytes(b"partial")
    (root / ".git").mkdir()                                                 # not ours: left alone

    listed = list_stacks(root)
    names = [path.name for path, _ in listed]
    assert set(names) == {"first", "second"}
    assert names.index("second") < names.index("first")  # newest first
    assert "broken" in caplog.text

    handled = cleanup_temp(root)
    assert sorted(p.name for p in handled) == [".half.tmp-deadbeef", ".whole.tmp-89abcdef"]
    assert hidden_entries(root) == [".git"]
    assert {p.name for p, _ in list_stacks(root)} == {"first", "second"}
    assert cleanup_temp(root) == []
    assert list_stacks(tmp_path / "nothing here") == [] and cleanup_temp(tmp_path / "nothing here") == []


def test_cleanup_respects_min_age(tmp_path):
    (tmp_path / ".fresh.tmp-00000000").mkdir()
    assert cleanup_temp(tmp_path, min_age_seconds=3600) == []
    assert (tmp_path / ".fresh.tmp-00000000").is_dir()


# --------------------------------------------------------------------------- exports


def test_psd_export_reads_back(written, tmp_path):
    from psd_tools import PSDImage

    folder, result, arrays = written
    before = snapshot(folder)
    out = export_psd(folder, tmp_path / "exports" / "valley.psd")
    assert snapshot(folder) == before  # exporting never modifies the stack
    assert sorted(p.name for p in out.parent.iterdir()) == ["valley.psd"]  # no temp file left
    psd = PSDImage.open(out)
    assert (psd.width, psd.height) == (W, H)
    layers = list(psd)
    assert [layer.name for layer in layers] == ["background", "old oak", "layer_02"]  # bottom to top
    for layer in layers:
        assert layer.kind == "pixel" and layer.bbox == (0, 0, W, H) and not layer.has_mask()
    background = np.asarray(layers[0].topil())
    np.testing.assert_array_equal(background[..., :3], arrays["background"])
    assert (background[..., 3] == 255).all()
    for layer, want in zip(layers[1:], arrays["foregrounds"]):
        np.testing.assert_array_equal(np.asarray(layer.topil()), want)
    composite = load_png(folder / "composite.png", "RGB", W, H).astype(int)
    # The layers are kept as they are: a painting program flattening them blends the encoded
    # values (Pillow's over), while the stored merged image is the linear-light composite.
    canvas = Image.fromarray(np.dstack([arrays["background"], np.full((H, W), 255, np.uint8)]), "RGBA")
    for fg in arrays["foregrounds"]:
        canvas = Image.alpha_composite(canvas, Image.fromarray(fg, "RGBA"))
    encoded_over = np.asarray(canvas)[..., :3].astype(int)
    flattened = np.asarray(psd.composite())[..., :3].astype(int)
    assert np.abs(flattened - encoded_over).max() <= 1
    merged = np.asarray(psd.topil())[..., :3].astype(int)  # the stored merged image (psd-tools')
    assert np.abs(merged - encoded_over).max() <= 1
    opaque = np.all([fg[..., 3] == 255 for fg in arrays["foregrounds"][-1:]], axis=0)
    assert np.abs(merged - composite)[opaque].max() <= 1  # opaque pixels agree with composite.png


def test_psd_keeps_unicode_layer_names(written, tmp_path):
    from psd_tools import PSDImage

    folder, result, _ = written
    result.layers[1].name = "Eiche über dem Fluss 木"
    out = export_psd(result, tmp_path / "u.psd", folder=folder)
    assert [layer.name for layer in PSDImage.open(out)][1] == "Eiche über dem Fluss 木"
    with pytest.raises(ValueError, match="folder"):
        export_psd(result, tmp_path / "v.psd")


def test_ora_export_reads_back(written, tmp_path):
    folder, result, arrays = written
    out = export_ora(folder / "stack.json", tmp_path / "valley.ora")
    data = out.read_bytes()
    # The mimetype entry comes first, stored, so its text sits at a fixed offset.
    assert data[30:38] == b"mimetype" and data[38:54] == b"image/openraster"
    with zipfile.ZipFile(out) as archive:
        infos = archive.infolist()
        assert infos[0].filename == "mimetype" and infos[0].compress_type == zipfile.ZIP_STORED
        names = {info.filename for info in infos}
        assert {"stack.xml", "mergedimage.png", "Thumbnails/thumbnail.png"} <= names
        root = ElementTree.fromstring(archive.read("stack.xml"))
        assert (root.get("w"), root.get("h")) == (str(W), str(H))
        xml_layers = root.find("stack").findall("layer")
        assert [e.get("name") for e in xml_layers] == ["layer_02", "old oak", "background"]  # top first
        images = {e.get("name"): np.asarray(Image.open(io.BytesIO(archive.read(e.get("src")))))
                  for e in xml_layers}
        np.testing.assert_array_equal(images["background"][..., :3], arrays["background"])
        assert (images["background"][..., 3] == 255).all()
        np.testing.assert_array_equal(images["old oak"], arrays["foregrounds"][0])
        np.testing.assert_array_equal(images["layer_02"], arrays["foregrounds"][1])
        merged = np.asarray(Image.open(io.BytesIO(archive.read("mergedimage.png"))))
        np.testing.assert_array_equal(merged[..., :3], load_png(folder / "composite.png", "RGB", W, H))
        thumb = Image.open(io.BytesIO(archive.read("Thumbnails/thumbnail.png")))
        assert thumb.size == (W, H) and thumb.mode == "RGBA"


def test_ora_thumbnail_is_at_most_256():
    rng = np.random.default_rng(2)
    width, height = 320, 64
    layers = [StackLayer("background", "background", file="background.png"),
              StackLayer("layer_01", "foreground", file="layer_01.png")]
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
              rng.integers(0, 256, (height, width, 4), dtype=np.uint8)]
    with zipfile.ZipFile(io.BytesIO(ora_bytes(layers, images, width, height))) as archive:
        thumb = Image.open(io.BytesIO(archive.read("Thumbnails/thumbnail.png")))
        assert thumb.size == (256, 51)
        merged = Image.open(io.BytesIO(archive.read("mergedimage.png")))
        assert merged.size == (width, height)


def test_write_stack_with_exports_lists_them(tmp_path):
    background, fgs = make_layers()
    result = write_stack(tmp_path / "s", make_stack(), background, fgs, export_psd=True, export_ora=True)
    assert result.exports == ["stack.psd", "stack.ora"]
    assert load_stack(tmp_path / "s").exports == ["stack.psd", "stack.ora"]
    assert zipfile.is_zipfile(tmp_path / "s" / "stack.ora")
    assert (tmp_path / "s" / "stack.psd").read_bytes()[:4] == b"8BPS"


# --------------------------------------------------------------------------- import cost


def test_import_does_not_pull_torch_or_psd_tools():
    code = ("import sys, inference.stack; "
            "bad = [m for m in ('torch', 'diffusers', 'psd_tools') if m in sys.modules]; "
            "sys.exit(', '.join(bad) or 0)")
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
