"""Train the built-in tiny SD1-family model from scratch on the toy world: first the VAE, then the UNet.

    python -m toy.pretrain --out toy/tiny_sd.safetensors

Stages: (1) the VAE on world scenes and generic random polygons, then its latents are normalised; (2) the UNet
on VAE latents of base-world scenes. The text
encoder is a small CLIP-L-shaped transformer with random weights (fixed seed), frozen throughout, read through the
real CLIP tokenizer. The VAE and UNet are the project's own modules at small widths (the UNet takes SD1's code
paths: conv proj_in, 8 heads). Progress is saved every few minutes to `<out>.progress.pt`, atomically;
running the same command again resumes from it. The result is an original-layout .safetensors (fp16) that
`sd.load` opens, with the command and the full config in its metadata.
"""
from __future__ import annotations

import devices  # noqa: F401  first: it sets OpenMP's wait policy, which only counts before torch loads

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fastpaths
from atomic import atomic_path
from schedule import DDPMSchedule
from sd.checkpoint import write_state_dict
from sd.model import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from text import ClipLConfig, ClipLTextEncoder, CLIPTokenizer
from unet import UNetConfig, UNetModel
from vae import SD_SCALE, AutoencoderKL, VAEConfig

from . import world

# Seeds of the separate random streams, offset from ToyConfig.seed so that they never coincide.
_VAE_DATA, _UNET_DATA, _STATS_DATA = 1000, 2000, 3000


@dataclass
class ToyConfig:
    """Everything that decides the shipped weights (besides the code): written into the file's metadata."""

    seed: int = 0
    # Text encoder: CLIP-L layout; its 49408 x width token table is most of the file, hence the small width.
    text_width: int = 64
    text_layers: int = 2
    text_mlp_width: int = 256
    # VAE: 32 x 32 images -> 8 x 8 x 4 latents (factor 4).
    vae_ch: int = 32
    vae_ch_mult: tuple[int, ...] = (1, 1, 2)
    vae_res_blocks: int = 1
    vae_steps: int = 1600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    vae_generic_fraction: float = 0.5
    # UNet: SD1 layout (conv proj_in, 8 heads) on 8 x 8 latents.
    unet_channels: int = 32
    unet_channel_mult: tuple[int, ...] = (1, 2)
    unet_res_blocks: int = 1
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    unet_scenes: int = 20000
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # Offset noise (Guttenberg, 2023): a per-image, per-channel constant added to the noise. On 8 x 8 latents the
    # plain noise's mean (std 1/8) is so small that the image's mean survives even at t = 999, so without this the
    # model takes the background's brightness from the starting noise and ignores "black/white background".
    offset_noise: float = 0.3
    ema_decay: float = 0.999
    stats_images: int = 2048
    checkpoint_every_s: float = 180.0
    # bf16 autocast: measured no faster than fp32 for these tiny widths on a 2-core CPU, so off.
    bf16: bool = False

    def __post_init__(self) -> None:
        self.vae_ch_mult = tuple(int(m) for m in self.vae_ch_mult)
        self.unet_channel_mult = tuple(int(m) for m in self.unet_channel_mult)

    def text_config(self) -> ClipLConfig:
        # sd.load infers one head per 64 channels (at least one), so build it that way too.
        return ClipLConfig(width=self.text_width, layers=self.text_layers, heads=max(1, self.text_width // 64),
                           mlp_width=self.text_mlp_width)

    def vae_config(self) -> VAEConfig:
        return VAEConfig(ch=self.vae_ch, ch_mult=self.vae_ch_mult, num_res_blocks=self.vae_res_blocks)

    def unet_config(self) -> UNetConfig:
        levels = len(self.unet_channel_mult)
        return UNetConfig(model_channels=self.unet_channels, channel_mult=self.unet_channel_mult,
                          num_res_blocks=self.unet_res_blocks, attention_levels=(True,) * levels,
                          transformer_depth=(1,) * levels, context_dim=self.text_width, num_heads=8)


# Settings read by one later stage only: they may change on resume until that stage has begun.
STAGE_FIELDS = {
    "unet": {"unet_steps", "unet_batch", "unet_lr", "unet_warmup", "unet_scenes", "unet_channels",
             "unet_channel_mult", "unet_res_blocks", "caption_dropout", "min_snr_gamma", "ema_decay",
             "offset_noise"},
}


def _round_fp16_(module: torch.nn.Module) -> torch.nn.Module:
    """Round weights to fp16 values (kept in fp32), so the fp16 file holds exactly what was used or trained."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def build_text_encoder(cfg: ToyConfig) -> ClipLTextEncoder:
    """The frozen random text encoder: same seed, same weights, on every machine."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = ClipLTextEncoder(cfg.text_config())
    return _round_fp16_(model).eval().requires_grad_(False)


def build_vae(cfg: ToyConfig) -> AutoencoderKL:
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 1)
        return fastpaths.apply(AutoencoderKL(cfg.vae_config()))  # the CPU speed layers, as sd.load gives them


