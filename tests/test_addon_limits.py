"""The add-on's mirrored request limits (addon/limits.py, bpy-free) equal the engine's
(inference/request.py): the add-on cannot import the engine, so this test is what keeps
the two from drifting apart (they once allowed 2000- and 1000-character prompts)."""
import ast
from pathlib import Path

from addon import limits as addon_limits
from inference import request as engine_limits

ADDON = Path(__file__).resolve().parents[1] / "addon"


def mirrored_names() -> list[str]:
    return [name for name in vars(addon_limits) if name.isupper()]


def test_every_mirrored_limit_equals_the_engines():
    names = mirrored_names()
    assert {"MAX_PROMPT_CHARS", "MAX_NAME_CHARS", "MAX_FOREGROUNDS", "MIN_SIZE", "MAX_SIZE",
            "SIZE_MULTIPLE", "MIN_STEPS", "MAX_STEPS", "MIN_GUIDANCE", "MAX_GUIDANCE", "MAX_SEED",
            "METHODS", "TTA_PASSES"} <= set(names)
    for name in names:
        assert getattr(addon_limits, name) == getattr(engine_limits, name), name


def test_no_other_add_on_module_writes_a_limit_of_its_own():
    """The Blender modules read the limits from addon/limits.py, not from numbers of their own."""
    values = {getattr(addon_limits, name) for name in mirrored_names()
              if isinstance(getattr(addon_limits, name), int) and getattr(addon_limits, name) > 100}
    for path in ADDON.glob("*.py"):
        if path.name == "limits.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                    isinstance(target, ast.Name) and target.id in mirrored_names() for target in node.targets):
                raise AssertionError(f"{path.name}:{node.lineno} defines a limit; import it from limits.py")
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in values:
                raise AssertionError(f"{path.name}:{node.lineno} writes {node.value!r}, "
                                     f"a limit of limits.py, as a number")
