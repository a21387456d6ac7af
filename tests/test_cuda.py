"""The CUDA paths on tiny models: training in every precision, resume, sampling, encoding, and the diffusers parity.

Skipped without a GPU (CI has none). On a GPU machine: `python -m pytest tests/test_cuda.py`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sd
import train
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict
from test_train import args, world  # noqa: F401  (the tiny checkpoint, images and cache; the argv builder)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 on the GPU means float32 here: cuDNN would otherwise run convolutions in TF32 (10-bit mantissa)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def lora_rel_err(a_file, b_file) -> float:
    """The largest relative difference over the LoRA factors of two files (the up factors start at zero, so these
    are what training changed)."""
    a, b = load_file(a_file), load_file(b_file)
    assert set(a) == set(b)
    return max(rel_err(a[k].float(), b[k].float()) for k in a if "lora_up" in k)


def lora_cosine(a_file, b_file) -> float:
    """Cosine between the up factors of two files, all layers as one vector."""
    a, b = load_file(a_file), load_file(b_file)
    keys = sorted(k for k in a if "lora_up" in k)
    va, vb = (torch.cat([t[k].double().flatten() for k in keys]) for t in (a, b))
    return float(va @ vb / (va.norm() * vb.norm()))


def last_record(out) -> dict:
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])


def test_fp32_training_on_cuda_follows_the_cpu_run(world, tmp_path):  # noqa: F811
    # Noise and timesteps come from CPU generators, so both devices train on the same draws.
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    assert train.main(args(world, cpu, steps=6)) == 0
    assert train.main(args(world, gpu, steps=6, device="cuda")) == 0
    assert lora_rel_err(gpu / "lora_final.safetensors", cpu / "lora_final.safetensors") < 1e-3
    assert last_record(gpu)["loss"] == pytest.approx(last_record(cpu)["loss"], rel=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_mixed_precision_training_on_cuda(world, tmp_path, precision, checkpointing):  # noqa: F811
    out, ref = tmp_path / precision, tmp_path / "fp32"
    assert train.main(args(world, out, precision=precision, device="cuda", steps=6,
                           gradient_checkpointing=checkpointing)) == 0
    assert train.main(args(world, ref, device="cuda", steps=6)) == 0
    record = last_record(out)
    assert np.isfinite(record["loss"])
    assert ("loss_scale" in record) == (precision == "fp16")
    # fp32 factors under half-precision weights: the run heads where the fp32 one does. (Adam's first steps are
    # about sign(gradient) * lr, so rounding moves single elements a lot; the direction and the loss hold.)
    assert lora_cosine(out / "lora_final.safetensors", ref / "lora_final.safetensors") > 0.9
    assert record["loss"] == pytest.approx(last_record(ref)["loss"], rel=0.05)


def test_checkpointing_on_cuda_gives_the_same_steps(world, tmp_path):  # noqa: F811
    plain, gc = tmp_path / "plain", tmp_path / "gc"
    assert train.main(args(world, plain, device="cuda", steps=4)) == 0
    assert train.main(args(world, gc, device="cuda", steps=4, gradient_checkpointing=True)) == 0
    # The same sums up to rounding, which Adam's early steps (about sign(gradient) * lr) magnify in the smallest
    # elements: measured on an H100, 8.5e-4.
    assert lora_rel_err(gc / "lora_final.safetensors", plain / "lora_final.safetensors") < 5e-3
    assert last_record(gc)["loss"] == pytest.approx(last_record(plain)["loss"], rel=1e-4)


def test_resume_on_cuda_equals_the_uninterrupted_run(world, tmp_path):  # noqa: F811
    full, first, second = tmp_path / "full", tmp_path / "first", tmp_path / "second"
    assert train.main(args(world, full, steps=6, device="cuda")) == 0
    assert train.main(args(world, first, steps=3, device="cuda")) == 0
    assert train.main(args(world, second, steps=6, device="cuda",
                           resume=str(first / "state" / "step_0000003.pt"))) == 0
    # cuDNN's and cuBLAS's kernels may sum in another order from run to run, so close rather than bitwise (as on
    # the CPU); Adam magnifies that rounding in the smallest elements: measured on an H100, 4.6e-4.
    assert lora_rel_err(second / "lora_final.safetensors", full / "lora_final.safetensors") < 5e-3
    assert last_record(second)["loss"] == pytest.approx(last_record(full)["loss"], rel=1e-4)


def test_state_written_on_cuda_resumes_on_cpu(world, tmp_path):  # noqa: F811
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(args(world, first, steps=3, device="cuda")) == 0
    assert train.main(args(world, second, steps=5, device="cpu",
                           resume=str(first / "state" / "step_0000003.pt"))) == 0
    assert last_record(second)["step"] == 5


def test_full_mode_on_cuda_in_bf16(world, tmp_path):  # noqa: F811
    out = tmp_path / "full"
    assert train.main(args(world, out, mode="full", precision="bf16", device="cuda", steps=3, lr=1e-4)) == 0
    saved = list(out.glob("*.safetensors"))
    assert saved and sd.load(saved[0]).unet is not None


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_sampling_on_cuda_matches_cpu(tmp_path, dtype):
    import sample
    from PIL import Image

    ckpt = write_state_dict(tmp_path / "tiny.safetensors", tiny_state_dict("sd1", seed=0))
    images = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert sample.main(["--ckpt", str(ckpt), "--prompt", "a red circle", "--steps", "6", "--seed", "3",
                            "--size", "32x32", "--device", device, "--dtype", dtype if device == "cuda" else "fp32",
                            "--out", str(out), "--quiet"]) == 0
        (png,) = out.glob("*.png")
        images[device] = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    # The starting noise is drawn on the CPU, so the GPU image is the CPU one up to rounding.
    tolerance = 1.0 if dtype == "fp32" else 8.0  # mean absolute difference in 0-255 levels
    assert np.abs(images["cuda"] - images["cpu"]).mean() < tolerance


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_unet_and_vae_on_cuda_match_diffusers(tmp_path, dtype, tolerance):
    pytest.importorskip("diffusers")
    from test_unet import diffusers_reference
    from test_vae import to_diffusers

    tensors = tiny_state_dict("sd1", seed=5)
    model = sd.load(write_state_dict(tmp_path / "tiny.safetensors", tensors))
    unet_sd = {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items()
               if k.startswith("model.diffusion_model.")}
    ref_unet = diffusers_reference(model.unet.cfg, unet_sd).to("cuda", dtype)
    ref_vae = to_diffusers(model.vae).to("cuda", dtype)
    unet, vae = model.unet.to("cuda", dtype), model.vae.to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    x, t, ctx, image = x.to("cuda", dtype), t.to("cuda"), ctx.to("cuda", dtype), image.to("cuda", dtype)
    with torch.no_grad():
        assert rel_err(unet(x, t, ctx), ref_unet(x, t, encoder_hidden_states=ctx).sample) < tolerance
        assert rel_err(vae.decode(x[:1]), ref_vae.decode(x[:1]).sample) < tolerance
        assert rel_err(vae.encode(image).mean, ref_vae.encode(image).latent_dist.mean) < tolerance


def test_encoding_on_cuda_matches_cpu(world, tmp_path):  # noqa: F811
    from data import LatentLoader

    caches = {}
    for device in ("cpu", "cuda"):
        cache = tmp_path / f"cache_{device}"
        assert train.main(args(world, tmp_path / f"run_{device}", cache=str(cache), steps=1, device=device)) == 0
        batch = LatentLoader(str(cache), batch_size=6, seed=0, shuffle=False, sample=False).batch(0)
        caches[device] = batch
    assert rel_err(caches["cuda"].latents, caches["cpu"].latents) < 1e-4
    assert rel_err(caches["cuda"].context, caches["cpu"].context) < 1e-4


def test_schedule_conversions_follow_the_batch_device():
    # Samplers may keep their timesteps on the CPU while the latents live on the GPU.
    from schedule import DDPMSchedule

    schedule = DDPMSchedule()
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.float16)
    t = torch.tensor([10, 900])
    eps = torch.randn_like(x)
    x0 = schedule.x0_from_eps(x, eps, t)
    assert x0.device == x.device and x0.dtype == x.dtype
    ref = schedule.x0_from_eps(x.cpu().float(), eps.cpu().float(), t)
    assert rel_err(x0.float(), ref) < 1e-2
