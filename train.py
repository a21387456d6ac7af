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

import devices  # noqa: F401  first: it sets OpenMP's wait policy, which only counts before torch loads

import contextlib
import dataclasses
import os
import json
import math
import resource
import shlex
import sys
import time
from pathlib import Path
from time import monotonic

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import lora
import sd
from atomic import write_text
from data import CacheMismatchError, LatentCache, LatentLoader, encode_dataset
from devices import auto_precision, precision_warning, resolve_device
from sampling import generate, grid, save_png, to_pil
from sampling.generate import eval_mode
from schedule import DDPMSchedule, zero_terminal_snr
from sd.load import detect_prediction_type
from text import embedding_file, new_tokens
from toy import hooks as toy
from training.config import TrainConfig, is_builtin_toy, parse_command_line, resumed_config
from training.blocks import block_lr_weights, lr_groups, parse_table
from training.captions import vary_captions
from training.interrupt import Interrupted, Interrupts, quiet_on_broken_pipe, say
from training.loss import distance, huber_delta, timestep_weight
from training.noise import multires_noise, perturbed, timesteps
from training.optim import lr_factor, make_optimizer, param_groups, set_lr
from training.state import (load_state, read_header, remove_stale_temp_files, resolve, save_state, set_rng_states,
                            truncate_log)
