"""--device: checked before any model is loaded, with a message that says what is wrong."""
from __future__ import annotations

import pytest
import torch

import sample
import train
from devices import resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def test_auto_and_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_unparsable_name():
    with pytest.raises(ValueError, match="device 'gpu0'"):
        resolve_device("gpu0")


@no_cuda
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match="device 'cuda'.*use cpu or auto"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_index_past_the_last():
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@no_cuda
def test_scripts_refuse_cuda_before_loading(tmp_path, capsys, monkeypatch):
    import sd

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sd, "load", no_loading)
    with pytest.raises(ValueError, match="device 'cuda'"):  # the script prints it as `error: ...`
        train.main(["--device", "cuda", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as stop:
        sample.main(["--ckpt", "toy/tiny_sd.safetensors", "--prompt", "x", "--device", "cuda"])
    assert stop.value.code == 2
    assert "--device 'cuda'" in capsys.readouterr().err
    from data.pipeline import EncodeConfig
    with pytest.raises(ValueError, match="device 'cuda'"):
        EncodeConfig(device="cuda")
