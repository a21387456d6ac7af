"""The latent-diffusion UNet (SD1.x / SD2.x / SDXL) whose module paths are the original checkpoint keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, laid out as [cos | sin], in float32."""
    half = dim // 2
    # Computed here rather than stored as a buffer: the checkpoint has no such tensor.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics, so half-precision activations keep accurate means and variances."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.dtype != x.dtype:  # e.g. float32 weights under autocast
            w, b = self.weight.float(), self.bias.float()
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        # PyTorch's CPU and CUDA kernels accumulate half/bfloat16 statistics in float32 already, so upcasting x
        # first, as the original does, would only add two casts and a float32 copy kept for backward.
        # (CUDA autocast runs group_norm in float32 whatever we do; .to() brings its output back, as before.)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between, plus a skip path (1x1 conv if width changes)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            norm(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when context is None)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        return self.to_out(rearrange(self.attend(q, k, v), "b h n d -> b n (h d)"))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ / sqrt(dim_head))·v for each head: the default scale, as in the original."""
        return F.scaled_dot_product_attention(q, k, v)


class GEGLU(nn.Module):
    """Linear layer producing a value half and a gate half; returns value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, then a GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a feature map, as a residual branch."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = norm(channels, eps=1e-6)
        # SD1 projects with 1x1 convs before flattening; SD2/SDXL with Linear layers after flattening.
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        h = h if self.use_linear else self.proj_in(h)  # SD1: a 1x1 conv on the feature map
        h = rearrange(h, "b c y x -> b (y x) c")
        h = self.proj_in(h) if self.use_linear else h  # SD2/SDXL: a linear map on the tokens
        for block in self.transformer_blocks:
            h = checkpoint(block, h, context, use_reentrant=False) if checkpointed else block(h, context)
        h = self.proj_out(h) if self.use_linear else h
        h = rearrange(h, "b (y x) c -> b c y x", y=height, x=width)
        return x + (h if self.use_linear else self.proj_out(h))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size` is the next skip's: for latents that are not a multiple of 8 the downsampled side was
        # rounded up, so doubling would overshoot by one. With sizes that divide evenly it is exactly 2x.
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the context to SpatialTransformers.

    checkpointed: each ResBlock and each transformer block recomputes its activations in backward instead of
    keeping them. The thin layers between them (the transformers' norm and 1x1 projections, the resamplers)
    keep theirs: recomputing them would cost a conv each for little memory.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None, checkpointed: bool = False) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = checkpoint(layer, x, emb, use_reentrant=False) if checkpointed else layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, checkpointed)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Predicts noise (or v) for latents `x` at `timesteps`, conditioned on text `context` (and SDXL's `y`)."""

    gradient_checkpointing: bool = False
    # With gradient checkpointing, blocks whose input has fewer latent pixels than this keep their activations
    # (_run); 0 checkpoints every block.
    checkpoint_min_pixels: int = 256

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, ted = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, cfg.dropout)

        # Encoder: remember each block's output width, since the decoder concatenates them back in.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch = [mc], mc
        for level, out_ch in enumerate(cfg.level_channels):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, ted, out_ch, cfg.dropout)]
                ch = out_ch
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        middle = [ResBlock(ch, ted, ch, cfg.dropout)]
        if cfg.transformer_depth_middle > 0:
            middle.append(transformer(ch, cfg.transformer_depth_middle))
        self.middle_block = TimestepEmbedSequential(*middle, ResBlock(ch, ted, ch, cfg.dropout))

        # Decoder: one more block per level than the encoder, each eating one skip tensor.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            out_ch = cfg.level_channels[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), ted, out_ch, cfg.dropout)]
                ch = out_ch
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor,
             context: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Deep blocks over few pixels hold little activation memory but run weight-bound products (large weights,
        # few columns); recomputing them would cost time and save next to nothing, so they keep their activations.
        checkpointed = (self.gradient_checkpointing and self.training
                        and h.shape[-2] * h.shape[-1] >= self.checkpoint_min_pixels)
        return block(h, emb, context, size, checkpointed=checkpointed)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) latents; timesteps: (B,) or scalar; context: (B, tokens, context_dim); y: (B, adm)."""
        if (y is not None) != hasattr(self, "label_emb"):
            raise ValueError(f"y must be given exactly when adm_in_channels is set ({self.cfg.adm_in_channels})")
        dtype = self.time_embed[0].weight.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))

        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h).to(x.dtype)
