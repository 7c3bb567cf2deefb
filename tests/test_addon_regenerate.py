"""Regenerate one layer from the history, in real Blender against a real server subprocess
(tiny model): Generate → pick the stack's layer 1, give it a new prompt → the operator sends
POST /v1/jobs/{id}/regenerate → the watcher's `tick()` follows the new job → the new stack's
other layers are byte-identical copies, the chosen one is new, and the same backdrop's
planes now show the new files. Mistakes (a layer the stack does not have, no change, a
job the server forgot, another server) are one clear report, never a traceback."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blender_helpers import run_in_blender  # noqa: E402

TIMEOUT = 120.0


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


# --------------------------------------------------------------------------- inside Blender


def scenario_regenerate_one_layer(output: str) -> dict:
    import bpy

    from test_addon_generate_flow import _finished, _report, _setup, _tick_until

    package, _prefs, scene = _setup(output)
    from multiplane.addon import history, importer, properties
    from multiplane.addon.watcher import watcher

    settings = scene.multiplane
    ops = bpy.ops.multiplane
    out = {}

    def planes() -> dict:
        collection = settings.backdrop
        return {obj[importer.PROP_LAYER]: bpy.path.abspath(importer.plane_image(obj).filepath)
                for obj in collection.objects} if collection else {}

    ops.generate()
    out["first"] = _tick_until(_finished, TIMEOUT)
    item = settings.history[0]
    out["item"] = {"job_id": item.job_id, "server": item.server, "path": item.path,
                   "layers": [[layer.name, layer.prompt] for layer in item.layers]}
    out["source_digests"] = _digests(Path(item.path))
    out["collection"] = settings.backdrop.name
    out["planes_before"] = planes()
    out["poll"] = history.MULTIPLANE_OT_history_regenerate_layer.poll(bpy.context)
    settings.history_index = 0
    out["layer_menu"] = [list(entry) for entry in properties.history_layer_items(item)]
    settings.regenerate_layer = "1"  # the panel's menu accepts the stack's own layers
    out["layer_menu_value"] = settings.regenerate_layer

    # Mistakes: reported at once, nothing submitted.
    out["bad_layer"] = _report(lambda: ops.history_regenerate_layer(index=0, layer=5, prompt="a red canoe"))
    out["no_change"] = _report(lambda: ops.history_regenerate_layer(index=0, layer=1))
    out["same_prompt"] = _report(lambda: ops.history_regenerate_layer(index=0, layer=1, prompt="  a boat "))
    out["busy_after_mistakes"] = watcher.busy

    # The real thing: layer 1 with a new prompt, followed like a Generate.
    result = ops.history_regenerate_layer(index=0, layer=1, prompt="a red canoe")
    out["result"] = sorted(result)
    out["phase_at_once"] = watcher.state.phase
    out["second"] = _tick_until(_finished, TIMEOUT)
    new = settings.history[0]
    out["new_item"] = {"job_id": new.job_id, "server": new.server, "path": new.path,
                       "request": json.loads(new.request),
                       "layers": [[layer.name, layer.prompt] for layer in new.layers]}
    out["history_len"] = len(settings.history)
    out["new_digests"] = _digests(Path(new.path))
    out["new_manifest_name"] = json.loads((Path(new.path) / "stack.json").read_text())["name"]
    out["depths"] = [layer.get("depth") for layer in
                     json.loads((Path(new.path) / "stack.json").read_text())["layers"]]
    out["collection_after"] = settings.backdrop.name
    out["backdrops"] = sorted(c.name for c in bpy.data.collections if c.name.startswith("Backdrop: "))
    out["planes_after"] = planes()

    # The server no longer knows the job (e.g. restarted with another output folder).
    settings.history[0].job_id = "job-the-server-never-saw"
    ops.history_regenerate_layer(index=0, layer=1, seed_mode="SET", seed=7)
    out["forgotten"] = _tick_until(_finished, 30)
    out["history_len_after_forgotten"] = len(settings.history)
    watcher.clear_error()

    # A stack made by another server than the one the preferences now point at.
    settings.history[1].server = "REMOTE http://10.1.2.3:8765"
    out["other_server"] = _report(lambda: ops.history_regenerate_layer(index=1, layer=0, seed_mode="RANDOM"))
    out["busy_after_other_server"] = watcher.busy

    # A stack without a job id (imported from elsewhere): greyed out.
    settings.history[1].job_id = ""
    settings.history_index = 1
    out["poll_without_job"] = history.MULTIPLANE_OT_history_regenerate_layer.poll(bpy.context)
    package.unregister()
    return out


# --------------------------------------------------------------------------- pytest side


def test_regenerate_one_layer_from_the_history(tmp_path):
    out = run_in_blender(__file__, "scenario_regenerate_one_layer", timeout=300, output=str(tmp_path))
    assert out["first"]["state"] == "succeeded", out["first"]
    item = out["item"]
    assert item["job_id"] and item["server"].startswith("LOCAL ")
    assert [name for name, _prompt in item["layers"]] == ["background", "layer_01"]
    assert out["poll"] is True
    assert [entry[0] for entry in out["layer_menu"]] == ["0", "1"]
    assert out["layer_menu"][0][1].startswith("Background") and out["layer_menu"][1][1].startswith("Layer 1")
    assert out["layer_menu_value"] == "1"
    source = out["source_digests"]
    assert {"background.png", "layer_01.png"} <= set(source)

    assert "no layer 5" in out["bad_layer"] and "0 (background) to 1" in out["bad_layer"], out["bad_layer"]
    assert "Nothing to change" in out["no_change"], out["no_change"]
    assert "Nothing to change" in out["same_prompt"], out["same_prompt"]
    assert not out["busy_after_mistakes"]
    for report in (out["bad_layer"], out["no_change"], out["same_prompt"]):
        assert "Traceback" not in report

    assert out["result"] == ["FINISHED"]
    assert out["phase_at_once"] in ("starting", "submitting")
    second = out["second"]
    assert second["state"] == "succeeded", second
    assert "running" in second["phases"] or "queued" in second["phases"], second
    new = out["new_item"]
    assert new["job_id"] != item["job_id"] and new["path"] != item["path"]
    assert new["request"]["source"] == item["job_id"]
    assert new["request"]["layer_index"] == 1 and new["request"]["prompt"] == "a red canoe"
    assert "seed" not in new["request"]  # "Keep Seed": only the prompt changed
    assert new["server"] == item["server"]
    assert out["history_len"] == 2
    # The other layer is a byte-identical copy, the chosen one is new.
    assert out["new_digests"]["background.png"] == source["background.png"]
    assert out["new_digests"]["layer_01.png"] != source["layer_01.png"]
    assert dict(new["layers"])["layer_01"] != dict(item["layers"])["layer_01"]
    assert "a red canoe" in dict(new["layers"])["layer_01"]
    # Same backdrop, replaced in place; its planes now show the new stack's files.
    assert out["new_manifest_name"] == out["collection"].removeprefix("Backdrop: ")
    assert out["collection_after"] == out["collection"] and out["backdrops"] == [out["collection"]]
    assert out["depths"] == [None, 6.0]  # the artist's depth carried over
    before, after = out["planes_before"], out["planes_after"]
    assert sorted(after) == sorted(before) == ["background", "layer_01"]
    for layer in ("background", "layer_01"):
        assert Path(before[layer]).parent == Path(item["path"]), before
        assert Path(after[layer]).parent == Path(new["path"]), after

    forgotten = out["forgotten"]
    assert forgotten["state"] == "failed", forgotten
    assert "no longer knows job job-the-server-never-saw" in forgotten["error"], forgotten["error"]
    assert "Generate" in forgotten["error"] and "Traceback" not in forgotten["error"]
    assert out["history_len_after_forgotten"] == 2

    assert "http://10.1.2.3:8765" in out["other_server"] and "local server" in out["other_server"]
    assert not out["busy_after_other_server"]
    assert out["poll_without_job"] is False
