"""analysis sweep: a tiny grid trained with train.py, measured on held-out images, reused when run again."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, ImageDraw

import analysis as la
import lora
import sd
import train
from toy import hooks as toy_hooks
from analysis.sweep import SweepGrid, toy_scores, validation_batches, validation_loss
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


def test_sweep_trains_the_grid_measures_every_run_and_reuses_finished_runs(world, capsys, tmp_path):
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
    assert "concept_score" not in rows["r2_a=r_lin_lr0.003"]  # toy_eval off: no scores.json, no score columns
    assert not (out / "sweep_toy_scores.png").exists()
    # The toy's scores, written by train.py's own writer as a toy run would: concept 0.25 -> 0.5 + r/16 for rank r.
    for rank in (2, 4):
        before = {"concept_score": 0.25, "forgetting_score": 0.75, "base_accuracy": {}, "images": fake_images()}
        after = {"concept_score": 0.5 + rank / 16, "forgetting_score": 0.75 - rank / 32, "base_accuracy": {},
                 "images": fake_images()}
        toy_hooks.summary("star", before, after, out / f"r{rank}_a=r_lin_lr0.003")
    # Same grid again: nothing is retrained and every number comes out the same (validation is deterministic).
    result = la.sweep(SweepGrid(ranks=[2, 4], alphas=["rank"], rules=["r"], lrs=[3e-3]), train_args(world), out,
                      val_images=world["val"], timesteps=[200, 800])
    assert [r["status"] for r in result.rows] == ["reused", "reused"]
    assert [r["val_loss"] for r in result.rows] == [rows[r["name"]]["val_loss"] for r in result.rows]
    assert [(r["concept_score"], r["forgetting_score"], r["concept_base"], r["forgetting_base"]) for r in result.rows] \
        == [(0.625, 0.6875, 0.25, 0.75), (0.75, 0.625, 0.25, 0.75)]
    base, *runs = result.summary
    assert base["name"] == "base" and (base["concept_score"], base["forgetting_score"]) == (0.25, 0.75)
    assert [r["concept_score"] for r in runs] == [0.625, 0.75]
    assert "concept_score" in result.table() and "forgetting_score" in result.table()
    written = [w.name for w in result.save(tmp_path)]
    assert "sweep_toy_scores.png" in written and (tmp_path / "sweep_toy_scores.png").stat().st_size > 0
    assert "concept_score" in (tmp_path / "sweep.csv").read_text().splitlines()[0]


def fake_images() -> dict:
    return {k: torch.zeros(2, 3, 8, 8) for k in ("concept", "base")}


def test_toy_scores_reads_train_py_scores_and_rejects_other_files(tmp_path):
    assert toy_scores(tmp_path) is None
    (tmp_path / "scores.json").write_text(json.dumps({"base": {"concept_score": 0.1}, "trained": {}}))
    with pytest.raises(ValueError, match="scores.json"):
        toy_scores(tmp_path)


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
