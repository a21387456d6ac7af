"""train.py end to end on a tiny model: encode, train, resume, DDP, full mode, and bad input."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file

import sd
import train
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict
from training.optim import AdamW

from helpers import captioned_circles, train_argv


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1 checkpoint, six captioned 32 px images, and a shared latent cache folder."""
    root = tmp_path_factory.mktemp("train")
    ckpt = write_state_dict(root / "tiny.safetensors", tiny_state_dict("sd1", seed=1))
    images = root / "images"
    pairs = [("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 3
    captioned_circles(images, [c for _, c in pairs], [f"a {name} circle" for name, _ in pairs])
    return {"ckpt": str(ckpt), "images": str(images), "cache": str(root / "cache"), "root": root}


def args(world, out, **overrides) -> list[str]:
    return train_argv(world, out, **{"steps": 6, "targets": "attn-mlp", **overrides})


def fixed_loss(model, cache: str) -> float:
    """The denoising loss on every cached image at fixed noise and timesteps: deterministic, so it can be compared."""
    from data import LatentLoader
    loader = LatentLoader(cache, batch_size=6, seed=0, shuffle=False, sample=False)
    batch = loader.batch(0)
    cfg = train.TrainConfig()
    with torch.no_grad():
        return float(train.diffusion_loss(model.unet, model.schedule, batch.latents, batch.context, 123, 0, cfg,
                                          torch.autocast("cpu", enabled=False)))


def test_lora_training_lowers_the_loss_and_writes_a_usable_file(world, tmp_path):
    out = tmp_path / "run"
    assert train.main(args(world, out, steps=25, lr=1e-2, validation_prompts="a red circle|a blue circle",
                           validation_steps=3, save_every=10)) == 0
    lora_file = out / "lora_final.safetensors"
    assert lora_file.is_file() and (out / "lora_step_0000010.safetensors").is_file()
    assert (out / "samples" / "step_0000025.png").is_file()
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 26))
    assert {"step", "loss", "lr", "grad_norm", "step_time_s", "peak_mem_gb"} <= set(lines[0])

    base = sd.load(world["ckpt"])
    before = fixed_loss(base, world["cache"])
    import lora
    lora.load(lora_file, base.unet)
    after = fixed_loss(base, world["cache"])
    assert after < 0.9 * before, (before, after)

    from safetensors import safe_open
    with safe_open(lora_file, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_training_config"])["rank"] == 4
    assert json.loads((out / "config.yaml").read_text())["steps"] == 25

    import sample
    assert sample.main(["--ckpt", world["ckpt"], "--prompt", "a red circle", "--lora", f"{lora_file}:0.8",
                        "--steps", "2", "--size", "32x32", "--batch", "1", "--out", str(tmp_path / "samples")]) == 0
    assert list((tmp_path / "samples").glob("*.png"))


def test_resume_equals_the_uninterrupted_run(world, tmp_path):
    full, first, second = tmp_path / "full", tmp_path / "first", tmp_path / "second"
    assert train.main(args(world, full, steps=6, state_every=3)) == 0
    assert train.main(args(world, first, steps=3)) == 0
    assert train.main(args(world, second, steps=6, resume=str(first / "state" / "step_0000003.pt"))) == 0
    a = load_file(full / "lora_final.safetensors")
    b = load_file(second / "lora_final.safetensors")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # CPU fp32: bitwise
    # and 'latest' finds the newest state of an output folder
    assert train.main(args(world, first, steps=4, resume="latest")) == 0


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert train.main(argv) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_equal_one_process_with_the_same_global_batch(world, tmp_path):
    import torch.multiprocessing as mp
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert train.main(args(world, single, steps=3, batch_size=1, grad_accum=2)) == 0
    train.main(args(world, tmp_path / "warm", steps=1))  # the cache exists before the workers start
    mp.spawn(_ddp_worker, args=(2, _free_port(), args(world, ddp, steps=3, batch_size=1, grad_accum=1)), nprocs=2)
    a = load_file(single / "lora_final.safetensors")
    b = load_file(ddp / "lora_final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-5)  # fp sums in another order


def test_full_mode_writes_a_checkpoint_whose_untouched_tensors_equal_the_base(world, tmp_path):
    out = tmp_path / "full"
    assert train.main(args(world, out, mode="full", steps=2, lr=1e-4, ema_decay=0.9, save_dtype="auto")) == 0
    path = out / "model_final.safetensors"
    model = sd.load(path)
    assert model.version == "sd1"
    base = load_file(world["ckpt"])
    tuned = load_file(path)
    assert set(base) == set(tuned)
    for k, v in base.items():
        if not k.startswith("model.diffusion_model."):
            assert torch.equal(tuned[k], v), k
    assert any(not torch.equal(tuned[k], v) for k, v in base.items() if k.startswith("model.diffusion_model."))


def test_optimizer_step_counts_fp16_overflow_skips():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([dict(params=[p], lr=0.1)])  # ours, not a torch.optim.Optimizer: GradScaler works with it too
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((p * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    norm, skipped = train.optimizer_step(opt, scaler, [p], 1.0)
    assert skipped and torch.equal(p.detach(), torch.ones(3)) and scaler.get_scale() == 512.0
    scaler.scale(p.sum()).backward()
    norm, skipped = train.optimizer_step(opt, scaler, [p], 0.0)
    assert not skipped and not torch.equal(p.detach(), torch.ones(3)) and norm == pytest.approx(3**0.5)
    assert p.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 + GradScaler training runs on CUDA")
def test_fp16_run_on_cuda(world, tmp_path):
    out = tmp_path / "fp16"
    assert train.main(args(world, out, precision="fp16", device="cuda", steps=4)) == 0
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "loss_scale" in record and "skipped_steps" in record


def test_nan_loss_stops_and_keeps_the_last_good_outputs(world, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real = train.diffusion_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(train, "diffusion_loss", sometimes_nan)
    assert train.main(args(world, out, steps=6, state_every=2)) == 1
    assert (out / "state" / "step_0000002.pt").is_file()
    assert not (out / "lora_final.safetensors").exists()


def test_ctrl_c_saves_a_resumable_state(world, tmp_path, monkeypatch):
    out = tmp_path / "interrupt"
    real = train.diffusion_loss
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "diffusion_loss", interrupt)
    assert train.main(args(world, out, steps=6)) == 130
    assert (out / "state" / "latest").read_text().strip() == "step_0000002.pt"


@pytest.mark.parametrize("override, message", [
    ({"ckpt": "/nope/missing.safetensors"}, "not found"),
    ({"images": "/nope/folder"}, "not found"),
    ({"rank": 0}, "rank"),
    ({"resolution": 30}, "multiple of 8"),
    ({"class_images": "/nope/folder"}, "class_images: folder not found"),
    ({"class_images": ".", "class_prompt": "a circle"}, "give one of them"),
])
def test_bad_input_fails_before_any_model_is_loaded(world, tmp_path, override, message, monkeypatch):
    monkeypatch.setattr(sd, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=message):
        train.main(args(world, tmp_path / "bad", **override))


def test_unknown_option_suggests_the_closest(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(args(world, tmp_path / "bad") + ["--learning_rat=3"])
    with pytest.raises(SystemExit):
        train.main(["--rnak", "4"])
    assert "did you mean 'rank'" in capsys.readouterr().err


def test_yaml_recipe_unknown_key_suggests_the_closest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rnak: 4\n")
    with pytest.raises(ValueError, match="did you mean 'rank'"):
        train.main(["--config", str(recipe)])


def test_help_lists_every_key(capsys):
    from training.config import FIELDS
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in FIELDS)


def test_recipes_parse():
    from pathlib import Path

    from training.config import from_dict, load_yaml
    for recipe in sorted(Path("configs").glob("*.yaml")):
        from_dict(load_yaml(recipe), source=str(recipe))


def test_class_images_are_encoded_with_their_own_captions_as_the_prior(world, tmp_path):
    from data import LatentLoader
    out = tmp_path / "prior"
    assert train.main(args(world, out, steps=2, class_images=world["images"], prior_loss_weight=0.5)) == 0
    prior = LatentLoader(out / "class_cache", batch_size=6, seed=0, shuffle=False, sample=False)
    own = LatentLoader(world["cache"], batch_size=6, seed=0, shuffle=False, sample=False)
    # the same images and captions as the instance set here, so the same cached conditioning
    assert torch.equal(prior.batch(0).context, own.batch(0).context)


def test_the_builtin_toy_without_a_recipe_uses_the_toy_recipe():
    from training.config import TOY_RECIPE, load_yaml, parse_args
    toy = load_yaml(TOY_RECIPE)
    cfg = parse_args([])
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.out) == (toy["steps"], toy["batch_size"], toy["lr"], toy["out"])
    assert parse_args(["--steps", "7"]).steps == 7 and parse_args(["--steps", "7"]).lr == toy["lr"]
    other = parse_args(["--ckpt", "some/model.safetensors"])
    assert (other.steps, other.batch_size, other.lr) == (1000, 1, 1e-4)
