"""The extension package: Blender's own validator accepts the repository, the builder's zip
holds the add-on, engine and server but no development files, and Blender installs and
runs it the way a user would."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import REPO_ROOT, make_stack, run_in_blender  # noqa: E402


def _addon_tools(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.addon_tools", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = _addon_tools("build", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.suffix == ".zip"
    return path


def test_manifest_passes_blenders_validator():
    proc = _addon_tools("validate")
    assert proc.returncode == 0, proc.stderr
    assert "Success" in proc.stdout


def test_manifest_declares_what_blender_and_users_need():
    manifest = tomllib.loads((REPO_ROOT / "blender_manifest.toml").read_text())
    assert manifest["id"] == "multiplane" and manifest["type"] == "add-on"
    assert manifest["blender_version_min"] == "4.2.0"
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    assert not manifest["tagline"][-1] in ".!?"
    assert set(manifest["permissions"]) == {"files", "network"}


def test_validator_failures_come_back_as_errors(tmp_path):
    (tmp_path / "blender_manifest.toml").write_text('schema_version = "1.0.0"\nid = "broken"\n')
    (tmp_path / "__init__.py").write_text("")
    proc = _addon_tools("validate", str(tmp_path))
    assert proc.returncode == 1
    assert "missing \"name\"" in proc.stderr


def test_package_holds_addon_engine_and_server_but_no_development_files(package):
    names = zipfile.ZipFile(package).namelist()
    top = {name.split("/", 1)[0] for name in names}
    for required in ("blender_manifest.toml", "__init__.py", "addon/__init__.py", "addon/importer.py",
                     "addon/geometry.py", "inference/__init__.py", "server/__init__.py", "requirements.txt"):
        assert required in names, required
    assert {"addon", "inference", "server"} <= top
    for excluded in ("tests", "bench", "tools", ".venv", ".git", ".ci", "Makefile", "pyproject.toml",
                     "requirements-dev.txt", "demo", "dist"):
        assert excluded not in top, excluded
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert _addon_tools("validate", str(package)).returncode == 0


def test_engine_and_server_in_the_package_import_no_development_module(package):
    """The inference environment installs requirements.txt only: shipped engine and server
    code may not need the test helpers (tools/), their httpx, or Blender."""
    import ast

    forbidden = {"tools", "httpx", "bpy", "pytest"}
    found = []
    with zipfile.ZipFile(package) as archive:
        for name in archive.namelist():
            if not (name.startswith(("inference/", "server/")) and name.endswith(".py")):
                continue
            for node in ast.walk(ast.parse(archive.read(name), name)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                found += [(name, m) for m in modules if m.split(".")[0] in forbidden]
    assert found == []
    requirements = zipfile.ZipFile(package).read("requirements.txt").decode()
    assert "httpx" not in requirements


def blender_install(package: str, stack_dir: str) -> dict:
    import bpy

    helpers.reset_blender()
    bpy.ops.extensions.package_install_files(filepath=package, repo="user_default", enable_on_install=True)
    module = sys.modules.get("bl_ext.user_default.multiplane.addon.importer")
    scene = bpy.context.scene
    helpers.add_camera(scene)
    result = bpy.ops.multiplane.import_stack(filepath=stack_dir)
    return {
        "module_file": module.__file__ if module else None,
        "registered": hasattr(bpy.types, "MULTIPLANE_OT_import_stack"),
        "result": sorted(result),
        "planes": len(bpy.data.collections["Backdrop: Test Stack"].objects),
        "home": str(Path.home()),
    }


def test_blender_installs_the_package_and_its_operators_work(package, tmp_path):
    stack = make_stack(tmp_path / "stack", 32, 24, name="Test Stack")
    info = run_in_blender(__file__, "blender_install", package=str(package), stack_dir=str(stack))
    assert info["registered"] and info["result"] == ["FINISHED"] and info["planes"] == 4
    # The operators ran from the installed copy, inside the throw-away home, not from the repo.
    assert info["module_file"] is not None and info["module_file"].startswith(info["home"])
