"""A run is never lost and a resume never silently changes it: signals, broken pipes, resume checks, bad values and
bad files, leftovers of interrupted saves, the precision `auto` picks, and labels that can be read."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import devices
import sd
import train
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict

from helpers import captioned_circles, train_argv

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1 checkpoint, four captioned 32 px images, and their latent cache (encoded once here)."""
    root = tmp_path_factory.mktemp("safety")
    ckpt = write_state_dict(root / "tiny.safetensors", tiny_state_dict("sd1", seed=1))
    images = root / "images"
    captioned_circles(images, [(220, 30, 30), (30, 30, 220)] * 2, [f"a circle {i}" for i in range(4)])
    w = {"ckpt": str(ckpt), "images": str(images), "cache": str(root / "cache"), "root": root}
    assert train.main(args(w, root / "warm", steps=1)) == 0  # the cache exists before any test runs
    return w


def args(world, out, **overrides) -> list[str]:
    return train_argv(world, out, **{"steps": 4, "targets": "attn", **overrides})


def no_models(monkeypatch):
    """Fail the test if a model is loaded or an image encoded."""
    monkeypatch.setattr(sd, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(train, "encode_dataset", lambda *a, **k: pytest.fail("images were encoded"))


# ------------------------------------------------------------------------------------- 1. precision auto

@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "fp32"), ({"avx2", "avx512_bf16"}, "bf16"),
                                             ({"avx2", "amx_bf16"}, "bf16"), ({"asimd", "bf16"}, "bf16")])
def test_auto_precision_picks_bf16_only_where_the_cpu_has_it(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: flags)
    precision, why = devices.auto_precision(torch.device("cpu"))
    assert precision == expected and why


def test_auto_precision_probes_where_flags_cannot_be_read(monkeypatch):
    assert 0 < devices._probe_bf16(size=32, repeats=1)  # the real probe runs
    monkeypatch.setattr(devices, "_cpu_flags", lambda: None)
    monkeypatch.setattr(devices, "_probe_bf16", lambda: 40.0)
    assert devices.auto_precision(torch.device("cpu"))[0] == "fp32"
    monkeypatch.setattr(devices, "_probe_bf16", lambda: 0.6)
    assert devices.auto_precision(torch.device("cpu"))[0] == "bf16"


def test_train_says_what_auto_chose_and_warns_about_emulated_bf16(monkeypatch, capsys):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2"})
    assert train.pick_precision("auto", torch.device("cpu")) == "fp32"
    assert train.pick_precision("bf16", torch.device("cpu")) == "bf16"  # still honoured
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("precision: fp32 (auto: ") and "avx512_bf16" in err[0]
    assert err[1].startswith("warning: bf16 on this CPU will be slow")


# ------------------------------------------------------------------------------------- 2. progress bars

def test_toy_scoring_and_validation_show_progress_bars(world, tmp_path, capsys):
    from toy.evaluate import ddim_sample
    model = sd.load(ROOT / "toy" / "tiny_sd.safetensors")
    ddim_sample(model, ["a red circle"], steps=2, progress="toy scores, base model")
    assert "toy scores, base model" in capsys.readouterr().err
    assert train.main(args(world, tmp_path / "v", steps=1, validation_prompts="a circle", validation_steps=2)) == 0
    assert "validation images, step 1" in capsys.readouterr().err


# -------------------------------------------------------------------- 3. signals, pipes, the state interval

def run_script(argv: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, **kw)


def wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    log = out / "log.jsonl"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    pytest.fail("no training steps")


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world["root"] / "uninterrupted"
    proc = run_script(args(world, out, steps=60), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait() == 0
    return load_file(out / "lora_final.safetensors")


@pytest.mark.parametrize("signum, piped", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGHUP, False)])
def test_a_signal_leaves_a_state_that_resumes_to_the_same_lora(world, uninterrupted, tmp_path, signum, piped):
    """`train.py ... | tee log` then Ctrl-C ends tee too: the state must be written though nothing can be printed."""
    out = tmp_path / "run"
    log = open(tmp_path / "output.txt", "w")
    proc = run_script(args(world, out, steps=60), stdout=subprocess.PIPE if piped else log, stderr=subprocess.STDOUT)
    wait_for_steps(out, 3, proc)
    if piped:
        proc.stdout.close()  # the reader is gone, as when Ctrl-C ends tee
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 130
    step = int((out / "state" / "latest").read_text().strip().removeprefix("step_").removesuffix(".pt"))
    assert 3 <= step < 60
    if not piped:
        text = (tmp_path / "output.txt").read_text()
        assert f"{signal.Signals(signum).name}: saved the training state at step {step}" in text
        assert f"python train.py --resume latest --out {out}" in text
    # The printed command alone continues the run, with its saved options.
    resumed = run_script(["--resume", "latest", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "changed:" not in output
    final = load_file(out / "lora_final.safetensors")
    assert set(final) == set(uninterrupted) and all(torch.equal(final[k], uninterrupted[k]) for k in final)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))  # nothing repeated after the resume


