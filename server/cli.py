"""Command line: `python -m server generate|regenerate|restyle|extend|import-layers|serve`.

Bad input prints one clear line on stderr and exits with code 2, before anything is
written or loaded. Engine errors (missing weights...) exit with 1 and their message.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + exits 2; we want one line
        raise UsageError(message)


def _four_numbers(text: str, what: str, names: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} must be {names} numbers") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"{what} {text!r} must have 4 numbers {names}")
    return values  # type: ignore[return-value]


def parse_box(text: str) -> tuple[float, float, float, float]:
    return _four_numbers(text, "box", "x0,y0,x1,y1")


def parse_margins(text: str) -> tuple[float, float, float, float]:
    """L,T,R,B: fractions of the camera frame's width (left, right) and height (top, bottom)."""
    return _four_numbers(text, "margins", "L,T,R,B")


LEAN_HELP = ("lean activations in joint/harmonized runs: the UNet's feed-forwards in token pieces and its "
             "ResNet blocks row by row, the same result in less memory (auto: on GPUs, and on the CPU "
             "when memory is short)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m server", description="Multiplane inference engine and server")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate one layer stack into a folder")
    add_generation_arguments(gen)
    gen.add_argument("--out", required=True, type=Path, help="stack folder to create (must not exist)")

    regen = sub.add_parser("regenerate", help="regenerate one layer of a stack; the others stay byte-identical")
    regen.add_argument("--stack", required=True, type=Path, help="the existing stack folder (or its stack.json)")
    regen.add_argument("--layer-index", required=True, type=int, help="0 = background, 1.. = foregrounds")
    regen.add_argument("--prompt", default=None, help="the layer's new prompt")
    regen.add_argument("--seed", type=int, default=None, help="the layer's new seed")
    add_edit_arguments(regen)

    restyle = sub.add_parser("restyle", help="all layers again with a style prompt, keeping the layout")
    restyle.add_argument("--stack", required=True, type=Path)
    restyle.add_argument("--style", required=True, help="added to the global prompt")
    add_edit_arguments(restyle)

    layered = sub.add_parser("import-layers", help="a layered PSD or OpenRaster file as a new stack")
    layered.add_argument("file", type=Path, help="the .psd or .ora file (bottom layer = background)")
    layered.add_argument("--out", required=True, type=Path, help="stack folder to create (must not exist)")
    layered.add_argument("--name", default="", help="the stack's display name (default: the file's name)")
    layered.add_argument("--exr", action="store_true", help="also write a multilayer OpenEXR stack.exr")
    extend = sub.add_parser("extend", help="grow every layer of a stack around the same frame for a new shot "
                                           "(outpainting); the old pixels stay")
    extend.add_argument("--stack", required=True, type=Path, help="the existing stack folder (or its stack.json)")
    extend.add_argument("--margins", required=True, type=parse_margins, metavar="L,T,R,B",
                        help="what the new shot needs around the frame: fractions of its width/height")
    add_edit_arguments(extend)

    serve = sub.add_parser("serve", help="run the HTTP API (the Blender add-on starts this)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port")
    serve.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    serve.add_argument("--output-root", type=Path, default=None)
    serve.add_argument("--models-dir", type=Path, default=None)
    serve.add_argument("--device", default="auto")
    serve.add_argument("--devices", default=None, metavar="auto|cuda:0,cuda:1",
                       help="one worker (and warm model) per device, jobs to the first free one; "
                            "auto = every CUDA GPU when there are several")
    serve.add_argument("--max-queue", type=int, default=32, help="queued jobs beyond this get HTTP 429")
    serve.add_argument("--retention", type=int, default=100, help="finished stacks kept under the output root")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="also answer to this Host name (a LAN name, a proxy's public name, "
                            "NAME:PORT for a tunnel); repeat for more; also $MULTIPLANE_ALLOW_HOSTS")
    serve.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS: PEM certificate")
    serve.add_argument("--tls-key", type=Path, default=None, help="serve HTTPS: PEM private key")
    serve.add_argument("--max-batch", type=int, default=None, metavar="ROWS",
                       help="rows per UNet call in joint/harmonized runs (default: what fits the free memory)")
    serve.add_argument("--lean-activations", default="auto", metavar="auto|on|off", help=LEAN_HELP)
    serve.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: per device)")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet's attention-free blocks (slower first load; see the README)")
    return parser


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    from inference.request import StackRequest

    d = StackRequest(prompt="")
    p.add_argument("--prompt", required=True, help="the global scene prompt, shared by all layers")
    p.add_argument("--negative", "--negative-prompt", dest="negative", default="")
    p.add_argument("--background", default="", help="the background layer's own prompt")
    p.add_argument("--layer", action="append", default=[], metavar="PROMPT",
                   help="a foreground layer's prompt, back to front; repeat for more layers")
    p.add_argument("--box", action="append", default=[], type=parse_box, metavar="X0,Y0,X1,Y1",
                   help="optional normalized layout box for the layer at the same position")
    p.add_argument("--width", type=int, default=None, help=f"canvas pixels (default {d.width}); "
                                                              f"not with --aspect")
    p.add_argument("--height", type=int, default=None, help=f"canvas pixels (default {d.height}); "
                                                               f"not with --aspect")
    p.add_argument("--aspect", type=float, default=None,
                   help="the camera frame's width/height: plans the canvas at the model's pixel budget "
                        "(exact aspect, multiples of 64, at most 2048 per side); boxes are in frame coordinates")
    p.add_argument("--margins", type=parse_margins, default=None, metavar="L,T,R,B",
                   help="with --aspect: extra canvas around the frame, fractions of its width/height")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--method", default=d.method)
    p.add_argument("--tta", type=int, default=d.tta_passes, help="transparent decoder passes: 1, 2, 4 or 8")
    p.add_argument("--model", default="sdxl", help="tiny, sdxl, sd15, a diffusers folder or a .safetensors file")
    p.add_argument("--models-dir", type=Path, default=None, help="extra folder searched for weight files")
    p.add_argument("--offline", action="store_true", help="never download; fail with the list of missing files")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--offload", action="store_true", help="model CPU offload (low GPU memory)")
    p.add_argument("--vae-tiling", action="store_true", help="tile the VAE decode (low memory)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float16 on GPUs, "
                                                 "float32 on the CPU; bfloat16 halves CPU memory)")
    p.add_argument("--max-batch", type=int, default=None, metavar="ROWS",
                   help="rows per UNet call in joint/harmonized runs (default: what fits the free memory)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet's attention-free blocks (slower first load; see the README)")
    p.add_argument("--lean-activations", default="auto", metavar="auto|on|off", help=LEAN_HELP)
    p.add_argument("--psd", action="store_true", help="also write a layered stack.psd")
    p.add_argument("--ora", action="store_true", help="also write an OpenRaster stack.ora")
    p.add_argument("--exr", action="store_true",
                   help="also write a multilayer OpenEXR stack.exr (linear, premultiplied) for compositors")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="new stack folder (must not exist)")
    p.add_argument("--model", default=None, help="default: the model recorded in the stack")
    p.add_argument("--tta", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--offline", action="store_true")
    p.add_argument("--quiet", action="store_true")


def canvas_from_args(args):
    """(width, height, frame, plan): from --aspect/--margins with the model's pixel budget
    (`inference.canvas.plan_canvas`), else --width/--height with the frame the whole image
    (plan None). Raises InvalidRequest naming the option."""
    from inference.canvas import plan_canvas
    from inference.errors import InvalidRequest
    from inference.models import pixel_budget
    from inference.request import StackRequest, validate_margins

    if args.aspect is None:
        if args.margins is not None:
            raise InvalidRequest("margins", "--margins needs --aspect (the camera frame's width/height) "
                                            "to plan the canvas around the frame")
        default = StackRequest(prompt="")
        return args.width or default.width, args.height or default.height, None, None
    if args.width is not None or args.height is not None:
        raise InvalidRequest("aspect", "--aspect/--margins plan the canvas size; leave out --width/--height "
                                       "(or give only --width/--height for a canvas that is the whole frame)")
    margins = args.margins or (0.0, 0.0, 0.0, 0.0)
    validate_margins("margins", margins)
    try:
        plan = plan_canvas(args.aspect, margins, pixel_budget(args.model))
    except ValueError as error:
        raise InvalidRequest("aspect", str(error)) from None
    return plan.width, plan.height, None if plan.whole else plan.frame, plan


def request_from_args(args):
    """Build and validate the StackRequest; raises InvalidRequest naming the field."""
    from inference.errors import InvalidRequest
    from inference.request import LayerSpec, StackRequest

    if len(args.box) > len(args.layer):
        raise InvalidRequest("box", f"{len(args.box)} boxes given for {len(args.layer)} layers")
    layers = tuple(LayerSpec(prompt=p, box=args.box[i] if i < len(args.box) else None)
                   for i, p in enumerate(args.layer))
    width, height, frame, _plan = canvas_from_args(args)
    return StackRequest(prompt=args.prompt, background=args.background, layers=layers,
                        negative_prompt=args.negative, width=width, height=height,
                        steps=args.steps, guidance=args.guidance, seed=args.seed,
                        method=args.method, tta_passes=args.tta, frame=frame).validated()


class ProgressBar:
    """A one-line progress display on stderr (tqdm), one bar per phase and layer."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar = None
        self._key = None

    def __call__(self, p) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        key = (p.phase, p.layer)
        if key != self._key:
            self.close()
            self._key = key
            label = p.phase if p.layer is None else f"{p.phase} layer {p.layer + 1}/{p.layers}"
            if p.message:
                label += f" {p.message}"
            unit = "B" if p.phase == "download" else "it"
            self._bar = tqdm(total=p.total or None, desc=label, unit=unit, unit_scale=p.phase == "download",
                             leave=False, file=sys.stderr, dynamic_ncols=True)
        if self._bar is not None:
            if p.total and self._bar.total != p.total:
                self._bar.total = p.total
            self._bar.n = p.step
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def cmd_generate(args) -> int:
    from inference.engine import Engine, EngineSettings
    from inference.progress import CancelToken

    request = request_from_args(args)  # InvalidRequest → exit 2 in main()
    plan = canvas_from_args(args)[3]
    if plan is not None and plan.capped:
        print(f"note: the canvas is capped at 2048 pixels per side: the frame gets {plan.frame_width:.0f}x"
              f"{plan.frame_height:.0f} px, less detail than the model's native size", file=sys.stderr)
    out = args.out
    if out.exists():
        raise UsageError(f"--out: {out} already exists; choose a new folder")
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    engine = Engine(EngineSettings(device=args.device, models_dir=args.models_dir,
                                   allow_download=not args.offline, offload=args.offload,
                                   vae_tiling=args.vae_tiling, max_batch=args.max_batch, dtype=args.dtype,
                                   lean_activations=args.lean_activations, compile=args.compile))
    bar = ProgressBar(args.quiet)
    cancel = CancelToken()
    try:
        stack = engine.generate(request, args.model, out, progress=bar, cancel=cancel,
                                export_psd=args.psd, export_ora=args.ora, export_exr=args.exr)
    except KeyboardInterrupt:
        cancel.cancel("interrupted")
        raise
    finally:
        bar.close()
    print(f"wrote {out} ({len(stack.layers)} layers, {stack.width}x{stack.height}, "
          f"{stack.timings.get('total', 0):.1f} s){frame_note(stack)}")
    return EXIT_OK


def frame_note(stack) -> str:
    """', frame W x H px at (x, y)' for a stack whose camera frame is not the whole canvas."""
    if stack.frame is None:
        return ""
    x0, y0, x1, y1 = stack.frame
    return (f", frame {(x1 - x0) * stack.width:.0f}x{(y1 - y0) * stack.height:.0f} px at "
            f"({x0 * stack.width:.0f}, {y0 * stack.height:.0f})")


def run_edit(args, edit) -> int:
    """Shared by `regenerate`, `restyle` and `extend`: engine set-up, progress bar, report."""
    from inference.engine import Engine, EngineSettings
    from inference.progress import CancelToken

    if args.out.exists():
        raise UsageError(f"--out: {args.out} already exists; choose a new folder")
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    engine = Engine(EngineSettings(device=args.device, models_dir=args.models_dir,
                                   allow_download=not args.offline))
    bar = ProgressBar(args.quiet)
    try:
        stack = edit(engine, progress=bar, cancel=CancelToken())
    finally:
        bar.close()
    print(f"wrote {args.out} ({len(stack.layers)} layers, {stack.width}x{stack.height}){frame_note(stack)}")
    return EXIT_OK


def cmd_regenerate(args) -> int:
    return run_edit(args, lambda engine, **kw: engine.regenerate(
        args.stack, args.layer_index, args.out, new_prompt=args.prompt, new_seed=args.seed,
        model=args.model, tta_passes=args.tta, **kw))


def cmd_restyle(args) -> int:
    return run_edit(args, lambda engine, **kw: engine.restyle(
        args.stack, args.style, args.out, model=args.model, tta_passes=args.tta, **kw))


def cmd_import_layers(args) -> int:
    """Warnings (what the stack could not carry over) go to stderr, one per line."""
    from inference.request import validate_name
    from inference.stack.layered_import import import_layered

    if args.out.exists():
        raise UsageError(f"--out: {args.out} already exists; choose a new folder")
    validate_name("name", args.name)
    stack = import_layered(args.file, args.out, name=args.name, export_exr=args.exr)
    for warning in stack.imported["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out} ({len(stack.layers)} layers, {stack.width}x{stack.height}, "
          f"{len(stack.imported['warnings'])} warning(s))")
    return EXIT_OK
def cmd_extend(args) -> int:
    return run_edit(args, lambda engine, **kw: engine.extend(
        args.stack, args.margins, args.out, model=args.model, tta_passes=args.tta, **kw))


def cmd_serve(args, engine_factory=None) -> int:
    """`engine_factory(device)`: an engine per device (tests); default the real Engine.
    Start-up failures raise InvalidRequest (one line, exit 2); after serving, the process
    ends at once (`process.exit_process`)."""
    from .process import exit_process, run_server

    code = run_server(host=args.host, port=args.port, parent_pid=args.parent_pid,
                      output_root=args.output_root, device=args.device,
                      models_dir=args.models_dir, max_queue=args.max_queue,
                      retention=args.retention, engine_factory=engine_factory,
                      allow_hosts=tuple(args.allow_host), tls_cert=args.tls_cert,
                      tls_key=args.tls_key, devices=args.devices,
                      engine_options=dict(max_batch=args.max_batch, dtype=args.dtype,
                                          lean_activations=args.lean_activations, compile=args.compile)) or EXIT_OK
    exit_process(code)
    return code


def main(argv: list[str] | None = None) -> int:
    from inference.errors import Cancelled, InvalidRequest, MultiplaneError

    try:
        args = build_parser().parse_args(argv)
        handler = {"generate": cmd_generate, "regenerate": cmd_regenerate, "restyle": cmd_restyle,
                   "extend": cmd_extend, "import-layers": cmd_import_layers, "serve": cmd_serve}[args.command]
        return handler(args)
    except (UsageError, InvalidRequest) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Cancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("cancelled: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except MultiplaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
