"""Layered files back in (inference/stack/layered_import.py): PSDs written by psd-tools (our own
export, and edited as an editor would) and by pytoshop (an independent writer), OpenRaster
files (ours, and hand-built to the spec), through the module, the CLI and the API."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402

from inference.errors import InvalidRequest  # noqa: E402
from inference.stack import LayerStack, StackLayer, load_layer_images, load_stack, write_stack  # noqa: E402
from inference.stack.layered_import import import_layered  # noqa: E402
from tools.layered_files import OraNode, PsdLayer, openraster, pytoshop_psd  # noqa: E402

WIDTH, HEIGHT = 100, 70  # not multiples of 64: imports keep any size
NAMES = ["background", "disc", "rect", "ellipse"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A stack with PSD and ORA exports, and its layer pixels."""
    images = helpers.stack_layers(WIDTH, HEIGHT)
    layers = [StackLayer(name=name, kind="background" if i == 0 else "foreground") for i, name in enumerate(NAMES)]
    folder = tmp_path_factory.mktemp("source") / "stack"
    write_stack(folder, LayerStack(name="Source", width=WIDTH, height=HEIGHT, layers=layers),
                images[0], images[1:], export_psd=True, export_ora=True)
    return folder, images


def _pixels(folder: Path) -> tuple[LayerStack, list[np.ndarray]]:
    stack = load_stack(folder)  # the strict reader accepts it
    return stack, load_layer_images(stack, folder)


def _shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`image` moved by (dx, dy) on a transparent canvas of the same size (cropped)."""
    result = np.zeros_like(image)
    h, w = image.shape[:2]
    result[max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)] = \
        image[max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)]
    return result


@pytest.mark.parametrize("export", ["stack.psd", "stack.ora"])
def test_our_own_exports_come_back_exactly(source, tmp_path, export):
    folder, images = source
    written = import_layered(folder / export, tmp_path / "back", name="Back")
    stack, pixels = _pixels(tmp_path / "back")
    assert [layer.name for layer in stack.layers] == NAMES
    assert (stack.width, stack.height, stack.method, stack.name) == (WIDTH, HEIGHT, "imported", "Back")
    assert stack.imported == {"source": export, "format": export[-3:], "warnings": []} == written.imported
    for got, expected in zip(pixels, images):
        assert np.array_equal(got, expected)
    # The box is each foreground's bounds on the canvas.
    alpha = images[1][..., 3]
    rows, columns = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    assert stack.layers[1].box == (columns[0] / WIDTH, rows[0] / HEIGHT, (columns[-1] + 1) / WIDTH,
                                   (rows[-1] + 1) / HEIGHT)


def _edit_like_an_editor(psd_path: Path, out_path: Path) -> np.ndarray:
    """New pixels in 'rect', 'disc' moved by (+12, +5), 'ellipse' hidden; returns rect's new pixels."""
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    psd = PSDImage.open(psd_path)
    by_name = {layer.name: layer for layer in psd}
    disc = by_name["disc"]
    disc.left, disc.top = disc.left + 12, disc.top + 5
    by_name["ellipse"].visible = False
    new_rect = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    new_rect[10:40, 20:90] = (250, 200, 10, 255)
    new_rect[40:50, 20:90] = (250, 200, 10, 100)
    index = list(psd).index(by_name["rect"])
    replacement = PixelLayer.frompil(Image.fromarray(new_rect, "RGBA"), psd, name="rect")
    by_name["rect"].delete_layer()
    replacement.move_to(psd, index=index)
    psd.save(out_path)
    return new_rect


def _edit_ora_like_an_editor(ora_path: Path, out_path: Path) -> np.ndarray:
    """The same edits as `_edit_like_an_editor`, the file written again by another program
    (tools/layered_files.openraster) from our ORA's layer PNGs; returns rect's new pixels."""
    import io
    import zipfile

    with zipfile.ZipFile(ora_path) as archive:
        pixels = {name: np.asarray(Image.open(io.BytesIO(archive.read(f"data/{file}"))).convert("RGBA"))
                  for name, file in zip(NAMES, ["background.png", "layer_01.png", "layer_02.png", "layer_03.png"])}
    new_rect = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    new_rect[10:40, 20:90] = (250, 200, 10, 255)
    new_rect[40:50, 20:90] = (250, 200, 10, 100)
    openraster(out_path, WIDTH, HEIGHT, [
        OraNode("ellipse", pixels["ellipse"], visible=False),
        OraNode("rect", new_rect),
        OraNode("disc", pixels["disc"], x=12, y=5),
        OraNode("background", pixels["background"]),
    ])
    return new_rect


