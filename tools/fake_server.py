"""`python -m tools.fake_server <serve options>`: the real server process (`server.process`:
socket, guards, uvicorn, job service, signals) over `FakeEngine`s instead of the engine.

For tests of the process and HTTP layer that need no model: start-up errors, limits, slow
clients, the jobs journal, several devices. $MULTIPLANE_FAKE_STEP_SECONDS is each denoising
step's sleep (default 0).
"""
from __future__ import annotations

import os
import sys

from tools.fake_engine import FakeEngine

STEP_SECONDS_ENV = "MULTIPLANE_FAKE_STEP_SECONDS"


def fake_engine(device: str) -> FakeEngine:
    engine = FakeEngine(step_seconds=float(os.environ.get(STEP_SECONDS_ENV) or 0))
    engine.device = device
    return engine


def main(argv: list[str]) -> int:
    from inference.errors import InvalidRequest
    from server.cli import EXIT_USAGE, UsageError, build_parser, cmd_serve

    try:
        return cmd_serve(build_parser().parse_args(["serve", *argv]), engine_factory=fake_engine)
    except (UsageError, InvalidRequest) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
