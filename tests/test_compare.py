"""analysis compare: adapters at an equal parameter budget, over seeds, with mean ± 95% CI; sweep --seeds too."""
from __future__ import annotations

import csv
import json
import math

import pytest

import analysis as la
from analysis.compare import match_budget, trainable_count
from analysis.stats import aggregate, mean_ci, t975
from test_analyze_sweep import fake_images, world  # noqa: F401 (world: the sweep tests' fixture, a tiny SD1 and images)
from toy import hooks as toy_hooks


def train_args(world) -> list[str]:
    return [f"--ckpt={world['ckpt']}", f"--images={world['images']}", "--resolution=32", "--precision=fp32",
            "--steps=2", "--batch_size=2", "--targets=attn", "--toy_eval=False", "--lr=3e-3"]


def test_mean_ci_is_the_t_interval():
    mean, half, n = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)          # 1.2910
    assert (mean, n) == (2.5, 4) and half == pytest.approx(3.1824 * sd / 2)
    assert mean_ci([0.3, 0.5])[1] == pytest.approx(12.7062 * 0.1)    # two seeds: t(1) · |x1 − x2| / 2
    assert math.isnan(mean_ci([0.3])[1]) and t975(60) == pytest.approx(2.0003, abs=2e-4)
    rows = aggregate([{"a": "x", "v": 1.0}, {"a": "x", "v": 3.0}, {"a": "y", "v": 2.0}], ["a"], ["v"])
    assert rows[0]["v"] == 2.0 and rows[0]["v_ci95"] == pytest.approx(12.7062) and rows[1]["n"] == 1


def test_budgets_are_matched_within_ten_percent(world):
    import sd
    unet = sd.load(world["ckpt"]).unet
    settings = match_budget(unet, ["lora", "loha", "dora", "lokr"], 8, "attn")
    budget = trainable_count(unet, "lora", 8, "attn")
    assert settings[0] == {"adapter": "lora", "rank": 8, "options": {}, "params": budget, "params_vs_lora": 0.0}
    for s in settings:
        assert abs(s["params"] - budget) <= 0.1 * budget
        assert s["params"] == trainable_count(unet, s["adapter"], s["rank"], "attn", s["options"])
    assert settings[1]["rank"] == 4  # LoHa: 2r(d+k) parameters, so r/2 matches a LoRA's r(d+k) exactly
    with pytest.raises(ValueError, match="within"):  # DoRA = a LoRA plus one magnitude per output channel
        match_budget(unet, ["dora"], 4, "attn")


def test_compare_trains_each_adapter_per_seed_and_reports_mean_and_ci(world, capsys):
    out = world["root"] / "cmp"
    argv = ["compare", "--adapters", "lora,loha", "--rank", "2", "--seeds", "0,1", "--out", str(out),
            "--val-images", world["val"], "--timesteps", "200,800", "--", *train_args(world)]
    assert la.main(argv) == 0
    printed = capsys.readouterr().out
    assert "equal budget" in printed and "loha   r=1" in printed
    data = json.loads((out / "compare.json").read_text())
    runs = data["runs"]
    assert [(r["adapter"], r["seed"], r["status"]) for r in runs] == [
        ("lora", 0, "ok"), ("lora", 1, "ok"), ("loha", 0, "ok"), ("loha", 1, "ok")]
    rows = {r["adapter"]: r for r in data["rows"]}
    for adapter in ("lora", "loha"):
        these = [r for r in runs if r["adapter"] == adapter]
        vals = [r["val_loss"] for r in these]
        assert rows[adapter]["n"] == 2 and rows[adapter]["val_loss"] == pytest.approx(sum(vals) / 2)
        assert rows[adapter]["val_loss_ci95"] == pytest.approx(12.7062 * abs(vals[0] - vals[1]) / 2)
        assert all(1 <= r["rank90"] <= 2 for r in these)   # a rank-2 LoRA; a rank-1 LoHa has rank ≤ 1·1
        assert all(r["intruders"] >= 0 for r in these)
    assert rows["loha"]["params"] == rows["lora"]["params"]
    with open(out / "compare.csv") as f:
        assert {r["adapter"] for r in csv.DictReader(f)} == {"lora", "loha"}
    assert (out / "compare.png").is_file()
    assert "±" in json.loads((out / "compare.json").read_text())["summary"][1]["val_loss"]
    # Toy scores (as train.py writes them on the toy), then the same comparison again: every run is reused.
    for i, name in enumerate(["lora_s0", "lora_s1", "loha_s0", "loha_s1"]):
        before = {"concept_score": 0.25, "forgetting_score": 0.75, "base_accuracy": {}, "images": fake_images()}
        after = {"concept_score": 0.5 + i / 8, "forgetting_score": 0.7, "base_accuracy": {}, "images": fake_images()}
        toy_hooks.summary("star", before, after, out / name)
    result = la.compare(["lora", "loha"], 2, [0, 1], train_args(world), out, val_images=world["val"],
                        timesteps=[200, 800])
    assert [r["status"] for r in result.data["runs"]] == ["reused"] * 4
    lo, ha = result.rows
    assert lo["concept_score"] == pytest.approx(0.5625) and lo["concept_score_ci95"] == pytest.approx(12.7062 / 16)
    assert ha["concept_score"] == pytest.approx(0.8125) and ha["forgetting_score_ci95"] == pytest.approx(0.0)
    assert "concept_score" in result.table()


def test_sweep_with_seeds_reports_mean_and_ci_rows(world):
    out = world["root"] / "sweep_seeds"
    grid = la.SweepGrid(ranks=[2], alphas=["rank"], rules=["r"], lrs=[3e-3], seeds=[0, 1])
    result = la.sweep(grid, train_args(world), out, val_images=world["val"], timesteps=[200, 800])
    per_seed = [r for r in result.rows if isinstance(r["seed"], int)]
    mean = [r for r in result.rows if r.get("status") == "mean ± 95% CI"]
    assert len(per_seed) == 2 and len(mean) == 1
    vals = [r["val_loss"] for r in per_seed]
    assert mean[0]["val_loss"] == pytest.approx(sum(vals) / 2)
    assert mean[0]["val_loss_ci95"] == pytest.approx(12.7062 * abs(vals[0] - vals[1]) / 2)
    assert len(result.summary) == 2 and "±" in result.summary[1]["val_loss"]


def test_the_full_fine_tune_runs_at_its_own_learning_rate():
    from analysis.compare import _point_args, setting_label
    full = {"adapter": "full", "rank": None, "options": {"lr": 1e-4}, "params": 10, "params_vs_lora": 9.0}
    assert _point_args(full, 2, 1e-4) == ["--mode=full", "--lr=0.0001", "--seed=2"]
    assert setting_label(full) == "full fine-tune lr=0.0001"
    lora = {"adapter": "lora", "rank": 4, "options": {}, "params": 1, "params_vs_lora": 0.0}
    assert "--lr" not in " ".join(_point_args(lora, 2, 1e-4))  # the adapters keep train.py's lr
