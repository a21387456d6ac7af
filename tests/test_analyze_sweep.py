"""lora.analyze sweep: a tiny grid trained with train.py, measured on held-out images, reused when run again."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, ImageDraw

import lora
import sd
from lora import analyze as la
from lora.sweep import SweepGrid, validation_batches, validation_loss
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict


def circles(folder, shift: int) -> str:
    folder.mkdir()
    for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 2):
        im = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(im).ellipse([4 + i + shift, 4, 26, 26 - i], fill=colour)
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} circle")
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    ckpt = write_state_dict(root / "tiny.safetensors", tiny_state_dict("sd1", seed=1))
    return {"ckpt": str(ckpt), "images": circles(root / "images", 0), "val": circles(root / "val", 2), "root": root}


def train_args(world) -> list[str]:
    return [f"--ckpt={world['ckpt']}", f"--images={world['images']}", "--resolution=32", "--precision=fp32",
            "--steps=3", "--batch_size=2", "--targets=attn", "--toy_eval=False", "--seed=0"]


def test_sweep_trains_the_grid_measures_every_run_and_reuses_finished_runs(world, capsys):
    out = world["root"] / "grid"
    argv = ["sweep", "--rank", "2,4", "--rule", "r", "--alpha", "rank", "--lr", "3e-3", "--out", str(out),
            "--val-images", world["val"], "--prompts", "a red circle", "--sample-steps", "2", "--timesteps", "200,800",
            "--", *train_args(world)]
    assert la.main(argv) == 0
    data = json.loads((out / "sweep.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"r2_a=r_lin_lr0.003", "r4_a=r_lin_lr0.003"}
    for r in rows.values():
        assert r["status"] == "ok" and r["steps"] == 3 and r["scale"] == 1.0
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["final_train_loss"]) and r["dW_fro"] > 0
        assert {k for k in r if k.startswith("dW.")} >= {"dW.input_blocks.1", "dW.output_blocks.3"}
    assert len(data["val_loss_per_timestep"]["base"]) == 2
    for name in ("sweep.csv", "sweep_val_loss.png", "sweep_train_loss.png", "sweep_dw_blocks.png",
                 "sweep_samples.png", "sweep_val_by_timestep.png"):
        assert (out / name).is_file(), name
    assert "val_loss" in capsys.readouterr().out
    # Same grid again: nothing is retrained and every number comes out the same (validation is deterministic).
    result = la.sweep(SweepGrid(ranks=[2, 4], alphas=["rank"], rules=["r"], lrs=[3e-3]), train_args(world), out,
                      val_images=world["val"], timesteps=[200, 800])
    assert [r["status"] for r in result.rows] == ["reused", "reused"]
    assert [r["val_loss"] for r in result.rows] == [rows[r["name"]]["val_loss"] for r in result.rows]


def test_validation_loss_is_deterministic_and_sees_the_lora(world, tmp_path):
    model = sd.load(world["ckpt"])
    batches = validation_batches(model, world["val"], tmp_path / "cache", resolution=32, seed=0)
    a = validation_loss(model, batches, [100, 500], seed=3)
    assert a == validation_loss(model, batches, [100, 500], seed=3)
    assert a != validation_loss(model, batches, [100, 500], seed=4)
    lora.inject(model.unet, 2, None, "attn")
    with torch.no_grad():
        for layer in lora.lora_layers(model.unet):
            layer.lora_up.weight.normal_(0, 0.5)
    assert validation_loss(model, batches, [100, 500], seed=3) != a


def test_grid_points_and_bad_grids():
    points = SweepGrid(ranks=[4, 16], alphas=["rank", 8], rules=["r", "sqrt"], lrs=[1e-4], seeds=[0, 1]).points(0)
    assert len(points) == 16 and len({p["name"] for p in points}) == 16
    p = next(p for p in points if p["rank"] == 16 and p["alpha"] == 8 and p["rs"])
    assert p["scale"] == pytest.approx(8 / 4) and p["rule"] == "alpha/sqrt(r)"
    with pytest.raises(ValueError, match="scaling rule"):
        SweepGrid(rules=["log"]).points(0)
    with pytest.raises(ValueError, match="alpha"):
        SweepGrid(alphas=[-1.0]).points(0)
    with pytest.raises(ValueError, match="repeats"):
        SweepGrid(ranks=[4, 4]).points(0)
