"""`python -m data.encode` as a user runs it: a messy folder encodes once, skips and reports the broken file,
a second run encodes nothing, and mistakes (mismatched cache, --strict, missing folder) exit 2 with a message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.encode import build_parser, main
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_state_dict(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_state_dict("sd1", seed=0))


def messy(root: Path) -> Path:
    """Mixed formats, sizes and caption styles, plus one broken file and one uncaptioned image."""
    rng = np.random.default_rng(0)

    def save(path, size, mode="RGB", **kw):
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        (image.convert(mode) if mode != "RGB" else image).save(path, **kw)

    save(root / "5_sks dog" / "dog1.jpg", (48, 36))
    save(root / "5_sks dog" / "dog2.png", (30, 44), mode="RGBA")
    (root / "5_sks dog" / "dog2.txt").write_text("sks dog sitting")
    save(root / "captioned" / "cat.webp", (40, 40))
    (root / "captioned" / "cat.txt").write_text("a cat")
    save(root / "captioned" / "palette.gif", (25, 20), mode="P")
    (root / "captioned" / "palette.txt").write_text("a gif")
    save(root / "captioned" / "nocaption.png", (20, 20))
    save(root / "hf" / "one.png", (64, 32))
    (root / "hf" / "metadata.jsonl").write_text(json.dumps({"file_name": "one.png", "text": "wide one"}) + "\n")
    (root / "captioned" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated nonsense")
    (root / "captioned" / "broken.txt").write_text("broken")
    return root


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_option():
    result = subprocess.run([sys.executable, "-m", "data.encode", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in result.stdout
    assert "metadata.jsonl" in result.stdout and "10_sks dog" in result.stdout and "--overwrite" in result.stdout


def test_messy_folder_as_a_new_user(tmp_path, ckpt, capsys):
    images, out = messy(tmp_path / "train"), tmp_path / "cache"
    args = ["--ckpt", ckpt, "--images", images, "--out", out, "--resolution", "16", "--bucket", "--bucket-step", "4",
            "--flip", "--folder-captions", "--device", "cpu", "--quiet"]
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    assert "5 images" in stdout and "5 encoded (10 latents with mirror images), 0 reused, 2 skipped" in stdout
    assert "broken.jpg: not a readable image" in stdout and "nocaption.png: missing caption" in stdout
    assert "buckets (WxH: images)" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    captions = {os.path.basename(it["file"]): (it["caption"], it["repeats"]) for it in manifest["items"]}
    assert captions == {"dog1.jpg": ("sks dog", 5), "dog2.png": ("sks dog sitting", 5), "cat.webp": ("a cat", 1),
                        "palette.gif": ("a gif", 1), "one.png": ("wide one", 1)}

    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "0 encoded, 5 reused, 2 skipped" in stdout and "0 captions encoded" in stdout

    code, _, stderr = run(capsys, *args, "--strict")
    assert code == 2 and "strict" in stderr and "broken.jpg" in stderr


def test_repeats_suffix_and_errors(tmp_path, ckpt, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 20), (i * 100, 0, 0)).save(folder / f"{i}.png")
    common = ["--ckpt", ckpt, "--out", tmp_path / "cache", "--bucket-step", "4", "--quiet", "--device", "cpu"]
    code, stdout, stderr = run(capsys, "--images", f"{folder}:3", "--resolution", "16", "--prompt", "a photo", *common)
    assert code == 0, stderr
    assert "(6 samples per epoch with repeats)" in stdout

    code, _, stderr = run(capsys, "--images", folder, "--resolution", "20", "--prompt", "a photo", *common)
    assert code == 2 and "error:" in stderr and "resolution=[16, 16] (now [20, 20])" in stderr and "--overwrite" in stderr
    code, stdout, _ = run(capsys, "--images", folder, "--resolution", "20", "--prompt", "a photo", "--overwrite", *common)
    assert code == 0 and "2 encoded" in stdout

    code, _, stderr = run(capsys, "--images", tmp_path / "nope", "--prompt", "x", *common)
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = run(capsys, "--images", folder, "--resolution", "17", "--prompt", "x", *common[:2],
                          "--out", tmp_path / "cache17", *common[4:])
    assert code == 2 and "resolution 17x17 is not a multiple of 2, which this model's VAE needs" in stderr
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--images", "x"])  # --ckpt and --out are required
