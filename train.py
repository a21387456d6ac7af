"""Train a LoRA, or resume-train the whole UNet, on an original SD checkpoint: one hand-written loop.

    python train.py                                   # the built-in toy: a LoRA for a new concept, on CPU
    python train.py --config configs/sd15_lora.yaml --ckpt v1-5-pruned-emaonly.safetensors --images data/
    python train.py --config configs/sdxl_lora.yaml --ckpt sd_xl_base_1.0.safetensors --images data/
    torchrun --nproc_per_node 2 train.py ...          # DDP: NCCL on GPUs, gloo on CPU

Data flow: images --data.encode_dataset--> latent cache --LatentLoader--> this loop --> LoRA file / checkpoint.
SDXL: the cache also holds the pooled text and each image's size/crop conditioning, from which every batch builds
the UNet's y; resolution defaults to 1024; SDXL's VAE runs in float32 (or bf16), never float16, where it overflows.
Every option: python train.py --help.
"""
from __future__ import annotations

import os

# Sleep rather than spin while waiting for OpenMP work: on a small CPU shared with other jobs, spinning threads
# starve each other and a step can take 10x longer (measured: 0.5 s -> 11 s per toy step beside a test run).
# Only effective before torch is first imported; an OMP_WAIT_POLICY you set yourself wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import json
import math
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import lora
import sd
from atomic import write_text
from devices import resolve_device
from data import CacheMismatchError, LatentLoader, encode_dataset
from sampling import generate, grid, save_png, to_pil
from training.config import TrainConfig, is_builtin_toy, parse_args
from training.optim import lr_factor, make_optimizer, param_groups, set_lr
from training.state import load_state, resolve, save_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(RuntimeError):
    pass


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device wants an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def pick_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            print("note: fp16 on CPU is very slow (no fast fp16 matmul); bf16 is the CPU's mixed precision", file=sys.stderr)
        return precision
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def diffusion_loss(unet, schedule, latents, context, seed: int, index: int, cfg: TrainConfig, autocast,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loss of one micro-batch: MSE between the UNet output and the eps or v target, in fp32.
    y: the extra conditioning vector of a UNet that takes one (SDXL: pooled text + size embeddings).

    Noise and timesteps come from a generator seeded by (seed, micro-batch index), so a resumed or
    data-parallel run draws exactly what a single uninterrupted run would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=g)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(b, latents.shape[1], 1, 1, generator=g)
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=g)
    noise, t = noise.to(latents.device), t.to(latents.device)
    noisy = schedule.add_noise(latents, noise, t)
    target = schedule.target(latents, noise, t)
    with autocast:
        pred = unet(noisy, t, context) if y is None else unet(noisy, t, context, y)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        snr = schedule.snr(t)
        weight = snr.clamp(max=cfg.min_snr_gamma) / (snr if schedule.prediction_type == "epsilon" else snr + 1)
        loss = loss * weight
    return loss.mean()


