"""The multilayer OpenEXR export (inference/stack/exr.py): what the file holds, read back with
the OpenEXR bindings, and how it travels through the writer, the CLI and the API.
(tests/test_addon_exr.py opens the same files in Blender.)"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import OpenEXR
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402

from addon.stack_reader import exr_layer_names as addon_exr_layer_names  # noqa: E402
from inference.stack import EXR_FILE, LayerStack, StackLayer, export_exr, load_stack, write_stack  # noqa: E402
from inference.stack.exr import exr_layer_names, linear_composite, write_exr  # noqa: E402

WIDTH, HEIGHT = 64, 48
NAMES = ["background", "disc", "rect", "ellipse"]
HALF_EPSILON = 2.0 ** -11  # relative rounding error of half floats (10-bit mantissa)


def _stack(names=NAMES, **fields) -> LayerStack:
    layers = [StackLayer(name=name, kind="background" if i == 0 else "foreground", seed=i)
              for i, name in enumerate(names)]
    return LayerStack(width=WIDTH, height=HEIGHT, prompt="test", layers=layers, **fields)


def _expected_premultiplied(image: np.ndarray) -> np.ndarray:
    alpha = image[..., 3:4] / 255.0 if image.shape[2] == 4 else np.ones(image.shape[:2] + (1,))
    return np.concatenate([helpers.srgb_to_linear(image[..., :3] / 255.0) * alpha, alpha], axis=2)


def _read(path: Path) -> tuple[dict, dict]:
    with OpenEXR.File(str(path), separate_channels=True) as document:
        header = dict(document.header())
        channels = {name: channel.pixels.copy() for name, channel in document.channels().items()}
    return header, channels


def _assert_half_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float16
    error = np.abs(actual.astype(np.float64) - expected)
    assert (error <= np.abs(expected) * HALF_EPSILON + 2.0 ** -24).all(), error.max()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    images = helpers.stack_layers(WIDTH, HEIGHT)
    folder = tmp_path_factory.mktemp("exr") / "stack"
    final = write_stack(folder, _stack(), images[0], images[1:], export_exr=True)
    return folder, final, images


def test_one_half_float_layer_per_stack_layer_plus_the_composite(written):
    folder, final, images = written
    assert final.exports == [EXR_FILE]
    assert load_stack(folder).exports == [EXR_FILE]  # the manifest lists it and the reader accepts it
    header, channels = _read(folder / EXR_FILE)
    expected_names = {f"{layer}.{c}" for layer in [*NAMES, "Composite"] for c in "RGBA"}
    assert set(channels) == expected_names
    assert header["compression"] == OpenEXR.ZIP_COMPRESSION
    for name, image in zip(NAMES, images):
        expected = _expected_premultiplied(image)
        for index, channel in enumerate("RGBA"):
            _assert_half_close(channels[f"{name}.{channel}"], expected[..., index])
    # Premultiplied: colour never exceeds alpha; the soft edges really are partly transparent.
    disc_alpha = channels["disc.A"].astype(np.float64)
    assert ((disc_alpha > 0.05) & (disc_alpha < 0.95)).any()
    assert (channels["disc.R"].astype(np.float64) <= disc_alpha + 1e-3).all()


def test_the_composite_is_the_linear_light_over_of_the_layers(written):
    folder, _final, images = written
    _header, channels = _read(folder / EXR_FILE)
    result = _expected_premultiplied(images[0])
    for image in images[1:]:
        front = _expected_premultiplied(image)
        result = front + result * (1.0 - front[..., 3:4])
    for index, channel in enumerate("RGBA"):
        _assert_half_close(channels[f"Composite.{channel}"], result[..., index])
    assert np.allclose(linear_composite(images), result)
    # ...which is not the sRGB-space composite.png at the soft edges.
    encoded_over = helpers.srgb_to_linear(helpers.composite_encoded(images) / 255.0)
    assert np.abs(encoded_over - result[..., :3]).max() > 0.01


def test_frame_rectangle_and_names_are_in_the_header(written, tmp_path):
    folder, _final, images = written
    header, _channels = _read(folder / EXR_FILE)
    (x0, y0), (x1, y1) = header["multiplaneFrame"]
    assert (x0, y0, x1, y1) == (0.0, 0.0, 1.0, 1.0)  # no frame in the stack: the whole canvas
    (px0, py0), (px1, py1) = header["multiplaneFramePixels"]
    assert (px0, py0, px1, py1) == (0, 0, WIDTH - 1, HEIGHT - 1)
    assert header["multiplaneLayers"] == NAMES and header["multiplaneComposite"] == "Composite"

    framed = tmp_path / "framed.exr"
    write_exr(framed, _stack().layers, images, WIDTH, HEIGHT, frame=(0.125, 0.25, 0.875, 1.0))
    header, _channels = _read(framed)
    (x0, y0), (x1, y1) = header["multiplaneFrame"]
    assert (x0, y0, x1, y1) == (0.125, 0.25, 0.875, 1.0)
    (px0, py0), (px1, py1) = header["multiplaneFramePixels"]
    assert (px0, py0, px1, py1) == (8, 12, 55, 47)


def test_layer_names_with_dots_and_clashes_stay_unique_and_the_addon_agrees(tmp_path):
    names = ["sky.v2", "sky_v2", "Composite", "  ", "tree", "tree"[:4]]
    expected = ["sky_v2", "sky_v2 2", "Composite 2", "layer", "tree", "tree 2", "Composite"]
    assert exr_layer_names(names) == expected
    assert addon_exr_layer_names(names) == expected
    for tricky in (["a.b.c", "a_b_c", "a_b_c 2"], ["Composite", "Composite 2"], ["ü.ñ", "日本"]):
        assert addon_exr_layer_names(tricky) == exr_layer_names(tricky)
        assert len(set(exr_layer_names(tricky))) == len(tricky) + 1


def test_export_of_an_existing_stack_is_atomic_and_leaves_the_stack_alone(written, tmp_path, monkeypatch):
    folder, _final, _images = written
    before = sorted(p.name for p in folder.iterdir())
    out = export_exr(folder, tmp_path / "copy.exr")
    assert out.read_bytes() == (folder / EXR_FILE).read_bytes()  # deterministic: same pixels, same bytes
    assert sorted(p.name for p in folder.iterdir()) == before

    def broken(*_args, **_kwargs):
        (tmp_path / "half").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr("inference.stack.exr.write_exr", broken)
    with pytest.raises(OSError, match="disk full"):
        export_exr(folder, tmp_path / "failed.exr")
    assert not (tmp_path / "failed.exr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failing_exr_leaves_no_stack(tmp_path, monkeypatch):
    images = helpers.stack_layers(WIDTH, HEIGHT)

    def broken(*_args, **_kwargs):
        raise RuntimeError("cannot encode")

    monkeypatch.setattr("inference.stack.writer.write_exr", broken)
    with pytest.raises(RuntimeError, match="cannot encode"):
        write_stack(tmp_path / "stack", _stack(), images[0], images[1:], export_exr=True)
    assert list(tmp_path.iterdir()) == []


def test_api_job_with_export_exr_serves_the_file(tmp_path):
    from test_server_api import AUTH, Api

    api = Api(tmp_path / "out")
    try:
        job = api.wait(api.submit(layers=[{"prompt": "a boat"}], export_exr=True)["id"])
        assert job["status"] == "succeeded", job
        assert EXR_FILE in job["stack"]["files"] and job["request"]["export_exr"] is True
        response = api.client.get(f"/v1/jobs/{job['id']}/files/{EXR_FILE}", headers=AUTH)
        assert response.status_code == 200 and response.headers["content-type"] == "image/x-exr"
        assert response.content[:4] == b"\x76\x2f\x31\x01"  # the OpenEXR magic number
        refused = api.client.post("/v1/jobs", json={"prompt": "a lake", "export_exr": "yes"}, headers=AUTH)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "export_exr"]
    finally:
        api.close()

