"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster single-threaded, especially when other processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """`broken_build(kernel)`: forget this process's outcome for a fastpaths.build.Kernel and make its next build fail as
    it would with no compiler ("no compiler here"), on a CPU that claims AVX-512 BF16 and into a fresh build folder."""
    from torch.utils import cpp_extension

    from fastpaths import build

    def fail(**kwargs):
        raise RuntimeError("no compiler here")

    def arm(kernel: build.Kernel) -> None:
        monkeypatch.setattr(kernel, "state", "untried")
        monkeypatch.setattr(kernel, "ext", None)
        monkeypatch.setattr(build, "cpu_has_avx512_bf16", lambda: True)
        monkeypatch.setenv("SD_LORA_EXT_DIR", str(tmp_path))
        monkeypatch.setattr(cpp_extension, "load", fail)

    return arm