EDITORS = {"psd": _edit_like_an_editor, "ora": _edit_ora_like_an_editor}


@pytest.mark.parametrize("kind", sorted(EDITORS))
def test_an_edited_file_comes_back_with_the_edits(source, tmp_path, kind):
    folder, images = source
    edited = tmp_path / f"edited.{kind}"
    new_rect = EDITORS[kind](folder / f"stack.{kind}", edited)
    written = import_layered(edited, tmp_path / "back")
    stack, pixels = _pixels(tmp_path / "back")
    assert [layer.name for layer in stack.layers] == ["background", "disc", "rect"]
    assert written.imported["warnings"] == ["hidden layer 'ellipse' skipped"]
    assert np.array_equal(pixels[0], images[0])
    assert np.array_equal(pixels[1], _shifted(images[1], 12, 5))
    assert np.array_equal(pixels[2], new_rect)
    assert stack.layers[2].box == (0.2, 10 / HEIGHT, 0.9, 50 / HEIGHT)
    assert stack.name == "edited"  # the file's name by default


def test_psd_groups_blend_modes_and_transparent_background(tmp_path):
    from psd_tools import PSDImage
    from psd_tools.constants import BlendMode

    psd = PSDImage.new("RGBA", (WIDTH, HEIGHT))
    base = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    base[:, :50] = (10, 20, 30, 255)  # the right half is transparent
    psd.create_pixel_layer(Image.fromarray(base, "RGBA"), name="paper")
    a = psd.create_pixel_layer(Image.new("RGBA", (20, 10), (255, 0, 0, 255)), name="trunk", left=5, top=5)
    b = psd.create_pixel_layer(Image.new("RGBA", (20, 10), (0, 0, 255, 255)), name="leaves", left=15, top=8)
    psd.create_group([a, b], name="tree")
    psd.create_pixel_layer(Image.new("RGBA", (10, 10), (0, 255, 0, 255)), name="glow", left=60, top=30,
                           blend_mode=BlendMode.SCREEN)
    psd.save(tmp_path / "grouped.psd")
    written = import_layered(tmp_path / "grouped.psd", tmp_path / "back")
    stack, pixels = _pixels(tmp_path / "back")
    assert [layer.name for layer in stack.layers] == ["paper", "tree", "glow"]
    warnings = written.imported["warnings"]
    assert "group 'tree' (2 layers) flattened into one layer" in warnings
    assert "layer 'glow' uses blend mode SCREEN; imported as normal (its own pixels)" in warnings
    assert any(w.startswith("the bottom layer 'paper' is the background but 50.0% of its pixels are not opaque: "
                            "flattened over white") for w in warnings)
    assert (pixels[0][:, :50] == (10, 20, 30)).all() and (pixels[0][:, 50:] == 255).all()
    tree = pixels[1]
    assert tuple(tree[6, 6]) == (255, 0, 0, 255) and tuple(tree[10, 20]) == (0, 0, 255, 255)  # leaves on top
    assert tree[30:, :].max() == 0  # nothing outside the group's layers
    assert tuple(pixels[2][35, 65]) == (0, 255, 0, 255)


