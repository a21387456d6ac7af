"""sample.py as a user runs it: PNGs with A1111 parameters, grids, LoRA scale sweeps, and errors before any loading."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lora
import sample
import sampling
import sd
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict
from unet import UNetConfig, UNetModel

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD1 checkpoint, a LoRA trained on it (random, non-zero), and a LoRA for a base of another width."""
    folder = tmp_path_factory.mktemp("cli")
    ckpt = write_state_dict(folder / "tiny.safetensors", tiny_state_dict("sd1", seed=0))
    model = sd.load(ckpt)
    lora.inject(model.unet, rank=4, targets="attn")
    with torch.no_grad():
        for layer in lora.lora_layers(model.unet):
            layer.lora_up.weight.normal_(0, 0.5)
    lora.save(folder / "style.safetensors", model.unet)
    other = UNetModel(dataclasses.replace(UNetConfig.tiny_sd1(), context_dim=48))  # another text-encoder width
    lora.inject(other, rank=4, targets="attn")
    lora.save(folder / "other_base.safetensors", other)
    return {"ckpt": ckpt, "lora": folder / "style.safetensors", "other": folder / "other_base.safetensors"}


def run(*argv: str) -> list[Path]:
    """main() with --quiet; returns the files it printed."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert sample.main([*map(str, argv), "--quiet"]) == 0
    return [Path(line) for line in out.getvalue().split()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_writes_pngs_with_parameters_and_a_grid(files, tmp_path):
    written = run("--ckpt", files["ckpt"], "--prompt", "a photo of a cat", "--negative", "blurry",
                  "--sampler", "euler_a", "--steps", "3", "--cfg", "6", "--seed", "7", "--size", "24x16",
                  "--batch", "3", "--out", tmp_path, "--grid")
    assert [p.name for p in written] == ["00000-7.png", "00001-8.png", "00002-9.png", "grid-00000.png"]
    image = Image.open(written[1])
    assert image.size == (24, 16)
    params = sampling.parse_a1111_parameters(image.text["parameters"])
    assert params["prompt"] == "a photo of a cat" and params["negative"] == "blurry"
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"], params["Size"], params["Model"]) \
        == ("3", "Euler a", "6", "8", "24x16", "tiny")
    assert Image.open(written[-1]).size == (48, 32)  # 3 images: 2 columns, 2 rows
    # Running again never overwrites: numbering continues.
    again = run("--ckpt", files["ckpt"], "--prompt", "a photo of a cat", "--steps", "1", "--size", "16x16",
                "--out", tmp_path)
    assert [p.name for p in again] == ["00003-0.png"]


def test_same_seed_same_image(files, tmp_path):
    args = ["--ckpt", files["ckpt"], "--prompt", "a cat", "--steps", "2", "--size", "16x16", "--seed", "3"]
    first = run(*args, "--out", tmp_path / "a")
    second = run(*args, "--out", tmp_path / "b")
    assert np.array_equal(pixels(first[0]), pixels(second[0]))


def test_lora_scales_grid_and_scale_zero_is_the_base(files, tmp_path):
    common = ["--ckpt", files["ckpt"], "--prompt", "a cat", "--steps", "3", "--size", "16x16", "--seed", "5",
              "--batch", "2", "--sampler", "dpmpp_2m", "--karras"]
    written = run(*common, "--lora", f"{files['lora']}:0.8", "--lora-scales", "0,0.5,1", "--out", tmp_path / "lora")
    names = [p.name for p in written]
    assert names == ["00000-5-lora0.png", "00001-6-lora0.png", "00002-5-lora0.5.png", "00003-6-lora0.5.png",
                     "00004-5-lora1.png", "00005-6-lora1.png", "grid-00000-lora-scales.png"]
    params = Image.open(written[2]).text["parameters"]
    assert params.startswith("a cat <lora:style:0.4>\n") and "Schedule type: Karras" in params
    assert 'LoRA scales: "0, 0.5, 1"' in Image.open(written[-1]).text["parameters"]
    assert Image.open(written[-1]).height > 2 * 16 and Image.open(written[-1]).width > 3 * 16  # labelled 2x3 grid

    base = run(*common, "--out", tmp_path / "base")
    assert np.array_equal(pixels(written[0]), pixels(base[0]))  # LoRA at scale 0 == no LoRA
    assert np.array_equal(pixels(written[1]), pixels(base[1]))
    assert not np.array_equal(pixels(written[4]), pixels(base[0]))


@pytest.fixture()
def no_loading(monkeypatch):
    """Make any model load fail loudly, to prove that errors come first."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(sd, "load", boom)


