"""The loss and noise options of train.py (training/loss.py, training/noise.py, zero terminal SNR, CFG rescale): each
formula against a hand computation on fixed tensors; each option a no-op when off and a change when on."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train
from sampling.generate import rescale_guidance
from schedule import DDPMSchedule, scaled_linear_betas, zero_terminal_snr
from training.loss import distance, huber_delta, timestep_weight
from training.noise import multires_noise, perturbed, timesteps

from helpers import train_argv
from test_train import world  # noqa: F401 (a fixture: a tiny SD1 checkpoint with captioned images)

AC = DDPMSchedule().alphas_cumprod


# ------------------------------------------------------------------------------------------ the loss

def test_huber_delta_follows_each_schedule():
    t = torch.tensor([0, 250, 999])
    assert torch.equal(huber_delta(t, AC, "constant", 0.1), torch.full((3,), 0.1))
    want = [0.1 ** (v / 1000) for v in (0, 250, 999)]
    assert huber_delta(t, AC, "exponential", 0.1).tolist() == pytest.approx(want, rel=1e-6)
    sigma = [math.sqrt((1 - float(AC[v])) / float(AC[v])) for v in (0, 250, 999)]
    want = [(1 - 0.1) / (1 + s) ** 2 + 0.1 for s in sigma]
    assert huber_delta(t, AC, "snr", 0.1).tolist() == pytest.approx(want, rel=1e-6)
    assert huber_delta(torch.tensor([999]), torch.zeros(1000), "snr", 0.1).item() == pytest.approx(0.1)  # σ = ∞


def test_distances_are_their_formulas():
    pred = torch.tensor([[0.0, 0.5, -3.0]]).view(1, 3, 1, 1)
    target = torch.zeros(1, 3, 1, 1)
    d = torch.tensor([0.2])
    assert torch.equal(distance(pred, target), pred**2)
    want_huber = [2 * 0.2 * (math.sqrt(x * x + 0.04) - 0.2) for x in (0.0, 0.5, -3.0)]
    want_l1 = [2 * (math.sqrt(x * x + 0.04) - 0.2) for x in (0.0, 0.5, -3.0)]
    assert distance(pred, target, "huber", d).flatten().tolist() == pytest.approx(want_huber, rel=1e-6)
    assert distance(pred, target, "smooth_l1", d).flatten().tolist() == pytest.approx(want_l1, rel=1e-6)
    assert distance(pred, target, "huber", torch.tensor([100.0])).flatten().tolist() == pytest.approx(
        [0.0, 0.25, 9.0], rel=1e-3)  # δ ≫ |d|: the pseudo-Huber loss is the squared error


def test_timestep_weights_are_min_snr_and_debiased():
    snr = torch.tensor([0.01, 1.0, 4.0, 2000.0])
    assert timestep_weight(snr, "epsilon") is None
    assert timestep_weight(snr, "epsilon", 5.0).tolist() == pytest.approx([1.0, 1.0, 1.0, 5 / 2000])
    assert timestep_weight(snr, "v_prediction", 5.0).tolist() == pytest.approx([0.01 / 1.01, 0.5, 0.8, 5 / 2001])
    assert timestep_weight(snr, "epsilon", debiased=True).tolist() == pytest.approx(
        [10.0, 1.0, 0.5, 1 / math.sqrt(1000)])  # SNR capped at 1000
    assert timestep_weight(snr, "v_prediction", debiased=True).tolist() == pytest.approx(
        [1 / 1.01, 0.5, 0.2, 1 / 1001])
    both = timestep_weight(snr, "epsilon", 5.0, True)
    assert both.tolist() == pytest.approx([10.0, 1.0, 0.5, 5 / 2000 / math.sqrt(1000)])


# ------------------------------------------------------------------------------------------ the noise

def test_multires_noise_adds_upsampled_levels_and_rescales():
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    got = multires_noise(noise, torch.Generator().manual_seed(1), iterations=2, discount=0.5)
    g = torch.Generator().manual_seed(1)
    total = noise.clone()
    for i in range(2):
        r = 2 + 2 * float(torch.rand((), generator=g))
        h = max(1, int(16 / r**i))
        level = torch.randn(2, 4, h, h, generator=g)
        total = total + 0.5**i * torch.nn.functional.interpolate(level, size=(16, 16), mode="bilinear")
    assert torch.allclose(got, total / total.std(), atol=1e-6)
    assert got.std().item() == pytest.approx(1.0, abs=1e-5)


def test_timesteps_uniform_is_the_plain_draw_and_ranges_hold():
    plain = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(timesteps(64, torch.Generator().manual_seed(3), 1000), plain)
    t = timesteps(500, torch.Generator().manual_seed(3), 1000, 200, 300)
    assert t.min() >= 200 and t.max() < 300
    u = torch.sigmoid(0.5 + 2.0 * torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    want = (100 + (u * 800).floor()).long()
    assert torch.equal(timesteps(8, torch.Generator().manual_seed(4), 1000, 100, 900, "logit_normal", 0.5, 2.0), want)
    middle = timesteps(4000, torch.Generator().manual_seed(5), 1000, sampling="logit_normal")
    assert ((middle > 250) & (middle < 750)).float().mean() > 0.6  # uniform: 0.5


def test_input_perturbation_adds_gamma_noise_only_when_on():
    noise = torch.ones(2, 3)
    assert perturbed(noise, torch.Generator().manual_seed(0), 0.0) is noise
    xi = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(perturbed(noise, torch.Generator().manual_seed(0), 0.1), noise + 0.1 * xi)


# -------------------------------------------------------------------- zero terminal SNR and CFG rescale

def test_zero_terminal_snr_matches_diffusers_and_keeps_the_first_step():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    betas = scaled_linear_betas()
    ours = zero_terminal_snr(betas)
    assert torch.allclose(ours, rescale_zero_terminal_snr(betas.float()).double(), rtol=2e-4, atol=1e-7)  # theirs: fp32
    new, old = torch.cumprod(1 - ours, 0), torch.cumprod(1 - betas, 0)
    assert new[-1] == 0 and new[0] == pytest.approx(float(old[0]), rel=1e-12)
    # sqrt(ᾱ) is shifted and scaled: an affine map of the old one
    a, b = new.sqrt(), old.sqrt()
    slope = (a[0] - a[500]) / (b[0] - b[500])
    assert torch.allclose(a, slope * (b - b[-1]), atol=1e-9)


def test_cfg_rescale_pulls_the_guided_output_to_the_conditional_scale():
    g = torch.Generator().manual_seed(0)
    guided, cond = 3 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    full = rescale_guidance(guided, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)
    want = 0.7 * guided * (cond.std(dim=(1, 2, 3), keepdim=True) / guided.std(dim=(1, 2, 3), keepdim=True)) \
        + 0.3 * guided
    assert torch.allclose(rescale_guidance(guided, cond, 0.7), want)


# ------------------------------------------------------------------------- through train.py

def _lora(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


OPTIONS = {
    "huber": {"loss_type": "huber"},
    "smooth_l1_exp": {"loss_type": "smooth_l1", "huber_schedule": "exponential"},
    "debiased": {"debiased_estimation": True},
    "multires": {"multires_noise_iterations": 4},
    "input_perturbation": {"ip_noise_gamma": 0.1},
    "timestep_range": {"min_timestep": 200, "max_timestep": 800},
    "logit_normal": {"timestep_sampling": "logit_normal"},
}


def test_each_option_changes_training_and_is_a_no_op_when_off(world, tmp_path):  # noqa: F811
    base = dict(steps=2, targets="attn")
    assert train.main(train_argv(world, tmp_path / "base", **base)) == 0
    want = _lora(tmp_path / "base" / "lora_final.safetensors")
    off = dict(loss_type="l2", huber_c=0.3, huber_schedule="constant", debiased_estimation=False,
               multires_noise_iterations=0, multires_noise_discount=0.5, ip_noise_gamma=0.0, min_timestep=0,
               max_timestep=1000, timestep_sampling="uniform", logit_mean=0.3, logit_std=2.0, masked_loss=False,
               shuffle_caption=False, keep_tokens=2, caption_tag_dropout=0.0, validation_split=0.0)
    assert train.main(train_argv(world, tmp_path / "off", **base, **off)) == 0
    got = _lora(tmp_path / "off" / "lora_final.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    for name, options in OPTIONS.items():
        assert train.main(train_argv(world, tmp_path / name, **base, **options)) == 0, name
        got = _lora(tmp_path / name / "lora_final.safetensors")
        assert any(not torch.equal(got[k], want[k]) for k in want if "lora_up" in k), name


def test_zero_terminal_snr_needs_v_prediction_and_is_written_in_the_file(world, tmp_path, capsys):  # noqa: F811
    assert train.cli(train_argv(world, tmp_path / "eps", steps=1, zero_terminal_snr=True)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "eps-prediction" in err[-1] and not (tmp_path / "eps").exists()
    out = tmp_path / "v"
    assert train.main(train_argv(world, out, steps=2, targets="attn", zero_terminal_snr=True,
                                 prediction_type="v_prediction")) == 0
    with safe_open(str(out / "lora_final.safetensors"), "pt") as f:
        assert f.metadata()["ss_zero_terminal_snr"] == "True"


def test_sample_py_takes_the_zero_snr_schedule_and_refuses_it_for_eps(world, tmp_path, capsys):  # noqa: F811
    import sample

    common = ["--ckpt", world["ckpt"], "--prompt", "a red circle", "--steps", "3", "--size", "32x32", "--quiet"]
    with pytest.raises(SystemExit):
        sample.main([*common, "--zero-terminal-snr", "--out", str(tmp_path / "no")])
    assert "predicts eps" in capsys.readouterr().err
    for sampler in ("ddim", "euler"):
        out = tmp_path / sampler
        assert sample.main([*common, "--zero-terminal-snr", "--prediction-type", "v_prediction", "--cfg-rescale",
                            "0.7", "--sampler", sampler, "--out", str(out)]) == 0
        from PIL import Image
        png = next(out.glob("*.png"))
        assert "Schedule: zero terminal SNR" in Image.open(png).info["parameters"]


# ------------------------------------------------------------------------------------- per-block control

def test_block_lr_weight_presets_are_sd_scripts_formulas():
    from training.blocks import lr_weight_list

    n = 12
    assert lr_weight_list("linear", n, "x") == pytest.approx([i / 11 for i in range(12)])
    assert lr_weight_list("reverse_linear", n, "x") == pytest.approx([(11 - i) / 11 for i in range(12)])
    assert lr_weight_list("sine", n, "x") == pytest.approx([math.sin(math.pi / 2 * i / 11) for i in range(12)])
    assert lr_weight_list("cosine", n, "x") == pytest.approx([math.sin(math.pi / 2 * (11 - i) / 11)
                                                              for i in range(12)])
    assert lr_weight_list("zeros+0.5", n, "x") == [0.5] * 12
    assert lr_weight_list("1,0,2", 3, "x") == [1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="up_lr_weight: .*need 12 numbers"):
        lr_weight_list("1,2", 12, "up_lr_weight")


def test_block_tables_parse_and_refuse_in_one_line():
    from training.blocks import lr_groups, parse_table

    assert parse_table("input_blocks.*=8, output_blocks.*=4", "block_ranks") == {"input_blocks.*": 8.0,
                                                                              "output_blocks.*": 4.0}
    for bad in ("input_blocks.*", "=3", "a=x", "a=-1"):
        with pytest.raises(ValueError, match="block_lrs: .*PATTERN=VALUE"):
            parse_table(bad, "block_lrs")
    named = [("input_blocks.1.1.proj_in.lora_down.weight", 1), ("middle_block.1.proj_in.lora_up.weight", 2),
             ("output_blocks.0.1.proj_out.lora_up.weight", 3)]
    groups = lr_groups(named, 1e-3, {r"re:middle_block\.1\.proj_in": 5e-4}, {"output_blocks.0.*": 0.5})
    assert [(lr, [p for _, p in ps]) for lr, ps in groups] == [(1e-3, [1]), (5e-4, [2, 3])]


def test_block_options_set_ranks_alphas_and_learning_rates(world, tmp_path):  # noqa: F811
    out = tmp_path / "blocks"
    assert train.main(train_argv(world, out, steps=2, targets="attn", rank=4, block_ranks="input_blocks.*=8",
                                 block_alphas="output_blocks.*=1", block_lrs="middle_block.*=0",
                                 up_lr_weight="1,0,1,1")) == 0
    import lora
    import sd

    unet = sd.load(world["ckpt"]).unet
    lora.load(out / "lora_final.safetensors", unet)
    layers = dict(lora.named_lora_layers(unet))
    assert layers and not any(p.startswith("output_blocks.1.") for p in layers)  # up_lr_weight 0: no adapter there
    for path, layer in layers.items():
        assert layer.rank == (8 if path.startswith("input_blocks.") else 4), path
        assert layer.alpha == (1.0 if path.startswith("output_blocks.") else layer.rank), path
        if path.startswith("middle_block."):  # lr 0: B stays at its zero init
            assert torch.count_nonzero(layer.lora_up.weight) == 0, path
        else:
            assert torch.count_nonzero(layer.lora_up.weight) > 0, path


# ------------------------------------------------------------------------------------- validation loss

def test_the_validation_split_is_seeded_disjoint_and_never_trained_on(world):  # noqa: F811
    from data import LatentLoader
    from training.validation import split

    train_items, held = split(10, 0.25, seed=3)
    assert held == split(10, 0.25, seed=3)[1] and len(held) == 2 and not set(held) & set(train_items)
    assert split(10, 0.0, 0) == (list(range(10)), []) and len(split(3, 0.01, 0)[1]) == 1
    with pytest.raises(ValueError, match="validation_split: .*none to train on"):
        split(2, 0.9, 0)
    from data import encode_dataset
    cache = world["root"] / "split_cache"
    encode_dataset(world["images"], cache, world["ckpt"], resolution=32, seed=0)
    loader = LatentLoader(cache, batch_size=2, seed=0, only=[0, 2, 4])
    seen = {i for step in range(3 * loader.steps_per_epoch) for i in loader.batch(step).indices}
    assert seen == {0, 2, 4}


def test_val_loss_is_logged_deterministically_and_matches_the_saved_lora(world, tmp_path):  # noqa: F811
    import json

    import lora
    import sd
    from training.validation import held_out_batches, held_out_loss, split

    logs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert train.main(train_argv(world, out, steps=4, targets="attn", validation_split=0.34,
                                     val_loss_every=2)) == 0
        logs.append([json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()])
    assert [r["step"] for r in logs[0] if "val_loss" in r] == [2, 4]
    assert [r.get("val_loss") for r in logs[0]] == [r.get("val_loss") for r in logs[1]]
    model = sd.load(world["ckpt"])
    lora.load(tmp_path / "a" / "lora_final.safetensors", model.unet)
    _, held = split(6, 0.34, 0)
    batches = held_out_batches(world["cache"], 2, 0, only=held)
    per_t = held_out_loss(model, batches, seed=0)
    assert logs[0][-1]["val_loss"] == pytest.approx(sum(per_t) / len(per_t), rel=1e-5)


# ------------------------------------------------------------------------------------------ masked loss

def _masked_world(root):
    from PIL import Image, ImageDraw

    folder = root / "masked"
    folder.mkdir()
    for name, colour in (("a", "red"), ("b", "blue"), ("c", "green")):
        im = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(im).ellipse([6, 6, 26, 26], fill=colour)
        if name == "b":  # transparency: the right half is see-through
            im = im.convert("RGBA")
            alpha = Image.new("L", (32, 32), 255)
            ImageDraw.Draw(alpha).rectangle([16, 0, 31, 31], fill=0)
            im.putalpha(alpha)
        im.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {colour} circle")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 15, 31], fill=255)  # a's left half counts
    mask.save(folder / "a.mask.png")
    return folder


def test_masks_come_from_mask_files_and_alpha_at_latent_resolution(tmp_path, world):  # noqa: F811
    from data import LatentCache, LatentLoader, encode_dataset

    folder = _masked_world(tmp_path)
    report = encode_dataset(folder, tmp_path / "cache", world["ckpt"], resolution=32, flip=True, seed=0)
    assert report.images == 3  # a.mask.png is a's mask, not an image
    cache = LatentCache(tmp_path / "cache")
    by_name = {Path(it.file).stem: i for i, it in enumerate(cache.items)}
    h, w = cache.moments(0)[0].shape[1:]
    a, b = cache.mask(by_name["a"]), cache.mask(by_name["b"], "plain")
    assert a.shape == (1, h, w) and cache.mask(by_name["c"]) is None
    assert torch.all(a[..., : w // 2] == 1) and torch.all(a[..., w // 2:] == 0)
    assert torch.all(b[..., : w // 2] == 1) and torch.all(b[..., w // 2:] == 0)   # opaque left, clear right
    assert torch.equal(cache.mask(by_name["a"], "flip"), a.flip(-1))
    batch = LatentLoader(cache, batch_size=3, seed=0, shuffle=False).batch(0)
    c_row = batch.indices.index(by_name["c"])
    assert batch.mask.shape == (3, 1, h, w) and torch.all(batch.mask[c_row] == 1)
    from PIL import Image
    Image.new("L", (32, 32), 255).save(folder / "a.mask.png")  # a new mask: encoded again, the latents reused
    again = encode_dataset(folder, tmp_path / "cache", world["ckpt"], resolution=32, flip=True, seed=0)
    assert again.encoded == 0 and torch.all(LatentCache(tmp_path / "cache").mask(by_name["a"]) == 1)


def test_the_masked_loss_weights_each_pixel(world):  # noqa: F811
    from training.config import TrainConfig

    cfg = TrainConfig()
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1.0
    schedule = DDPMSchedule()
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731  a UNet that predicts 0: the loss is the target's square
    got = train.diffusion_loss(zero, schedule, latents, None, 0, 0, cfg, torch.autocast("cpu", enabled=False),
                               mask=mask)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    torch.randint(0, 1000, (2,), generator=g)
    assert got.item() == pytest.approx(float((noise**2 * mask).mean()), rel=1e-6)


def test_masked_loss_through_train_py(world, tmp_path, capsys):  # noqa: F811
    from PIL import Image

    folder = _masked_world(tmp_path)
    common = dict(images=str(folder), cache=str(tmp_path / "cache"), steps=2, targets="attn")
    assert train.cli(train_argv(world, tmp_path / "none", **{**common, "images": world["images"],
                                                            "cache": world["cache"]}, masked_loss=True)) == 2
    assert "masked_loss: no image" in capsys.readouterr().err
    runs = {}
    for name, masked in (("plain", False), ("masked", True)):
        assert train.main(train_argv(world, tmp_path / name, **common, masked_loss=masked)) == 0
        runs[name] = _lora(tmp_path / name / "lora_final.safetensors")
    assert any(not torch.equal(runs["plain"][k], runs["masked"][k]) for k in runs["plain"] if "lora_up" in k)
    Image.new("L", (32, 32), 255).save(folder / "a.mask.png")  # all weights 1: masked loss is plain loss, bit for bit
    im = Image.open(folder / "b.png")
    im.putalpha(255)  # b's alpha made opaque
    im.save(folder / "b.png")
    assert train.main(train_argv(world, tmp_path / "white", **{**common, "cache": str(tmp_path / "cache2")},
                                 masked_loss=True)) == 0
    assert train.main(train_argv(world, tmp_path / "white_off", **{**common, "cache": str(tmp_path / "cache2")},
                                 masked_loss=False)) == 0
    white, off = (_lora(tmp_path / n / "lora_final.safetensors") for n in ("white", "white_off"))
    assert all(torch.equal(white[k], off[k]) for k in off)


# ------------------------------------------------------------------------------------------ captions

def test_vary_caption_keeps_the_first_tags_and_shuffles_or_drops_the_rest():
    from training.captions import vary_caption

    caption = "sks dog, on a beach,sunset , film grain, wide shot"
    tags = ["sks dog", "on a beach", "sunset", "film grain", "wide shot"]
    assert vary_caption(caption, torch.Generator()) == ", ".join(tags)  # all off: only the spaces are tidied
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(4, generator=g).tolist()
    kept = (torch.rand(4, generator=g) >= 0.5).tolist()
    shuffled = [tags[1:][i] for i in order]
    want = ", ".join(["sks dog"] + [t for t, k in zip(shuffled, kept) if k])
    assert vary_caption(caption, torch.Generator().manual_seed(5), True, 1, 0.5) == want
    many = {vary_caption(caption, torch.Generator().manual_seed(s), True, 2) for s in range(40)}
    assert len(many) > 1 and all(c.startswith("sks dog, on a beach, ") for c in many)


def test_shuffled_captions_reach_the_text_encoder_each_step(world, tmp_path):  # noqa: F811
    from helpers import captioned_circles

    folder = tmp_path / "tags"
    captioned_circles(folder, [(220, 30, 30), (30, 30, 220)] * 2,
                      ["red, circle, white background, small", "blue, circle, white background, large"] * 2)
    common = dict(images=str(folder), cache=str(tmp_path / "cache"), steps=2, targets="attn")
    runs = {}
    for name, options in (("base", {}), ("shuffle", {"shuffle_caption": True, "keep_tokens": 1}),
                          ("shuffle2", {"shuffle_caption": True, "keep_tokens": 1}),
                          ("drop", {"caption_tag_dropout": 0.5})):
        assert train.main(train_argv(world, tmp_path / name, **common, **options)) == 0
        runs[name] = _lora(tmp_path / name / "lora_final.safetensors")
    assert all(torch.equal(runs["shuffle"][k], runs["shuffle2"][k]) for k in runs["base"])  # seeded
    for name in ("shuffle", "drop"):
        assert any(not torch.equal(runs[name][k], runs["base"][k]) for k in runs["base"] if "lora_up" in k)