def conditioning(model, batch, autocast, dtype: torch.dtype, empty: tuple | None = None,
                 drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, y) for one micro-batch: the cached text embeddings, or the text encoder's output when it is
    trained (no embeddings in the cache); y is None except for SDXL, where it is the pooled text plus each image's
    own size conditioning (original size, crop, target size as cached: see data.pipeline.size_conditioning).

    drop: a [B] bool mask of captions to drop (caption dropout). SD1/SD2 take the empty caption's embedding
    (`empty` = cache.empty_prompt()); SDXL zeroes context and pooled text, as its authors train it (sgm's
    unconditional text is zeros) and as sampling.generate encodes an empty negative prompt. Sizes are kept."""
    xl = model.needs_y
    dropping = drop is not None and bool(drop.any())
    tokens = batch.tokens
    if dropping and not xl and batch.context is None:
        tokens = torch.where(drop[:, None], empty[0].to(tokens.device)[None], tokens)
    if batch.context is not None:
        context, pooled = batch.context, batch.pooled
    else:
        with autocast:
            context, pooled = model.text_encoder(tokens, batch.tokens_g) if xl else (model.text_encoder(tokens), None)
    if dropping and xl:
        context = context * ~drop[:, None, None]
        pooled = pooled * ~drop[:, None]
    elif dropping and batch.context is not None:
        context = torch.where(drop[:, None, None], empty[1].to(context)[None], context)
    y = None
    if xl:
        sizes = batch.size_conditioning
        y = model.vector(pooled.float(), sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6])
    return context.to(dtype), y


def caption_drop_mask(rate: float, batch_size: int, seed: int, index: int) -> torch.Tensor | None:
    """Which captions of micro-batch `index` are dropped: drawn from (seed, index) alone, like noise and timesteps."""
    if not rate:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + index + (1 << 48))  # a stream apart from the noise's
    return torch.rand(batch_size, generator=g) < rate


def check_cache(loader: LatentLoader, model, what: str = "cache") -> None:
    """The cache must hold what this model's UNet is conditioned on (SDXL: pooled text and size conditioning)."""
    width = model.text_encoder.config.width
    try:
        loader.cache.check(version=model.version, context_dim=width)
    except CacheMismatchError as err:
        raise CacheMismatchError(f"{what}: {err}") from None


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, params: list[torch.Tensor],
                   max_grad_norm: float) -> tuple[float, bool]:
    """Unscale (fp16), clip, step, zero. Returns (grad norm, whether the step was skipped).

    With a GradScaler, gradients that overflowed fp16 make it skip the update and halve the scale;
    those skips are normal early in fp16 training and are counted, not treated as errors."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), skipped


def prepare_data(cfg: TrainConfig, out: Path, rank: int, world: int) -> Path:
    """Encode the images once (rank 0), reuse the cache afterwards. Returns the cache folder."""
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    if rank == 0:  # the toy's images too are written by rank 0 alone: ranks racing on one folder would collide
        images = cfg.images or str(toy_images(cfg, out))
        report = encode_dataset(images, cache, cfg.ckpt, resolution=cfg.resolution, bucket=cfg.bucket,
                                bucket_step=cfg.bucket_step if cfg.bucket else 8,
                                flip=cfg.flip, prompt=cfg.prompt or None, repeats=cfg.repeats,
                                text=not cfg.train_text_encoder, seed=cfg.seed)
        print(report)
    if world > 1:
        dist.barrier()
    return cache


def toy_images(cfg: TrainConfig, out: Path) -> Path:
    """The default dataset: captioned images of the toy world's held-out concept, written once as PNG + .txt."""
    if not is_toy(cfg):
        raise ValueError("images: no image folder given (--images DIR); only the built-in toy checkpoint has default images")
    from toy import world
    folder = out / f"toy_{cfg.toy_concept}_images"
    if not folder.is_dir():
        write_folder_once(folder, *world.concept_dataset(cfg.toy_concept, cfg.toy_images))
    return folder


def write_folder_once(folder: Path, images, scenes) -> None:
    """The toy's generated images and captions, written beside the folder and renamed: a half-written one never counts."""
    from toy import world
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    world.write_folder(tmp, images, scenes)
    tmp.rename(folder)


def toy_prior_images(cfg: TrainConfig, out: Path) -> Path:
    """Captioned scenes of the toy's base world, for prior preservation: what the LoRA should leave as it was."""
    from toy import world
    folder = out / f"toy_prior_images_{cfg.toy_prior_images}"
    if not folder.is_dir():
        write_folder_once(folder, *world.make_dataset(cfg.toy_prior_images, seed=cfg.seed + 2000))
    return folder


def is_sdxl_file(path: str) -> bool:
    """Whether a checkpoint holds SDXL's text conditioner, from its key names alone (no weight is read)."""
    return any(k.startswith(sd.model.SDXL_TEXT_PREFIX) for k in sd.CheckpointFile(path).keys())