def test_psd_from_an_independent_writer(tmp_path):
    """pytoshop: offsets (partly off the canvas), opacity, hidden, blend mode, an adjustment
    layer, Unicode names, an odd canvas size."""
    width, height = 90, 50
    paper = np.zeros((height, width, 4), np.uint8)
    paper[...] = (120, 90, 60, 255)
    leaf = np.zeros((20, 30, 4), np.uint8)
    leaf[...] = (20, 200, 40, 200)
    leaf[:, :10, 3] = 0  # a transparent strip on the left
    path = pytoshop_psd(tmp_path / "pytoshop.psd", width, height, [
        PsdLayer("Hintergrund", paper),
        PsdLayer("Bäume", leaf, left=70, top=-5, opacity=128),
        PsdLayer("hidden", leaf, visible=False),
        PsdLayer("shade", leaf, left=5, top=25, blend_mode="multiply"),
        PsdLayer("invert", None, adjustment=True),
        PsdLayer("Bäume", leaf, left=1, top=2),
    ])
    written = import_layered(path, tmp_path / "back")
    stack, pixels = _pixels(tmp_path / "back")
    assert [layer.name for layer in stack.layers] == ["Hintergrund", "Bäume", "shade", "Bäume 2"]
    assert (stack.width, stack.height) == (width, height)
    assert written.imported["warnings"] == [
        "hidden layer 'hidden' skipped",
        "layer 'shade' uses blend mode MULTIPLY; imported as normal (its own pixels)",
        "invert layer 'invert' skipped: adjustment and fill layers have no pixels of their own, so the "
        "stack's composite differs from the editor's",
    ]
    assert np.array_equal(pixels[0], paper[..., :3])
    expected = np.zeros((height, width, 4), np.uint8)
    expected[0:15, 70:90] = leaf[5:20, 0:20]
    expected[0:15, 70:90, 3] = np.floor(leaf[5:20, 0:20, 3].astype(np.float64) * 128 / 255 + 0.5)
    assert np.array_equal(pixels[1][..., 3], expected[..., 3])
    visible = expected[..., 3] > 0
    assert np.array_equal(pixels[1][visible], expected[visible])
    assert stack.layers[1].box == (80 / width, 0.0, 1.0, 15 / height)  # the transparent strip is not bounds
    assert np.array_equal(pixels[3][2:22, 1:31], leaf)


def test_hand_built_openraster_with_offsets_groups_and_opacity(tmp_path):
    width, height = 80, 60
    sky = np.zeros((height, width, 4), np.uint8)
    sky[...] = (30, 60, 200, 255)
    square = np.zeros((10, 10, 4), np.uint8)
    square[...] = (250, 250, 0, 255)
    red = np.zeros((10, 10, 4), np.uint8)
    red[...] = (255, 0, 0, 255)
    path = openraster(tmp_path / "hand.ora", width, height, [  # top first
        OraNode("top", square, x=75, y=55, opacity=0.5),
        OraNode("glow", square, x=40, y=5, composite_op="svg:screen"),
        OraNode("group", x=3, y=2, children=[
            OraNode("front", red, x=5, y=5),
            OraNode("hidden in group", square, x=0, y=0, visible=False),
            OraNode("back", square, x=0, y=0),
        ]),
        OraNode("hidden", square, visible=False),
        OraNode("sky", sky),
    ])
    written = import_layered(path, tmp_path / "back")
    stack, pixels = _pixels(tmp_path / "back")
    assert [layer.name for layer in stack.layers] == ["sky", "group", "glow", "top"]
    assert written.imported["format"] == "ora"
    assert written.imported["warnings"] == [
        "hidden layer 'hidden' skipped",
        "group 'group' (3 layers) flattened into one layer",
        "layer 'glow' uses composite-op svg:screen; imported as normal",
    ]
    group = pixels[1]
    assert tuple(group[2, 3]) == (250, 250, 0, 255)  # 'back' at the group's offset
    assert tuple(group[8, 9]) == (255, 0, 0, 255)  # 'front' over it, offsets added up
    assert group[20:, :].max() == 0 and stack.layers[1].box == (3 / width, 2 / height, 18 / width, 17 / height)
    top = pixels[3]
    assert tuple(top[57, 77]) == (250, 250, 0, 128) and top[:55].max() == 0  # cropped, half opacity


DOT = np.full((2, 2, 4), 255, np.uint8)


