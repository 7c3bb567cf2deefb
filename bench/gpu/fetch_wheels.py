"""Download the wheels the GPU benchmark machine lacks into bench/gpu/wheels/ (ignored by git).

That machine has PyTorch (and its own dependencies) but no network, so the run carries
every other distribution the engine imports, at this venv's versions: the closure of
`bench/gpu/requirements.txt`'s requirements minus what a PyTorch install brings and numpy
(which every PyTorch image has). Pure-Python wheels are fetched once; compiled ones for
CPython 3.10–3.12 on manylinux x86_64 (abi3 wheels once). The total must stay ≤ 60 MB.

`python -m bench.gpu.fetch_wheels` (needs PyPI; run on a machine that has it).
"""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEELS = HERE / "wheels"
LIMIT_BYTES = 60 * 2 ** 20
PYTHONS = ("3.10", "3.11", "3.12")
# Brought by a PyTorch install (its own requirements) or every PyTorch image (numpy).
WITH_TORCH = {"torch", "filelock", "fsspec", "jinja2", "markupsafe", "networkx", "sympy", "mpmath",
              "typing-extensions", "setuptools", "numpy", "triton"}


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: list[str]) -> dict[str, str]:
    """{distribution: installed version} of `roots` and their unconditional requirements."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _name(todo.pop())
        if name in seen or name in WITH_TORCH:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not needed on this platform (a marker excluded it here too)
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" not in req and "sys_platform == \"win32\"" not in req:
                todo.append(req)
    return seen


def is_pure(name: str) -> bool:
    wheel = metadata.distribution(name).read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel


def download(spec: str, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--dest", str(WHEELS), spec, *extra], check=True)


def main() -> int:
    roots = [line.split("#")[0].strip() for line in (HERE / "requirements.txt").read_text().splitlines()]
    wanted = closure([r for r in roots if r])
    WHEELS.mkdir(exist_ok=True)
    for name, version in sorted(wanted.items()):
        spec = f"{name}=={version}"
        if is_pure(name):
            download(spec)
            continue
        for python in PYTHONS:
            try:
                download(spec, "--python-version", python, "--implementation", "cp",
                         "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
                         "--platform", "manylinux_2_17_x86_64")
            except subprocess.CalledProcessError:
                print(f"no {spec} wheel for CPython {python}", file=sys.stderr)
    total = sum(p.stat().st_size for p in WHEELS.glob("*.whl"))
    print(f"{len(list(WHEELS.glob('*.whl')))} wheels, {total / 2 ** 20:.1f} MiB in {WHEELS}")
    if total > LIMIT_BYTES:
        print(f"over the {LIMIT_BYTES / 2 ** 20:.0f} MiB limit: drop the largest optional ones", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