def is_toy(cfg: TrainConfig) -> bool:
    return is_builtin_toy(cfg.ckpt)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    resolution_given = cfg.resolution != 0
    cfg.validate()  # missing files, bad values: fail before any model is loaded
    if is_sdxl_file(cfg.ckpt):
        if not resolution_given:
            cfg.resolution = 1024  # what SDXL base was trained at (by area; buckets keep about 1024^2 pixels)
        if cfg.mode == "lora" and cfg.train_text_encoder:
            print("note: SDXL text-encoder LoRA: CLIP-L gets q, k, v, out, fc1, fc2; OpenCLIP bigG keeps q/k/v in one "
                  "packed tensor (in_proj_weight), so only its out_proj and MLP are adapted", file=sys.stderr)
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    precision = pick_precision(cfg.precision, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = prepare_data(cfg, out, rank, world)
    loader = LatentLoader(cache, batch_size=cfg.batch_size, seed=cfg.seed, flip=cfg.flip or None)
    if master:
        write_text(out / "config.yaml", json.dumps(cfg.to_dict(), indent=2))  # JSON is valid YAML

    # --- model: LoRA keeps the frozen base in the low precision; full training keeps fp32 master weights
    weight_dtype = DTYPES[precision] if cfg.mode == "lora" else torch.float32
    model = sd.load(cfg.ckpt, dtype=weight_dtype, device=device,
                    prediction_type=None if cfg.prediction_type == "auto" else cfg.prediction_type)
    check_cache(loader, model)
    if master and model.version == "sdxl":
        vae_dtype = str(next(model.vae.parameters()).dtype).removeprefix("torch.")
        print(f"note: SDXL's VAE overflows in float16 (NaN images), so it never runs in it: the cache was encoded in "
              f"float32, and validation/class images decode in {vae_dtype} (fp16 training keeps the VAE in float32)",
              file=sys.stderr)
    torch.manual_seed(cfg.seed)
    unet = model.unet
    toy_before = toy_scores(cfg, model, "base") if master else None
    if cfg.mode == "lora":
        alpha = cfg.alpha or None
        targets = cfg.targets if cfg.targets in lora.PRESETS else [t.strip() for t in cfg.targets.split(",")]
        lora.inject(unet, cfg.rank, alpha, targets, init=cfg.init, rs=cfg.rs, dropout=cfg.lora_dropout, dtype=torch.float32)
        if cfg.train_text_encoder:
            lora.inject(model.text_encoder, cfg.rank, alpha, "attn-mlp", init=cfg.init, rs=cfg.rs,
                        dropout=cfg.lora_dropout, dtype=torch.float32)
        if master:
            print(lora.report(unet))
    else:
        unet.requires_grad_(True)
    unet.gradient_checkpointing = cfg.gradient_checkpointing
    unet.train()
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    groups = param_groups([(n, p) for n, p in trainable.items()], cfg.lr, cfg.weight_decay, cfg.loraplus_ratio)
    if cfg.train_text_encoder:
        model.text_encoder.train()
        te = {f"te.{n}": p for n, p in model.text_encoder.named_parameters() if p.requires_grad}
        trainable.update(te)
        groups += param_groups(list(te.items()), cfg.lr_text_encoder or cfg.lr, cfg.weight_decay, cfg.loraplus_ratio, "te")
    optimizer = make_optimizer(groups, cfg.optimizer, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    autocast = (torch.autocast(device.type, dtype=DTYPES[precision]) if precision != "fp32" else contextlib.nullcontext())
    ema = {n: p.detach().clone().float() for n, p in trainable.items()} if cfg.ema_decay and cfg.mode == "full" else None

    start = 0
    if cfg.resume:
        path = resolve(cfg.resume, out)
        state = load_state(path)
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state["trainable"][n])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"]:
            ema = {k: v.to(device) for k, v in state["ema"].items()}
        torch.set_rng_state(state["rng"]["torch"])
        start = state["step"]
        if master:
            print(f"resumed from {path} at step {start}")

    net = DDP(unet) if world > 1 else unet
    prior = class_loader(cfg, model, out, rank, world) if uses_prior(cfg) else None
    if prior is not None:
        check_cache(prior, model, "class images' cache")
    dropout = cfg.caption_dropout
    empty = loader.cache.empty_prompt() if dropout and not model.needs_y else None
    schedule = model.schedule
    params = list(trainable.values())
    log = open(out / "log.jsonl", "a") if master else None
    board = tensorboard_writer(out) if master and cfg.tensorboard else None
    skipped = 0

    def save_outputs(step: int, final: bool = False) -> None:
        """LoRA file or full checkpoint, plus the training state; rank 0 only."""
        if not master:
            return
        save_state(out, step, trainable, optimizer, scaler, ema, cfg.to_dict())
        name = "final" if final else f"step_{step:07d}"
        if cfg.mode == "lora":
            lora.save(out / f"lora_{name}.safetensors", model if cfg.train_text_encoder else unet,
                      format=cfg.lora_format, metadata={"ss_training_config": cfg.to_dict(), "ss_steps": step})
        else:
            save_full(model, out / f"model_{name}.safetensors", ema, cfg)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not master, desc=cfg.mode, unit="step")
    completed = start
    try:
        for step in bar:
            t0 = time.perf_counter()
            set_lr(optimizer, lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule))
            total = 0.0
            for micro in range(cfg.grad_accum):
                index = (step * cfg.grad_accum + micro) * world + rank  # the global micro-batch this rank runs
                batch = loader.batch(index).to(device)
                sync = contextlib.nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else net.no_sync()
                with sync:
                    drop = caption_drop_mask(dropout, batch.latents.shape[0], cfg.seed, index)
                    context, y = conditioning(model, batch, autocast, weight_dtype, empty,
                                              None if drop is None else drop.to(device))
                    loss = diffusion_loss(net, schedule, batch.latents, context, cfg.seed, index, cfg, autocast, y)
                    if prior is not None:
                        pb = prior.batch(index).to(device)
                        context, y = conditioning(model, pb, autocast, weight_dtype)
                        loss = loss + cfg.prior_loss_weight * diffusion_loss(
                            net, schedule, pb.latents, context, cfg.seed + 1, index, cfg, autocast, y)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"loss is {loss.item()} at step {step}")
                    (scaler.scale(loss / cfg.grad_accum) if scaler else loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            grad_norm, was_skipped = optimizer_step(optimizer, scaler, params, cfg.max_grad_norm)
            completed = step + 1  # the weights now hold this many updates: what an interrupt must save
            skipped += was_skipped
            if ema is not None:
                with torch.no_grad():
                    for n, p in trainable.items():
                        ema[n].lerp_(p.float(), 1 - cfg.ema_decay)
            done = completed
            if master:
                record = {"step": done, "loss": total, "lr": optimizer.param_groups[0]["lr"],
                          "grad_norm": float(grad_norm), "step_time_s": time.perf_counter() - t0,
                          "peak_mem_gb": peak_memory_gb(device)}
                if scaler is not None:
                    record.update(loss_scale=scaler.get_scale(), skipped_steps=skipped)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if board is not None:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"train/{key}", value, done)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{record['lr']:.2e}")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save_outputs(done)
            elif cfg.state_every and done % cfg.state_every == 0 and master:
                save_state(out, done, trainable, optimizer, scaler, ema, cfg.to_dict())
            if cfg.validate_every and done % cfg.validate_every == 0 and done < cfg.steps and master:
                validate(cfg, model, out, done)
    except KeyboardInterrupt:
        if master:
            print(f"\ninterrupted: saving the state at step {completed} (resume with --resume latest)")
            save_state(out, completed, trainable, optimizer, scaler, ema, cfg.to_dict())
        return 130
    except NonFiniteLoss as err:
        print(f"\nstopping: {err}. The last good outputs in {out} are kept; lower lr or use bf16/fp32.", file=sys.stderr)
        return 1
    finally:
        bar.close()
        if log:
            log.close()
        if board is not None:
            board.close()

    save_outputs(cfg.steps, final=True)
    if master:
        validate(cfg, model, out, cfg.steps)
        if toy_before is not None:
            after = toy_scores(cfg, model, "lora" if cfg.mode == "lora" else "fine-tuned")
            print_toy_summary(cfg, toy_before, after, out)
        print(f"done: outputs in {out}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("tensorboard: install the tensorboard package (pip install tensorboard), "
                         "or leave --tensorboard off; log.jsonl has the same numbers") from None
    return SummaryWriter(str(out / "tensorboard"))


