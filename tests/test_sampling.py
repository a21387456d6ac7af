"""Samplers against the diffusers schedulers of the same name, guidance, seeding, LoRA scale 0 and PNG metadata."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import lora
import sampling
import sd
from sampling.samplers import _euler_grid, dpmpp_2m_grid
from sampling.timesteps import SPACINGS, spaced_timesteps
from schedule import DDPMSchedule
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict

diffusers = pytest.importorskip("diffusers")

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)
SIZE = 16  # pixels; the tiny VAE downsamples by 2, so latents are 8x8

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_state_dict(folder / "sd1.safetensors", tiny_state_dict("sd1", seed=0))
    write_state_dict(folder / "sd2.safetensors", tiny_state_dict("sd2", seed=0))
    return {"epsilon": sd.load(folder / "sd1.safetensors"),
            "v_prediction": sd.load(folder / "sd2.safetensors", prediction_type="v_prediction"),
            "folder": folder}


def contexts(model, prompts=("a cat", "a dog"), negative=""):
    with torch.no_grad():
        return model.encode_prompt(list(prompts)), model.encode_prompt([negative] * len(prompts))


# ------------------------------------------------------------------------------------------- grids

def _diffusers_scheduler(name: str, prediction_type: str = "epsilon", spacing: str = "leading", karras: bool = False):
    kw = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing)
    if name == "ddpm":
        return diffusers.DDPMScheduler(clip_sample=False, **kw)
    if name == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **kw)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**kw)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**kw)
    return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                 use_karras_sigmas=karras, **kw)


STEP_COUNTS = [1, 2, 3, 5, 7, 8, 10, 13, 20, 25, 27, 30, 48, 50, 61, 100, 150, 999, 1000]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timestep_grids_match_diffusers(spacing):
    a = DDPMSchedule().alphas_cumprod
    for n in STEP_COUNTS:
        ref = _diffusers_scheduler("ddim", spacing=spacing)
        ref.set_timesteps(n)
        ours = spaced_timesteps(n, spacing)
        assert len(ours) == n
        if len(ref.timesteps) == n + 1:
            # diffusers' float arange overshoots for a few counts (e.g. trailing 61) and appends t = -1.
            assert spacing == "trailing" and ref.timesteps[-1] == -1
            ref.timesteps = ref.timesteps[:-1]
        assert torch.equal(ref.timesteps.double(), ours), (spacing, n)

        ref = _diffusers_scheduler("euler", spacing=spacing)
        ref.set_timesteps(n)
        ts, sigmas = _euler_grid(a, n, spacing)
        if len(ref.timesteps) == n:
            torch.testing.assert_close(ref.timesteps.double(), ts, rtol=0, atol=1e-3)
            # diffusers builds σ from a float32 ᾱ; near t=0 that costs about 1e-5 relative.
            torch.testing.assert_close(ref.sigmas.double(), sigmas, rtol=1e-4, atol=0)

        ref = _diffusers_scheduler("dpmpp_2m", spacing=spacing)
        ref.set_timesteps(n)
        ts, sigmas = dpmpp_2m_grid(a, n, spacing)
        if len(ref.timesteps) == n:
            assert torch.equal(ref.timesteps.double(), ts), (spacing, n)
            torch.testing.assert_close(ref.sigmas.double(), sigmas, rtol=1e-4, atol=0)


def test_karras_grid_matches_diffusers():
    a = DDPMSchedule().alphas_cumprod
    for n in STEP_COUNTS:
        ref = _diffusers_scheduler("dpmpp_2m", karras=True)
        ref.set_timesteps(n)
        ts, sigmas = dpmpp_2m_grid(a, n, karras=True)
        torch.testing.assert_close(ref.sigmas.double(), sigmas, rtol=1e-3, atol=0)
        # Rounding σ -> t can flip by one where diffusers' float32 table lands next to a half.
        assert (ref.timesteps.double() - ts).abs().max() <= 1, n


# ------------------------------------------------------------------------------ samplers vs diffusers

CASES = [
    ("ddpm", "leading", False, 0.0), ("ddpm", "trailing", False, 0.0), ("ddpm", "linspace", False, 0.0),
    ("ddim", "leading", False, 0.0), ("ddim", "trailing", False, 0.0), ("ddim", "leading", False, 0.7),
    ("euler", "leading", False, 0.0), ("euler", "trailing", False, 0.0), ("euler", "linspace", False, 0.0),
    ("euler_a", "leading", False, 0.0), ("euler_a", "trailing", False, 0.0),
    ("dpmpp_2m", "leading", False, 0.0), ("dpmpp_2m", "trailing", False, 0.0), ("dpmpp_2m", "linspace", False, 0.0),
    ("dpmpp_2m", "leading", True, 0.0),
]


def _diffusers_loop(name, model, cond, uncond, cfg, steps, spacing, karras, eta, seeds):
    """The reference: diffusers' scheduler stepping with our UNet, CFG done by hand, generators as a pipeline passes them."""
    scheduler = _diffusers_scheduler(name, model.prediction_type, spacing, karras)
    scheduler.set_timesteps(steps)
    generators = sampling.make_generators(seeds)
    x = torch.cat([torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=g) for g in generators])
    if name in ("euler", "euler_a"):
        # Our Euler samplers start at sqrt(1 + σ_max²)·x_T; diffusers agrees for "leading" and uses σ_max otherwise.
        x = x * (1 + scheduler.sigmas[0].item() ** 2) ** 0.5
    context = torch.cat([uncond, cond])
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]), t)
            out_uncond, out_cond = model.unet(inp, t.float().expand(inp.shape[0]), context).chunk(2)
            out = out_uncond + cfg * (out_cond - out_uncond)
            kw = {}
            if name == "ddim":
                kw["eta"] = eta
            if name in ("ddpm", "ddim", "euler_a"):
                kw["generator"] = generators
            x = scheduler.step(out, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,spacing,karras,eta", CASES)
def test_sampler_matches_diffusers(models, prediction_type, name, spacing, karras, eta):
    model = models[prediction_type]
    cond, uncond = contexts(model)
    steps, cfg, seeds = 5, 5.0, [11, 12]
    ours = sampling.sample_latents(model, cond, uncond, sampler=name, steps=steps, cfg=cfg, height=SIZE, width=SIZE,
                                   generators=sampling.make_generators(seeds), spacing=spacing, karras=karras, eta=eta)
    ref = _diffusers_loop(name, model, cond, uncond, cfg, steps, spacing, karras, eta, seeds)
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.5), ("euler_a", 0.0)])
def test_stochastic_samplers_use_each_images_generator(models, name, eta):
    model = models["epsilon"]
    cond, uncond = contexts(model, ["a cat"])
    x_t = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    run = lambda seed: sampling.sample_latents(model, cond, uncond, sampler=name, steps=4, height=SIZE, width=SIZE,
                                               noise=x_t, generators=sampling.make_generators([seed]), eta=eta)
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))  # same start, different step noise