def test_a_signal_during_the_optimizer_step_waits_for_it_to_finish():
    from training.interrupt import Interrupted, Interrupts
    interrupts = Interrupts()
    interrupts.install()
    try:
        done = []
        with pytest.raises(Interrupted) as stop:
            with interrupts.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("the whole update")
        assert done == ["the whole update"] and stop.value.signal_name == "SIGTERM"
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)


def test_output_to_a_closed_pipe_is_dropped_not_raised():
    from training.interrupt import _DropWhenBroken
    r, w = os.pipe()
    stream = _DropWhenBroken(os.fdopen(w, "w"))
    os.close(r)
    stream.write("x" * 100_000)  # EPIPE: dropped
    stream.flush()
    assert stream.broken
    stream.write("more")


def test_ctrl_c_before_training_is_one_line(monkeypatch, capsys):
    from training.interrupt import Interrupted

    def stop(*a, **k):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(train, "main", stop)
    try:
        assert train.cli([]) == 130
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["SIGINT: stopped outside the training loop; no training state was lost"]


def test_a_state_is_written_by_time_by_default(world, tmp_path, monkeypatch):
    from training.config import TrainConfig
    assert TrainConfig().state_every_minutes == 10
    import itertools
    clock = itertools.count(0, 400)  # 400 s per call: every step ends more than 6 minutes after the last state
    monkeypatch.setattr(train, "monotonic", lambda: float(next(clock)))
    assert train.main(args(world, tmp_path / "t", steps=4, state_every_minutes=6)) == 0
    states = sorted(p.name for p in (tmp_path / "t" / "state").glob("step_*.pt"))
    assert "step_0000002.pt" in states and "step_0000004.pt" in states


# ------------------------------------------------------------------------------------- 4. resume checks

def test_resume_keeps_the_saved_options_and_prints_what_changes(world, tmp_path, capsys):
    out = tmp_path / "r"
    assert train.main(args(world, out, steps=3, lr=2e-3)) == 0
    capsys.readouterr()
    # the run is complete: nothing to train, and no silent switch to another step count
    assert train.main(["--resume", "latest", "--out", str(out)]) == 0
    assert "complete at step 3 of 3" in capsys.readouterr().out
    assert train.main(["--resume", "latest", "--out", str(out), "--steps", "5", "--lr", "2e-3"]) == 0
    captured = capsys.readouterr()
    assert "changed: steps 3 -> 5" in captured.err and "changed: lr" not in captured.err
    assert json.loads((out / "config.yaml").read_text())["rank"] == 4
    assert json.loads((out / "config.yaml").read_text())["steps"] == 5