def build_unet(cfg: ToyConfig) -> UNetModel:
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 2)
        return fastpaths.apply(UNetModel(cfg.unet_config()))


def _generator(*parts: int) -> torch.Generator:
    """A torch generator for one step of one stage: every step's randomness is a function of its index alone,
    so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


def vae_batch(data_seed: int, start: int, n: int, generic_fraction: float) -> torch.Tensor:
    """VAE training images: base-world scenes mixed with generic random polygons (world.render_generic), so the
    VAE can encode shapes and colours the UNet never learns to draw (a LoRA can only add what the VAE can decode)."""
    images = []
    for i in range(start, start + n):
        if world.item_rng(data_seed, i, 2).random() < generic_fraction:
            images.append(world.render_generic(world.item_rng(data_seed, i, 1)))
        else:
            images.append(world.render(world.sample_scene(world.item_rng(data_seed, i)), world.item_rng(data_seed, i, 1)))
    return world.to_tensor(np.stack(images))


def world_batch(data_seed: int, start: int, n: int) -> tuple[torch.Tensor, list[world.Scene]]:
    """Items start..start+n of the base-world dataset `data_seed`, as VAE input in [-1, 1]."""
    scenes = [world.sample_scene(world.item_rng(data_seed, i)) for i in range(start, start + n)]
    images = np.stack([world.render(s, world.item_rng(data_seed, i, 1)) for i, s in zip(range(start, start + n), scenes)])
    return world.to_tensor(images), scenes


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """L1 + L2 reconstruction through a sampled latent, plus a small KL(q(z|x) || N(0, 1)) per latent element.

    The KL only keeps the posterior from collapsing to a point; the latent scale is fixed afterwards by
    `normalise_latents`, which is exact, so the weight need not be tuned for it."""
    post = vae.encode(x)
    recon = vae.decode(post.sample(gen)).float()
    l1 = (recon - x).abs().mean()
    l2 = (recon - x).pow(2).mean()
    mean, logvar = post.mean.float(), post.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


@torch.no_grad()
def normalise_latents(vae: AutoencoderKL, images: torch.Tensor) -> dict[str, list[float]]:
    """Re-parametrise quant_conv / post_quant_conv so that SD_SCALE * latent has zero mean and unit variance per
    channel (sd.load always applies SD1's 0.18215). Exact: decode(encode(x)) does not change.

    With z' = k (z - m): the mean rows of quant_conv are shifted and scaled, its log-variance rows gain
    2 log k, and post_quant_conv absorbs the inverse, z = z'/k + m."""
    moments = vae.quant_conv(vae.encoder(images))
    z = moments[:, : vae.cfg.embed_dim]
    m = z.mean(dim=(0, 2, 3))
    s = z.std(dim=(0, 2, 3))
    k = 1.0 / (SD_SCALE * s)
    c = vae.cfg.embed_dim
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= k[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - m) * k
    q.bias[c:] += 2.0 * torch.log(k)
    p.bias += (p.weight[:, :, 0, 0] * m[None]).sum(dim=1)
    p.weight /= k[None, :, None, None]
    return {"mean": m.tolist(), "std": s.tolist()}


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def encode_dataset(vae: AutoencoderKL, cfg: ToyConfig, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior means and stds (both scaled by SD_SCALE) and captions of the UNet's training scenes."""
    means, stds, captions = [], [], []
    vae.eval()
    with torch.no_grad():
        for start in range(0, cfg.unet_scenes, batch):
            x, scenes = world_batch(cfg.seed + _UNET_DATA, start, min(batch, cfg.unet_scenes - start))
            post = vae.encode(x)
            means.append(post.mean.float() * SD_SCALE)
            stds.append(post.std.float() * SD_SCALE)
            captions += [s.caption for s in scenes]
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def encode_captions(text: ClipLTextEncoder, captions: list[str], tokenizer: CLIPTokenizer) -> torch.Tensor:
    out = [text(tokenizer(captions[i:i + 256], pad_id=text.pad_id)) for i in range(0, len(captions), 256)]
    return torch.cat(out)


def original_state_dict(unet: UNetModel, vae: AutoencoderKL, text: ClipLTextEncoder,
                        dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The three parts under their original checkpoint prefixes, in `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIX, text)):
        out.update({prefix + k: v.detach().to(dtype) for k, v in module.state_dict().items()})
    return out


def _save_progress(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class Trainer:
    """Holds the models and the progress of one pretraining run, and knows how to save and resume it."""

    def __init__(self, cfg: ToyConfig, progress: Path, log=print):
        self.cfg, self.progress, self.log = cfg, progress, log
        self.text = build_text_encoder(cfg)
        self.vae = build_vae(cfg)
        self.unet = build_unet(cfg)
        self.ema = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
        self.vae_step = self.unet_step = 0
        self.latent_stats: dict | None = None
        stages = ("vae", "unet")
        self.elapsed = dict.fromkeys(stages, 0.0)      # wall-clock seconds spent in training steps
        self.cpu_seconds = dict.fromkeys(stages, 0.0)  # process CPU time, less sensitive to a shared machine
        self.step_times: dict[str, list[float]] = {k: [] for k in stages}
        self._last_save = time.monotonic()
        if progress.exists():
            self._resume(torch.load(progress, map_location="cpu", weights_only=True))

    def _resume(self, state: dict) -> None:
        now, saved = dataclasses.asdict(self.cfg), state["config"]
        diff = {k: (saved.get(k), now.get(k)) for k in {*now, *saved} if saved.get(k) != now.get(k)}
        # Settings of stages not yet begun may still change, and how often progress is saved never matters.
        free = {"checkpoint_every_s"}
        for stage, fields in STAGE_FIELDS.items():
            if state.get(f"{stage}_step", 0) == 0:
                free |= fields
        if set(diff) - free:
            raise ValueError(f"{self.progress} was written with another config (saved vs now: {diff}); "
                             "delete it or pass the same options")
        self.vae.load_state_dict(state["vae"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        if state["unet_step"] > 0:  # otherwise keep the fresh UNet: same seed, and its config may have changed
            self.unet.load_state_dict(state["unet"])
            self.ema = state["ema"]
            self.unet_opt.load_state_dict(state["unet_opt"])
        self.vae_step, self.unet_step = state["vae_step"], state["unet_step"]
        self.latent_stats = state["latent_stats"]
        # Runs begun before a stage existed lack its entries; a missing CPU time was not measured (None).
        self.elapsed.update(state["elapsed"])
        self.step_times.update(state.get("step_times", {}))
        self.cpu_seconds.update(state.get("cpu_seconds", {"vae": None}))
        self.log(f"resumed from {self.progress}: vae step {self.vae_step}, unet step {self.unet_step}")

    def save(self) -> None:
        _save_progress(self.progress, {
            "config": dataclasses.asdict(self.cfg), "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
            "ema": self.ema, "vae_opt": self.vae_opt.state_dict(), "unet_opt": self.unet_opt.state_dict(),
            "vae_step": self.vae_step, "unet_step": self.unet_step, "latent_stats": self.latent_stats,
            "elapsed": self.elapsed, "step_times": self.step_times, "cpu_seconds": self.cpu_seconds,
        })
        self._last_save = time.monotonic()

    def _maybe_save(self) -> None:
        if time.monotonic() - self._last_save > self.cfg.checkpoint_every_s:
            self.save()

    def train_vae(self) -> None:
        cfg, vae = self.cfg, self.vae
        vae.train()
        t0, running = time.perf_counter(), []
        while self.vae_step < cfg.vae_steps:
            step = self.vae_step
            start, cpu = time.perf_counter(), time.process_time()
            for group in self.vae_opt.param_groups:
                group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, 50)
            x = vae_batch(cfg.seed + _VAE_DATA, step * cfg.vae_batch, cfg.vae_batch, cfg.vae_generic_fraction)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, parts = vae_loss(vae, x, cfg.vae_kl_weight, _generator(cfg.seed, 1, step))
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            self.vae_opt.step()
            self.vae_step += 1
            dt = time.perf_counter() - start
            self.elapsed["vae"] += dt
            self.cpu_seconds["vae"] += time.process_time() - cpu
            self.step_times["vae"].append(dt)
            running.append(parts)
            if self.vae_step % 50 == 0 or self.vae_step == cfg.vae_steps:
                avg = {k: sum(p[k] for p in running) / len(running) for k in running[0]}
                self.log(f"vae step {self.vae_step}/{cfg.vae_steps} l1 {avg['l1']:.4f} l2 {avg['l2']:.5f} "
                         f"kl {avg['kl']:.2f} | {dt:.2f} s/step, {time.perf_counter() - t0:.0f} s this sitting")
                running = []
            self._maybe_save()
        if self.latent_stats is None:
            x, _ = world_batch(cfg.seed + _STATS_DATA, 0, cfg.stats_images)
            vae.eval()
            self.latent_stats = normalise_latents(vae, x)
            self.log(f"latents normalised: raw mean {np.round(self.latent_stats['mean'], 3).tolist()}, "
                     f"raw std {np.round(self.latent_stats['std'], 3).tolist()}")
            _round_fp16_(vae)  # the UNet is trained on exactly the VAE that ships
            self.save()
        vae.eval().requires_grad_(False)

    def train_unet(self) -> None:
        cfg, unet = self.cfg, self.unet
        if self.unet_step >= cfg.unet_steps:
            return
        t = time.perf_counter()
        means, stds, captions = encode_dataset(self.vae, cfg)
        tokenizer = CLIPTokenizer()
        unique = sorted(set(captions))
        index = {c: i for i, c in enumerate(unique)}
        contexts = encode_captions(self.text, unique + [""], tokenizer)  # the last row is the empty prompt
        caption_ids = torch.tensor([index[c] for c in captions])
        self.log(f"encoded {len(captions)} scenes ({len(unique)} distinct captions) in {time.perf_counter() - t:.0f} s; "
                 f"scaled latent std {means.std().item():.3f}")
        schedule = DDPMSchedule()
        unet.train()
        t0, running = time.perf_counter(), []
        while self.unet_step < cfg.unet_steps:
            step = self.unet_step
            start, cpu = time.perf_counter(), time.process_time()
            for group in self.unet_opt.param_groups:
                group["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr, cfg.unet_warmup)
            g = _generator(cfg.seed, 2, step)
            idx = torch.randint(0, len(captions), (cfg.unet_batch,), generator=g)
            x0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)
            ctx_ids = caption_ids[idx].clone()
            ctx_ids[torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout] = len(unique)
            context = contexts[ctx_ids]
            noise = torch.randn(x0.shape, generator=g)
            noise = noise + cfg.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
            timesteps = torch.randint(0, schedule.num_timesteps, (cfg.unet_batch,), generator=g)
            x_t = schedule.add_noise(x0, noise, timesteps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                pred = unet(x_t, timesteps, context)
            per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
            # Min-SNR weighting (Hang et al., 2023): easy, low-noise steps stop dominating the gradient.
            snr = schedule.snr(timesteps)
            weight = snr.clamp(max=cfg.min_snr_gamma) / snr
            loss = (weight * per_sample).mean()
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            self.unet_opt.step()
            self._update_ema(step)
            self.unet_step += 1
            dt = time.perf_counter() - start
            self.elapsed["unet"] += dt
            self.cpu_seconds["unet"] += time.process_time() - cpu
            self.step_times["unet"].append(dt)
            running.append(per_sample.mean().item())
            if self.unet_step % 50 == 0 or self.unet_step == cfg.unet_steps:
                self.log(f"unet step {self.unet_step}/{cfg.unet_steps} mse {sum(running) / len(running):.4f} "
                         f"lr {self.unet_opt.param_groups[0]['lr']:.2e} | {dt:.2f} s/step, "
                         f"{time.perf_counter() - t0:.0f} s this sitting")
                running = []
            self._maybe_save()
        self.save()

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        # Warm-up of the decay, so the average is not dominated by the random initial weights.
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        for k, v in self.unet.state_dict().items():
            if v.is_floating_point():
                self.ema[k].lerp_(v, 1.0 - decay)
            else:
                self.ema[k].copy_(v)

    def ema_unet(self) -> UNetModel:
        unet = build_unet(self.cfg)
        unet.load_state_dict(self.ema)
        return unet.eval().requires_grad_(False)


def metadata(cfg: ToyConfig, command: str, trainer: Trainer) -> dict[str, str]:
    med = {k: float(np.median(v)) if v else None for k, v in trainer.step_times.items()}
    return {
        "modelspec.prediction_type": "epsilon",
        "sd.version": "sd1",
        "toy.command": command,
        "toy.seed": str(cfg.seed),
        "toy.config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
        "toy.world": json.dumps({"image_size": world.IMAGE_SIZE, "base_shapes": world.BASE_SHAPES,
                                 "base_colours": list(world.BASE_COLOURS), "held_out": world.CONCEPTS}),
        "toy.latent_stats": json.dumps(trainer.latent_stats),
        "toy.train_seconds": json.dumps({k: round(v, 1) for k, v in trainer.elapsed.items()}),
        "toy.train_cpu_seconds": json.dumps({k: v if v is None else round(v, 1) for k, v in trainer.cpu_seconds.items()}),
        "toy.median_step_seconds": json.dumps(med),
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ToyConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="toy/tiny_sd.safetensors", help="where to write the model")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--stage", choices=("all", "vae"), default="all",
                        help="'vae' stops after the VAE")
    defaults = ToyConfig()
    for f in dataclasses.fields(ToyConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(value))
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = ToyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ToyConfig)})
    return args, cfg


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = out.with_name(out.name + ".progress.pt")
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    log(f"config: {dataclasses.asdict(cfg)}")
    trainer = Trainer(cfg, progress, log)
    trainer.train_vae()
    if args.stage == "vae":
        log(f"VAE done; progress in {progress}")
        return None
    trainer.train_unet()
    command = "python -m toy.pretrain " + shlex.join(argv)
    sd = original_state_dict(trainer.ema_unet(), trainer.vae, trainer.text)
    write_state_dict(out, sd, metadata(cfg, command.strip(), trainer))
    log(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB); train time {trainer.elapsed}")
    return out


if __name__ == "__main__":
    main()
