"""The CLI's contract for bad input: one clear line on stderr, exit code 2, nothing written."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOOD = ["--prompt", "a forest", "--layer", "a fox", "--width", "256", "--height", "256",
        "--steps", "1", "--model", "tiny"]


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("change, needle", [
    (("--prompt", ""), "prompt: must not be empty"),
    (("--width", "300"), "width: must be a multiple of 64"),
    (("--height", "128"), "height: must be in 256..2048"),
    (("--width", "4096"), "width: must be in 256..2048"),
    (("--steps", "0"), "steps: must be an integer in 1..150"),
    (("--steps", "151"), "steps"),
    (("--steps", "many"), "invalid int value"),
    (("--model", "no-such-model"), "model"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, change, needle):
    out = tmp_path / "stack"
    result = run_cli("generate", *replace(GOOD, *change), "--out", str(out), "--offline", "--quiet")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_max_batch_exits_2_naming_the_option(tmp_path):
    out = tmp_path / "stack"
    result = run_cli("generate", *GOOD, "--max-batch", "0", "--out", str(out), "--offline", "--quiet")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "max_batch: must be a positive integer" in lines[0], result.stderr
    assert not out.exists()


def test_too_many_layers(tmp_path):
    args = list(GOOD)
    for i in range(8):
        args += ["--layer", f"thing {i}"]
    result = run_cli("generate", *args, "--out", str(tmp_path / "s"), "--quiet")
    assert result.returncode == 2
    assert "layers: at most 8 foreground layers, got 9" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_folder_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("mine")
    result = run_cli("generate", *GOOD, "--out", str(tmp_path / "s"), "--quiet")
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert (tmp_path / "s" / "keep.txt").read_text() == "mine"


def test_more_boxes_than_layers(tmp_path):
    result = run_cli("generate", *GOOD, "--box", "0,0,1,1", "--box", "0,0,.5,.5",
                     "--out", str(tmp_path / "s"), "--quiet")
    assert result.returncode == 2
    assert "box" in result.stderr


def test_malformed_box(tmp_path):
    result = run_cli("generate", *GOOD, "--box", "0,0,1", "--out", str(tmp_path / "s"), "--quiet")
    assert result.returncode == 2
    assert "4 numbers" in result.stderr


@pytest.mark.slow
def test_generate_writes_a_stack_with_psd_and_exr(tmp_path):
    out = tmp_path / "stack"
    result = run_cli("generate", *GOOD, "--layer", "a rock", "--box", "0,0,0.5,1", "--tta", "1",
                     "--method", "independent", "--out", str(out), "--psd", "--exr", "--offline")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    from inference.stack import load_stack

    stack = load_stack(out)
    assert [layer.prompt for layer in stack.layers[1:]] == ["a fox", "a rock"]
    assert stack.layers[1].box == (0.0, 0.0, 0.5, 1.0) or list(stack.layers[1].box) == [0.0, 0.0, 0.5, 1.0]
    assert "stack.psd" in stack.exports and (out / "stack.psd").is_file()
    assert "stack.exr" in stack.exports and (out / "stack.exr").read_bytes()[:4] == b"\x76\x2f\x31\x01"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_regenerate_one_layer_keeps_the_others(tmp_path):
    import hashlib

    src = tmp_path / "src"
    result = run_cli("generate", *GOOD, "--layer", "a rock", "--tta", "1", "--out", str(src), "--offline", "--quiet")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "edited"
    result = run_cli("regenerate", "--stack", str(src), "--layer-index", "2", "--prompt", "a blue boulder",
                     "--tta", "1", "--out", str(out), "--offline", "--quiet")
    assert result.returncode == 0, result.stderr

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(out / "background.png") == digest(src / "background.png")
    assert digest(out / "layer_01.png") == digest(src / "layer_01.png")
    assert digest(out / "layer_02.png") != digest(src / "layer_02.png")
    bad = run_cli("regenerate", "--stack", str(src), "--layer-index", "7", "--seed", "1",
                  "--out", str(tmp_path / "bad"), "--offline", "--quiet")
    assert bad.returncode == 2 and "layer_index" in bad.stderr
    assert not (tmp_path / "bad").exists()


ASPECT = ["--prompt", "a forest", "--layer", "a fox", "--steps", "1", "--model", "tiny"]


@pytest.mark.parametrize("extra, needle", [
    (["--aspect", "2.39", "--width", "512"], "aspect: --aspect/--margins plan the canvas size"),
    (["--margins", "0.1,0,0.1,0"], "margins: --margins needs --aspect"),
    (["--aspect", "2", "--margins", "0.1,0,5,0"], "margins.right = 5 is outside 0..4"),
    (["--aspect", "2", "--margins", "0.1,0,nan,0"], "margins.right must be a finite number"),
    (["--aspect", "2", "--margins", "0.1,0,0.1"], "must have 4 numbers L,T,R,B"),
    (["--aspect", "40"], "aspect: frame aspect 40 is outside 0.1..10"),
    (["--aspect", "2", "--box", "0,0,2,1"], "layers[0].box"),
])
def test_bad_aspect_or_margins_exit_2_naming_them(tmp_path, extra, needle):
    result = run_cli("generate", *ASPECT, *extra, "--out", str(tmp_path / "s"), "--offline", "--quiet")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_aspect_and_margins_plan_the_canvas_with_the_presets_budget():
    """No model run: the request the CLI builds is the planner's canvas at the preset's budget."""
    from inference.canvas import frame_to_canvas, plan_canvas
    from server.cli import build_parser, request_from_args

    def request(*extra):
        args = build_parser().parse_args(["generate", *ASPECT, "--box", "0,0.5,0.5,1", *extra, "--out", "x"])
        return request_from_args(args)

    framed = request("--aspect", "2.39", "--margins", "0.2,0,0.2,0.1")
    plan = plan_canvas(2.39, (0.2, 0, 0.2, 0.1), 256 * 256)  # tiny: default_size 256
    assert (framed.width, framed.height, framed.frame) == (plan.width, plan.height, plan.frame)
    assert framed.layers[0].box == (0.0, 0.5, 0.5, 1.0)  # the box stays in frame coordinates
    assert framed.canvas_box(framed.layers[0].box) == frame_to_canvas((0.0, 0.5, 0.5, 1.0), plan.frame)
    sdxl = request("--aspect", "1.5", "--model", "sdxl")
    assert sdxl.width * sdxl.height >= 1024 * 1024 * 0.9 and sdxl.frame is not None
    assert abs((sdxl.frame[2] - sdxl.frame[0]) * sdxl.width / ((sdxl.frame[3] - sdxl.frame[1]) * sdxl.height)
               - 1.5) < 1e-9  # exact aspect: rounding went into margins
    square = request("--aspect", "1")
    assert (square.width, square.height, square.frame) == (256, 256, None)  # whole canvas: no frame
    plain = request("--width", "384", "--height", "256")
    assert (plain.width, plain.height, plain.frame) == (384, 256, None)  # as before: the whole image


@pytest.mark.slow
def test_generate_with_aspect_and_margins_then_extend_for_a_new_shot(tmp_path):
    import numpy as np

    from inference.canvas import extension_offset, plan_canvas, plan_extension
    from inference.stack import load_layer_images, load_stack

    src = tmp_path / "src"
    result = run_cli("generate", *ASPECT, "--box", "0,0.5,0.5,1", "--aspect", "1.5", "--margins", "0.1,0,0.1,0",
                     "--tta", "1", "--out", str(src), "--offline", "--quiet")
    assert result.returncode == 0, result.stderr
    plan = plan_canvas(1.5, (0.1, 0, 0.1, 0), 256 * 256)
    stack = load_stack(src)
    assert (stack.width, stack.height) == (plan.width, plan.height) and stack.frame == pytest.approx(plan.frame)
    assert stack.layers[1].box == (0.0, 0.5, 0.5, 1.0)
    assert "frame" in result.stdout

    for bad, needle in ((["--margins", "0.5,0,-1,0"], "margins.right = -1 is outside"),
                        (["--margins", "4,4,4,4"], "more than the cap of 2048")):
        failed = run_cli("extend", "--stack", str(src), *bad, "--out", str(tmp_path / "bad"), "--offline", "--quiet")
        assert failed.returncode == 2 and needle in failed.stderr, failed.stderr
        assert not (tmp_path / "bad").exists()

    out = tmp_path / "ext"
    result = run_cli("extend", "--stack", str(src), "--margins", "0.5,0.1,0.1,0", "--tta", "1", "--out", str(out),
                     "--offline", "--quiet")
    assert result.returncode == 0, result.stderr
    grown = load_stack(out)
    new_plan = plan_extension(stack.width, stack.height, stack.frame, (0.5, 0.1, 0.1, 0))
    assert (grown.width, grown.height) == (new_plan.width, new_plan.height)
    ox, oy = extension_offset(stack.width, stack.height, stack.frame, (0.5, 0.1, 0.1, 0))
    old, new = load_layer_images(stack, src)[0], load_layer_images(grown, out)[0]
    np.testing.assert_array_equal(new[oy + 4:oy + stack.height, ox + 4:ox + stack.width], old[4:, 4:])
