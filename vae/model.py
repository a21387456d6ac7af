"""AutoencoderKL, the Stable Diffusion first-stage VAE; module paths equal the original CompVis checkpoint keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import VAEConfig

# Latents are multiplied by this before diffusion so that they have roughly unit variance.
SD_SCALE = 0.18215     # SD 1.x and SD 2.x
SDXL_SCALE = 0.13025   # SDXL (same architecture, retrained weights)
_SCALES = {"sd1": SD_SCALE, "sd2": SD_SCALE, "sdxl": SDXL_SCALE}


def scale_factor(version: str) -> float:
    """Latent scale for a model family: 'sd1', 'sd2' or 'sdxl'."""
    try:
        return _SCALES[version.lower()]
    except KeyError:
        raise ValueError(f"unknown version {version!r}; expected one of {sorted(_SCALES)}") from None


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv steps plus a skip; the skip gets a 1x1 conv when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions; q/k/v/proj_out are 1x1 convs as in the checkpoint."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        height, width = h.shape[-2:]
        # Contiguous (h w) c: with channels strided, PyTorch's CPU attention falls back to its plain path, which holds
        # the whole (h w)^2 score matrix (16 GiB for a 256x256 latent); the fused one streams it in blocks.
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c").contiguous() for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(c), as in the original
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # The original pads one zero row/column on the bottom/right only, so windows start at pixel (0, 0).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: `block` (a list of ResnetBlocks) and optionally `downsample` / `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None = None, resample_name: str = ""):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(resample_name, resample)


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        w_in = cfg.ch
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(w_in if j == 0 else w, w, g) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(w), "downsample"))
            w_in = w
        self.mid = Mid(w_in, g)
        self.norm_out = _norm(w_in, g)
        self.conv_out = nn.Conv2d(w_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        w_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, w_in, 3, padding=1)
        self.mid = Mid(w_in, g)
        # Built from the lowest resolution up, but stored so that up[0] is the full-resolution level,
        # matching the checkpoint numbering (and the encoder's down[i]).
        levels = []
        for i in reversed(range(len(widths))):
            w = widths[i]
            blocks = [ResnetBlock(w_in if j == 0 else w, w, g) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, Upsample(w) if i > 0 else None, "upsample"))
            w_in = w
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(w_in, g)
        self.conv_out = nn.Conv2d(w_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x): a Gaussian per latent element, from moments stacked [mean, logvar] on dim 1."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as in the original: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        # Draw on the generator's device so a CPU generator gives the same latents whatever the model's device.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """Image <-> latent. encode/decode never apply the latent scale; encode_latents/decode_latents do."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: Tensor, slice_size: int | None = None) -> DiagonalGaussian:
        """x: images in [-1, 1], (B, in_channels, H, W). slice_size bounds how many images go through at once."""
        chunks = x.split(slice_size) if slice_size else (x,)
        return DiagonalGaussian(torch.cat([self.quant_conv(self.encoder(c)) for c in chunks]))

    def decode(self, z: Tensor, slice_size: int | None = None) -> Tensor:
        """z: unscaled latents (B, embed_dim, h, w) -> images in about [-1, 1]. slice_size as in encode."""
        chunks = z.split(slice_size) if slice_size else (z,)
        return torch.cat([self.decoder(self.post_quant_conv(c)) for c in chunks])

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None, scale: float = SD_SCALE,
                       slice_size: int | None = None) -> Tensor:
        """Sampled latents multiplied by `scale` (use scale_factor(version)): what the UNet is trained on."""
        return self.encode(x, slice_size).sample(generator) * scale

    def decode_latents(self, z: Tensor, scale: float = SD_SCALE, slice_size: int | None = None) -> Tensor:
        return self.decode(z / scale, slice_size)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction through a sampled latent."""
        return self.decode(self.encode(x).sample(generator))
