"""Device and dtype selection (what can be checked on a CPU-only machine, plus faked GPUs)."""
from __future__ import annotations

import json

import pytest
import torch

from inference import devices
from inference.devices import default_dtype, describe_device, select_device
from inference.errors import InvalidRequest


def fake_hardware(monkeypatch, cuda: bool, mps: bool, cuda_count: int = 1) -> None:
    monkeypatch.setattr(devices, "cuda_available", lambda: cuda)
    monkeypatch.setattr(devices, "mps_available", lambda: mps)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count if cuda else 0)


@pytest.mark.parametrize(
    "cuda, mps, expected",
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    fake_hardware(monkeypatch, cuda, mps)
    assert select_device("auto").type == expected
    assert select_device(None).type == expected


def test_this_machine_auto_matches_torch():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device().type == expected


def test_cpu_is_always_available():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_forced_missing_device_is_a_request_error(monkeypatch, name):
    fake_hardware(monkeypatch, cuda=False, mps=False)
    with pytest.raises(InvalidRequest) as info:
        select_device(name)
    assert info.value.field == "device"
    assert name.split(":")[0] in str(info.value)


def test_cuda_index_beyond_device_count(monkeypatch):
    fake_hardware(monkeypatch, cuda=True, mps=False, cuda_count=2)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InvalidRequest, match="only 2 CUDA"):
        select_device("cuda:2")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cpu:0", "cuda:x", ""])
def test_unknown_or_malformed_names(monkeypatch, name):
    fake_hardware(monkeypatch, cuda=True, mps=True)
    if name == "":  # empty means auto, like None
        assert select_device(name).type == "cuda"
        return
    with pytest.raises(InvalidRequest) as info:
        select_device(name)
    assert info.value.field == "device"


def test_default_dtype():
    assert default_dtype(torch.device("cpu")) is torch.float32
    assert default_dtype("cuda") is torch.float16
    assert default_dtype(torch.device("cuda", 1)) is torch.float16
    assert default_dtype("mps") is torch.float16


def test_describe_cpu_is_json_and_consistent():
    info = describe_device("cpu")
    json.dumps(info)  # health output must be serializable
    assert info["device"] == "cpu" and info["type"] == "cpu"
    assert info["dtype"] == "float32"
    assert info["threads"] == torch.get_num_threads()
    assert info["cuda_available"] == torch.cuda.is_available()