from training.validation import held_out_batches, held_out_loss, split

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
    """The precision to train in, with one line saying why when it was chosen (auto) or will be slow (explicit)."""
    if precision == "auto":
        precision, why = auto_precision(device)
        say(f"precision: {precision} (auto: {why})", file=sys.stderr)
        return precision
    warning = precision_warning(precision, device)
    if warning:
        say(f"warning: {warning}", file=sys.stderr)
    return precision


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def diffusion_loss(unet, schedule, latents, context, seed: int, index: int, cfg: TrainConfig, autocast,
                   y: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loss of one micro-batch, in fp32: the distance between the UNet output and the eps or v target
    (training/loss.py: l2, Huber), weighted per timestep (min-SNR-γ, debiased). training/noise.py draws the noise,
    timesteps and noisy input (noise offset, multires noise, timestep range and sampling, input perturbation).
    y: the extra conditioning vector of a UNet that takes one (SDXL: pooled text + size embeddings).
    mask: per-pixel weights [B, 1, h, w] (masked loss), or None.

    Noise and timesteps come from a generator seeded by (seed, micro-batch index), so a resumed or
    data-parallel run draws exactly what a single uninterrupted run would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=g)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(b, latents.shape[1], 1, 1, generator=g)
    if cfg.multires_noise_iterations:
        noise = multires_noise(noise, g, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    t = timesteps(b, g, schedule.num_timesteps, cfg.min_timestep, min(cfg.max_timestep, schedule.num_timesteps),
                  cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std)
    noise, t = noise.to(latents.device), t.to(latents.device)
    noisy = schedule.add_noise(latents, perturbed(noise, g, cfg.ip_noise_gamma), t)
    target = schedule.target(latents, noise, t)
    with autocast:
        pred = unet(noisy, t, context) if y is None else unet(noisy, t, context, y)
    delta = (huber_delta(t, schedule.alphas_cumprod, cfg.huber_schedule, cfg.huber_c)
             if cfg.loss_type != "l2" else None)
    loss = distance(pred.float(), target.float(), cfg.loss_type, delta)
    if mask is not None:
        loss = loss * mask
    loss = loss.mean(dim=(1, 2, 3))
    weight = timestep_weight(schedule.snr(t), schedule.prediction_type, cfg.min_snr_gamma, cfg.debiased_estimation)
    if weight is not None:
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


def with_captions(model, batch, captions: list[str], device: torch.device):
    """The batch with other captions: their token ids, and no cached embeddings, so that conditioning() runs the
    text encoder on them."""
    tokens = model.tokenize(captions)
    tokens, tokens_g = tokens if model.needs_y else (tokens, None)
    return dataclasses.replace(batch, captions=captions, tokens=tokens.to(device), context=None, pooled=None,
                               tokens_g=None if tokens_g is None else tokens_g.to(device))


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
        images = cfg.images or str(toy.concept_images(cfg.toy_concept, cfg.toy_images, out, cfg.toy_word()))
        # A new token being trained, or a trained text encoder: the cache keeps token ids, the encoder runs in the loop
        added = ((cfg.token, cfg.num_vectors),) if learns_token(cfg) else ()
        report = encode_dataset(images, cache, cfg.ckpt, resolution=cfg.resolution, bucket=cfg.bucket,
                                bucket_step=cfg.bucket_step if cfg.bucket else 8,
                                flip=cfg.flip, prompt=cfg.prompt or None, repeats=cfg.repeats,
                                text=not (cfg.train_text_encoder or added), added_tokens=added, seed=cfg.seed)
        say(report)
    if world > 1:
        dist.barrier()
    return cache


def zero_snr_metadata(cfg: TrainConfig) -> dict[str, str]:
    """sd-scripts' ss_zero_terminal_snr, so that sample.py (and people) know the file wants the rescaled schedule."""
    return {"ss_zero_terminal_snr": "True"} if cfg.zero_terminal_snr else {}


def block_settings(cfg: TrainConfig, unet) -> tuple[dict, dict, dict, dict]:
    """(rank overrides, alpha overrides, lr per block, lr weight per block) from the per-block options
    (training/blocks.py); a block whose lr weight is 0 gets rank 0, i.e. no adapter."""
    weights = block_lr_weights(cfg.down_lr_weight, cfg.mid_lr_weight, cfg.up_lr_weight, len(unet.input_blocks))
    ranks = {pattern: 0 for pattern, w in weights.items() if w == 0}
    for pattern, r in parse_table(cfg.block_ranks, "block_ranks").items():
        if not r.is_integer():
            raise ValueError(f"block_ranks: {pattern}={r:g}: a rank is a whole number")
        ranks.setdefault(pattern, int(r))
    return ranks, parse_table(cfg.block_alphas, "block_alphas"), parse_table(cfg.block_lrs, "block_lrs"), weights


def learns_token(cfg: TrainConfig) -> bool:
    """Textual inversion (ti) and pivotal tuning train a new token's vectors."""
    return cfg.mode in ("ti", "pivotal")


def has_adapter(cfg: TrainConfig) -> bool:
    return cfg.mode in ("lora", "pivotal")


def add_training_token(cfg: TrainConfig, model) -> dict[str, torch.nn.Parameter]:
    """Add --token to the tokenizer and text encoder (init from --init_word or random, drawn from the seed) and
    return its trainable vectors by tower. Every other text-encoder weight stays frozen."""
    start = new_tokens.initial_vectors(model.text_encoder, model.tokenizer, cfg.num_vectors, cfg.init_word, cfg.seed)
    ids = new_tokens.add_token(model.text_encoder, model.tokenizer, cfg.token, start)
    vectors = new_tokens.new_vectors(model.text_encoder)
    for p in vectors.values():
        p.requires_grad_(True)
    init = f"from '{cfg.init_word}'" if cfg.init_word else "at random"
    say(f"new token {cfg.token!r}: ids {ids[0]}..{ids[-1]}, {cfg.num_vectors} vector(s) per tower "
        f"({', '.join(f'{k} {v.shape[1]} wide' for k, v in vectors.items())}), initialised {init}; "
        f"the text encoder runs in the loop")
    return vectors


def check_token_cache(loader: LatentLoader, cfg: TrainConfig) -> None:
    """The cache's token ids must be those of this run's tokenizer: the same new tokens, in the same order."""
    cached = [tuple(t) for t in loader.cache.manifest["text"].get("added_tokens", [])]
    if cached != [(cfg.token, cfg.num_vectors)]:
        raise ValueError(f"cache {loader.cache.folder}: its token ids were made for new tokens {cached}, this run "
                         f"trains {[(cfg.token, cfg.num_vectors)]}; encode it again (another --cache folder)")
    captions = [it.caption for it in loader.cache.items]
    without = [c for c in captions if cfg.token.lower() not in c.lower()]
    if len(without) == len(captions):
        raise ValueError(f"token {cfg.token!r} is in none of the {len(captions)} captions (e.g. {captions[0]!r}): its "
                         f"vectors would get no gradient; put it in the captions, or give --prompt with it")
    if without:
        say(f"note: {len(without)} of {len(captions)} captions lack {cfg.token!r} (e.g. {without[0]!r}); they train "
            f"the adapter only", file=sys.stderr)


def training_phase(cfg: TrainConfig, step: int) -> tuple[bool, bool]:
    """(the token's vectors train, the adapter trains) at `step`: pivotal's --ti_steps trains the vectors alone
    first; --ti_freeze then keeps them fixed."""
    if cfg.mode != "pivotal" or not cfg.ti_steps:
        return learns_token(cfg), has_adapter(cfg)
    if step < cfg.ti_steps:
        return True, False
    return not cfg.ti_freeze, True


def lora_targets(cfg: TrainConfig) -> str | list[str]:
    return cfg.targets if cfg.targets in lora.PRESETS else [t.strip() for t in cfg.targets.split(",")]


def configure(argv: list[str] | None) -> tuple[TrainConfig, int]:
    """The run's configuration, checked before any image is encoded or any model is loaded: option values, files,
    the checkpoint's header and shapes, the LoRA targets on the checkpoint's architecture (built on the meta device),
    and, for --resume, the state and the options it was trained with. Returns (config, step to start from)."""
    cfg, given = parse_command_line(argv)
    start = 0
    if cfg.resume:
        path = resolve(cfg.resume, Path(cfg.out))
        start, saved = read_header(path)
        if saved:
            cfg, changes = resumed_config(saved, given, str(path))
            for line in changes:
                say(f"changed: {line}", file=sys.stderr)
    if not cfg.images and not is_builtin_toy(cfg.ckpt):
        raise ValueError("images: no image folder given (--images DIR); only the built-in toy checkpoint has "
                         "default images")
    cfg.validate()  # option values and files
    try:
        ckpt, version, parts = sd.build_meta(cfg.ckpt)  # header only: every key and shape checked, no weight read
    except sd.CheckpointError as err:
        raise ValueError(f"ckpt: {err}") from None
    if cfg.zero_terminal_snr and cfg.prediction_type == "auto" and detect_prediction_type(ckpt, version) == "epsilon":
        raise ValueError(f"zero_terminal_snr: {cfg.ckpt} is an eps-prediction model, which cannot tell x0 at the "
                         f"pure-noise timestep that zero terminal SNR makes; use it with a v-prediction model (or "
                         f"--prediction_type v_prediction to turn this one into one)")
    if version == "sdxl" and "resolution" not in given and not cfg.resume:
        cfg.resolution = 1024  # what SDXL base was trained at (by area; buckets keep about 1024^2 pixels)
    if has_adapter(cfg):
        unet = parts[sd.model.UNET_PREFIX]
        ranks, alphas, _, _ = block_settings(cfg, unet)
        try:
            lora.inject(unet, cfg.rank, cfg.alpha or None, lora_targets(cfg), rs=cfg.rs, dtype=torch.float32,
                        rank_overrides=ranks, alpha_overrides=alphas, **cfg.adapter_options())
        except ValueError as err:
            raise ValueError(f"targets: {err}") from None
    else:
        block_settings(cfg, parts[sd.model.UNET_PREFIX])  # the lr options, checked
    if version == "sdxl" and cfg.mode == "lora" and cfg.train_text_encoder:
        if cfg.init in lora.packed.INITS and not cfg.lora_dropout:
            say("note: SDXL text-encoder LoRA: both towers get q, k, v, out, fc1, fc2; OpenCLIP bigG's q/k/v are the "
                "row thirds of its packed in_proj_weight (a PackedLoRA), saved as sd-scripts' q_proj/k_proj/v_proj",
                file=sys.stderr)
        else:
            say(f"note: SDXL text-encoder LoRA: CLIP-L gets q, k, v, out, fc1, fc2; OpenCLIP bigG only out_proj and "
                f"MLP: its q/k/v, one packed tensor (in_proj_weight), take LoRA with --init kaiming or gaussian and "
                f"no --lora_dropout (here {cfg.init}, {cfg.lora_dropout:g})", file=sys.stderr)
    return cfg, start


def resume_command(out: Path) -> str:
    """The command that continues the run in `out`: its options are saved with its state."""
    return f"python train.py --resume latest --out {shlex.quote(str(out))}"


def main(argv: list[str] | None = None, interrupts: Interrupts | None = None) -> int:
    cfg, resume_step = configure(argv)
    interrupts = interrupts or Interrupts()
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    precision = pick_precision(cfg.precision, device) if master else pick_quietly(cfg.precision, device)
    out = Path(cfg.out)
    if learns_token(cfg) and world > 1:
        raise ValueError(f"mode {cfg.mode}: one process only; the token's vectors are not averaged across DDP ranks")
    if cfg.resume and resume_step >= cfg.steps and (out / final_name(cfg)).is_file():
        say(f"the run in {out} is complete at step {resume_step} of {cfg.steps}: nothing to train "
            f"(give --steps N to train further)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if master:
        for path in remove_stale_temp_files(out):
            say(f"removed {path} (left by an interrupted save)", file=sys.stderr)
    cache = prepare_data(cfg, out, rank, world)
    opened = LatentCache(cache)
    if cfg.masked_loss and not opened.has_masks:
        raise ValueError(f"masked_loss: no image in {cfg.images or 'the toy images'} has a mask (name.mask.png "
                         f"beside name.png, or an alpha channel)")
    train_items, held_out = split(len(opened.items), cfg.validation_split, cfg.seed)
    loader = LatentLoader(opened, batch_size=cfg.batch_size, seed=cfg.seed, flip=cfg.flip or None,
                          only=train_items if held_out else None)
    if learns_token(cfg):
        check_token_cache(loader, cfg)
    if master:
        write_text(out / "config.yaml", json.dumps(cfg.to_dict(), indent=2))  # JSON is valid YAML

    # --- model: LoRA, TI and pivotal keep the frozen base in the low precision; full training keeps fp32 master weights
    weight_dtype = DTYPES[precision] if cfg.mode != "full" else torch.float32
    model = sd.load(cfg.ckpt, dtype=weight_dtype, device=device,
                    prediction_type=None if cfg.prediction_type == "auto" else cfg.prediction_type)
    check_cache(loader, model)
    if master and model.version == "sdxl":
        vae_dtype = str(next(model.vae.parameters()).dtype).removeprefix("torch.")
        say(f"note: SDXL's VAE overflows in float16 (NaN images), so it never runs in it: the cache was encoded in "
            f"float32, and validation/class images decode in {vae_dtype} (fp16 training keeps the VAE in float32)",
            file=sys.stderr)
    torch.manual_seed(cfg.seed)
    unet = model.unet
    vectors = add_training_token(cfg, model) if learns_token(cfg) else {}
    toy_run = master and cfg.toy_eval and is_builtin_toy(cfg.ckpt)  # the built-in default: scores before and after
    word = cfg.toy_word()
    toy_before = toy.scores(model, cfg.toy_concept, cfg.seed, "base", word=word) if toy_run else None
    ranks, alphas, block_lrs, lr_weights = block_settings(cfg, unet)
    if has_adapter(cfg):
        alpha = cfg.alpha or None
        lora.inject(unet, cfg.rank, alpha, lora_targets(cfg), init=cfg.init, rs=cfg.rs, dropout=cfg.lora_dropout,
                    dtype=torch.float32, rank_overrides=ranks, alpha_overrides=alphas, **cfg.adapter_options())
        if cfg.train_text_encoder:  # the preset includes OpenCLIP's packed q/k/v where they can take it (see note)
            lora.inject(model.text_encoder, cfg.rank, alpha, "attn-mlp", init=cfg.init, rs=cfg.rs,
                        dropout=cfg.lora_dropout, dtype=torch.float32, **cfg.adapter_options())
        if master:
            say(lora.report(unet))
    elif cfg.mode == "full":
        unet.requires_grad_(True)
    unet.gradient_checkpointing = cfg.gradient_checkpointing
    unet.train()
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    groups = []
    for lr, named in lr_groups([(n.removeprefix("unet."), p) for n, p in trainable.items()], cfg.lr, block_lrs,
                               lr_weights):
        groups += param_groups([(f"unet.{n}", p) for n, p in named], lr, cfg.weight_decay, cfg.loraplus_ratio,
                               "unet" if lr == cfg.lr else f"unet@{lr:g}")
    if master and len(groups) > 1 + (cfg.loraplus_ratio not in (0.0, 1.0)):
        say("learning rates: " + ", ".join(f"{g['name']} {g['lr']:g} ({len(g['params'])} tensors)" for g in groups))
    adapter_params = list(trainable.values())
    if vectors:  # the new rows, at their own learning rate
        emb = {f"emb.{tower}": p for tower, p in vectors.items()}
        trainable.update(emb)
        groups += param_groups(list(emb.items()), cfg.ti_lr, cfg.weight_decay, 0.0, "emb")
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
        missing = sorted(set(trainable) - set(state["trainable"]))
        extra = sorted(set(state["trainable"]) - set(trainable))
        if missing or extra:  # e.g. a state saved by a version that adapted other layers
            raise ValueError(f"resume: {path} holds other trainable tensors than this run trains ("
                             f"{len(missing)} missing, e.g. {missing[:3]}; {len(extra)} not trained here, e.g. "
                             f"{extra[:3]}); start a new run in another --out folder")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state["trainable"][n])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"]:
            ema = {k: v.to(device) for k, v in state["ema"].items()}
        set_rng_states(state["rng"])
        start = state["step"]
        if master:
            say(f"resumed from {path} at step {start}")
            dropped = truncate_log(out / "log.jsonl", start)
            if dropped:
                say(f"log.jsonl: removed {dropped} records past step {start} (they are trained again)", file=sys.stderr)

    if cfg.mode == "ti" and master and (cfg.class_prompt or cfg.class_images or cfg.toy_prior_images):
        say("note: prior preservation is skipped in --mode ti: the model does not change, and captions without the "
            "token give the vectors no gradient", file=sys.stderr)
    net = DDP(unet) if world > 1 else unet
    prior = class_loader(cfg, model, out, rank, world) if uses_prior(cfg) else None
    if prior is not None:
        check_cache(prior, model, "class images' cache")
    dropout = cfg.caption_dropout
    empty = loader.cache.empty_prompt() if dropout and not model.needs_y else None
    val_batches = validation_batches(cfg, model, opened, held_out, out) if master else None
    if cfg.zero_terminal_snr:  # training and the validation images both use the rescaled schedule
        model.schedule = DDPMSchedule(zero_terminal_snr(model.schedule.betas), model.prediction_type)
    schedule = model.schedule
    params = list(trainable.values())
    log = open(out / "log.jsonl", "a") if master else None
    board = tensorboard_writer(out) if master and cfg.tensorboard else None
    skipped = 0
    last_state = monotonic()

    def write_state(step: int) -> None:
        nonlocal last_state
        if master:
            save_state(out, step, trainable, optimizer, scaler, ema, cfg.to_dict())
        last_state = monotonic()

    def save_outputs(step: int, final: bool = False) -> None:
        """The training state first (what a resume needs), then the LoRA file and/or the embedding file (pivotal: both,
        side by side), or the full checkpoint; rank 0 only."""
        write_state(step)
        if not master:
            return
        name = "final" if final else f"step_{step:07d}"
        if learns_token(cfg):
            embedding_file.save(out / f"embedding_{name}.safetensors", cfg.token, vectors,
                                metadata={"step": step, "sd.version": model.version, "ss_training_config": cfg.to_dict()})
        if has_adapter(cfg):
            lora.save(out / f"lora_{name}.safetensors", model if cfg.train_text_encoder else unet,
                      format=cfg.lora_format, metadata={"ss_training_config": cfg.to_dict(), "ss_steps": step,
                                                        **zero_snr_metadata(cfg)})
        elif cfg.mode == "full":
            save_full(model, out / f"model_{name}.safetensors", ema, cfg)

    if cfg.resume and master:
        with interrupts.critical():
            rewrite_missing_outputs(cfg, out, start, save_outputs)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not master, desc=cfg.mode, unit="step")
    completed = start
    try:
        for step in bar:
            t0 = time.perf_counter()
            set_lr(optimizer, lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule))
            if cfg.mode == "pivotal":  # which of the two trains now (see training_phase); no gradient for the other
                emb_on, adapter_on = training_phase(cfg, step)
                for p in vectors.values():
                    p.requires_grad_(emb_on)
                for p in adapter_params:
                    p.requires_grad_(adapter_on)
            total = 0.0
            for micro in range(cfg.grad_accum):
                index = (step * cfg.grad_accum + micro) * world + rank  # the global micro-batch this rank runs
                batch = loader.batch(index).to(device)
                sync = contextlib.nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else net.no_sync()
                with sync:
                    if cfg.shuffle_caption or cfg.caption_tag_dropout:
                        batch = with_captions(model, batch, vary_captions(
                            batch.captions, cfg.seed, index, cfg.shuffle_caption, cfg.keep_tokens,
                            cfg.caption_tag_dropout), device)
                    drop = caption_drop_mask(dropout, batch.latents.shape[0], cfg.seed, index)
                    context, y = conditioning(model, batch, autocast, weight_dtype, empty,
                                              None if drop is None else drop.to(device))
                    loss = diffusion_loss(net, schedule, batch.latents, context, cfg.seed, index, cfg, autocast, y,
                                          batch.mask if cfg.masked_loss else None)
                    if prior is not None:
                        pb = prior.batch(index).to(device)
                        context, y = conditioning(model, pb, autocast, weight_dtype)
                        loss = loss + cfg.prior_loss_weight * diffusion_loss(
                            net, schedule, pb.latents, context, cfg.seed + 1, index, cfg, autocast, y,
                            pb.mask if cfg.masked_loss else None)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"loss is {loss.item()} at step {step}")
                    (scaler.scale(loss / cfg.grad_accum) if scaler else loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            with interrupts.critical():  # a signal here waits: a half-applied update is a state no run ever had
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
                if val_batches and (done % (cfg.val_loss_every or max(1, cfg.steps // 10)) == 0 or done == cfg.steps):
                    with eval_mode(unet, model.text_encoder):
                        per_t = held_out_loss(model, val_batches, seed=cfg.seed, unet=unet, condition=lambda b: (
                            conditioning(model, b.to(device), autocast, weight_dtype)))
                    record["val_loss"] = sum(per_t) / len(per_t)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if board is not None:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"train/{key}", value, done)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{record['lr']:.2e}")
            with interrupts.critical():
                if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    save_outputs(done)
                elif state_due(cfg, done, last_state) and done < cfg.steps:
                    write_state(done)
            if cfg.validate_every and done % cfg.validate_every == 0 and done < cfg.steps and master:
                validate(cfg, model, out, done)
        with interrupts.critical():
            save_outputs(cfg.steps, final=True)
    except Interrupted as stop:
        stopped(stop.signal_name, master, out, completed, write_state)
        return 130
    except KeyboardInterrupt:
        stopped("SIGINT", master, out, completed, write_state)
        return 130
    except NonFiniteLoss as err:
        say(f"\nstopping: {err}. The last good outputs in {out} are kept; lower lr or use bf16/fp32.", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(OSError, ValueError):
            bar.close()
        if log:
            log.close()
        if board is not None:
            board.close()

    if master:
        validate(cfg, model, out, cfg.steps)
        if toy_before is not None:
            after = toy.scores(model, cfg.toy_concept, cfg.seed, "trained", word=word)
            say(toy.summary(cfg.toy_concept, toy_before, after, out, word=word))
            say(f"before/after grid: {out / 'before_after.png'} (rows labelled: '{word}' prompts and "
                f"base-world prompts, each by the base and by the trained model)")
        say(f"done: outputs in {out}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def pick_quietly(precision: str, device: torch.device) -> str:
    return auto_precision(device)[0] if precision == "auto" else precision


def output_prefixes(cfg: TrainConfig) -> list[str]:
    """What a run writes, by file-name prefix: pivotal tuning writes a LoRA and an embedding side by side."""
    if cfg.mode == "full":
        return ["model"]
    return (["lora"] if has_adapter(cfg) else []) + (["embedding"] if learns_token(cfg) else [])


def final_name(cfg: TrainConfig) -> str:
    return f"{output_prefixes(cfg)[-1]}_final.safetensors"


def state_due(cfg: TrainConfig, step: int, last_state: float) -> bool:
    """Whether a training state is due after `step`: every state_every steps, or state_every_minutes after the last."""
    if cfg.state_every and step % cfg.state_every == 0:
        return True
    return bool(cfg.state_every_minutes) and monotonic() - last_state >= 60 * cfg.state_every_minutes


def stopped(signal_name: str, master: bool, out: Path, completed: int, write_state) -> None:
    """Save first, then say so: a message that cannot be printed (its pipe or terminal gone) never costs the state."""
    if master:
        write_state(completed)
    say(f"\n{signal_name}: saved the training state at step {completed} in {out / 'state'}; continue with:\n"
        f"  {resume_command(out)}", file=sys.stderr)


def rewrite_missing_outputs(cfg: TrainConfig, out: Path, start: int, save_outputs) -> None:
    """After a kill during a save: the periodic file of the step the run resumes at is written again from the same
    weights; earlier ones cannot be (their weights are gone), so they are named."""
    if not cfg.save_every:
        return
    prefixes = output_prefixes(cfg)
    missing = [s for s in range(cfg.save_every, min(start, cfg.steps - 1) + 1, cfg.save_every)
               if not all((out / f"{prefix}_step_{s:07d}.safetensors").is_file() for prefix in prefixes)]
    names = lambda s: " + ".join(f"{prefix}_step_{s:07d}.safetensors" for prefix in prefixes)  # noqa: E731
    if missing and missing[-1] == start:
        save_outputs(start)
        say(f"rewrote {names(start)} (its save was interrupted)", file=sys.stderr)
        missing.pop()
    if missing:
        say(f"note: {', '.join(names(s) for s in missing)} missing in {out}: their saves "
            f"were interrupted, and the weights of those steps no longer exist", file=sys.stderr)


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
                      seed=cfg.seed, height=size, width=size, progress=f"validation images, step {step}")
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    save_png(grid(to_pil(images), cols=len(cfg.validation_prompts)), folder / f"step_{step:07d}.png",
             parameters=" | ".join(cfg.validation_prompts) + f"\nSteps: {cfg.validation_steps}, CFG scale: {cfg.validation_cfg}, Seed: {cfg.seed}")


def validation_batches(cfg: TrainConfig, model, cache: LatentCache, held_out: list[int], out: Path) -> list | None:
    """The held-out batches of val_loss: --validation_split's images from the training cache, or the folder
    --validation_images encoded once into out/val_cache; None when neither is set."""
    if held_out:
        say(f"validation: {len(held_out)} of the training images held out for val_loss (--validation_split "
            f"{cfg.validation_split:g})")
        return held_out_batches(cache, cfg.batch_size, cfg.seed, only=held_out)
    if cfg.validation_images:  # with a token being trained: its ids, no embeddings (as prepare_data)
        added = ((cfg.token, cfg.num_vectors),) if learns_token(cfg) else ()
        encode_dataset(cfg.validation_images, out / "val_cache", model, resolution=cfg.resolution, seed=cfg.seed,
                       text=not (cfg.train_text_encoder or added), added_tokens=added)
        return held_out_batches(out / "val_cache", cfg.batch_size, cfg.seed)
    return None


def uses_prior(cfg: TrainConfig) -> bool:
    """Prior preservation; not for textual inversion, which leaves the model as it is (prior captions lack the token,
    so their loss would give the vectors no gradient)."""
    if cfg.mode == "ti":
        return False
    return bool(cfg.class_prompt or cfg.class_images or (is_builtin_toy(cfg.ckpt) and cfg.toy_prior_images))


def class_loader(cfg: TrainConfig, model, out: Path, rank: int, world: int) -> LatentLoader:
    """Prior preservation: a folder of captioned images (--class_images, or the toy's base world), or DreamBooth's
    class images generated once from class_prompt by the frozen base. Encoded once (rank 0) and cached."""
    if rank == 0:
        if cfg.class_prompt:
            folder = out / "class_images"
            folder.mkdir(parents=True, exist_ok=True)
            have = len(list(folder.glob("*.png")))
            for i in tqdm(range(have, cfg.num_class_images), desc="class images", unit="img"):
                img = generate(model, cfg.class_prompt, seed=cfg.seed + 10_000 + i, steps=cfg.validation_steps,
                               cfg=cfg.validation_cfg, height=cfg.resolution, width=cfg.resolution, progress=False)
                save_png(to_pil(img)[0], folder / f"class_{i:05d}.png")  # atomic: a resumed count never sees half a file
        else:
            folder = (Path(cfg.class_images) if cfg.class_images
                      else toy.prior_images(cfg.toy_prior_images, cfg.seed, out))
        encode_dataset(folder, out / "class_cache", cfg.ckpt, resolution=cfg.resolution,
                       prompt=cfg.class_prompt or None, seed=cfg.seed)
    if world > 1:
        dist.barrier()
    return LatentLoader(out / "class_cache", batch_size=cfg.batch_size, seed=cfg.seed + 1)


def cli(argv: list[str] | None = None) -> int:
    """The command line: signals and broken pipes handled, bad input and early stops as one line each."""
    interrupts = Interrupts()
    interrupts.install()  # SIGINT, SIGTERM and SIGHUP save the state and stop; see training/interrupt.py
    quiet_on_broken_pipe()  # `... | tee log`, then Ctrl-C: tee is gone, the state must still be written
    try:
        return main(argv, interrupts)
    except ValueError as err:  # bad input (config, files, data): one clear line, no traceback
        say(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # before training started (nothing to save yet) or after the final save
        name = getattr(stop, "signal_name", "SIGINT")
        say(f"\n{name}: stopped outside the training loop; no training state was lost", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
