"""The sidebar panel and the preferences UI in real Blender: register/unregister twice, and
`draw()` in every state against a recording layout that checks each call against the running
Blender's own UILayout API (function names, keyword names, icons, property names,
operator ids). Runs on bpy 5.0 and, when `make bpy42` made it, on bpy 4.2 LTS."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402
from addon import canvas as addon_canvas  # noqa: E402

NEW_CLASSES = ("MULTIPLANE_OT_generate", "MULTIPLANE_OT_cancel", "MULTIPLANE_OT_layer_add",
               "MULTIPLANE_OT_layer_remove", "MULTIPLANE_OT_layer_move", "MULTIPLANE_OT_randomize_seed",
               "MULTIPLANE_OT_copy_error", "MULTIPLANE_OT_history_import", "MULTIPLANE_OT_history_open_folder",
               "MULTIPLANE_OT_history_regenerate_layer", "MULTIPLANE_OT_test_connection",
               "MULTIPLANE_OT_restart_server", "MULTIPLANE_OT_install_environment",
               "MULTIPLANE_UL_layers", "MULTIPLANE_UL_history", "VIEW3D_PT_multiplane",
               "MultiplanePreferences", "MultiplaneLayer", "MultiplaneHistoryItem",
               "MULTIPLANE_OT_import_stack", "MULTIPLANE_OT_read_shot", "MULTIPLANE_OT_layers_from_selected")


# --------------------------------------------------------------------------- inside Blender


class RecordingLayout:
    """Stands in for bpy.types.UILayout: records every call, and refuses what the real one
    would refuse in this Blender version (unknown function, keyword, icon, property, operator)."""

    def __init__(self, calls: list, problems: list):
        object.__setattr__(self, "calls", calls)
        object.__setattr__(self, "problems", problems)

    def __setattr__(self, name, value):
        import bpy

        if name not in bpy.types.UILayout.bl_rna.properties:
            self.problems.append(f"layout has no attribute {name!r}")
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        import bpy

        functions = bpy.types.UILayout.bl_rna.functions
        if name not in functions:
            raise AttributeError(name)  # so hasattr(layout, "progress") is honest on 4.1-
        parameters = functions[name].parameters

        def call(*args, **kwargs):
            for key in kwargs:
                if key not in parameters:
                    self.problems.append(f"{name}() has no keyword {key!r}")
            icon = kwargs.get("icon")
            if icon is not None and icon not in parameters["icon"].enum_items.keys():
                self.problems.append(f"{name}(): unknown icon {icon!r}")
            self._check(name, args, kwargs)
            self.calls.append({"call": name, "args": [a if isinstance(a, (str, int, float)) else type(a).__name__
                                                      for a in args],
                               "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}})
            if name in ("row", "column", "box", "split", "grid_flow", "column_flow"):
                return RecordingLayout(self.calls, self.problems)
            if name == "operator":
                return _OperatorProps()
            return None

        return call

    def _check(self, name, args, kwargs):
        import bpy

        if name in ("prop", "prop_enum"):
            data, prop = args[0], args[1]
            if prop not in data.bl_rna.properties:
                self.problems.append(f"prop(): {type(data).__name__} has no property {prop!r}")
        elif name == "operator":
            module, _, function = args[0].partition(".")
            try:
                getattr(getattr(bpy.ops, module), function).get_rna_type()
            except (AttributeError, KeyError):
                self.problems.append(f"operator(): {args[0]!r} is not registered")
        elif name == "template_list":
            if not hasattr(bpy.types, args[0]):
                self.problems.append(f"template_list(): UIList {args[0]!r} is not registered")
        elif name == "progress":
            if not 0.0 <= kwargs.get("factor", 0.0) <= 1.0:
                self.problems.append(f"progress(): factor {kwargs['factor']} outside 0..1")


class _OperatorProps:
    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)


def _draw(draw_function, context) -> dict:
    calls, problems = [], []
    draw_function(RecordingLayout(calls, problems), context)
    texts = [c["kwargs"].get("text", "") for c in calls] + [a for c in calls for a in c["args"] if isinstance(a, str)]
    return {"calls": calls, "problems": problems, "texts": texts,
            "operators": [c["args"][0] for c in calls if c["call"] == "operator"],
            "progress": [c["kwargs"] for c in calls if c["call"] == "progress"]}


def scenario_register_twice() -> dict:
    import bpy

    helpers.reset_blender()
    seen = []

    def classes():
        from multiplane.addon import (backdrop, generate, history, layer_list, panel, preferences, properties,
                                      shot_operators)

        modules = (properties, backdrop, preferences, generate, layer_list, history, shot_operators, panel)
        return [cls for module in modules for cls in module.CLASSES]

    for _ in range(2):
        package = helpers.register_as_extension()
        present = [cls.__name__ for cls in classes() if cls.is_registered]
        has_settings = hasattr(bpy.types.Scene, "multiplane")
        layers = bpy.context.scene.multiplane.layers
        layers.add().prompt = "a fox"
        package.unregister()
        gone = [cls.__name__ for cls in classes() if not cls.is_registered]
        seen.append({"present": present, "gone": gone, "has_settings": has_settings,
                     "settings_after": hasattr(bpy.types.Scene, "multiplane")})
    return {"rounds": seen, "version": list(bpy.app.version)}


def scenario_draw_states() -> dict:
    import bpy

    helpers.reset_blender()
    package = helpers.register_as_extension()
    from multiplane.addon import generate, history, installer, panel, preferences, shot
    from multiplane.addon.watcher import WatchState, watcher

    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 1920, 1080, 50
    settings = scene.multiplane
    settings.prompt = "a forest"
    for text in ("a rock", "a fox"):
        settings.layers.add().prompt = text
    settings.layers[1].use_box = True
    settings.layer_index = 1
    draw = lambda layout, context: panel.VIEW3D_PT_multiplane.draw(type("Self", (), {"layout": layout})(), context)
    prefs = preferences.get(bpy.context)
    out = {}

    out["idle"] = _draw(draw, bpy.context)
    settings.shot_margins = (1.0, 0.5, 1.0, 0.0)  # a wide move: 3 frames wide is past the cap
    settings.shot_warning = "Backdrop: Lake: the camera move sees past the edges of background (missing right 0.30)"
    out["capped"] = _draw(draw, bpy.context)
    settings.shot_warning = ""
    settings.shot_margins = (5.0, 0.0, 0.0, 0.0)  # beyond what a canvas may hold
    out["too_wide"] = _draw(draw, bpy.context)
    settings.shot_margins = (0.0, 0.0, 0.0, 0.0)
    watcher.state = WatchState(phase="running", text="Denoising step 3/10, layer 2 of 3", fraction=0.4)
    out["running"] = _draw(draw, bpy.context)
    watcher.state = WatchState(phase="failed", error="The inference server stopped unexpectedly "
                                         "(exit code -9): Killed. Full log: /a/very/long/path/" + "x" * 80 + "/server.log")
    out["error"] = _draw(draw, bpy.context)
    watcher.state = WatchState()
    prefs.python_path = "/nonexistent/python3"
    out["no_server"] = _draw(draw, bpy.context)
    prefs.backend = "REMOTE"
    out["remote_no_url"] = _draw(draw, bpy.context)
    out["prefs_remote"] = _draw(lambda layout, ctx: preferences.draw_preferences(prefs, layout, ctx), bpy.context)
    prefs.backend = "LOCAL"
    prefs.python_path = ""
    out["prefs_local"] = _draw(lambda layout, ctx: preferences.draw_preferences(prefs, layout, ctx), bpy.context)

    class FakeInstall:
        running, done, cancelled, error = True, False, False, None
        status, fraction = "Installing torch (2/4): downloading torch-2.13.0.whl", 0.3

    installer._current = FakeInstall()
    out["installing"] = _draw(draw, bpy.context)
    out["prefs_installing"] = _draw(lambda layout, ctx: preferences.draw_preferences(prefs, layout, ctx), bpy.context)
    installer._current = None
    item = settings.history.add()
    item.name, item.path, item.prompt, item.created = "Forest", "/tmp/forest-stack", "a forest", "2026-01-01 10:00"
    watcher.state = WatchState(phase="succeeded", imported="Backdrop: Forest")
    out["history"] = _draw(draw, bpy.context)
    out["regenerate_poll"] = history.MULTIPLANE_OT_history_regenerate_layer.poll(bpy.context)
    plan = shot.plan_for_scene(scene, settings.model, shot.NO_MARGINS)
    out["size"] = [plan.width, plan.height, round(plan.frame_width), round(plan.frame_height)]
    package.unregister()
    return out


def scenario_layer_operators_and_request() -> dict:
    import bpy

    helpers.reset_blender()
    package = helpers.register_as_extension()
    from multiplane.addon import generate

    scene = bpy.context.scene
    settings = scene.multiplane
    ops = bpy.ops.multiplane
    for _ in range(3):
        ops.layer_add()
    for index, layer in enumerate(settings.layers):
        layer.prompt = f"layer {index}"
    settings.layer_index = 2
    ops.layer_move(direction="UP")
    after_move = [layer.prompt for layer in settings.layers]
    ops.layer_remove()
    after_remove = [layer.prompt for layer in settings.layers]
    settings.layers[0].use_box = True
    settings.layers[0].box = (0.1, 0.2, 0.6, 0.9)
    settings.layers[1].depth = 7.5  # behind layer 0's automatic depth (7.27): refused
    try:
        settings.prompt = "a quiet lake"
        generate.build_request(scene)
    except ValueError as error:
        depth_error = str(error)
    settings.prompt = ""
    settings.layers[1].depth = 3.5
    errors = {"depths": depth_error}
    try:
        generate.build_request(scene)
    except ValueError as error:
        errors["no_prompt"] = str(error)
    settings.prompt = "  a quiet lake  "
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 1000, 500, 100
    body = generate.build_request(scene)
    settings.layers[1].box = (0.5, 0.5, 0.4, 0.9)
    settings.layers[1].use_box = True
    try:
        generate.build_request(scene)
    except ValueError as error:
        errors["box"] = str(error)
    settings.layers[1].use_box = False
    settings.seed = 5
    ops.randomize_seed()
    # Generate with a user mistake: one ERROR report, the operator cancelled, no traceback.
    settings.layers[0].prompt = "   "
    reports = {}
    try:
        ops.generate()
    except RuntimeError as error:
        reports["no_camera"] = str(error)
    helpers.add_camera(scene)
    try:
        ops.generate()
    except RuntimeError as error:
        reports["empty_layer"] = str(error)
    package.unregister()
    return {"after_move": after_move, "after_remove": after_remove, "errors": errors, "body": body,
            "seed": settings.seed if hasattr(bpy.types.Scene, "multiplane") else None,
            "reports": reports}


# --------------------------------------------------------------------------- pytest side


@pytest.mark.parametrize("python", blender_pythons())
def test_register_unregister_twice_clean(python):
    result = run_in_blender(__file__, "scenario_register_twice", python=python)
    for round_ in result["rounds"]:
        assert set(NEW_CLASSES) <= set(round_["present"])
        assert sorted(round_["gone"]) == sorted(round_["present"])
        assert round_["has_settings"] and not round_["settings_after"]


@pytest.mark.parametrize("python", blender_pythons())
def test_panel_draws_every_state_with_valid_calls(python):
    out = run_in_blender(__file__, "scenario_draw_states", python=python)
    for state, drawn in out.items():
        if isinstance(drawn, dict):
            assert drawn["problems"] == [], (state, drawn["problems"])
    # Idle: Generate available, no progress bar; the size row explains the rounding.
    idle = out["idle"]
    assert "multiplane.generate" in idle["operators"] and not idle["progress"]
    # 1920 x 1080 at 50 %: the percentage is ignored; SDXL's 1024^2 budget at exactly 16:9,
    # inside a canvas of 64-multiples (the leftover width is margin, never stretch).
    assert out["size"] == [1408, 768, 1365, 768]
    assert any("Canvas: 1408 x 768" in t for t in idle["texts"])
    assert any("Frame: 1365 x 768 px" in t for t in idle["texts"])
    assert "multiplane.read_shot" in idle["operators"] and "multiplane.layers_from_selected" in idle["operators"]
    assert any("not running" in t for t in idle["texts"])
    assert any("Margins: left 1.00, top 0.50, right 1.00" in t for t in out["capped"]["texts"])
    assert any("Capped at 2048 px a side" in t for t in out["capped"]["texts"])
    assert "missing right 0.30" in " ".join(out["capped"]["texts"])
    assert "multiplane.extend_for_shot" in out["capped"]["operators"]
    assert any("Canvas: 2048 x" in t for t in out["capped"]["texts"])
    assert not any("Capped" in t for t in idle["texts"])
    assert "margins.left = 5 is outside 0..4" in " ".join(out["too_wide"]["texts"]), out["too_wide"]["texts"]
    # Running: a progress bar (4.2+ API) or a label, with the phase text, and Cancel; no Generate.
    running = out["running"]
    assert "multiplane.cancel" in running["operators"] and "multiplane.generate" not in running["operators"]
    if running["progress"]:
        assert running["progress"][0]["factor"] == pytest.approx(0.4)
        assert "layer 2 of 3" in running["progress"][0]["text"]
    else:
        assert any("layer 2 of 3" in t and "40%" in t for t in running["texts"])
    # Error: readable (wrapped into short labels, whole message kept) + copy button.
    error = out["error"]
    assert "multiplane.copy_error" in error["operators"]
    error_lines = [t for t in error["texts"] if "exit code -9" in t or "server.log" in t]
    assert error_lines and all(len(t) <= 48 for t in error_lines)
    # No server: the status line says what is wrong.
    assert any("Python not found: /nonexistent/python3" in t for t in out["no_server"]["texts"])
    assert any("No server URL" in t for t in out["remote_no_url"]["texts"])
    assert "multiplane.test_connection" in out["prefs_remote"]["operators"]
    assert "multiplane.install_environment" in out["prefs_local"]["operators"]
    assert any(t.startswith("Detected: ") and t.endswith("/.venv/bin/python") for t in out["prefs_local"]["texts"])
    # Installing: the progress shows in the panel and the preferences, cancel available.
    assert any("Installing torch" in (p.get("text") or "") for p in out["installing"]["progress"]) or \
        any("Installing torch" in t for t in out["installing"]["texts"])
    assert "multiplane.cancel_install" in out["prefs_installing"]["operators"]
    # History: re-import and open folder; regenerate-one-layer greyed out (poll False).
    history = out["history"]
    for op in ("multiplane.history_import", "multiplane.history_open_folder",
               "multiplane.history_regenerate_layer"):
        assert op in history["operators"]
    assert out["regenerate_poll"] is False
    assert any("Backdrop: Forest" in t for t in history["texts"])


@pytest.mark.parametrize("python", blender_pythons())
def test_layer_list_operators_and_request_body(python):
    out = run_in_blender(__file__, "scenario_layer_operators_and_request", python=python)
    assert out["after_move"] == ["layer 0", "layer 2", "layer 1"]
    assert out["after_remove"] == ["layer 0", "layer 1"]
    assert "Write a prompt" in out["errors"]["no_prompt"]
    assert "inside out" in out["errors"]["box"]
    body = out["body"]
    assert body["prompt"] == "a quiet lake"
    plan = addon_canvas.plan_canvas(2.0, (0.0, 0.0, 0.0, 0.0), 1024 * 1024)  # 1000 x 500, SDXL
    assert (body["width"], body["height"]) == (plan.width, plan.height) == (1472, 768)
    assert body["frame"] == pytest.approx(list(plan.frame)) and plan.frame[0] == 0.0 and plan.frame[1] > 0.0
    assert body["layers"] == [{"prompt": "layer 0", "box": pytest.approx([0.1, 0.2, 0.6, 0.9], abs=1e-6)},
                              {"prompt": "layer 1", "depth": 3.5}]  # depth 0 (spread): left out
    assert "layer 2 depth 7.5 is not nearer than layer 1 depth 7.27273" in out["errors"]["depths"], out["errors"]
    assert "change the layers' depths or their order" in out["errors"]["depths"]
    assert body["method"] == "joint" and body["model"] == "sdxl"
    assert out["seed"] != 5
    assert "no active camera" in out["reports"]["no_camera"]
    assert "Foreground layer 1 has no prompt" in out["reports"]["empty_layer"]
    for message in out["reports"].values():
        assert "Traceback" not in message