def _zip(entries: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _file(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder / name


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.psd", "does not exist"),
    (lambda d: _file(d, "notes.txt", b"x"), "choose a .psd or .ora file (got .txt)"),
    (lambda d: _file(d, "broken.psd", b"8BPS garbage"), "not a readable Photoshop file"),
    (lambda d: _file(d, "broken.ora", b"not a zip"), "not an OpenRaster file"),
    (lambda d: openraster(d / "empty.ora", 20, 20, []), "has no visible pixel layer"),
    (lambda d: openraster(d / "hidden.ora", 20, 20, [OraNode("a", DOT, visible=False)]), "has no visible pixel layer"),
    (lambda d: openraster(d / "huge.ora", 9000, 10, [OraNode("a", DOT)]), "the document is 9000x10 pixels"),
    (lambda d: openraster(d / "many.ora", 8, 8, [OraNode(f"l{i}", DOT) for i in range(65)]),
     "has 65 visible layers; at most 64"),
    (lambda d: _file(d, "nosrc.ora", _zip({"mimetype": b"image/openraster", "stack.xml": (
        b'<image w="8" h="8"><stack><layer name="a" src="data/gone.png"/></stack></image>')})),
     "layer 'a' names 'data/gone.png', which is not in the archive"),
    (lambda d: _file(d, "noxml.ora", _zip({"mimetype": b"image/openraster"})), "it has no stack.xml"),
    (lambda d: _file(d, "badpng.ora", _zip({"stack.xml": b'<image w="8" h="8"><stack><layer name="a" '
                                                         b'src="data/a.png"/></stack></image>',
                                            "data/a.png": b"not a png"})), "data/a.png is not a readable image"),
])
def test_bad_files_are_refused_by_name_and_nothing_is_written(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InvalidRequest, match=re.escape(message)) as caught:
        import_layered(path, tmp_path / "out")
    assert caught.value.field == "path"
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_import_layers(source, tmp_path, capsys):
    from server.cli import main

    folder, _images = source
    edited = tmp_path / "edited.psd"
    _edit_like_an_editor(folder / "stack.psd", edited)
    assert main(["import-layers", str(edited), "--out", str(tmp_path / "cli"), "--name", "Source", "--exr"]) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "3 layers, 100x70, 1 warning(s)" in out
    assert "warning: hidden layer 'ellipse' skipped" in err
    assert load_stack(tmp_path / "cli").exports == ["stack.exr"]
    assert main(["import-layers", str(edited), "--out", str(tmp_path / "cli")]) == 2
    assert "--out:" in capsys.readouterr().err
    assert main(["import-layers", str(tmp_path / "nope.ora"), "--out", str(tmp_path / "x")]) == 2
    assert "error: path:" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_api_import_is_a_finished_job_with_files_and_warnings(source, tmp_path):
    from test_server_api import AUTH, Api

    folder, _images = source
    edited = tmp_path / "edited.psd"
    _edit_like_an_editor(folder / "stack.psd", edited)
    api = Api(tmp_path / "out")
    try:
        response = api.client.post("/v1/imports", json={"path": str(edited), "name": "Source"}, headers=AUTH)
        assert response.status_code == 201, response.text
        job = response.json()
        assert (job["kind"], job["status"], job["stack"]["name"]) == ("import", "succeeded", "Source")
        assert job["warnings"] == ["hidden layer 'ellipse' skipped"]
        assert "layer_02.png" in job["stack"]["files"]
        file = api.client.get(f"/v1/jobs/{job['id']}/files/layer_01.png", headers=AUTH)
        assert file.status_code == 200 and file.content[:4] == b"\x89PNG"
        assert api.job(job["id"])["status"] == "succeeded"
        refused = api.client.post(f"/v1/jobs/{job['id']}/regenerate", json={"layer_index": 1, "seed": 3},
                                  headers=AUTH)
        assert refused.status_code == 409 and "imported layered file" in refused.json()["detail"]
        refused = api.client.post(f"/v1/jobs/{job['id']}/extend", json={"margins": [0.2, 0, 0, 0]}, headers=AUTH)
        assert refused.status_code == 409 and "imported layered file" in refused.json()["detail"]
        for body, text in (({"path": "relative.psd"}, "must be absolute"),
                           ({"path": str(tmp_path / "notes.txt")}, "must name a .psd, .psb or .ora file"),
                           ({"path": str(edited), "extra": 1}, "Extra inputs"),
                           ({"path": str(edited), "name": "n" * 101}, "at most 100 characters")):
            bad = api.client.post("/v1/imports", json=body, headers=AUTH)
            assert bad.status_code == 422 and text in str(bad.json()["detail"]), bad.text
        for path, text in ((str(tmp_path / "gone.psd"), "does not exist on the server"),
                           ("/tmp/a\u0000b.psd", "on the server"),
                           ("/" + "x" * 300 + ".psd", "cannot be read on the server (OSError)")):  # name too long
            missing = api.client.post("/v1/imports", json={"path": path}, headers=AUTH)
            assert missing.status_code == 404 and text in missing.json()["detail"], missing.text
        corrupt = tmp_path / "corrupt.ora"
        corrupt.write_bytes(b"not a zip")
        bad = api.client.post("/v1/imports", json={"path": str(corrupt)}, headers=AUTH)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "path"], bad.text
        assert api.client.post("/v1/imports", json={"path": str(edited)}).status_code == 401
    finally:
        api.close()
    # After a restart the stack is still an import (not regenerable), with its warnings.
    again = Api(tmp_path / "out")
    try:
        restored = again.job(job["id"])
        assert restored["kind"] == "import" and restored["warnings"] == job["warnings"]
    finally:
        again.close()