def save_full(model, path: Path, ema: dict | None, cfg: TrainConfig) -> None:
    """The whole model as an original-layout checkpoint. Untouched tensors keep the base file's dtype,
    so they come out bitwise equal to the base; trained UNet tensors use save_dtype ("auto": the base's)."""
    state = model.state_dict()
    if ema is not None:
        state.update({sd.model.UNET_PREFIX + k.removeprefix("unet."): v for k, v in ema.items() if k.startswith("unet.")})
    base = sd.CheckpointFile(cfg.ckpt).shapes
    chosen = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.save_dtype)
    out = {}
    for k, v in state.items():
        dtype = base[k].dtype if k in base else v.dtype
        if chosen is not None and k.startswith(sd.model.UNET_PREFIX):
            dtype = chosen
        out[k] = v.to(dtype) if v.is_floating_point() else v
    sd.write_state_dict(path, out, {"ss_training_config": json.dumps(cfg.to_dict())})


def validate(cfg: TrainConfig, model, out: Path, step: int) -> None:
    """Fixed prompts and seeds, one grid per validation."""
    if not cfg.validation_prompts:
        return
    size = cfg.resolution
    images = generate(model, cfg.validation_prompts, steps=cfg.validation_steps, cfg=cfg.validation_cfg,
                      seed=cfg.seed, height=size, width=size, progress=False)
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    save_png(grid(to_pil(images), cols=len(cfg.validation_prompts)), folder / f"step_{step:07d}.png",
             parameters=" | ".join(cfg.validation_prompts) + f"\nSteps: {cfg.validation_steps}, CFG scale: {cfg.validation_cfg}, Seed: {cfg.seed}")


