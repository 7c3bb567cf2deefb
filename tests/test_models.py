"""Model presets, resolution (models folder, HF cache, downloads), loading the tiny model.

Nothing here reaches the network: HF_HUB_OFFLINE=1 and a temporary HF_HOME for every test,
and huggingface_hub's downloader is replaced by a guard (or by a fake that writes files).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inference import hub, models
from inference.errors import Cancelled, InvalidRequest, MissingWeights, UnsafeCheckpoint
from inference.hub import HubFile, fetch_file, fetch_files, fetch_snapshot
from inference.models import PRESETS, load_model, preset_availability, preset_names, resolve_model
from inference.progress import CancelToken

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One Multiplane cache for the session so the tiny model is built once."""
    return tmp_path_factory.mktemp("multiplane-cache")


@pytest.fixture(autouse=True)
def isolated_hub(monkeypatch, tmp_path, shared_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("MULTIPLANE_CACHE_DIR", str(shared_cache))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to download {args} {kwargs}")

    monkeypatch.setattr(hub, "hf_hub_download", no_network)


@pytest.fixture
def hf_cache(tmp_path) -> Path:
    return tmp_path / "hf-home" / "hub"


def put_in_hf_cache(cache: Path, repo: str, filename: str, data: bytes = b"weights", commit: str = COMMIT) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    path = repo_dir / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return path


def layerdiffuse_into(models_dir: Path, preset: str) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    for f in PRESETS[preset].layerdiffuse:
        (models_dir / f.filename).write_bytes(b"layerdiffuse " + f.filename.encode())


class FakeDownloader:
    """Stands in for hf_hub_download: writes into the cache layout and drives tqdm_class."""

    def __init__(self, sizes: dict[str, int] | None = None, fail: dict[str, Exception] | None = None,
                 chunk: int = 1000):
        self.sizes = sizes or {}
        self.fail = fail or {}
        self.chunk = chunk
        self.calls: list[dict] = []

    def __call__(self, repo_id, filename, *, revision=None, cache_dir=None, local_dir=None, tqdm_class=None, **kw):
        self.calls.append(dict(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir))
        if filename in self.fail:
            raise self.fail[filename]
        size = self.sizes.get(filename, 2500)
        commit = revision if revision and re.fullmatch(r"[0-9a-f]{40}", revision) else COMMIT
        bar = tqdm_class(total=size, initial=0, desc=filename, unit="B", unit_scale=True)
        done = 0
        while done < size:
            n = min(self.chunk, size - done)
            bar.update(n)
            bar.update_transfer(n)  # as huggingface_hub's http_get does; must not double count
            done += n
        bar.close()
        return str(put_in_hf_cache(Path(cache_dir), repo_id, filename, b"x" * size, commit))


# -- presets -----------------------------------------------------------------------------------
def test_presets_describe_the_published_files():
    assert preset_names() == ["sdxl", "sd15", "tiny"]
    sdxl, sd15, tiny = PRESETS["sdxl"], PRESETS["sd15"], PRESETS["tiny"]
    assert (sdxl.family, sd15.family, tiny.family) == ("sdxl", "sd15", "sdxl")
    assert sdxl.base == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sd15.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    roles = {p: {(f.repo_id, f.filename): f.role for f in PRESETS[p].required_layerdiffuse()}
             for p in ("sdxl", "sd15")}
    assert roles["sdxl"] == {
        ("lllyasviel/LayerDiffuse_Diffusers", "ld_diffusers_sdxl_attn.safetensors"): "unet_patch",
        ("LayerDiffusion/layerdiffusion-v1", "vae_transparent_decoder.safetensors"): "decoder",
        ("LayerDiffusion/layerdiffusion-v1", "vae_transparent_encoder.safetensors"): "encoder",
    }
    assert roles["sd15"] == {
        ("LayerDiffusion/layerdiffusion-v1", "layer_sd15_transparent_attn.safetensors"): "attention_sharing",
        ("LayerDiffusion/layerdiffusion-v1", "layer_sd15_vae_transparent_decoder.safetensors"): "decoder",
        ("LayerDiffusion/layerdiffusion-v1", "layer_sd15_vae_transparent_encoder.safetensors"): "encoder",
    }
    assert [(f.filename, f.role) for f in PRESETS["sd15"].layerdiffuse if f.optional] == [
        ("layer_sd15_joint.safetensors", "joint")]
    assert [(f.repo_id, f.filename) for f in PRESETS["sdxl"].alternatives("encoder")] == [
        ("lllyasviel/LayerDiffuse_Diffusers", "ld_diffusers_sdxl_vae_transparent_encoder.safetensors")]
    for preset in (sdxl, sd15):
        names = [f.filename for f in preset.base_files]
        assert not [n for n in names if n.endswith((".bin", ".ckpt", ".pt", ".pth"))]
        assert all(".fp16." in n for n in names if n.endswith(".safetensors"))
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in names and "model_index.json" in names
        assert not [f for f in preset.config_files if f.filename.endswith(".safetensors")]
    # UI sizes: SDXL base ~7 GB + patch ~1.9 GB; SD1.5 smaller
    assert 8e9 < sdxl.approx_download_size < 10e9 and 2e9 < sd15.approx_download_size < 3.5e9


def test_layerdiffuse_sizes_match_the_manifest(weight_manifest):
    """Approximate sizes = fp16 bytes of the published tensor layouts (within 5 %)."""
    import math

    for preset in ("sdxl", "sd15"):
        for f in PRESETS[preset].layerdiffuse:
            stem = f.filename.removesuffix(".safetensors")
            shapes = weight_manifest["files"].get(stem)
            if f.role in ("decoder", "encoder"):  # every published decoder / encoder shares one layout
                shapes = weight_manifest["files"][f"vae_transparent_{f.role}"]
            expected = 2 * sum(math.prod(s) for s in shapes.values())
            assert abs(f.approx_size - expected) / expected < 0.05, f.filename


# -- hub: looking on disk ------------------------------------------------------------------------
def test_missing_preset_names_every_file(tmp_path):
    with pytest.raises(MissingWeights) as info:
        resolve_model("sdxl", models_dir=tmp_path / "models", allow_download=True)
    err = info.value
    preset = PRESETS["sdxl"]
    expected = [*preset.base_files, *(f.hub_file() for f in preset.required_layerdiffuse())]
    assert len(err.missing) == len(expected) == 21
    assert not any("ld_diffusers_sdxl_vae_transparent_encoder" in line for line in err.missing)  # alternative
    for f in expected:
        assert any(line.startswith(f"{f.repo_id}: {f.filename}") for line in err.missing), f
    text = str(err)
    assert "HF_HUB_OFFLINE" in text
    assert f"hf download {preset.base} " in text and "unet/diffusion_pytorch_model.fp16.safetensors" in text
    assert "hf download lllyasviel/LayerDiffuse_Diffusers ld_diffusers_sdxl_attn.safetensors" in text
    assert str(tmp_path / "models") in text  # tells where to put them
    assert "GB" in text


def test_missing_sd15_does_not_demand_optional_joint_file(tmp_path):
    with pytest.raises(MissingWeights) as info:
        resolve_model("sd15", models_dir=tmp_path, allow_download=True)
    joined = "\n".join(info.value.missing)
    assert "layer_sd15_transparent_attn.safetensors" in joined
    assert "layer_sd15_vae_transparent_decoder.safetensors" in joined
    assert "layer_sd15_joint.safetensors" not in joined


def test_download_disabled_is_reported_even_online(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(MissingWeights, match="turned off"):
        fetch_file("LayerDiffusion/layerdiffusion-v1", "vae_transparent_decoder.safetensors",
                   models_dir=tmp_path, allow_download=False)


def test_file_dropped_in_models_dir_is_found(tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    dropped = models_dir / "vae_transparent_decoder.safetensors"
    dropped.write_bytes(b"decoder")
    got = fetch_file("LayerDiffusion/layerdiffusion-v1", "vae_transparent_decoder.safetensors", models_dir=models_dir)
    assert got == dropped
    with pytest.raises(MissingWeights) as info:  # and resolution no longer asks for it
        resolve_model("sdxl", models_dir=models_dir, allow_download=True)
    assert not any("vae_transparent_decoder" in m for m in info.value.missing)
    assert any("vae_transparent_encoder" in m for m in info.value.missing)


def test_fake_hf_cache_is_found(tmp_path, hf_cache):
    cached = put_in_hf_cache(hf_cache, "LayerDiffusion/layerdiffusion-v1", "vae_transparent_encoder.safetensors")
    assert fetch_file("LayerDiffusion/layerdiffusion-v1", "vae_transparent_encoder.safetensors") == cached
    with pytest.raises(MissingWeights):  # another file of the same repo is still missing
        fetch_file("LayerDiffusion/layerdiffusion-v1", "vae_transparent_decoder.safetensors")


def test_preset_resolves_from_cache_and_models_dir_without_network(tmp_path, hf_cache):
    models_dir = tmp_path / "models"
    layerdiffuse_into(models_dir, "sdxl")
    for f in PRESETS["sdxl"].base_files:
        put_in_hf_cache(hf_cache, f.repo_id, f.filename)
    resolved = resolve_model("sdxl", models_dir=models_dir, allow_download=False)
    snapshot = hf_cache / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / COMMIT
    assert resolved.base == snapshot and resolved.base_kind == "diffusers"
    assert (resolved.preset, resolved.family, resolved.base_label) == ("sdxl", "sdxl", PRESETS["sdxl"].base)
    assert resolved.variant == "fp16"
    assert resolved.files == {f.role: models_dir / f.filename for f in PRESETS["sdxl"].required_layerdiffuse()}
    assert resolved.encoder_offset_scale == 1.0  # v1's encoder wins over the alternative beside it


def test_base_in_models_dir_repo_folder(tmp_path):
    models_dir = tmp_path / "models"
    layerdiffuse_into(models_dir, "sd15")
    base = models_dir / "stable-diffusion-v1-5"
    for f in PRESETS["sd15"].base_files:
        (base / f.filename).parent.mkdir(parents=True, exist_ok=True)
        (base / f.filename).write_bytes(b"x")
    resolved = resolve_model("sd15", models_dir=models_dir, allow_download=False)
    assert resolved.base == base and resolved.family == "sd15"
    assert set(resolved.files) == {"attention_sharing", "joint", "decoder", "encoder"}  # joint found, so offered
    assert resolved.files["encoder"].name == "layer_sd15_vae_transparent_encoder.safetensors"
    assert resolved.encoder_offset_scale == 1.0


# -- the offset encoder's scale goes with its file --------------------------------------------------
@pytest.mark.parametrize("family, filename, scale", [
    ("sdxl", "vae_transparent_encoder.safetensors", 1.0),  # LayerDiffusion/layerdiffusion-v1: raw output
    ("sdxl", "ld_diffusers_sdxl_vae_transparent_encoder.safetensors", 300.0),  # LayerDiffuse_Diffusers: x300
    ("sd15", "layer_sd15_vae_transparent_encoder.safetensors", 1.0),  # layerdiffusion-v1: raw output
])
def test_each_encoder_file_pairs_with_its_reference_scale(family, filename, scale):
    from inference.models import layerdiffuse_file

    f = layerdiffuse_file(family, filename)
    assert f.role == "encoder" and f.offset_scale == scale
    expected_repo = "lllyasviel/LayerDiffuse_Diffusers" if scale == 300.0 else "LayerDiffusion/layerdiffusion-v1"
    assert f.repo_id == expected_repo
    encoders = [g for p in PRESETS.values() for g in p.layerdiffuse if g.role == "encoder"]
    assert len(encoders) == 3 and all(g.offset_scale is not None for g in encoders)
    # and only encoders carry a scale
    assert all(g.offset_scale is None for p in PRESETS.values() for g in p.layerdiffuse if g.role != "encoder")


def test_diffusers_repo_encoder_is_used_x300_where_the_user_puts_it(tmp_path, hf_cache):
    """Only the LayerDiffuse_Diffusers encoder on disk: it serves (never downloaded), at x300."""
    models_dir = tmp_path / "models"
    layerdiffuse_into(models_dir, "sdxl")
    (models_dir / "vae_transparent_encoder.safetensors").unlink()
    for f in PRESETS["sdxl"].base_files:
        put_in_hf_cache(hf_cache, f.repo_id, f.filename)
    resolved = resolve_model("sdxl", models_dir=models_dir, allow_download=False)
    assert resolved.files["encoder"] == models_dir / "ld_diffusers_sdxl_vae_transparent_encoder.safetensors"
    assert resolved.encoder_offset_scale == 300.0
    listed = {f["filename"]: f for f in preset_availability(models_dir)[0]["files"]}
    assert preset_availability(models_dir)[0]["missing"] == []  # the alternative serves the role
    assert listed["vae_transparent_encoder.safetensors"]["present"] is False
    # neither encoder: the default one is what is asked for
    (models_dir / "ld_diffusers_sdxl_vae_transparent_encoder.safetensors").unlink()
    with pytest.raises(MissingWeights) as info:
        resolve_model("sdxl", models_dir=models_dir, allow_download=False)
    assert [m.split(" ")[:2] for m in info.value.missing] == [["LayerDiffusion/layerdiffusion-v1:",
                                                                "vae_transparent_encoder.safetensors"]]


# -- spec validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "model.pth"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(UnsafeCheckpoint):
        resolve_model(str(path), models_dir=None, allow_download=False)  # refused even unseen
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeCheckpoint, match="safetensors"):
        resolve_model(str(path), models_dir=None, allow_download=False)


@pytest.mark.parametrize("spec", ["sdxl-turbo", "flux", "SD3"])
def test_unknown_model_name(spec):
    with pytest.raises(InvalidRequest) as info:
        resolve_model(spec, models_dir=None, allow_download=False)
    assert info.value.field == "model"
    assert f"unknown model {spec!r}" in str(info.value)
    assert "sdxl, sd15, tiny" in str(info.value)


def test_empty_spec_and_missing_path(tmp_path):
    with pytest.raises(InvalidRequest):
        resolve_model("  ", models_dir=None, allow_download=False)
    with pytest.raises(InvalidRequest, match="no such file"):
        resolve_model(str(tmp_path / "nothere.safetensors"), models_dir=None, allow_download=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="model_index.json"):
        resolve_model(str(tmp_path / "empty"), models_dir=None, allow_download=False)


def fake_diffusers_folder(root: Path, *, cross=768, in_channels=4, text_time=False,
                          weights=".safetensors", cls="StableDiffusionPipeline") -> Path:
    components = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    index = {"_class_name": cls, **{k: ["diffusers", "X"] for k in components}, "safety_checker": [None, None]}
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for sub, stem in components.items():
        (root / sub).mkdir()
        for suffix in weights.split("|"):
            (root / sub / f"{stem}{suffix}").write_bytes(b"x")
    unet = {"cross_attention_dim": cross, "in_channels": in_channels}
    if text_time:
        unet["addition_embed_type"] = "text_time"
    (root / "unet" / "config.json").write_text(json.dumps(unet))
    return root


def test_diffusers_folder_inspection(tmp_path):
    inspect = models.inspect_diffusers_folder
    assert inspect(fake_diffusers_folder(tmp_path / "a")) == ("sd15", None)
    assert inspect(fake_diffusers_folder(tmp_path / "b", weights=".fp16.safetensors")) == ("sd15", "fp16")
    assert inspect(fake_diffusers_folder(tmp_path / "c", weights=".safetensors|.fp16.safetensors")) == ("sd15", "fp16")
    assert inspect(fake_diffusers_folder(tmp_path / "d", cross=2048, text_time=True,
                                         cls="StableDiffusionXLPipeline")) == ("sdxl", None)
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        inspect(fake_diffusers_folder(tmp_path / "e", weights=".bin"))
    with pytest.raises(InvalidRequest, match="cross_attention_dim 1024"):
        inspect(fake_diffusers_folder(tmp_path / "f", cross=1024))
    with pytest.raises(InvalidRequest, match="9 input channels"):
        inspect(fake_diffusers_folder(tmp_path / "g", in_channels=9))
    with pytest.raises(InvalidRequest, match="expected StableDiffusionXLPipeline"):
        inspect(fake_diffusers_folder(tmp_path / "h", cross=2048, text_time=True, cls="StableDiffusionPipeline"))
    mixed = fake_diffusers_folder(tmp_path / "i")
    os.rename(mixed / "vae" / "diffusion_pytorch_model.safetensors", mixed / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(InvalidRequest, match="vae only have fp16"):
        inspect(mixed)


def test_path_given_sd15_folder_takes_layerdiffuse_files_from_sd15_preset(tmp_path):
    folder = fake_diffusers_folder(tmp_path / "my-sd15")
    with pytest.raises(MissingWeights) as info:
        resolve_model(str(folder), models_dir=tmp_path / "models", allow_download=True)
    assert sorted(m.split(" ")[1] for m in info.value.missing) == [
        "layer_sd15_transparent_attn.safetensors", "layer_sd15_vae_transparent_decoder.safetensors",
        "layer_sd15_vae_transparent_encoder.safetensors"]
    layerdiffuse_into(tmp_path / "models", "sd15")
    resolved = resolve_model(str(folder), models_dir=tmp_path / "models", allow_download=False)
    assert (resolved.family, resolved.preset, resolved.base) == ("sd15", "sd15", folder.resolve())
    assert resolved.base_label == str(folder.resolve())


# -- single-file checkpoints -------------------------------------------------------------------------
def fake_checkpoint(path: Path, kind: str) -> Path:
    t = torch.zeros(2, 2)  # cloned below: safetensors refuses shared storage
    keys = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 9 if kind == "inpaint" else 4, 3, 3)}
    if kind in ("sdxl", "inpaint"):
        keys["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = t
        keys["conditioner.embedders.1.model.token_embedding.weight"] = t
    elif kind == "sd15":
        keys["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = t
    elif kind == "sd2":
        keys["cond_stage_model.model.token_embedding.weight"] = t
    elif kind == "refiner":
        keys["conditioner.embedders.0.model.token_embedding.weight"] = t
    elif kind == "lora":
        keys = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t}
    save_file({k: v.clone() for k, v in keys.items()}, str(path))
    return path


def test_checkpoint_family_detection(tmp_path):
    assert models.inspect_checkpoint(fake_checkpoint(tmp_path / "a.safetensors", "sdxl")) == "sdxl"
    assert models.inspect_checkpoint(fake_checkpoint(tmp_path / "b.safetensors", "sd15")) == "sd15"
    for kind, message in [("sd2", "neither an SDXL nor an SD 1.5"), ("refiner", "refiner"),
                          ("lora", "not a full Stable Diffusion checkpoint"), ("inpaint", "9 input channels")]:
        with pytest.raises(InvalidRequest, match=message):
            models.inspect_checkpoint(fake_checkpoint(tmp_path / f"{kind}.safetensors", kind))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InvalidRequest, match="not a readable"):
        models.inspect_checkpoint(tmp_path / "junk.safetensors")


def test_single_file_needs_only_the_base_configs(tmp_path, hf_cache):
    ckpt = fake_checkpoint(tmp_path / "my-finetune.safetensors", "sdxl")
    models_dir = tmp_path / "models"
    with pytest.raises(MissingWeights) as info:
        resolve_model(str(ckpt), models_dir=models_dir, allow_download=True)
    missing = "\n".join(info.value.missing)
    assert "unet/config.json" in missing and "tokenizer_2/vocab.json" in missing
    assert "diffusion_pytorch_model.fp16.safetensors" not in missing  # weights come from the file
    assert "ld_diffusers_sdxl_attn.safetensors" in missing

    layerdiffuse_into(models_dir, "sdxl")
    for f in PRESETS["sdxl"].config_files:
        put_in_hf_cache(hf_cache, f.repo_id, f.filename)
    resolved = resolve_model(str(ckpt), models_dir=models_dir, allow_download=False)
    assert resolved.base_kind == "single_file" and resolved.base == ckpt.resolve()
    assert resolved.base_config == hf_cache / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / COMMIT
    assert (resolved.family, resolved.preset) == ("sdxl", "sdxl")


# -- downloads (fake downloader) ----------------------------------------------------------------------
def test_download_progress_is_reported_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake = FakeDownloader(sizes={"vae_transparent_encoder.safetensors": 10_500}, chunk=1000)
    monkeypatch.setattr(hub, "hf_hub_download", fake)
    events = []
    path = fetch_file("LayerDiffusion/layerdiffusion-v1", "vae_transparent_encoder.safetensors",
                      progress=events.append)
    assert path.read_bytes() == b"x" * 10_500
    assert {e.phase for e in events} == {"download"}
    assert {e.message for e in events} == {"vae_transparent_encoder.safetensors"}
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 10_500  # each byte counted once
    assert all(e.total == 10_500 for e in events)
    assert fake.calls[0]["cache_dir"] == str(hub.hf_cache_dir())


def test_download_can_be_cancelled(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hf_hub_download", FakeDownloader(sizes={"a.safetensors": 50_000}))
    token = CancelToken()

    def progress(p):  # the bar reports once when the transfer starts; cancel right then
        token.cancel("user pressed cancel")

    with pytest.raises(Cancelled, match="user pressed cancel"):
        fetch_file("org/repo", "a.safetensors", progress=progress, cancel=token)
    assert hub.find_in_hf_cache("org/repo", "a.safetensors") is None


def test_connection_failure_reports_all_missing_files_at_once(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake = FakeDownloader(fail={"a.safetensors": LocalEntryNotFoundError("connection refused")})
    monkeypatch.setattr(hub, "hf_hub_download", fake)
    files = [HubFile("org/one", "a.safetensors", 10), HubFile("org/two", "b.safetensors", 20)]
    with pytest.raises(MissingWeights) as info:
        fetch_files(files)
    assert len(info.value.missing) == 2 and "could not be reached" in str(info.value)
    assert len(fake.calls) == 1  # no pointless second attempt once the hub is unreachable


def test_gated_or_absent_file_is_named_and_others_still_download(tmp_path, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/org/gone/resolve/main/a.safetensors")
    error = RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=request))
    fake = FakeDownloader(fail={"a.safetensors": error})
    monkeypatch.setattr(hub, "hf_hub_download", fake)
    files = [HubFile("org/gone", "a.safetensors"), HubFile("org/two", "b.safetensors")]
    with pytest.raises(MissingWeights) as info:
        fetch_files(files)
    assert info.value.missing == ["org/gone: a.safetensors — not found on the Hub (RepositoryNotFoundError)"]
    assert hub.find_in_hf_cache("org/two", "b.safetensors") is not None


def test_snapshot_download_pins_one_commit(tmp_path, monkeypatch, hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake = FakeDownloader()
    monkeypatch.setattr(hub, "hf_hub_download", fake)
    files = [HubFile("org/base", name) for name in ("model_index.json", "unet/config.json", "vae/config.json")]
    folder = fetch_snapshot("org/base", files)
    assert folder == hf_cache / "models--org--base" / "snapshots" / COMMIT
    assert [c["revision"] for c in fake.calls] == [None, COMMIT, COMMIT]
    assert all((folder / f.filename).is_file() for f in files)
    fake.calls.clear()
    assert fetch_snapshot("org/base", files) == folder and fake.calls == []  # complete: no download


def test_progress_bar_class_fits_huggingface_hub_bars():
    """The class goes through huggingface_hub's own bar factory and Xet reporter unchanged."""
    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter
    from huggingface_hub.utils.tqdm import _create_progress_bar

    events = []
    cls = hub.progress_bar_class("f.safetensors", events.append, None, min_interval=0)
    bar = _create_progress_bar(cls=cls, log_level=20, name="x", desc="f", total=100, initial=10,
                               unit="B", unit_scale=True)
    bar.update(40)
    bar.update_transfer(40)
    assert events[-1].step == 50 and events[-1].total == 100

    events.clear()
    with XetDownloadProgressReporter(reconstruction_desc="r", total=300, log_level=20, tqdm_class=cls) as rep:
        report = type("Report", (), dict(total_bytes_completed=120, total_transfer_bytes_completed=90,
                                          total_bytes=300, total_bytes_completion_rate=None,
                                          total_transfer_bytes_completion_rate=None))
        rep.update_progress(report)
    assert events[-1].step == 120 and events[-1].total == 300


# -- availability ---------------------------------------------------------------------------------------
def test_preset_availability(tmp_path, hf_cache):
    models_dir = tmp_path / "models"
    report = {p["name"]: p for p in preset_availability(models_dir)}
    json.dumps(report)
    assert set(report) == {"sdxl", "sd15", "tiny"}
    assert report["tiny"]["available"] is True
    sdxl = report["sdxl"]
    assert sdxl["available"] is False and len(sdxl["missing"]) == 21
    assert sdxl["download_bytes"] == PRESETS["sdxl"].approx_download_size

    layerdiffuse_into(models_dir, "sdxl")
    for f in PRESETS["sdxl"].base_files:
        put_in_hf_cache(hf_cache, f.repo_id, f.filename, data=b"12345")
    sdxl = {p["name"]: p for p in preset_availability(models_dir)}["sdxl"]
    assert sdxl["available"] is True and sdxl["missing"] == [] and sdxl["download_bytes"] == 0
    unet = next(e for e in sdxl["files"] if e["filename"].startswith("unet/diffusion"))
    assert unet["present"] and unet["size"] == 5 and unet["path"].endswith(unet["filename"])
    sd15 = {p["name"]: p for p in preset_availability(models_dir)}["sd15"]
    joint = next(e for e in sd15["files"] if e["role"] == "joint")
    assert joint["optional"] and not joint["present"]
    assert not any("joint" in m for m in sd15["missing"])


# -- hashes -------------------------------------------------------------------------------------------
def test_file_hashes_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"alpha")
    b.write_bytes(b"beta")
    resolved = models.ResolvedModel(spec="x", preset="sdxl", family="sdxl", base=tmp_path, base_kind="diffusers",
                                    base_label="x", files={"decoder": a, "encoder": b})
    cache_file = tmp_path / "hashes.json"
    hashes = resolved.file_hashes(cache_file)
    assert hashes == {"a.safetensors": "sha256:" + hashlib.sha256(b"alpha").hexdigest(),
                      "b.safetensors": "sha256:" + hashlib.sha256(b"beta").hexdigest()}
    assert cache_file.is_file()

    def no_rehash(path):
        raise AssertionError(f"rehashed {path}")

    monkeypatch.setattr(models, "file_sha256", no_rehash)
    assert resolved.file_hashes(cache_file) == hashes
    a.write_bytes(b"alpha, changed")
    with pytest.raises(AssertionError, match="rehashed"):
        resolved.file_hashes(cache_file)


# -- the tiny model end to end -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_loaded(shared_cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("MULTIPLANE_CACHE_DIR", str(shared_cache))
    try:
        resolved = resolve_model("tiny", models_dir=None, allow_download=False)
        yield load_model(resolved, torch.device("cpu"), torch.float32, vae_tiling=True)
    finally:
        mp.undo()


def test_tiny_resolves_to_its_own_layerdiffuse_files():
    resolved = resolve_model("tiny", models_dir=None, allow_download=False)
    assert (resolved.preset, resolved.family, resolved.base_kind) == ("tiny", "sdxl", "diffusers")
    assert set(resolved.files) == {"unet_patch", "decoder", "encoder"}
    assert all(p.parent == resolved.base / "layerdiffuse" for p in resolved.files.values())
    assert resolved.decoder_config["block_out_channels"] and resolved.encoder_config["block_out_channels"]
    # the same folder given as a path is detected as SDXL family and keeps its files
    again = resolve_model(str(resolved.base), models_dir=None, allow_download=False)
    assert (again.family, again.files, again.preset) == ("sdxl", resolved.files, "sdxl")


def test_tiny_folder_without_layerdiffuse_needs_the_sdxl_files(tmp_path):
    import shutil

    resolved = resolve_model("tiny", models_dir=None, allow_download=False)
    copy = tmp_path / "copy"
    shutil.copytree(resolved.base, copy, ignore=shutil.ignore_patterns("layerdiffuse"))
    with pytest.raises(MissingWeights) as info:
        resolve_model(str(copy), models_dir=tmp_path / "models", allow_download=True)
    assert len(info.value.missing) == 3
    assert all(m.split(":")[0] in ("LayerDiffusion/layerdiffusion-v1", "lllyasviel/LayerDiffuse_Diffusers")
               for m in info.value.missing)


def test_load_tiny(tiny_loaded):
    from diffusers import StableDiffusionXLPipeline

    from inference.sdxl_transparency import TransparencyPatch
    from inference.transparent_vae import TransparentDecoder, TransparentEncoder

    lm = tiny_loaded
    assert isinstance(lm.pipeline, StableDiffusionXLPipeline)
    assert isinstance(lm.decoder, TransparentDecoder) and isinstance(lm.encoder, TransparentEncoder)
    assert isinstance(lm.unet_patch, TransparencyPatch)
    assert lm.family == "sdxl" and lm.device == torch.device("cpu") and not lm.offloaded
    assert lm.pipeline.unet.dtype == torch.float32 and lm.decoder.dtype == torch.float32
    assert lm.pipeline.vae.use_tiling
    assert lm.pipeline.vae_scale_factor == 8


def test_tiny_transparency_switches_the_unet_and_restores_it(tiny_loaded):
    unet = tiny_loaded.pipeline.unet
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    pooled = tiny_loaded.pipeline.text_encoder_2.config.projection_dim
    added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}

    def run():
        with torch.no_grad():
            return unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample

    before = run()
    with tiny_loaded.transparency():
        patched = run()
    after = run()
    assert torch.equal(before, after)
    assert (patched - before).abs().mean() > 1e-4


def test_describe_names_files_with_hashes(tiny_loaded):
    from inference.weights import file_sha256

    desc = tiny_loaded.describe()
    assert desc["preset"] == "tiny" and desc["base"] == "tiny"
    files = tiny_loaded.resolved.files
    assert desc["files"] == {p.name: file_sha256(p) for p in files.values()}
    json.dumps(desc)


def test_offload_is_ignored_on_cpu():
    resolved = resolve_model("tiny", models_dir=None, allow_download=False)
    lm = load_model(resolved, "cpu", torch.float32, offload=True)
    assert not lm.offloaded and lm.pipeline.unet.device == torch.device("cpu")


def test_single_file_loading_uses_the_local_config_folder(tmp_path, monkeypatch, tiny_loaded):
    """The real finetune path can't run here; check what from_single_file is given, then
    let it return the tiny pipeline so the rest of load_model runs for real."""
    from diffusers import StableDiffusionXLPipeline

    resolved = tiny_loaded.resolved
    calls = []

    def fake_from_single_file(path, **kwargs):
        calls.append((path, kwargs))
        return StableDiffusionXLPipeline.from_pretrained(str(resolved.base), local_files_only=True,
                                                         dtype=kwargs["dtype"])

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", fake_from_single_file)
    ckpt = fake_checkpoint(tmp_path / "finetune.safetensors", "sdxl")
    single = dataclasses.replace(resolved, base=ckpt, base_kind="single_file", base_config=resolved.base,
                                 base_label=str(ckpt))
    lm = load_model(single, "cpu", torch.float32)
    assert calls == [(str(ckpt), {"config": str(resolved.base), "dtype": torch.float32,
                                  "local_files_only": True})]
    assert lm.describe()["base"] == str(ckpt)
    with lm.transparency():
        pass


def test_corrupt_base_weights_give_a_model_error(tmp_path):
    import shutil

    resolved = resolve_model("tiny", models_dir=None, allow_download=False)
    copy = tmp_path / "broken"
    shutil.copytree(resolved.base, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    broken = resolve_model(str(copy), models_dir=None, allow_download=False)
    with pytest.raises(InvalidRequest) as info:
        load_model(broken, "cpu", torch.float32)
    assert info.value.field == "model" and "could not be loaded" in str(info.value)
    assert str(copy) in str(info.value)


def test_wrong_layerdiffuse_file_is_a_weight_mismatch(tmp_path):
    """A LayerDiffuse file that does not fit the UNet is refused by name, before use."""
    import shutil

    from inference.errors import WeightMismatch

    resolved = resolve_model("tiny", models_dir=None, allow_download=False)
    copy = tmp_path / "mixed"
    shutil.copytree(resolved.base, copy)
    patch = copy / "layerdiffuse" / "ld_diffusers_sdxl_attn.safetensors"
    save_file({"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.zeros(3, 3,
                                                                                              dtype=torch.float16)},
              str(patch))
    with pytest.raises(WeightMismatch, match="to_q"):
        load_model(resolve_model(str(copy), models_dir=None, allow_download=False), "cpu", torch.float32)


# -- a real single-file load, offline ------------------------------------------------------------------
_RESNET_TO_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                       "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_TO_ORIGINAL = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_to_original(unet) -> dict:
    """diffusers UNet names → the original (ldm/sgm) layout single-file checkpoints use."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    per_block = unet.config.layers_per_block + 1
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    up_has_attention = {i: hasattr(b, "attentions") for i, b in enumerate(unet.up_blocks)}
    out = {}
    for name, tensor in unet.state_dict().items():
        if name in fixed:
            out[fixed[name]] = tensor
            continue
        m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", name)
        if m:
            kind, block, part, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if part == "resnets":
                layer, rest = rest.split(".", 1)
                rest = f"{_RESNET_TO_ORIGINAL[layer]}.{rest}"
            first = 1 if kind == "down_blocks" else 0
            last_row = first + block * per_block + per_block - 1  # the sampler shares the last row
            if part == "downsamplers":
                key = f"input_blocks.{last_row}.0.op.{rest.removeprefix('conv.')}"
            elif part == "upsamplers":
                key = f"output_blocks.{last_row}.{2 if up_has_attention[block] else 1}.{rest}"
            else:
                slot = 0 if part == "resnets" else 1
                key = f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{first + block * per_block + index}.{slot}.{rest}"
            out[key] = tensor
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
        assert m, name
        part, index, rest = m[1], int(m[2]), m[3]
        if part == "resnets":
            layer, rest = rest.split(".", 1)
            out[f"middle_block.{2 * index}.{_RESNET_TO_ORIGINAL[layer]}.{rest}"] = tensor
        else:
            out[f"middle_block.1.{rest}"] = tensor
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def _vae_to_original(vae) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(vae.config.up_block_types)
    out = {}
    for name, tensor in vae.state_dict().items():
        if name in fixed:
            out[fixed[name]] = tensor
            continue
        rest = name
        rest = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block.", rest)
        rest = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample.", rest)
        rest = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", rest)
        rest = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", rest)
        rest = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", rest)
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", rest)
        if m:
            rest = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_TO_ORIGINAL[m[2]]}.{m[3]}"
            if tensor.ndim == 2:  # the original stores 1x1 convolutions
                tensor = tensor[:, :, None, None]
        out[rest] = tensor
    return {"first_stage_model." + k: v for k, v in out.items()}


def _text_encoders_to_original(text_encoder, text_encoder_2) -> dict:
    out = {}
    for name, tensor in text_encoder.state_dict().items():  # CLIP-L: HF names under a prefix
        name = name if name.startswith("text_model.") else "text_model." + name
        out["conditioner.embedders.0.transformer." + name] = tensor
    sd = text_encoder_2.state_dict()
    prefix = "conditioner.embedders.1.model."
    out[prefix + "token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    for i in range(text_encoder_2.config.num_hidden_layers):
        hf, og = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[og + f"attn.in_proj_{kind}"] = torch.cat([sd[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[og + f"attn.out_proj.{kind}"] = sd[hf + f"self_attn.out_proj.{kind}"]
            out[og + f"ln_1.{kind}"] = sd[hf + f"layer_norm1.{kind}"]
            out[og + f"ln_2.{kind}"] = sd[hf + f"layer_norm2.{kind}"]
            out[og + f"mlp.c_fc.{kind}"] = sd[hf + f"mlp.fc1.{kind}"]
            out[og + f"mlp.c_proj.{kind}"] = sd[hf + f"mlp.fc2.{kind}"]
    return out


def test_real_single_file_load_offline_from_config_only_folder(tmp_path, tiny_loaded):
    """The tiny model saved as an original-layout SDXL checkpoint loads through diffusers'
    from_single_file with only the config files of its base, offline, weight for weight."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_loaded.pipeline
    checkpoint = {**_unet_to_original(pipe.unet), **_vae_to_original(pipe.vae),
                  **_text_encoders_to_original(pipe.text_encoder, pipe.text_encoder_2)}
    ckpt = tmp_path / "finetune.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in checkpoint.items()}, str(ckpt))
    assert models.inspect_checkpoint(ckpt) == "sdxl"

    base = tiny_loaded.resolved.base
    config_only = tmp_path / "configs"
    shutil.copytree(base, config_only, ignore=shutil.ignore_patterns("*.safetensors", "layerdiffuse"))
    resolved = dataclasses.replace(tiny_loaded.resolved, base=ckpt, base_kind="single_file",
                                   base_config=config_only, base_label=str(ckpt))
    loaded = load_model(resolved, "cpu", torch.float32)
    assert isinstance(loaded.pipeline, StableDiffusionXLPipeline)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(pipe, component).state_dict()
        got = getattr(loaded.pipeline, component).state_dict()
        assert got.keys() == want.keys(), component
        for name in want:
            assert torch.equal(got[name], want[name]), f"{component}.{name}"
    with loaded.transparency():  # the patch binds to the single-file UNet as well
        pass

    # A checkpoint missing tensors is named as such (diffusers leaves them without data).
    del checkpoint["conditioner.embedders.1.model.text_projection"]
    save_file({k: v.detach().clone().contiguous() for k, v in checkpoint.items()}, str(ckpt))
    with pytest.raises(InvalidRequest, match="text_encoder_2 tensors text_projection.weight"):
        load_model(resolved, "cpu", torch.float32)


def test_pixel_budget_is_the_presets_native_size_squared(tmp_path):
    from inference.errors import InvalidRequest
    from inference.models import pixel_budget

    assert (pixel_budget("sdxl"), pixel_budget("SD15"), pixel_budget("tiny")) == (1024 ** 2, 512 ** 2, 256 ** 2)
    with pytest.raises(InvalidRequest, match="unknown model"):
        pixel_budget("no-such-model")
    with pytest.raises(InvalidRequest, match="does not exist"):
        pixel_budget(str(tmp_path / "missing.safetensors"))
