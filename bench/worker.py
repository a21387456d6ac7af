"""One side of one benchmark case in its own process: load, then run a step each time the driver asks.

    python bench/worker.py --side ours --case train --precision bf16 --res 256 --ckpt FILE

Protocol (driver <-> worker): JSON lines. The worker writes {"ready": ...} after loading; then for each
"step" line it reads, it runs one step and writes {"s": seconds, "loss": ...}; on "quit" it writes its peak memory
and exits. One process per side keeps peak-memory figures (ru_maxrss) apart, and the driver alternates the
sides step by step so that background load on the machine hits both equally.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import weights  # noqa: E402

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_RANK = 4
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 1e-2, 1.0
SEED = 0
SAMPLE_T = 501  # a timestep of SD's 50-step DDIM schedule (leading spacing, offset 1)


def rss_gb(kind: str = "VmRSS") -> float:
    """Current resident set (or one of its parts: RssAnon, RssFile) in GiB, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --- inputs shared by both sides: pre-encoded latents and text contexts, as training from a latent cache has ---------

def inputs(res: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    side = res // 8
    return {
        "latents": torch.randn(batch, 4, side, side, generator=g).to(device),
        "context": torch.randn(batch, 77, 768, generator=g).to(device, dtype),
        "uncond": torch.randn(batch, 77, 768, generator=g).to(device, dtype),
        "image": (torch.rand(batch, 3, res, res, generator=g) * 2 - 1).to(device, dtype),
    }


def noise_and_timesteps(shape: torch.Size, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw train.diffusion_loss makes for micro-batch `index`, so both sides see the same noise and t."""
    g = torch.Generator().manual_seed(SEED * 1_000_003 + index)
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    return noise, t


def loss_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 trains with a GradScaler on both sides (as train.py and diffusers' scripts do); bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def lora_init(ldm_paths: list[str], fan_in: dict[str, int], rank: int) -> dict[str, torch.Tensor]:
    """The same LoRA A factor for both sides, keyed by the LDM module path (B starts at zero on both)."""
    out = {}
    for i, path in enumerate(sorted(ldm_paths)):
        g = torch.Generator().manual_seed(10_000 + i)
        bound = 1 / math.sqrt(fan_in[path])  # kaiming_uniform(a=sqrt(5)), nn.Linear's default
        out[path] = (torch.rand(rank, fan_in[path], generator=g) * 2 - 1) * bound
    return out


# --- ours ------------------------------------------------------------------------------------------------------

def ours_unet(ckpt: Path, dtype: torch.dtype, device: torch.device, how: str):
    """Our UNet: built on meta, each weight read straight into `dtype` (how="lean"), or through sd.load ("sd")."""
    if how == "sd":
        import sd
        model = sd.load(ckpt, dtype=dtype, device=device)
        unet = model.unet
        del model
        return unet
    import fastpaths
    from unet import UNetConfig, UNetModel
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_state_dict(weights.shapes(ckpt, UNET_PREFIX)))
    unet.load_state_dict(dict(weights.read(ckpt, UNET_PREFIX, dtype, device)), strict=True, assign=True)
    return fastpaths.apply(unet.eval().requires_grad_(False))  # as sd.load does


def ours_vae(ckpt: Path, dtype: torch.dtype, device: torch.device):
    import fastpaths
    from vae import AutoencoderKL, VAEConfig
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.from_state_dict(weights.shapes(ckpt, VAE_PREFIX)))
    vae.load_state_dict(dict(weights.read(ckpt, VAE_PREFIX, dtype, device)), strict=True, assign=True)
    return fastpaths.apply(vae.eval().requires_grad_(False))  # as sd.load does


def ours_train(args, device: torch.device):
    import lora
    from schedule import DDPMSchedule
    from train import diffusion_loss, optimizer_step
    from training.config import TrainConfig
    from training.optim import make_optimizer, param_groups

    dtype = DTYPES[args.precision]
    unet = ours_unet(args.ckpt, dtype, device, args.ours_load)
    paths = lora.inject(unet, LORA_RANK, LORA_RANK, "attn", dtype=torch.float32)
    fan_in = {p: unet.get_submodule(p).in_features for p in paths}
    with torch.no_grad():
        for path, a in lora_init(paths, fan_in, LORA_RANK).items():
            unet.get_submodule(path).lora_down.weight.copy_(a)
    unet.gradient_checkpointing = args.gc
    unet.train()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(param_groups(named, LR, WEIGHT_DECAY), "adamw", device)
    cfg = TrainConfig()  # no noise offset, no min-SNR weighting: the plain eps-MSE loss
    schedule = DDPMSchedule()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = loss_scaler(dtype, device)
    x = inputs(args.res, args.batch, device, dtype)
    net = compiled(unet, inference=False) if args.compile else unet

    def step(index: int) -> float:
        loss = diffusion_loss(net, schedule, x["latents"], x["context"], SEED, index, cfg, autocast)
        (loss if scaler is None else scaler.scale(loss)).backward()
        optimizer_step(optimizer, scaler, params, MAX_GRAD_NORM)
        return loss.item()

    return step, len(paths), sum(p.numel() for p in params)


def compiled(module, inference: bool):
    """torch.compile; for inference also freezing, which folds the frozen weights into the graph as constants
    (on CPU they are then pre-packed once for oneDNN instead of reordered at every call)."""
    if inference:
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True
    return torch.compile(module)


def ours_sample(args, device: torch.device):
    from sampling.generate import guided_denoiser
    from schedule import DDPMSchedule

    dtype = DTYPES[args.precision]
    unet = ours_unet(args.ckpt, dtype, device, args.ours_load)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    net = compiled(unet, inference=True) if args.compile else unet
    x = inputs(args.res, args.batch // 2, device, dtype)
    denoise = guided_denoiser(net, "epsilon", x["context"], x["uncond"], cfg=7.5)
    alphas = DDPMSchedule().alphas_cumprod
    a, a_prev = float(alphas[SAMPLE_T]), float(alphas[SAMPLE_T - 20])

    def step(index: int) -> float:
        # One DDIM step of a 50-step schedule: both CFG passes in one batch, then the update (as samplers.ddim does).
        with torch.inference_mode():
            x0, eps = denoise(x["latents"], SAMPLE_T, a)
            out = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return out.float().square().mean().item()

    return step, 0, 0


def ours_vae_case(args, device: torch.device):
    dtype = DTYPES[args.precision]
    vae = ours_vae(args.ckpt, dtype, device)
    x = inputs(args.res, args.batch, device, dtype)
    z = x["latents"].to(dtype)

    def step(index: int) -> float:
        with torch.inference_mode():
            if args.case == "vae_enc":
                out = vae.encode(x["image"]).sample(torch.Generator(device).manual_seed(index))
            else:
                out = vae.decode(z)
        return out.float().square().mean().item()

    return step, 0, 0


# --- the reference: diffusers + peft ------------------------------------------------------------------------------

def _original_config() -> dict:
    """The bits of SD1.5's v1-inference.yaml that diffusers' single-file converters read."""
    return {"model": {"params": {
        "unet_config": {"params": dict(
            in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
            channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1, context_dim=768,
            use_linear_in_transformer=False, use_spatial_transformer=True)},
        "first_stage_config": {"params": {"ddconfig": dict(
            double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
            num_res_blocks=2)}},
        "scale_factor": 0.18215,
    }}}


def ref_model(kind: str, ckpt: Path, dtype: torch.dtype, device: torch.device, how: str):
    """diffusers' UNet2DConditionModel / AutoencoderKL with the checkpoint's weights.

    how="default": built in fp32 as diffusers builds a model from its config, weights copied in, then cast to
    `dtype` (the fp32 copy is what the issue's reference figures include). how="lean": built empty (accelerate's
    init_empty_weights) and filled straight in `dtype`, as from_pretrained(torch_dtype=..., low_cpu_mem_usage=True)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su

    prefix = UNET_PREFIX if kind == "unet" else VAE_PREFIX
    ldm = weights.shapes(ckpt, prefix)
    original = _original_config()
    meta_ckpt = {prefix + k: v for k, v in ldm.items()}
    if kind == "unet":
        config = su.create_unet_diffusers_config_from_ldm(original, meta_ckpt)
        cls, convert = UNet2DConditionModel, su.convert_ldm_unet_checkpoint
    else:
        config = su.create_vae_diffusers_config_from_ldm(original, meta_ckpt)
        cls, convert = AutoencoderKL, su.convert_ldm_vae_checkpoint
    key_map = weights.diffusers_key_map(ldm, convert, config, prefix)
    to_diffusers = {lk: dk for dk, lk in key_map.items()}
    with init_empty_weights():
        model = cls(**config)
    state = dict(model.state_dict())
    if how == "default":
        model.to_empty(device=device)  # fp32 storage, as UNet2DConditionModel(**config) allocates it
        state = model.state_dict()
    with torch.no_grad():
        for lk, t in weights.read(ckpt, prefix, dtype if how == "lean" else None, device):  # one tensor at a time
            dk = to_diffusers[lk]
            if how == "lean":
                state[dk] = t.reshape(state[dk].shape)
            else:
                state[dk].copy_(t.reshape(state[dk].shape))
    if how == "lean":
        model.load_state_dict(state, strict=True, assign=True)
    else:
        del state  # holds every fp32 tensor: drop it so each is freed as .to() casts it
        model.to(dtype)
    return model.eval().requires_grad_(False), key_map


def ref_train(args, device: torch.device):
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    dtype = DTYPES[args.precision]
    unet, key_map = ref_model("unet", args.ckpt, dtype, device, args.ref_load)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=targets))
    # The trainable LoRA factors in fp32 under a bf16 base, as diffusers' LoRA script does for mixed precision.
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    # Same A as ours (B = 0 on both): map diffusers module paths to LDM ones through the weight-key map.
    lora_paths = {n.removesuffix(".lora_A.default"): m for n, m in unet.named_modules()
                  if n.endswith(".lora_A.default")}
    to_ldm = {dk.removesuffix(".weight"): lk.removesuffix(".weight") for dk, lk in key_map.items()}
    ldm_paths = {to_ldm[p + ".base_layer"] if p + ".base_layer" in to_ldm else to_ldm[p]: p for p in lora_paths}
    fan_in = {lp: lora_paths[dp].in_features for lp, dp in ldm_paths.items()}
    with torch.no_grad():
        for lp, a in lora_init(list(ldm_paths), fan_in, LORA_RANK).items():
            dp = ldm_paths[lp]
            lora_paths[dp].weight.copy_(a)
            unet.get_submodule(dp + ".lora_B.default").weight.zero_()
    if args.gc:
        unet.enable_gradient_checkpointing()
    unet.train()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = loss_scaler(dtype, device)
    x = inputs(args.res, args.batch, device, dtype)
    net = compiled(unet, inference=False) if args.compile else unet

    def step(index: int) -> float:
        noise, t = noise_and_timesteps(x["latents"].shape, index)
        noise, t = noise.to(device), t.to(device)
        noisy = scheduler.add_noise(x["latents"], noise, t)
        with autocast:
            pred = net(noisy, t, x["context"], return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
        else:  # as diffusers' train_text_to_image_lora.py does through accelerate
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, len(lora_paths), sum(p.numel() for p in params)


def ref_sample(args, device: torch.device):
    from diffusers import DDIMScheduler

    dtype = DTYPES[args.precision]
    unet, _ = ref_model("unet", args.ckpt, dtype, device, args.ref_load)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    net = compiled(unet, inference=True) if args.compile else unet
    x = inputs(args.res, args.batch // 2, device, dtype)
    context = torch.cat([x["uncond"], x["context"]])
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(50)
    assert SAMPLE_T in scheduler.timesteps

    def step(index: int) -> float:
        with torch.inference_mode():
            latents = x["latents"]
            out = net(torch.cat([latents, latents]).to(dtype), SAMPLE_T, context, return_dict=False)[0].float()
            uncond, cond = out.chunk(2)
            guided = uncond + 7.5 * (cond - uncond)
            out = scheduler.step(guided, SAMPLE_T, latents, return_dict=False)[0]
        return out.float().square().mean().item()

    return step, 0, 0


def ref_vae_case(args, device: torch.device):
    dtype = DTYPES[args.precision]
    vae, _ = ref_model("vae", args.ckpt, dtype, device, args.ref_load)
    x = inputs(args.res, args.batch, device, dtype)
    z = x["latents"].to(dtype)

    def step(index: int) -> float:
        with torch.inference_mode():
            if args.case == "vae_enc":
                out = vae.encode(x["image"]).latent_dist.sample(torch.Generator(device).manual_seed(index))
            else:
                out = vae.decode(z).sample
        return out.float().square().mean().item()

    return step, 0, 0


SIDES = {
    ("ours", "train"): ours_train, ("ours", "sample"): ours_sample,
    ("ours", "vae_enc"): ours_vae_case, ("ours", "vae_dec"): ours_vae_case,
    ("ref", "train"): ref_train, ("ref", "sample"): ref_sample,
    ("ref", "vae_enc"): ref_vae_case, ("ref", "vae_dec"): ref_vae_case,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=("ours", "ref"), required=True)
    p.add_argument("--case", choices=("train", "sample", "vae_enc", "vae_dec"), required=True)
    p.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ours-load", choices=("lean", "sd"), default="lean")
    p.add_argument("--ref-load", choices=("default", "lean"), default="default")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # The protocol owns stdout; anything the libraries print goes to stderr.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    device = torch.device(args.device)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    step, n_layers, n_trainable = SIDES[(args.side, args.case)](args, device)
    sync(device)
    proto.write(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, "rss_after_load_gb": rss_gb(),
                            "lora_layers": n_layers, "trainable": n_trainable,
                            "threads": torch.get_num_threads()}) + "\n")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    index = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            sync(device)
            t, cpu = time.perf_counter(), time.process_time()
            loss = step(index)
            sync(device)
            # CPU seconds (all threads) beside wall seconds: with one thread they are the time the step was actually
            # running, which other processes competing for the cores barely change.
            proto.write(json.dumps({"s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu,
                                    "loss": loss}) + "\n")
            index += 1
        elif cmd == "quit":
            report = {"peak_rss_gb": peak_rss_gb(), "rss_gb": rss_gb()}
            if device.type == "cuda":
                report["cuda_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                report["cuda_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
            proto.write(json.dumps(report) + "\n")
            return


if __name__ == "__main__":
    main()
