"""Validate and build the Multiplane extension with Blender's own extension tool.

Blender ships its packager as a stand-alone script (`blender_ext.py`, standard library
only) inside the bpy wheel; running that exact script is the surest way to know that
Blender will accept the package. `python -m tools.addon_tools validate|build` wraps it.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_RELATIVE_TOOL = Path("scripts", "addons_core", "bl_pkg", "cli", "blender_ext.py")


class ToolError(RuntimeError):
    """blender_ext.py is missing or reported a failure."""


def find_blender_ext() -> Path:
    """Path of `blender_ext.py` inside the installed bpy wheel (bpy/<version>/scripts/...)."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.origin:
        raise ToolError("the bpy module is not installed in this Python; `make setup` installs it "
                        "(blender_ext.py, Blender's extension tool, ships inside it)")
    package_dir = Path(spec.origin).parent
    found = sorted(package_dir.glob(str(Path("*") / _RELATIVE_TOOL)))
    if not found:
        raise ToolError(f"no {_RELATIVE_TOOL.name} under {package_dir}/<version>/{_RELATIVE_TOOL.parent}")
    return found[-1]


def _run(args: list[str]) -> str:
    tool = find_blender_ext()
    proc = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "FATAL_ERROR" in output:
        raise ToolError(f"blender_ext.py {args[0]} failed (exit {proc.returncode}):\n{output}")
    return output


def validate(source: Path = REPO_ROOT) -> str:
    """Validate the manifest of a source folder or a built .zip; returns the tool's output."""
    return _run(["validate", str(source)])


def build(output_dir: Path, source_dir: Path = REPO_ROOT) -> Path:
    """Build the extension .zip into `output_dir` and validate the result; returns its path."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    before = set(output_dir.glob("*.zip"))
    output = _run(["build", "--source-dir", str(Path(source_dir).resolve()), "--output-dir", str(output_dir)])
    names = [line.split("building:", 1)[1].strip() for line in output.splitlines() if "building:" in line]
    if names:
        package = output_dir / names[-1]
    else:
        created = sorted(set(output_dir.glob("*.zip")) - before)
        if not created:
            raise ToolError(f"blender_ext.py build did not say what it wrote:\n{output}")
        package = created[-1]
    validate(package)
    return package
