"""Every preset at its real size, offline: random-weight copies of `sdxl` and `sd15` in a
Hugging Face cache, and the real CLI run against them (`make verify-full-size`).

Why: nobody here can download the published weights, and the tiny model hides what only
the real shapes show (SDXL's two text encoders and pooled projection, 10-layer
transformer blocks, head widths, the 2816-wide added embedding, the 1.9 GB delta over 560
parameters, the full-size transparent decoder, fp16 files cast on load). So we write the
files a user's cache would hold, in the same layout: the exact file list of each
preset (`inference.models.PRESETS[name].base_files`, fp16 variants, same folders) plus its
LayerDiffuse files in their manifest layouts, under `models--org--name/{refs/main,
snapshots/<commit>/..., blobs/<sha256>}` like huggingface_hub writes them. Only the
values are made up.

Values: deterministic and *sane* (activations must stay finite in float32; a NaN image is
a bug), following the recipe of `../shared/reference/README.md` — tensor i of a file (names
sorted) is `randn(shape)` from seed `salt(file) + i`, divided by sqrt(fan-in) for 2+-dim
tensors, `1 + 0.1 r` for 1-dim weights (norm gains), `0.1 r` for other 1-dim tensors.
The SDXL attention delta (`unet_patch`) is a rank-256 product scaled by 0.1, like the
published file (a LoRA merged into dense deltas), so the joint method's factorization
sees the rank it sees in the real file.

Memory: files are written one tensor at a time straight into safetensors (header first,
then each tensor's bytes), so the builder never holds a model; shapes come from models
built on the meta device (no storage).

Configs: `tools/full_size_configs/<preset>/` (public copies of the Hub files, sources in
SOURCES.md); SDXL's UNet config is the project's reference copy in
`../shared/reference/sdxl_unet_config.json`; tokenizers are the real CLIP BPE vocabulary
(`inference.tiny.write_clip_vocabulary`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from tools.reference import REPO_ROOT, reference_dir

CONFIG_DIR = Path(__file__).resolve().with_name("full_size_configs")
MANIFEST_FILE = "layerdiffuse_weight_manifest.json"

# Config files that come from the project's reference data instead of CONFIG_DIR:
# (preset, path in repo) → (reference file, keys the Hub file has on top of it).
REFERENCE_CONFIGS = {
    ("sdxl", "unet/config.json"): ("sdxl_unet_config.json", {"_class_name": "UNet2DConditionModel"}),
}
# Tensor-name prefixes of the Hub files that today's library drops from the module tree:
# the published text encoders were saved by transformers 4.x, whose CLIPTextModel wrapped a
# `text_model`; transformers 5 strips that prefix on load (its conversion mapping).
PUBLISHED_NAME_PREFIX = {"CLIPTextModel": "text_model."}
# LayerDiffuse files whose stem is not a manifest entry share the layout of another file.
MANIFEST_ENTRY_BY_ROLE = {"encoder": "vae_transparent_encoder", "decoder": "vae_transparent_decoder"}

RECIPE = "recipe"  # ../shared/reference/README.md's deterministic weights
LOW_RANK_DELTA = "low_rank_delta"  # rank-DELTA_RANK product, for merged-LoRA delta files
DELTA_RANK = 256
DELTA_SCALE = 0.1  # deltas ~ 0.1 / sqrt(fan_in): visible next to the base weights, not dominant
DTYPE_BYTES = 2  # every published file is fp16

DEFAULT_PRESETS = ("sdxl", "sd15")
PROMPT = "a harbour town at dusk"
BACKGROUND = "quiet harbour with moored boats"
LAYERS = ("a white lighthouse", "a seagull in flight")


def weight_manifest() -> dict:
    return json.loads((reference_dir() / MANIFEST_FILE).read_text())


# -- what gets written ----------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedFile:
    """One file of the fake cache: a weight file (`shapes`, all fp16) or bytes (`content`)."""

    repo_id: str
    filename: str  # path inside the repo
    shapes: Optional[dict[str, tuple[int, ...]]] = None  # sorted tensor names → shape
    content: Optional[bytes] = None
    init: str = RECIPE
    role: str = "base"  # base, or the LayerDiffuse role

    @property
    def size(self) -> int:
        if self.shapes is None:
            return len(self.content or b"")
        return 8 + len(safetensors_header(self.shapes)) + sum(math.prod(s) for s in self.shapes.values()) * DTYPE_BYTES


def layerdiffuse_to_build(preset) -> tuple:
    """The preset's LayerDiffuse files a full run uses: every required file, plus each
    optional file whose role no required file covers (SD 1.5's joint model). Alternatives
    of a required file (same role, e.g. the x300 SDXL encoder) are not needed for a run."""
    required = preset.required_layerdiffuse()
    covered = {f.role for f in required}
    return tuple(f for f in preset.layerdiffuse if f in required or f.role not in covered)


def manifest_entry(ld_file, manifest: dict) -> str:
    """The manifest entry holding a LayerDiffuse file's tensor layout: its stem, else the
    entry of the layout its role shares (every offset encoder has the SDXL encoder's)."""
    stem = Path(ld_file.filename).stem
    if stem in manifest["files"]:
        return stem
    if ld_file.role in MANIFEST_ENTRY_BY_ROLE:
        return MANIFEST_ENTRY_BY_ROLE[ld_file.role]
    raise KeyError(f"{ld_file.filename}: no tensor layout in {MANIFEST_FILE} (role {ld_file.role})")


def config_bytes(preset_name: str, filename: str) -> bytes:
    """A base config file as the Hub has it (CONFIG_DIR copy, or the reference data)."""
    if (preset_name, filename) in REFERENCE_CONFIGS:
        source, extra = REFERENCE_CONFIGS[(preset_name, filename)]
        config = {**extra, **json.loads((reference_dir() / source).read_text())}
        return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    path = CONFIG_DIR / preset_name / filename
    if not path.is_file():
        raise FileNotFoundError(f"preset {preset_name} lists {filename}, but {path} does not exist; add a copy "
                                f"of the Hub file there and note its source in {CONFIG_DIR / 'SOURCES.md'}")
    return path.read_bytes()


def clip_vocabulary_files() -> dict[str, bytes]:
    """vocab.json and merges.txt of the CLIP BPE (the same for every CLIP tokenizer folder)."""
    from inference.tiny import write_clip_vocabulary

    with tempfile.TemporaryDirectory() as scratch:
        write_clip_vocabulary(Path(scratch))
        return {name: (Path(scratch) / name).read_bytes() for name in ("vocab.json", "merges.txt")}


def component_shapes(library_class: Sequence[str], config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names (as the Hub files spell them) and shapes of a pipeline component, from
    the component built on the meta device."""
    import importlib

    import torch

    library, class_name = library_class
    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            model = cls.from_config(config)
        else:  # transformers
            model = cls(cls.config_class.from_dict(config))
    prefix = PUBLISHED_NAME_PREFIX.get(class_name, "")
    published = {(n if n.startswith(prefix) else prefix + n): tuple(t.shape) for n, t in model.state_dict().items()}
    return dict(sorted(published.items()))


def plan_preset(name: str) -> list[PlannedFile]:
    """Every file of preset `name` with its content or tensor layout (no values yet)."""
    from inference.models import PRESETS

    preset = PRESETS[name]
    if not preset.base or not preset.base_files:
        raise ValueError(f"preset {name} has no Hub files (it is built locally)")
    model_index = json.loads(config_bytes(name, "model_index.json"))
    vocabulary = None
    planned = []
    for f in preset.base_files:
        folder, _, leaf = f.filename.rpartition("/")
        if leaf.endswith(".safetensors"):
            config = json.loads(config_bytes(name, f"{folder}/config.json"))
            planned.append(PlannedFile(f.repo_id, f.filename, shapes=component_shapes(model_index[folder], config)))
        elif leaf in ("vocab.json", "merges.txt"):
            vocabulary = vocabulary or clip_vocabulary_files()
            planned.append(PlannedFile(f.repo_id, f.filename, content=vocabulary[leaf]))
        else:
            planned.append(PlannedFile(f.repo_id, f.filename, content=config_bytes(name, f.filename)))
    manifest = weight_manifest()
    for ld in layerdiffuse_to_build(preset):
        layout = manifest["files"][manifest_entry(ld, manifest)]
        shapes = {k: tuple(v) for k, v in sorted(layout.items())}
        planned.append(PlannedFile(ld.repo_id, ld.filename, shapes=shapes, role=ld.role,
                                   init=LOW_RANK_DELTA if ld.role == "unet_patch" else RECIPE))
    return planned


# -- values ---------------------------------------------------------------------------------
def file_salt(repo_id: str, filename: str) -> int:
    """Seed offset per file, so equal positions in different files get different values."""
    return (zlib.crc32(f"{repo_id}/{filename}".encode()) & 0xFFFF) * 1_000_000


def recipe_tensor(name: str, shape: tuple[int, ...], seed: int):
    """One tensor of ../shared/reference/README.md's deterministic weights (float32; `seed`
    is the tensor's position among the sorted names there). The recipe's one home: the
    golden tests build their weights with it too (tests/reference_weights.py)."""
    import torch

    r = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    if len(shape) >= 2:
        return r / math.sqrt(math.prod(shape[1:]))
    if name.endswith("weight"):
        return 1 + 0.1 * r
    return 0.1 * r


def tensor_values(index: int, name: str, shape: tuple[int, ...], init: str, salt: int = 0):
    """Float32 values of tensor `index` (sorted position) of a file, by its init recipe."""
    import torch

    if init == LOW_RANK_DELTA and len(shape) == 2:
        g = torch.Generator().manual_seed(salt + index)
        rank = min(DELTA_RANK, *shape)
        up = torch.randn(shape[0], rank, generator=g) / math.sqrt(rank)
        down = torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1])
        return DELTA_SCALE * (up @ down)
    values = recipe_tensor(name, shape, salt + index)
    return DELTA_SCALE * values if init == LOW_RANK_DELTA else values


# -- writing ----------------------------------------------------------------------------------
def safetensors_header(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The JSON header of an all-fp16 safetensors file, tensors in the given order, padded to 8."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * DTYPE_BYTES
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    data = json.dumps(header, separators=(",", ":")).encode()
    return data + b" " * (-len(data) % 8)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]],
                      values: Callable[[int, str, tuple[int, ...]], object]) -> str:
    """Stream an fp16 safetensors file tensor by tensor; return its sha256 (hex)."""
    import torch

    header = safetensors_header(shapes)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(header).to_bytes(8, "little"), header):
            f.write(chunk)
            digest.update(chunk)
        for i, (name, shape) in enumerate(shapes.items()):
            tensor = values(i, name, shape).to(torch.float16).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{path.name}: {name} came out {tuple(tensor.shape)}, expected {shape}")
            chunk = tensor.numpy().tobytes()
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def fake_commit(repo_id: str) -> str:
    """A stable 40-hex "commit" per repo, so repeated builds land in the same snapshot."""
    return hashlib.sha1(f"multiplane-full-size:{repo_id}".encode()).hexdigest()


def repo_cache_dir(hub_cache: Path, repo_id: str) -> Path:
    return Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))


def write_cache(hub_cache: Path, files: Iterable[PlannedFile], log: Callable[[str], None] = print) -> None:
    """Write `files` into a Hugging Face hub cache (the `hub` folder under HF_HOME) the way
    huggingface_hub lays out downloads: content in `blobs/<sha256>`, the repo tree as
    relative symlinks in `snapshots/<commit>/`, `refs/main` naming the commit."""
    for f in files:
        t = time.perf_counter()
        repo = repo_cache_dir(hub_cache, f.repo_id)
        commit = fake_commit(f.repo_id)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        blobs = repo / "blobs"
        blobs.mkdir(exist_ok=True)
        incoming = blobs / f".incoming-{os.getpid()}"
        if f.shapes is not None:
            salt = file_salt(f.repo_id, f.filename)
            sha = write_safetensors(incoming, f.shapes,
                                    lambda i, name, shape: tensor_values(i, name, shape, f.init, salt))
        else:
            incoming.write_bytes(f.content or b"")
            sha = hashlib.sha256(f.content or b"").hexdigest()
        blob = blobs / sha
        os.replace(incoming, blob)
        link = repo / "snapshots" / commit / f.filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
        if f.shapes is not None:
            log(f"  wrote {f.repo_id}: {f.filename} ({f.size / 1e9:.2f} GB, {len(f.shapes)} tensors, "
                f"{time.perf_counter() - t:.1f} s)")


def build_preset_cache(name: str, hf_home: Path, log: Callable[[str], None] = print) -> list[PlannedFile]:
    """Write preset `name` at full size into `<hf_home>/hub`; return what was written."""
    planned = plan_preset(name)
    write_cache(Path(hf_home) / "hub", planned, log=log)
    return planned


# -- running the real CLI against it ----------------------------------------------------------
def cli_command(name: str, out: Path, *, device: str = "auto", size: int = 256, steps: int = 2) -> list[str]:
    """The user's command: joint, background + 2 foregrounds, one decoder pass, offline."""
    command = [sys.executable, "-m", "server", "generate", "--model", name, "--method", "joint",
               "--prompt", PROMPT, "--background", BACKGROUND]
    for layer in LAYERS:
        command += ["--layer", layer]
    return command + ["--width", str(size), "--height", str(size), "--steps", str(steps), "--tta", "1",
                      "--offline", "--device", device, "--quiet", "--out", str(out)]


def regenerate_command(stack: Path, out: Path, *, device: str = "auto") -> list[str]:
    """An edit of that stack: foreground 1 again with a new prompt, which encodes the other
    layers back into latents (the only full-size use of the offset encoder)."""
    return [sys.executable, "-m", "server", "regenerate", "--stack", str(stack), "--layer-index", "1",
            "--prompt", "a red lighthouse", "--tta", "1", "--offline", "--device", device, "--quiet",
            "--out", str(out)]


def offline_env(work: Path) -> dict:
    """The environment of a user whose HF cache is `work/hf` and who is offline; Multiplane's
    own cache (file hashes) goes to `work` too, so nothing outside it is touched."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", MULTIPLANE_CACHE_DIR=str(work / "multiplane-cache"),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


class VerifyFailed(RuntimeError):
    pass


@dataclass
class StepReport:
    """One CLI run: its stack.json timings (load, denoise, decode, total), wall time, peak RSS."""

    wall_s: float
    peak_rss: int
    timings: dict = field(default_factory=dict)

    def describe(self) -> str:
        t = self.timings
        return (f"load {t.get('load', 0):.1f} s, denoise {t.get('denoise', 0):.1f} s, "
                f"decode {t.get('decode', 0):.1f} s, CLI wall {self.wall_s:.0f} s, "
                f"peak RSS {self.peak_rss / 1e9:.1f} GB")


@dataclass
class RunReport:
    preset: str
    disk_bytes: int
    build_s: float
    generate: StepReport
    regenerate: Optional[StepReport] = None
    layers: list = field(default_factory=list)  # per image of the generated stack: name, mean, std

    def lines(self) -> list[str]:
        lines = [f"{self.preset}: disk {self.disk_bytes / 1e9:.1f} GB, build {self.build_s:.0f} s; "
                 f"generate: {self.generate.describe()}"]
        if self.regenerate is not None:
            lines.append(f"{self.preset}: regenerate layer 1: {self.regenerate.describe()}")
        return lines


def check_stack(out: Path, expected_layers: int) -> list[dict]:
    """Read the stack back with the product's reader; every image must carry information
    (a constant image is what NaN or dead activations turn into after the uint8 cast)."""
    import numpy as np

    from inference.stack import load_layer_images, load_png, load_stack

    stack = load_stack(out)
    if len(stack.layers) != expected_layers:
        raise VerifyFailed(f"{out}: {len(stack.layers)} layers, expected {expected_layers}")
    images = dict(zip((layer.name for layer in stack.layers), load_layer_images(stack, out)))
    images["composite"] = load_png(out / stack.composite, "RGB", stack.width, stack.height, "composite")
    stats = []
    for name, pixels in images.items():
        channels = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64)
        stats.append({"image": name, "mean": [round(v, 1) for v in channels.mean(0)],
                      "std": [round(v, 1) for v in channels.std(0)]})
        if float(channels.std(0).max()) == 0.0:
            raise VerifyFailed(f"{out}: {name} is a constant image (NaN or dead activations?)")
    return stats


def run_cli(command: list[str], env: dict, log_path: Path) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS of it and its children) of one CLI run; output
    goes to `log_path`."""
    from bench.common import PeakSampler

    t = time.perf_counter()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            with PeakSampler(proc.pid, tree=True, interval=0.1) as rss:
                rc = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: do not leave a 20 GB process behind
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return rc, time.perf_counter() - t, rss.peak


def run_step(name: str, step: str, command: list[str], out: Path, work: Path,
             log: Callable[[str], None]) -> StepReport:
    """Run one CLI command writing the stack `out` offline against the cache in `work`;
    VerifyFailed with its output when it fails."""
    log(f"{name}: running {' '.join(command[1:])}")
    log_path = work / f"{step}.log"
    rc, wall_s, peak = run_cli(command, offline_env(work), log_path)
    if rc != 0:
        hint = (" — killed, probably out of memory (SDXL in float32 on a CPU peaks at about 21 GB)"
                if rc == -signal.SIGKILL else "")
        output = log_path.read_text(errors="replace")
        raise VerifyFailed(f"{name}: the CLI exited with {rc}{hint} after {wall_s:.0f} s "
                           f"(peak RSS {peak / 1e9:.1f} GB):\n{output[-4000:]}")
    timings = json.loads((out / "stack.json").read_text()).get("timings", {})
    return StepReport(wall_s=wall_s, peak_rss=peak, timings=timings)


def verify_preset(name: str, *, work_root: Optional[Path] = None, keep: bool = False, device: str = "auto",
                  size: int = 256, steps: int = 2, edit: bool = True, planned: Optional[list[PlannedFile]] = None,
                  log: Callable[[str], None] = print) -> RunReport:
    """Build preset `name` in a temporary HF_HOME, run the CLI offline (generate, then
    regenerate one layer unless not `edit`), check the stacks.

    The temporary folder (about the preset's download size) is deleted afterwards, also on
    failure, unless `keep`.
    """
    planned = planned if planned is not None else plan_preset(name)
    need = sum(f.size for f in planned)
    work = Path(tempfile.mkdtemp(prefix=f"multiplane-full-size-{name}-", dir=work_root))
    try:
        free = shutil.disk_usage(work).free
        log(f"{name}: {len(planned)} files, {need / 1e9:.1f} GB, into {work} ({free / 1e9:.0f} GB free)")
        if free < need + 500_000_000:
            raise VerifyFailed(f"{work}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB (+0.5) needed; "
                               "pass --work-dir on a larger disk")
        t = time.perf_counter()
        write_cache(work / "hf" / "hub", planned, log=log)
        build_s = time.perf_counter() - t
        log(f"{name}: built in {build_s:.0f} s")
        out = work / "stack"
        generate = run_step(name, "generate", cli_command(name, out, device=device, size=size, steps=steps), out,
                            work, log)
        stats = check_stack(out, expected_layers=1 + len(LAYERS))
        regenerate = None
        if edit:
            edited = work / "regenerated"
            regenerate = run_step(name, "regenerate", regenerate_command(out, edited, device=device), edited,
                                  work, log)
            check_stack(edited, expected_layers=1 + len(LAYERS))
            for kept in ("background.png", "layer_02.png"):
                if (edited / kept).read_bytes() != (out / kept).read_bytes():
                    raise VerifyFailed(f"{name}: regenerating layer 1 changed {kept}")
        return RunReport(preset=name, disk_bytes=need, build_s=build_s, generate=generate,
                         regenerate=regenerate, layers=stats)
    finally:
        if keep:
            log(f"{name}: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _raise_on_sigterm() -> None:
    """A terminated run still deletes its gigabytes (finally blocks run on SystemExit)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.full_size", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="build each preset, run the CLI offline, check the stack, delete")
    verify.add_argument("--preset", action="append", choices=DEFAULT_PRESETS, help="default: all")
    verify.add_argument("--work-dir", type=Path, default=None, help="where the temporary caches go (default: $TMPDIR)")
    verify.add_argument("--keep", action="store_true", help="keep the caches and stacks (for inspection)")
    verify.add_argument("--device", default="auto")
    verify.add_argument("--size", type=int, default=256)
    verify.add_argument("--steps", type=int, default=2)
    verify.add_argument("--no-edit", action="store_true", help="skip the regenerate run after generate")
    build = sub.add_parser("build", help="write one preset's full-size cache into HF_HOME and keep it")
    build.add_argument("--preset", required=True, choices=DEFAULT_PRESETS)
    build.add_argument("--hf-home", required=True, type=Path)
    plan = sub.add_parser("plan", help="list the files and sizes each preset would write")
    plan.add_argument("--preset", action="append", choices=DEFAULT_PRESETS)
    args = parser.parse_args(argv)
    _raise_on_sigterm()

    if args.command == "plan":
        for name in args.preset or DEFAULT_PRESETS:
            planned = plan_preset(name)
            for f in planned:
                print(f"{name}  {f.size / 1e6:10.1f} MB  {f.repo_id}: {f.filename}")
            print(f"{name}  {sum(f.size for f in planned) / 1e9:10.2f} GB in all")
        return 0
    if args.command == "build":
        planned = build_preset_cache(args.preset, args.hf_home)
        print(f"wrote {sum(f.size for f in planned) / 1e9:.1f} GB into {args.hf_home / 'hub'}")
        return 0

    reports, failures = [], []
    for name in args.preset or DEFAULT_PRESETS:
        try:
            report = verify_preset(name, work_root=args.work_dir, keep=args.keep, device=args.device,
                                   size=args.size, steps=args.steps, edit=not args.no_edit)
        except VerifyFailed as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            failures.append(name)
            continue
        reports.append(report)
        for line in report.lines():
            print(line)
        for stats in report.layers:
            print(f"    {stats['image']}: mean {stats['mean']} std {stats['std']}")
    print("\nfull-size verification:")
    for report in reports:
        for line in report.lines():
            print("  ok     " + line)
    for name in failures:
        print(f"  FAILED {name}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
