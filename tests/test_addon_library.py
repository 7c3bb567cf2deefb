"""A history that is a library (issue 11 part 3): every stack in the stacks folder, listed
in any .blend with its name, prompt, model, method, size, date and thumbnails; search; "Use
these settings"; delete after a confirmation, and nothing else; regenerate from another
.blend through the job record the add-on keeps beside the engine's files. The folder logic
(addon/library.py) is tested without Blender, the rest in real Blender on 5.0 and 4.2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, make_stack, run_in_blender  # noqa: E402

from addon import library  # noqa: E402
from addon.stack_reader import read_recipe  # noqa: E402


def _stack(folder: Path, name: str, created: str, prompt: str, model: str = "tiny", method: str = "joint",
           job: tuple[str, str] | None = None, boxes_and_depths=None) -> Path:
    make_stack(folder, name=name)
    manifest = json.loads((folder / "stack.json").read_text())
    manifest.update(created=created, prompt=prompt, method=method, model={"preset": model, "base": "x", "files": {}},
                    negative_prompt="blurry", seed=77, steps=12, guidance=6.5)
    manifest["layers"][0]["prompt"] = "distant hills"
    for layer, (box, depth) in zip(manifest["layers"][1:], boxes_and_depths or []):
        layer["box"], layer["depth"] = box, depth
    (folder / "stack.json").write_text(json.dumps(manifest))
    if job:
        library.write_job_record(folder, *job)
    return folder


def _library(root: Path) -> Path:
    stacks = root / "stacks"
    _stack(stacks / "Lake-a1", "Lake", "2026-11-30T08:00:00Z", "a misty lake at dawn", method="independent",
           boxes_and_depths=[([0.1, 0.2, 0.5, 0.9], 20.0), (None, None), ([0.0, 0.0, 1.0, 0.5], 3.0)])
    _stack(stacks / "Fox-b2", "Fox den", "2026-12-01T09:30:00Z", "a red fox in snow",
           job=("job-b2", "LOCAL /somewhere"))
    (stacks / "Broken-c3").mkdir()
    (stacks / "Broken-c3" / "stack.json").write_text("{not json")
    make_stack(stacks / "Half-d4.partial")
    (stacks / "notes").mkdir()
    return stacks


# --------------------------------------------------------------------------- no Blender


def test_scan_lists_stacks_newest_first_and_names_the_unreadable(tmp_path):
    stacks = _library(tmp_path)
    entries, problems = library.scan_stacks(stacks)
    assert [entry.name for entry in entries] == ["Fox den", "Lake"]
    fox, lake = entries
    assert (fox.job_id, fox.server) == ("job-b2", "LOCAL /somewhere") and lake.job_id == ""
    assert (fox.recipe.prompt, fox.recipe.model, fox.recipe.method) == ("a red fox in snow", "tiny", "joint")
    assert fox.size == "64 x 48" and fox.date == "2026-12-01 09:30"
    assert len(problems) == 1 and "Broken-c3" in problems[0] and "not valid JSON" in problems[0]
    assert library.scan_stacks(tmp_path / "missing") == ([], [])


def test_search_matches_every_word_anywhere():
    texts = ["Fox den a red fox in snow tiny joint", "Lake a misty lake at dawn tiny independent"]
    assert library.filter_flags(texts, "") == [True, True]
    assert library.filter_flags(texts, "FOX snow") == [True, False]
    assert library.filter_flags(texts, "tiny dawn") == [False, True]
    assert library.filter_flags(texts, "fox dawn") == [False, False]


def test_delete_removes_that_stack_and_nothing_else(tmp_path):
    stacks = _library(tmp_path)
    outside = make_stack(tmp_path / "elsewhere" / "Other")
    with pytest.raises(library.LibraryError, match="not in the stacks folder"):
        library.delete_stack(outside, stacks)
    with pytest.raises(library.LibraryError, match="not in the stacks folder"):
        library.delete_stack(stacks / "Lake-a1" / ".." / ".." / "elsewhere" / "Other", stacks)
    with pytest.raises(library.LibraryError, match="not a stack, nothing was deleted"):
        library.delete_stack(stacks / "notes", stacks)
    library.delete_stack(stacks / "Lake-a1", stacks)
    assert not (stacks / "Lake-a1").exists()
    assert sorted(p.name for p in stacks.iterdir()) == ["Broken-c3", "Fox-b2", "Half-d4.partial", "notes"]
    assert (outside / "stack.json").is_file()


def test_panel_settings_recall_the_request(tmp_path):
    stacks = _library(tmp_path)
    values = library.panel_settings(read_recipe(stacks / "Lake-a1"))
    assert values["prompt"] == "a misty lake at dawn" and values["negative_prompt"] == "blurry"
    assert values["background_prompt"] == "distant hills" and values["stack_name"] == "Lake"
    assert values["layers"] == [{"prompt": "test layer 1", "box": (0.1, 0.2, 0.5, 0.9), "depth": 20.0},
                                {"prompt": "test layer 2", "box": None, "depth": 0.0},
                                {"prompt": "test layer 3", "box": (0.0, 0.0, 1.0, 0.5), "depth": 3.0}]
    assert (values["seed"], values["steps"], values["guidance"]) == (77, 12, 6.5)
    assert (values["method"], values["model"], values["size"]) == ("independent", "tiny", (64, 48))


# --------------------------------------------------------------------------- inside Blender


def scenario_library(root: str) -> dict:
    import types

    import bpy

    helpers.reset_blender()
    helpers.register_as_extension()
    from multiplane.addon import history_library, panel, preferences

    prefs = preferences.get(bpy.context)
    prefs.stacks_dir = str(Path(root) / "stacks")
    scene = bpy.context.scene
    helpers.add_camera(scene)
    out = {"before_load": len(scene.multiplane.history)}
    blend = str(Path(root) / "shot.blend")
    bpy.ops.wm.save_as_mainfile(filepath=blend)
    bpy.ops.wm.open_mainfile(filepath=blend)  # another .blend, or a new session: the library is listed
    scene = bpy.context.scene
    settings = scene.multiplane
    out["items"] = [[i.name, i.prompt, i.model, i.method, i.size, i.created, i.job_id, len(i.layers)]
                    for i in settings.history]
    # Module mode makes no icons (icon_id stays 0), but the previews are loaded from the files.
    out["thumbnails"] = [list(history_library.thumbnail_preview(i.thumbnail).image_size) for i in settings.history]
    out["layer_thumbnails"] = [list(history_library.thumbnail_preview(layer.file).image_size)
                               for layer in settings.history[0].layers]
    out["gone_thumbnail"] = history_library.thumbnail_icon(str(Path(root) / "nothing.png"))
    search = types.SimpleNamespace(filter_name="misty dawn", bitflag_filter_item=1 << 30)
    flags, order = panel.MULTIPLANE_UL_history.filter_items(search, bpy.context, settings, "history")
    out["search"] = [bool(flag) for flag in flags] + [order]
    settings.history_index = 0
    out["regenerate_poll"] = bpy.ops.multiplane.history_regenerate_layer.poll()  # Fox has a job record

    # Use these settings (the Lake stack), one undo step.
    bpy.ops.multiplane.history_use_settings(index=1)
    out["recalled"] = {
        "prompt": settings.prompt, "negative": settings.negative_prompt, "background": settings.background_prompt,
        "name": settings.stack_name, "method": settings.method, "model": settings.model, "seed": settings.seed,
        "steps": settings.steps, "guidance": round(settings.guidance, 3),
        "size": [scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage],
        "layers": [[layer.prompt, layer.use_box, [round(v, 3) for v in layer.box], layer.depth]
                   for layer in settings.layers],
    }

    # Delete: a click only asks (module mode has no window, where invoke_confirm confirms by
    # itself, so the click goes through a stand-in window manager that records the question);
    # confirmed, it removes the stack's folder and its row, and the planes imported from it stay.
    bpy.ops.multiplane.history_import(index=1)
    lake_folder = Path(settings.history[1].path)
    asked = []
    window_manager = types.SimpleNamespace(invoke_confirm=lambda op, event: asked.append(op) or {"RUNNING_MODAL"})
    clicked = types.SimpleNamespace(history_item=lambda _context: settings.history[1])
    result = history_library.MULTIPLANE_OT_history_delete.invoke(
        clicked, types.SimpleNamespace(scene=scene, window_manager=window_manager), None)
    out["invoke_delete"] = [sorted(result), len(asked)]
    out["after_invoke"] = lake_folder.is_dir()
    out["delete"] = sorted(bpy.ops.multiplane.history_delete("EXEC_DEFAULT", index=1))
    out["after_delete"] = [lake_folder.is_dir(), [i.name for i in settings.history],
                           sorted(p.name for p in lake_folder.parent.iterdir())]
    backdrop = bpy.data.collections.get("Backdrop: Lake")
    out["planes_kept"] = len(backdrop.objects) if backdrop else 0
    bpy.ops.multiplane.history_refresh()
    out["after_refresh"] = [i.name for i in settings.history]
    import multiplane

    multiplane.unregister()
    return out


@pytest.mark.parametrize("python", blender_pythons())
def test_history_is_the_stacks_folder_in_any_blend(tmp_path, python):
    _library(tmp_path)
    out = run_in_blender(__file__, "scenario_library", python=python, root=str(tmp_path))
    assert out["items"] == [
        ["Fox den", "a red fox in snow", "tiny", "joint", "64 x 48", "2026-12-01 09:30", "job-b2", 4],
        ["Lake", "a misty lake at dawn", "tiny", "independent", "64 x 48", "2026-11-30 08:00", "", 4],
    ]
    assert out["thumbnails"] == [[64, 48], [64, 48]] and out["layer_thumbnails"] == [[64, 48]] * 4
    assert out["gone_thumbnail"] == 0
    assert out["search"] == [False, True, []]
    assert out["regenerate_poll"] is True
    recalled = out["recalled"]
    assert (recalled["prompt"], recalled["negative"], recalled["background"], recalled["name"]) == (
        "a misty lake at dawn", "blurry", "distant hills", "Lake")
    assert (recalled["method"], recalled["model"], recalled["seed"], recalled["steps"]) == ("independent", "tiny", 77, 12)
    assert recalled["guidance"] == 6.5 and recalled["size"] == [64, 48, 100]
    assert recalled["layers"] == [["test layer 1", True, [0.1, 0.2, 0.5, 0.9], 20.0],
                                  ["test layer 2", False, [0.25, 0.25, 0.75, 0.75], 0.0],
                                  ["test layer 3", True, [0.0, 0.0, 1.0, 0.5], 3.0]]
    assert out["invoke_delete"] == [["RUNNING_MODAL"], 1] and out["after_invoke"] is True  # asked, not deleted
    assert out["delete"] == ["FINISHED"]
    gone, names, left = out["after_delete"]
    assert gone is False and names == ["Fox den"]
    assert left == ["Broken-c3", "Fox-b2", "Half-d4.partial", "notes"]
    assert out["planes_kept"] == 4
    assert out["after_refresh"] == ["Fox den"]
