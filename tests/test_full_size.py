"""The full-size builder (tools/full_size.py) at meta/tiny scale: it plans exactly each
preset's files with the published layouts, its configs build the real module shapes, and
what it writes is a Hugging Face cache the product's lookup finds. No real-size tensor is
ever allocated here; `make verify-full-size` does the real thing."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from inference.hub import find_in_hf_cache, locate_file, plan_snapshot
from inference.models import PRESETS, LayerDiffuseFile
from tools import full_size

FULL_PRESETS = ("sdxl", "sd15")


@pytest.fixture(scope="module")
def plans() -> dict[str, list[full_size.PlannedFile]]:
    return {name: full_size.plan_preset(name) for name in FULL_PRESETS}


def by_name(planned) -> dict[str, full_size.PlannedFile]:
    return {f.filename: f for f in planned}


# -- the file list ------------------------------------------------------------------------
@pytest.mark.parametrize("name", FULL_PRESETS)
def test_plan_is_exactly_the_presets_files(plans, name):
    preset = PRESETS[name]
    planned = {(f.repo_id, f.filename) for f in plans[name]}
    expected = {(f.repo_id, f.filename) for f in preset.base_files}
    expected |= {(f.repo_id, f.filename) for f in preset.required_layerdiffuse()}
    assert any(f.role == "encoder" for f in preset.required_layerdiffuse())  # both presets have one
    if name == "sd15":  # the joint method's optional model is built too
        expected.add(("LayerDiffusion/layerdiffusion-v1", "layer_sd15_joint.safetensors"))
    assert planned == expected
    assert len(plans[name]) == len(planned)  # no file twice
    weights = [f for f in plans[name] if f.filename.endswith(".safetensors")]
    assert all(f.shapes and f.content is None for f in weights)
    assert all(".fp16." in f.filename for f in weights if f.role == "base")


def test_alternatives_of_a_required_role_are_not_built():
    preset = PRESETS["sdxl"]
    alternatives = [f for f in preset.layerdiffuse if f.alternative]
    assert alternatives  # the x300 LayerDiffuse_Diffusers encoder
    optional_same_role = LayerDiffuseFile("r/x", "another_encoder.safetensors", "encoder", 1, optional=True)
    extra_role = LayerDiffuseFile("LayerDiffusion/layerdiffusion-v1", "layer_xl_extra.safetensors", "joint", 1,
                                  optional=True)
    widened = dataclasses.replace(preset, layerdiffuse=preset.layerdiffuse + (optional_same_role, extra_role))
    built = full_size.layerdiffuse_to_build(widened)
    assert extra_role in built
    assert not set(alternatives) & set(built) and optional_same_role not in built
    assert set(preset.required_layerdiffuse()) <= set(built)


def test_manifest_entry_of_each_layerdiffuse_file(weight_manifest):
    entry = lambda filename, role: full_size.manifest_entry(  # noqa: E731
        LayerDiffuseFile("r/x", filename, role, 0), weight_manifest)
    assert entry("ld_diffusers_sdxl_attn.safetensors", "unet_patch") == "ld_diffusers_sdxl_attn"
    assert entry("layer_sd15_joint.safetensors", "joint") == "layer_sd15_joint"
    assert entry("layer_sd15_vae_transparent_decoder.safetensors", "decoder") == "vae_transparent_decoder"
    for encoder in ("vae_transparent_encoder", "layer_sd15_vae_transparent_encoder",
                    "ld_diffusers_sdxl_vae_transparent_encoder"):
        assert entry(f"{encoder}.safetensors", "encoder") == "vae_transparent_encoder"
    with pytest.raises(KeyError, match="no tensor layout"):
        entry("layer_sd15_unknown.safetensors", "attention_sharing")


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_layerdiffuse_files_have_the_manifest_layouts(plans, weight_manifest, name):
    for f in plans[name]:
        if f.role == "base":
            continue
        stem = Path(f.filename).stem
        entry = stem if stem in weight_manifest["files"] else full_size.MANIFEST_ENTRY_BY_ROLE[f.role]
        assert f.shapes == {k: tuple(v) for k, v in weight_manifest["files"][entry].items()}, f.filename
        assert list(f.shapes) == sorted(f.shapes)
        assert f.init == (full_size.LOW_RANK_DELTA if f.role == "unet_patch" else full_size.RECIPE)


# -- the real shapes (meta device) ----------------------------------------------------------
def test_sdxl_shapes(plans, weight_manifest):
    files = by_name(plans["sdxl"])
    unet = files["unet/diffusion_pytorch_model.fp16.safetensors"].shapes
    te1 = files["text_encoder/model.fp16.safetensors"].shapes
    te2 = files["text_encoder_2/model.fp16.safetensors"].shapes
    # Two text encoders, 768 and 1280 wide; the second one's pooled projection feeds the UNet.
    assert te1["text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert all(k.startswith("text_model.") for k in [*te1, *te2] if k != "text_projection.weight")  # Hub names
    assert "text_projection.weight" not in te1
    assert te2["text_model.embeddings.token_embedding.weight"] == (49408, 1280)
    assert te2["text_projection.weight"] == (1280, 1280)
    assert sum(".layers." in k and k.endswith("self_attn.q_proj.weight") for k in te2) == 32
    # Cross-attention reads both encoders' states concatenated; 6 micro-conditions x 256 + 1280.
    assert unet["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (640, 768 + 1280)
    assert unet["add_embedding.linear_1.weight"] == (1280, 6 * 256 + 1280)
    assert sum(k.endswith("attn1.to_q.weight") for k in unet) == 70  # 10-layer blocks at 1280
    # The SDXL delta covers 560 UNet parameters with their exact shapes.
    delta = weight_manifest["files"]["ld_diffusers_sdxl_attn"]
    assert len(delta) == 560
    assert {k: tuple(v) for k, v in delta.items()} == {k: unet[k] for k in delta}
    total = sum(math.prod(s) for s in unet.values())
    assert 2.5e9 < total < 2.6e9  # SDXL's 2.57 B UNet parameters


def test_sd15_shapes(plans, weight_manifest):
    files = by_name(plans["sd15"])
    unet = files["unet/diffusion_pytorch_model.fp16.safetensors"].shapes
    te = files["text_encoder/model.fp16.safetensors"].shapes
    assert te["text_model.embeddings.token_embedding.weight"] == (49408, 768)
    joint = weight_manifest["files"]["layer_sd15_joint"]
    for entry in weight_manifest["layer_sd15_module_order"]:
        module, i = entry["diffusers"], entry["index"]
        q_out, q_in = unet[f"{module}.to_q.weight"]
        k_out, k_in = unet[f"{module}.to_k.weight"]
        # Each per-frame LoRA is sized from the attention module it wraps.
        assert tuple(joint[f"hookers.layers.{i}.to_q_lora.0.down.weight"]) == (256, q_in)
        assert tuple(joint[f"hookers.layers.{i}.to_k_lora.0.down.weight"]) == (256, k_in)
        assert tuple(joint[f"hookers.layers.{i}.to_k_lora.0.up.weight"]) == (k_out, 256)
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert "add_embedding.linear_1.weight" not in unet


def test_configs_are_the_hub_layouts(plans):
    sdxl = by_name(plans["sdxl"])
    index = json.loads(sdxl["model_index.json"].content)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    unet_config = json.loads(sdxl["unet/config.json"].content)
    assert unet_config["_class_name"] == "UNet2DConditionModel"
    assert unet_config["transformer_layers_per_block"] == [1, 2, 10]
    sd15 = by_name(plans["sd15"])
    assert json.loads(sd15["model_index.json"].content)["safety_checker"][1] == "StableDiffusionSafetyChecker"
    assert json.loads(sd15["vae/config.json"].content)["scaling_factor"] == 0.18215


# -- values ----------------------------------------------------------------------------------
def test_recipe_values_match_the_reference_recipe():
    shapes = {"a.bias": (5,), "a.weight": (4, 3, 2, 2), "n.weight": (6,)}
    for i, (name, shape) in enumerate(shapes.items()):
        r = torch.randn(shape, generator=torch.Generator().manual_seed(7 + i))
        expected = {"a.bias": 0.1 * r, "a.weight": r / math.sqrt(12), "n.weight": 1 + 0.1 * r}[name]
        assert torch.equal(full_size.tensor_values(i, name, shape, full_size.RECIPE, salt=7), expected)


def test_low_rank_delta_has_the_published_rank_and_a_small_scale():
    delta = full_size.tensor_values(0, "x.to_q.weight", (300, 400), full_size.LOW_RANK_DELTA)
    assert torch.linalg.matrix_rank(delta).item() == full_size.DELTA_RANK
    assert delta.std().item() == pytest.approx(full_size.DELTA_SCALE / math.sqrt(400), rel=0.1)


def test_file_salt_separates_files():
    assert full_size.file_salt("a/b", "x.safetensors") != full_size.file_salt("a/b", "y.safetensors")


# -- the cache it writes (tiny tensors, real file list) ----------------------------------------
def shrunk(planned: list[full_size.PlannedFile], keep: int = 3) -> list[full_size.PlannedFile]:
    """The same files with the first `keep` tensor names each, every dimension capped at 3."""
    out = []
    for f in planned:
        if f.shapes is not None:
            names = list(f.shapes)[:keep]
            f = dataclasses.replace(f, shapes={n: tuple(min(d, 3) for d in f.shapes[n]) for n in names})
        out.append(f)
    return out


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_written_cache_is_found_by_the_products_lookup(plans, tmp_path, name):
    preset = PRESETS[name]
    hub = tmp_path / "hf" / "hub"
    small = shrunk(plans[name])
    full_size.write_cache(hub, small, log=lambda _: None)

    plan = plan_snapshot(preset.base, preset.base_files, cache_dir=hub)
    assert plan.missing == () and plan.folder is not None
    for ld in full_size.layerdiffuse_to_build(preset):
        path = locate_file(ld.repo_id, ld.filename, cache_dir=hub)
        assert path is not None and path.is_symlink()
    repo = full_size.repo_cache_dir(hub, preset.base)
    commit = full_size.fake_commit(preset.base)
    assert (repo / "refs" / "main").read_text() == commit
    assert plan.folder == repo / "snapshots" / commit
    for f in small:
        path = find_in_hf_cache(f.repo_id, f.filename, cache_dir=hub)
        blob = path.resolve()
        assert blob.parent.name == "blobs" and blob.stat().st_size == f.size
        if f.shapes is None:
            assert path.read_bytes() == f.content
            continue
        salt = full_size.file_salt(f.repo_id, f.filename)
        with safe_open(str(path), framework="pt") as st:
            assert st.metadata() == {"format": "pt"}
            assert list(st.keys()) == list(f.shapes)
            for i, key in enumerate(st.keys()):
                tensor = st.get_tensor(key)
                assert tensor.dtype == torch.float16 and tuple(tensor.shape) == f.shapes[key]
                expected = full_size.tensor_values(i, key, f.shapes[key], f.init, salt).to(torch.float16)
                assert torch.equal(tensor, expected)


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_product_resolves_the_written_cache_offline(plans, tmp_path, monkeypatch, name):
    """With HF_HOME at the fake cache and no network, the preset is available and resolves
    to the written files, one per role (what the CLI run starts from)."""
    from inference.models import preset_availability, resolve_model

    full_size.write_cache(tmp_path / "hf" / "hub", shrunk(plans[name], keep=1), log=lambda _: None)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = next(e for e in preset_availability() if e["name"] == name)
    assert entry["available"] and entry["missing"] == []
    assert all(e["present"] for e in entry["files"] if not e["optional"])
    resolved = resolve_model(name, allow_download=False)
    assert resolved.base == full_size.repo_cache_dir(tmp_path / "hf" / "hub", PRESETS[name].base) / "snapshots" / (
        full_size.fake_commit(PRESETS[name].base))
    built = full_size.layerdiffuse_to_build(PRESETS[name])
    assert {role: path.name for role, path in resolved.files.items()} == {f.role: f.filename for f in built}


def test_written_tokenizers_load_with_the_hub_settings(plans, tmp_path):
    from transformers import CLIPTokenizer

    hub = tmp_path / "hub"
    full_size.write_cache(hub, [f for f in plans["sdxl"] if "tokenizer" in f.filename], log=lambda _: None)
    folder = full_size.repo_cache_dir(hub, PRESETS["sdxl"].base) / "snapshots" / full_size.fake_commit(
        PRESETS["sdxl"].base)
    first = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    second = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"))
    n = len(first("a lighthouse").input_ids)
    ids = first("a lighthouse", padding="max_length", max_length=77).input_ids
    assert ids[0] == 49406 and ids[n - 1] == 49407 and len(ids) == 77
    assert ids[n] == 49407  # pads with <|endoftext|>
    assert second("a lighthouse", padding="max_length", max_length=77).input_ids[n] == 0  # pads with "!"


def test_written_configs_rebuild_the_planned_shapes(plans, tmp_path):
    """What the builder wrote as config.json builds (on meta) exactly the shapes it wrote."""
    from diffusers import UNet2DConditionModel

    hub = tmp_path / "hub"
    full_size.write_cache(hub, [f for f in plans["sdxl"] if f.filename == "unet/config.json"], log=lambda _: None)
    folder = full_size.repo_cache_dir(hub, PRESETS["sdxl"].base) / "snapshots" / full_size.fake_commit(
        PRESETS["sdxl"].base)
    config = UNet2DConditionModel.load_config(str(folder / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert shapes == by_name(plans["sdxl"])["unet/diffusion_pytorch_model.fp16.safetensors"].shapes


# -- the runner ---------------------------------------------------------------------------------
def test_cli_command_is_the_joint_two_layer_offline_run():
    command = full_size.cli_command("sd15", Path("/tmp/out"), size=256, steps=2)
    assert command[1:4] == ["-m", "server", "generate"]
    joined = " ".join(command)
    assert "--model sd15 --method joint" in joined and "--offline" in command and "--tta 1" in joined
    assert command.count("--layer") == 2 and "--width 256 --height 256 --steps 2" in joined


def test_offline_env_keeps_everything_in_the_work_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", "/elsewhere")
    env = full_size.offline_env(tmp_path)
    assert env["HF_HOME"] == str(tmp_path / "hf") and env["HF_HUB_OFFLINE"] == "1"
    assert env["MULTIPLANE_CACHE_DIR"] == str(tmp_path / "multiplane-cache") and "HF_HUB_CACHE" not in env


def test_peak_rss_of_a_process_tree_counts_grandchildren():
    """A grandchild holding 300 MB shows in the peak of the tree rooted at its parent (how
    the CLI run is measured); the parent alone does not reach it."""
    from bench.common import PeakSampler

    hold = "import time; b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {hold!r}])"
    proc = subprocess.Popen([sys.executable, "-c", parent])
    with PeakSampler(proc.pid, tree=True, interval=0.02) as tree, PeakSampler(proc.pid, interval=0.02) as alone:
        proc.wait()
    assert tree.peak > 300_000_000 > alone.peak


def test_failed_run_deletes_its_cache_and_names_the_cli_error(plans, tmp_path, monkeypatch):
    """Tensors too small for the model: the CLI fails to load; the report carries its
    message and the temporary cache is gone."""
    monkeypatch.setattr(full_size, "cli_command", lambda name, out, **kw: [
        sys.executable, "-c", "import os, sys; print('loading', os.environ['HF_HOME']); sys.exit(3)"])
    tiny_files = shrunk(plans["sd15"], keep=1)
    with pytest.raises(full_size.VerifyFailed, match=r"exited with 3[\s\S]*loading .*multiplane-full-size-sd15-"):
        full_size.verify_preset("sd15", work_root=tmp_path, planned=tiny_files, log=lambda _: None)
    assert os.listdir(tmp_path) == []


def test_killed_run_says_it_was_probably_memory(plans, tmp_path, monkeypatch):
    monkeypatch.setattr(full_size, "cli_command", lambda name, out, **kw: [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(full_size.VerifyFailed, match="killed, probably out of memory"):
        full_size.verify_preset("sd15", work_root=tmp_path, planned=shrunk(plans["sd15"], keep=1),
                                log=lambda _: None)
    assert os.listdir(tmp_path) == []


def test_regenerate_command_edits_one_foreground_offline():
    command = full_size.regenerate_command(Path("/tmp/stack"), Path("/tmp/edited"))
    assert command[1:4] == ["-m", "server", "regenerate"]
    joined = " ".join(command)
    assert "--stack /tmp/stack --layer-index 1" in joined and "--offline" in command
    assert command[-2:] == ["--out", "/tmp/edited"]