def test_resume_refuses_changes_to_what_is_trained_before_loading(world, tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert train.main(args(world, out, steps=2)) == 0
    no_models(monkeypatch)
    with pytest.raises(ValueError) as err:
        train.main(["--resume", "latest", "--out", str(out), "--rank", "8", "--alpha", "2", "--targets", "attn-mlp"])
    text = str(err.value)
    assert "rank 4 -> 8" in text and "alpha 0.0 -> 2.0" in text and "targets 'attn' -> 'attn-mlp'" in text


def test_resume_latest_without_a_state_fails_before_any_work(world, tmp_path, monkeypatch):
    no_models(monkeypatch)
    with pytest.raises(ValueError, match="no training state"):
        train.main(args(world, tmp_path / "empty", resume="latest"))
    assert not (tmp_path / "empty").exists()


def test_targets_that_match_nothing_fail_before_any_work(world, tmp_path, monkeypatch):
    no_models(monkeypatch)
    with pytest.raises(ValueError, match="targets: no Linear/Conv2d module matches"):
        train.main(args(world, tmp_path / "t", targets="*.nothing_here"))
    assert not (tmp_path / "t").exists()  # a run that fails its checks creates no output folder


def test_a_checkpoint_whose_shapes_do_not_fit_fails_before_any_work(world, tmp_path, monkeypatch):
    state = tiny_state_dict("sd1", seed=1)
    key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    bad = write_state_dict(tmp_path / "bad.safetensors", state)
    no_models(monkeypatch)
    with pytest.raises(ValueError, match="bad.safetensors"):
        train.main(args(world, tmp_path / "b", ckpt=str(bad)))
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------- 5. bad values and files

@pytest.mark.parametrize("option", ["alpha=nan", "alpha=inf", "lr=nan", "noise_offset=-inf"])
def test_non_finite_options_are_refused_when_parsed(world, tmp_path, monkeypatch, option):
    no_models(monkeypatch)
    key, value = option.split("=")
    with pytest.raises(ValueError, match=f"{key} must be a finite number"):
        train.main(args(world, tmp_path / "n", **{key: value}))


def test_a_recipe_that_is_not_yaml_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("rank: 4\nsteps: [1, 2\nlr: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        train.main(["--config", str(recipe)])


@pytest.mark.parametrize("content, message", [(b"", "the file is empty"), (b"\x10\x00\x00\x00\x00\x00\x00\x00{}",
                                              "not a readable safetensors file")])
def test_an_unreadable_lora_file_is_one_line_naming_it(tmp_path, content, message):
    import lora
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    model = sd.load(ROOT / "toy" / "tiny_sd.safetensors")
    with pytest.raises(ValueError) as err:
        lora.load(path, model.unet)
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_a_pickle_lora_that_needs_code_is_refused(tmp_path):
    import argparse

    import lora
    path = tmp_path / "evil.pt"
    torch.save({"x": argparse.Namespace(a=1), "t": torch.zeros(1)}, path)  # unpickling it would run argparse code
    with pytest.raises(ValueError, match=f"{path}: refused"):
        lora.load(path, sd.load(ROOT / "toy" / "tiny_sd.safetensors").unet)


def test_sample_names_a_truncated_lora_and_a_scale_that_is_not_a_number(tmp_path, capsys):
    import sample
    ckpt = str(ROOT / "toy" / "tiny_sd.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    with pytest.raises(SystemExit) as code:
        sample.main(["--ckpt", ckpt, "--prompt", "x", "--lora", str(truncated), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and str(truncated) in err[0]
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--prompt", "x", "--lora", f"{truncated}:abc", "--out", str(tmp_path / "o")])
    assert "the scale 'abc' after the last ':' is not a number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 6. nothing left behind

def test_leftovers_of_interrupted_saves_are_cleaned_and_the_log_cut_back(world, tmp_path, capsys):
    out = tmp_path / "c"
    assert train.main(args(world, out, steps=4, state_every=2, save_every=2)) == 0
    stale = [out / ".lora_step_0000002.safetensors.abc123.tmp", out / "state" / ".step_0000004.pt.xyz.tmp",
             out / "state" / "latest.tmp", out / ".tmpq1w2e3"]
    for path in stale:
        path.write_bytes(b"half")
    # a kill -9 after the state at step 2 was written: the log ran on to step 4, and the step-2 LoRA never landed
    (out / "lora_step_0000002.safetensors").unlink()
    (out / "state" / "latest").write_text("step_0000002.pt")
    assert train.main(["--resume", "latest", "--out", str(out)]) == 0
    assert not any(p.exists() for p in stale)
    assert (out / "lora_step_0000002.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert "rewrote lora_step_0000002.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 7. pictures

@pytest.mark.parametrize("size", [16, 32, 64, 512])
def test_grid_column_labels_fit_their_columns_at_every_size(size):
    from sampling import grid
    from sampling.images import cell_scale, label_font
    labels = ["LoRA x0", "LoRA x0.5", "LoRA x1"]
    cells = [Image.new("RGB", (size, size), "gray")] * 3
    sheet = grid(cells, cols=3, col_labels=labels)
    font = label_font(max(12, size // 16))
    cell = size * cell_scale(size, size, labels, font)
    assert sheet.width == 3 * cell
    assert all(font.getlength(label) < cell for label in labels)  # no label runs into the next column


def test_before_after_rows_are_labelled_in_the_picture(tmp_path):
    from toy.hooks import before_after_grid
    images = {"concept": torch.zeros(8, 3, 32, 32), "base": torch.zeros(8, 3, 32, 32)}
    path = before_after_grid("purple", {"images": images}, {"images": images}, tmp_path / "ba.png")
    picture = Image.open(path).convert("L")
    cell = 96
    margin = picture.width - 8 * cell
    assert margin > 100 and picture.height == 4 * cell
    label_area = picture.crop((0, 0, margin, picture.height))
    assert min(label_area.getdata()) < 128  # dark text on the white label column


# ------------------------------------------------------------------ OpenMP's wait policy, before torch loads

@pytest.mark.parametrize("module", ["train", "sample", "analysis", "data", "toy.evaluate", "toy.pretrain"])
def test_every_entry_point_sets_the_wait_policy_before_torch_loads(module):
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads; set later, threads spin, and on a loaded machine the
    analysis sweep trained 1.7x slower than train.py until it was set first (devices.py)."""
    spy = ("import os, sys, importlib\n"
           "class Spy:\n"
           "    def find_spec(self, name, path=None, target=None):\n"
           "        if name == 'torch' and not hasattr(self, 'seen'):\n"
           "            self.seen = print('policy:', os.environ.get('OMP_WAIT_POLICY'))\n"
           "sys.meta_path.insert(0, Spy())\n"
           f"importlib.import_module({module!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", spy], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "policy: PASSIVE"


def test_a_state_with_other_trainable_tensors_is_refused_in_one_line(world, tmp_path):
    out = tmp_path / "s"
    assert train.main(args(world, out, steps=2)) == 0
    path = out / "state" / "step_0000002.pt"
    state = torch.load(path, weights_only=True)
    state["trainable"].pop(next(iter(state["trainable"])))
    torch.save(state, path)
    with pytest.raises(ValueError, match="holds other trainable tensors than this run trains"):
        train.main(["--resume", "latest", "--out", str(out), "--steps", "3"])
