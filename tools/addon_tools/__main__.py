"""`python -m tools.addon_tools validate` / `python -m tools.addon_tools build --output-dir DIR`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import REPO_ROOT, ToolError, build, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.addon_tools",
                                     description="Validate or build the Multiplane Blender extension "
                                                 "with Blender's own blender_ext.py")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="validate blender_manifest.toml (folder or built .zip)")
    check.add_argument("path", nargs="?", type=Path, default=REPO_ROOT,
                       help="extension source folder or package .zip (default: the repository)")
    make = commands.add_parser("build", help="build the extension .zip")
    make.add_argument("--output-dir", type=Path, required=True, help="folder for the .zip")
    make.add_argument("--source-dir", type=Path, default=REPO_ROOT, help="default: the repository")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            print(validate(args.path))
        else:
            print(build(args.output_dir, args.source_dir))
    except ToolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