def uses_prior(cfg: TrainConfig) -> bool:
    return bool(cfg.class_prompt or cfg.class_images or (is_toy(cfg) and cfg.toy_prior_images))


def class_loader(cfg: TrainConfig, model, out: Path, rank: int, world: int) -> LatentLoader:
    """Prior preservation: a folder of captioned images (--class_images, or the toy's base world), or DreamBooth's
    class images generated once from class_prompt by the frozen base. Encoded once (rank 0) and cached."""
    if rank == 0:
        if cfg.class_prompt:
            folder = out / "class_images"
            folder.mkdir(parents=True, exist_ok=True)
            have = len(list(folder.glob("*.png")))
            for i in tqdm(range(have, cfg.num_class_images), desc="class images"):
                img = generate(model, cfg.class_prompt, seed=cfg.seed + 10_000 + i, steps=cfg.validation_steps,
                               cfg=cfg.validation_cfg, height=cfg.resolution, width=cfg.resolution, progress=False)
                save_png(to_pil(img)[0], folder / f"class_{i:05d}.png")  # atomic: a resumed count never sees half a file
        else:
            folder = Path(cfg.class_images) if cfg.class_images else toy_prior_images(cfg, out)
        encode_dataset(folder, out / "class_cache", cfg.ckpt, resolution=cfg.resolution,
                       prompt=cfg.class_prompt or None, seed=cfg.seed)
    if world > 1:
        dist.barrier()
    return LatentLoader(out / "class_cache", batch_size=cfg.batch_size, seed=cfg.seed + 1)


def toy_scores(cfg: TrainConfig, model, label: str) -> dict | None:
    """Concept and forgetting scores from the toy world's detectors (built-in toy checkpoint only)."""
    if not cfg.toy_eval or not is_toy(cfg):
        return None
    from toy.evaluate import evaluate
    print(f"toy: sampling the {label} model for the scores ...")
    # 96 base prompts (8 per shape-colour pair) and 48 concept prompts: one image moves a score by 0.01 or 0.02
    return evaluate(model, cfg.toy_concept, n_base=96, n_concept=48, n_world=8, seed=cfg.seed)


def print_toy_summary(cfg: TrainConfig, before: dict, after: dict, out: Path) -> None:
    """The two numbers of the toy experiment, base vs trained, and a before/after grid."""
    from toy.evaluate import save_grid
    rows = [("concept score", f"'{cfg.toy_concept}' prompts show a {cfg.toy_concept}", "concept_score"),
            ("forgetting score", "base-world prompts: colour+shape accuracy", "forgetting_score")]
    lines = [f"{'':18}{'base':>8}{'trained':>9}   what it measures"]
    lines += [f"{name:18}{before[key]:8.2f}{after[key]:9.2f}   {what}" for name, what, key in rows]
    text = "\n".join(lines)
    print(text)
    write_text(out / "scores.txt", text + "\n")
    keys = ("concept_score", "forgetting_score", "base_accuracy")
    write_text(out / "scores.json",
               json.dumps({k: {key: r[key] for key in keys} for k, r in (("base", before), ("trained", after))}, indent=2))
    n = 8
    grid = torch.cat([before["images"]["concept"][:n], after["images"]["concept"][:n],
                   before["images"]["base"][:n], after["images"]["base"][:n]])
    path = save_grid(grid, out / "before_after.png", ncol=n)
    print(f"before/after grid: {path} (rows: concept prompts base, trained; base-world prompts base, trained)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (schedulers, `kill`) saves and exits like Ctrl-C


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except ValueError as err:  # bad input (config, files, data): one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