def test_the_imported_key_is_checked_like_every_manifest_field(source):
    from inference.errors import StackFormatError

    folder, _images = source
    data = load_stack(folder).to_dict()
    assert "imported" not in data  # generated stacks do not carry the key
    good = {"source": "a.psd", "format": "psd", "warnings": ["w"]}
    assert LayerStack.from_dict({**data, "imported": good}).imported == good
    for bad, field in (("x", "imported"), ({**good, "format": "tiff"}, "imported.format"),
                       ({**good, "warnings": "w"}, "imported.warnings"), ({"format": "psd", "warnings": []},
                                                                          "imported.source"),
                       ({**good, "warnings": [1]}, "imported.warnings[0]")):
        with pytest.raises(StackFormatError, match=re.escape(f"stack.json: {field}:")):
            LayerStack.from_dict({**data, "imported": bad})


def test_the_addon_reader_sees_exports_and_import_warnings(source, tmp_path):
    from addon.stack_reader import read_stack

    folder, _images = source
    edited = tmp_path / "edited.psd"
    _edit_like_an_editor(folder / "stack.psd", edited)
    import_layered(edited, tmp_path / "back", export_exr=True)
    info = read_stack(tmp_path / "back")
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.exports == ("stack.exr",) and info.exr_path == tmp_path / "back" / "stack.exr"
    assert info.import_warnings == ("hidden layer 'ellipse' skipped",)
    plain = read_stack(folder)
    assert plain.exr_path is None and plain.import_warnings == () and plain.exports == ("stack.psd", "stack.ora")


def test_carried_depths_keep_known_layers_and_fill_the_others_in_order():
    from inference.stack.layered_import import carried_depths

    names = ["bg", "new far", "disc", "new mid", "rect", "new near"]
    depths, warnings = carried_depths(names, {"bg": 40.0, "disc": 10.0, "rect": 5.0, "gone": 7.0})
    assert warnings == []
    assert depths[0] == 40.0 and depths[2] == 10.0 and depths[4] == 5.0
    assert depths[1] == pytest.approx(1 / (1 / 40 + (1 / 10 - 1 / 40) / 2))  # even in 1/distance
    assert depths[3] == pytest.approx(1 / (1 / 10 + (1 / 5 - 1 / 10) / 2))
    assert depths[5] == 2.5  # nearer than the nearest known: half its distance
    assert all(b < a for a, b in zip(depths, depths[1:]))
    assert carried_depths(["new bg", "disc"], {"disc": 3.0})[0] == [6.0, 3.0]
    assert carried_depths(["a", "b"], {}) == ([None, None], [])
    swapped, warnings = carried_depths(["bg", "rect", "disc"], {"bg": 40.0, "disc": 10.0, "rect": 5.0})
    assert swapped == [None, None, None] and "another order" in warnings[0]


def test_import_keeps_the_given_depths_and_checks_them_over_the_api(source, tmp_path):
    from test_server_api import AUTH, Api

    folder, _images = source
    written = import_layered(folder / "stack.psd", tmp_path / "kept", depths={"background": 30.0, "rect": 6.0})
    assert [layer.depth for layer in written.layers] == pytest.approx([30.0, 1 / (1 / 30 + (1 / 6 - 1 / 30) / 2),
                                                                       6.0, 3.0])
    api = Api(tmp_path / "out")
    try:
        ok = api.client.post("/v1/imports", json={"path": str(folder / "stack.ora"), "depths": {"disc": 8}},
                             headers=AUTH)
        assert ok.status_code == 201, ok.text
        stack = load_stack(ok.json()["stack"]["path"])
        assert [layer.depth for layer in stack.layers][:2] == [16.0, 8.0]
        bad = api.client.post("/v1/imports", json={"path": str(folder / "stack.ora"), "depths": {"disc": -1}},
                              headers=AUTH)
        assert bad.status_code == 422 and "layer 'disc': must be a finite number > 0" in bad.text
        assert bad.json()["detail"][0]["loc"] == ["body", "depths"]
    finally:
        api.close()