def test_deterministic_samplers_ignore_generators_after_the_start(models):
    model = models["epsilon"]
    cond, uncond = contexts(model, ["a cat"])
    x_t = torch.randn(1, 4, SIZE // 2, SIZE // 2)
    for name in ("ddim", "euler", "dpmpp_2m"):
        a, b = (sampling.sample_latents(model, cond, uncond, sampler=name, steps=3, height=SIZE, width=SIZE, noise=x_t,
                                        generators=sampling.make_generators([s])) for s in (1, 2))
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------- guidance

def test_cfg_one_is_the_conditional_output(models):
    model = models["epsilon"]
    images = [sampling.generate(model, "a cat", negative, cfg=1.0, steps=3, height=SIZE, width=SIZE, seed=3,
                                progress=False) for negative in ("", "blurry, ugly")]
    assert torch.equal(images[0], images[1])  # the negative prompt plays no part
    cond, _ = contexts(model, ["a cat"])
    latents = sampling.sample_latents(model, cond, None, steps=3, cfg=7.5, height=SIZE, width=SIZE,
                                      generators=sampling.make_generators([3]))
    torch.testing.assert_close(images[0], sampling.decode(model, latents), rtol=0, atol=1e-6)


def test_guidance_mixes_the_two_outputs(models):
    model = models["v_prediction"]
    cond, uncond = contexts(model, ["a cat"], "a dog")
    x = torch.randn(1, 4, SIZE // 2, SIZE // 2)
    ab = float(model.schedule.alphas_cumprod[500])
    with torch.no_grad():
        only_cond = sampling.guided_denoiser(model.unet, model.prediction_type, cond)(x, 500.0, ab)
        only_uncond = sampling.guided_denoiser(model.unet, model.prediction_type, uncond)(x, 500.0, ab)
        for cfg in (0.0, 1.5, 7.5):
            mixed = sampling.guided_denoiser(model.unet, model.prediction_type, cond, uncond, cfg)(x, 500.0, ab)
            for got, c, u in zip(mixed, only_cond, only_uncond):  # x0 and eps are linear in the output
                torch.testing.assert_close(got, u + cfg * (c - u), rtol=1e-4, atol=1e-5)


def test_to_x0_eps_inverts_the_forward_process():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    schedule = DDPMSchedule(prediction_type="v_prediction")
    t = torch.tensor([300, 300])
    x_t = schedule.add_noise(x0, eps, t)
    ab = float(schedule.alphas_cumprod[300])
    for pred, out in (("epsilon", eps), ("v_prediction", schedule.velocity(x0, eps, t))):
        got_x0, got_eps = sampling.to_x0_eps(x_t, out, ab, pred)
        torch.testing.assert_close(got_x0, x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- generate()

def test_same_seed_same_image_whatever_the_batch(models):
    model = models["epsilon"]
    kw = dict(sampler="euler_a", steps=3, height=SIZE, width=SIZE, progress=False)
    first = sampling.generate(model, ["a cat", "a cat"], seed=5, **kw)
    again = sampling.generate(model, ["a cat", "a cat"], seed=5, **kw)
    assert torch.equal(first, again)
    alone = sampling.generate(model, "a cat", seed=6, **kw)  # image 1 of the batch used seed 5 + 1
    torch.testing.assert_close(first[1:], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(first[0], first[1])


def test_generate_output_and_modes_restored(models):
    model = models["epsilon"]
    model.unet.train()
    images = sampling.generate(model, ["a cat", "a dog"], "blurry", steps=2, height=SIZE, width=SIZE + 8,
                               progress=False)
    assert model.unet.training and not model.vae.training
    model.unet.eval()
    assert images.shape == (2, 3, SIZE, SIZE + 8) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    pil = sampling.to_pil(images)
    assert [im.size for im in pil] == [(SIZE + 8, SIZE)] * 2 and pil[0].mode == "RGB"
    assert sampling.to_uint8(images).shape == (2, SIZE, SIZE + 8, 3)


def test_bf16_model_runs_in_its_dtype(models):
    model = sd.load(models["folder"] / "sd1.safetensors", dtype=torch.bfloat16)
    images = sampling.generate(model, "a cat", sampler="dpmpp_2m", karras=True, steps=3, height=SIZE, width=SIZE,
                               progress=False)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_sliced_vae_decode_matches_whole_batch(models):
    model = models["epsilon"]
    latents = torch.randn(3, 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(sampling.decode(model, latents, slice_size=1), sampling.decode(model, latents),
                               rtol=0, atol=1e-5)


def test_lora_scale_zero_equals_the_base_model(models, tmp_path):
    kw = dict(sampler="dpmpp_2m", steps=3, height=SIZE, width=SIZE, seed=2, progress=False)
    model = sd.load(models["folder"] / "sd1.safetensors")
    base = sampling.generate(model, "a cat", **kw)
    lora.inject(model.unet, rank=4, targets="attn")
    lora.inject(model.text_encoder, rank=4, targets="attn")
    with torch.no_grad():
        for layer in lora.lora_layers(model.unet) + lora.lora_layers(model.text_encoder):
            layer.lora_up.weight.normal_(0, 0.5)
    lora.save(tmp_path / "style.safetensors", model)

    fresh = sd.load(models["folder"] / "sd1.safetensors")
    lora.load(tmp_path / "style.safetensors", fresh, scale=0.0, name="style")
    assert torch.equal(sampling.generate(fresh, "a cat", **kw), base)
    for part in (fresh.unet, fresh.text_encoder):
        lora.set_multiplier(part, 1.0, "style")
    assert not torch.allclose(sampling.generate(fresh, "a cat", **kw), base, atol=1e-3)


# ------------------------------------------------------------------------------------------ bad input

def test_bad_input_is_refused_with_a_clear_message(models):
    model = models["epsilon"]
    with pytest.raises(ValueError, match="valid samplers: ddpm, ddim, euler, euler_a, dpmpp_2m"):
        sampling.generate(model, "x", sampler="plms", height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="width must be a positive multiple of 2"):
        sampling.generate(model, "x", height=SIZE, width=SIZE + 1, progress=False)
    with pytest.raises(ValueError, match="Karras sigmas are implemented for dpmpp_2m only"):
        sampling.generate(model, "x", sampler="euler", karras=True, height=SIZE, width=SIZE, progress=False)
    with pytest.raises(ValueError, match="eta applies to ddim only"):
        sampling.generate(model, "x", sampler="euler_a", eta=0.5, height=SIZE, width=SIZE, progress=False)
    with pytest.raises(ValueError, match="spacing"):
        sampling.generate(model, "x", spacing="uniform", height=SIZE, width=SIZE, progress=False)
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        sampling.generate(model, ["a", "b", "c"], ["n1", "n2"], height=SIZE, width=SIZE, progress=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sampling.spaced_timesteps(0)
    assert sampling.size_multiple(model) == 2  # tiny: the VAE halves; the UNet takes any latent size


# ------------------------------------------------------------------------------------------- PNG files

def test_png_carries_a1111_parameters(tmp_path):
    text = sampling.a1111_parameters("a cat, 8k", "blurry", steps=25, sampler="dpmpp_2m", cfg=7.5, seed=42,
                                     width=512, height=768, model="v1-5", karras=True, loras=[("style", 0.5)],
                                     extra={"Note": "a, b"})
    assert text == ("a cat, 8k <lora:style:0.5>\nNegative prompt: blurry\n"
                    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
                    "Size: 512x768, Model: v1-5, Note: \"a, b\"")
    path = sampling.save_png(Image.new("RGB", (8, 8)), tmp_path / "sub" / "00000-42.png", text)
    assert Image.open(path).text["parameters"] == text
    assert [p.name for p in path.parent.iterdir()] == ["00000-42.png"]  # no temp file left behind
    parsed = sampling.parse_a1111_parameters(text)
    assert parsed["Seed"] == "42" and parsed["Sampler"] == "DPM++ 2M" and parsed["Note"] == "a, b"
    assert parsed["negative"] == "blurry"
    no_negative = sampling.a1111_parameters("a cat", steps=4, sampler="euler_a", cfg=1, seed=0, width=8, height=8)
    assert no_negative == "a cat\nSteps: 4, Sampler: Euler a, CFG scale: 1, Seed: 0, Size: 8x8"
    assert sampling.next_index(tmp_path / "sub") == 1 and sampling.next_index(tmp_path / "none") == 0


def test_grid_layout():
    cells = [Image.new("RGB", (10, 12), c) for c in ("red", "green", "blue", "white", "black")]
    g = sampling.grid(cells)
    assert g.size == (30, 24)  # 3 columns, 2 rows
    labelled = sampling.grid(cells[:4], cols=2, col_labels=["x0", "x1"], row_labels=["seed 1", "seed 2"])
    assert labelled.width > 20 and labelled.height > 24
