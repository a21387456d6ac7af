"""bench/bench.py's command line: case names, the CUDA-only fp16 cases, and the refusals before any model loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench  # noqa: E402


def test_case_names_and_batches():
    case = bench.Case.parse("train-fp16gc-512", batch=4)
    assert (case.kind, case.precision, case.res, case.batch) == ("train", "fp16gc", 512, 4)
    assert case.worker_args()[-1] == "--gc" and "fp16" in case.worker_args()
    assert bench.Case.parse("sample-bf16-256", batch=3).batch == 6  # both guidance passes in one batch


@pytest.mark.parametrize("name", ["train-fp8-256", "sample-bf16gc-512", "train-bf16", "decode-fp32-512"])
def test_bad_case_names_are_refused(name):
    with pytest.raises(SystemExit, match="bad case"):
        bench.Case.parse(name)


@pytest.mark.parametrize("argv,message", [
    (["--cases", "train-fp16-256", "--device", "cpu"], "fp16 cases are for CUDA"),
    (["--batch", "0", "--device", "cpu"], "--batch must be at least 1"),
    (["--steps", "0", "--device", "cpu"], "--steps must be at least 1"),
])
def test_bad_options_stop_before_any_model_is_made(argv, message):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), *argv, "--ckpt", "/nonexistent.safetensors"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and message in r.stderr + r.stdout


def test_memory_floor_says_when_a_target_is_under_it():
    saved = bench.estimate.expected_memory(64, 1, bench.torch.bfloat16, gc=False)["activations"]
    results = [
        {"case": "train-bf16-64", "ours": {"rss_after_load_gb": 1.0}, "ref": {"peak_rss_gb": 10.0}},
        {"case": "train-bf16-64", "ours": {"rss_after_load_gb": 1.0}, "ref": {"peak_rss_gb": 1.0}},
        {"case": "sample-bf16-64", "ours": {"rss_after_load_gb": 1.0}, "ref": {"peak_rss_gb": 1.0}},  # no target
        {"case": "train-fp32-64", "ours": {"rss_after_load_gb": 1.0}, "ref": {"peak_rss_gb": 1.0}},   # no target
    ]
    lines = bench.memory_floor(results).splitlines()
    assert len(lines) == 3  # a heading and the two bf16 train cases
    assert f"= {(1.0 + saved) / 10:.3f}x the reference; target 0.6: within reach" in lines[1]
    assert "target 0.6: UNREACHABLE" in lines[2]
    assert bench.memory_floor(results[2:]) == ""
    # The floor is for the batch the case ran at, not for the 1 its name implies.
    saved4 = bench.estimate.expected_memory(64, 4, bench.torch.bfloat16, gc=False)["activations"]
    four = bench.memory_floor([{**results[0], "batch": 4}]).splitlines()[1]
    assert f"{saved4:.2f} saved activations" in four and saved4 > 2 * saved