@pytest.mark.parametrize("extra,message", [
    (["--size", "500x512"], "width 500 is not a positive multiple of 8"),
    (["--size", "big"], "expected WIDTHxHEIGHT"),
    (["--sampler", "plms"], "unknown sampler 'plms'; valid samplers: ddpm, ddim, euler, euler_a, dpmpp_2m"),
    (["--lora", "missing.safetensors"], "--lora missing.safetensors: no such file"),
    (["--lora-scales", "0,1"], "--lora-scales needs at least one --lora"),
    (["--karras", "--sampler", "euler"], "--karras applies to dpmpp_2m only"),
    (["--eta", "0.5"], "--eta applies to ddim only"),
    (["--steps", "0"], "--steps must be between 1 and 1000"),
])
def test_bad_input_fails_before_loading(files, no_loading, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(files["ckpt"]), "--prompt", "x", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_or_wrong_checkpoint_fails_before_loading(files, no_loading, capsys, tmp_path):
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", "x"])
    assert "nope.safetensors: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(files["lora"]), "--prompt", "x"])
    assert "this is a LoRA file" in capsys.readouterr().err


def test_lora_for_another_base_fails_before_loading(files, no_loading, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(files["ckpt"]), "--prompt", "x", "--lora", str(files["other"])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "other_base.safetensors does not fit tiny.safetensors" in err
    assert "a LoRA for another base model" in err


def test_parse_helpers():
    assert sample.parse_size("768x512") == (768, 512) and sample.parse_size("64") == (64, 64)
    assert sample.parse_lora("a/b.safetensors:0.5") == sample.LoraSpec(Path("a/b.safetensors"), 0.5)
    assert sample.parse_lora(r"C:\loras\b.safetensors").path == Path(r"C:\loras\b.safetensors")
    assert sample.parse_scales("0, 0.5,1") == [0.0, 0.5, 1.0]
    specs = [sample.LoraSpec(Path("x/a.safetensors"), 1), sample.LoraSpec(Path("y/a.safetensors"), 1)]
    sample._name_loras(specs)
    assert [s.name for s in specs] == ["a", "a_2"]


def test_help_gives_every_option_a_default():
    import re

    text = sample.build_parser().format_help()
    section = text.split("\noptions:\n")[1]
    entries = {e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n  (?=-)", section)}
    for option in ("--negative", "--lora", "--lora-scales", "--sampler", "--karras", "--eta", "--spacing",
                   "--zero-terminal-snr", "--steps", "--cfg", "--cfg-rescale", "--seed", "--size", "--batch", "--out",
                   "--grid", "--dtype", "--device", "--vae-slice", "--quiet"):
        assert "default" in entries[option] or "required" in entries[option], option
    assert "pixels" in text and "dpmpp_2m" in text


def test_script_runs_standalone():
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT / "tests", timeout=120)
    assert result.returncode == 0 and "--lora-scales" in result.stdout


def test_size_defaults_to_the_models_own(files):
    from training.config import TrainConfig
    assert sample.default_size("sdxl", Path("sd_xl_base_1.0.safetensors")) == 1024
    assert sample.default_size("sd1", Path("v1-5-pruned-emaonly.safetensors")) == 512
    assert sample.default_size("sd1", Path(TrainConfig.ckpt)) == 32  # the built-in toy
    # an explicit size is kept; no size means the model's own (512 for a file that is not the toy)
    assert sample.preflight(Path(files["ckpt"]), [], 24, 16) == (24, 16)
    assert sample.preflight(Path(files["ckpt"]), [], 0, 0) == (512, 512)
