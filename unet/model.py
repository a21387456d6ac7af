"""The latent-diffusion UNet (SD1.x / SD2.x / SDXL) whose module paths are the original checkpoint keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import cpu_attention, im2col, winograd
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


class _FrozenConv2d(torch.autograd.Function):
    """A conv whose weight gets no gradient (LoRA training): backward needs the weight only, not the input.

    Autograd's conv keeps its input for a weight gradient whether or not one is wanted; for the UNet's frozen
    convs that input (a full feature map per conv) is dead weight in memory. Same kernels, forward and backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # autocast, if on, applies here

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return grad_x.to(dtype), None, None, None, None, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same keys) with two shortcuts, both measured (bench/README.md):

    - On CPU, a conv over few pixels runs as one matrix product of its unfolded input (im2col). oneDNN re-lays out
      the whole weight at every call, forward and backward; when the weight dwarfs the activations (SD's
      1280-2560-channel convs at 8x8 and below) that costs more than the product, which a plain matmul reads in
      place. On a 2-core Zen 4 in bf16: 2.5-4x faster for 2560->1280 at 4x4-8x8, about 1.2x for 1280->1280 at
      8x8, slower from 16x16 up; hence the rule below. A 1x1 conv needs no unfolding, and as a matmul it is
      faster at every size measured (1.1-1.7x, forward and backward, 8x8 to 64x64), so it always takes this path.
      For 3x3 kernels the unfold and its backward fold are C++ where built (im2col.py), and backward reads the
      weight as it lies (gradᵀ·W). Other devices keep the library conv.
    - With a frozen weight, backward keeps the weight only (_FrozenConv2d), on every device.
    - On CPU in float32, frozen 3x3 convs over many pixels (SD's 320-640-channel convs at 32x32 and up) run by
      Winograd F(4x4, 3x3) (winograd.py): 1.5-2x faster than oneDNN's direct conv there, forward and backward,
      at about 10x the rounding error of a direct fp32 conv (still 1000x below bf16's).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (MATMUL_CONV and x.device.type == "cpu" and x.ndim == 4 and self._matmul_ok
                and (self.kernel_size[0] == 1 or x.shape[0] * x.shape[2] * x.shape[3] * 10 <= self.in_channels)):
            return self._matmul_forward(x)  # a frozen weight makes the matmul keep nothing but the weight
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if WINOGRAD_CONV and winograd.usable(x, self):
            return winograd.conv3x3(x, self.weight, self.bias)
        if FROZEN_CONV and frozen and torch.is_grad_enabled() and x.requires_grad \
                and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                       self.groups)
        return super().forward(x)

    def _matmul_forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        k = self.kernel_size[0]
        if k == 3 and IM2COL and im2col.usable(x):
            out = im2col.product3x3(x, self.weight, self.bias)                    # (out, n·h·w)
        else:
            weight = self.weight.flatten(1)
            cols = F.unfold(x, k, padding=self.padding[0]) if k > 1 else x.flatten(2)  # (n, c·k·k, h·w)
            # One product for the whole batch, so the weight is read once.
            cols = cols[0] if n == 1 else cols.transpose(0, 1).flatten(1)             # (c·k·k, n·h·w)
            out = weight @ cols if self.bias is None else torch.addmm(self.bias[:, None], weight, cols)
        return out.view(1, -1, h, w) if n == 1 else out.view(-1, n, h, w).transpose(0, 1).contiguous()

    @property
    def _matmul_ok(self) -> bool:
        """Square odd kernel, 'same' zero padding, stride 1: the cases the unfold above reproduces exactly."""
        k = self.kernel_size[0]
        return (self.kernel_size == (k, k) and k % 2 == 1 and self.padding == (k // 2, k // 2)
                and self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros")


# Set False to always use the library conv (for A/B timing and memory); POINTWISE_PROJ: SD1's transformer
# projections as per-token linear maps (SpatialTransformer.forward); CPU_ATTENTION: our attention kernel (bf16 and
# float32) where the CPU has AVX-512 BF16 (CrossAttention.forward); WINOGRAD_CONV: float32 3x3 convs by Winograd
# (Conv2d.forward); IM2COL: the C++ unfold and fold for 3x3 convs that run as one product (Conv2d._matmul_forward).
MATMUL_CONV = True
FROZEN_CONV = True
POINTWISE_PROJ = True
CPU_ATTENTION = True
WINOGRAD_CONV = True
IM2COL = True
# With gradient checkpointing, blocks whose input has fewer latent pixels than this keep their activations
# (UNetModel._run); 0 checkpoints every block.
CHECKPOINT_MIN_PIXELS = 256


def norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between, plus a skip path (1x1 conv if width changes)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            norm(out_channels), nn.SiLU(), nn.Dropout(dropout), Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else Conv2d(channels, out_channels, 1)
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
        # Default scale is dim_head ** -0.5, as in the original. On CPUs with AVX-512 BF16 our own kernel
        # (cpu_attention.cpp) does the same sum, in bf16 about twice as fast as PyTorch's for SD's head sizes.
        if CPU_ATTENTION and cpu_attention.usable(q, k, v):
            out = cpu_attention.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class _GatedGELU(torch.autograd.Function):
    """value * gelu(gate) for (value | gate) = the projection's output, keeping only that output for backward.

    Autograd would also keep gelu(gate), half as big again (4x the model width per token, in every transformer
    block: a tenth of all saved activations); backward recomputes it with one elementwise op instead.
    """

    @staticmethod
    def forward(ctx, projected: torch.Tensor) -> torch.Tensor:
        value, gate = projected.chunk(2, dim=-1)
        ctx.save_for_backward(projected)
        return value * F.gelu(gate)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projected,) = ctx.saved_tensors
        value, gate = projected.chunk(2, dim=-1)
        grad_value = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * value, gate)  # d gelu(gate) / d gate, times the incoming
        return torch.cat([grad_value, grad_gate], dim=-1)


class GEGLU(nn.Module):
    """Linear layer producing a value half and a gate half; returns value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.proj(x)
        if torch.is_grad_enabled() and projected.requires_grad:
            return _GatedGELU.apply(projected)
        value, gate = projected.chunk(2, dim=-1)
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
        self.proj_in = nn.Linear(channels, inner) if use_linear else Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        # SD1's 1x1 convs are linear maps over channels. As long as they are plain convs (no LoRA wrapper), apply
        # them as that, per token: the layout change then comes free with the product instead of costing a copy
        # of the feature map on each side (bench/README.md). A wrapped conv gets the feature map it expects.
        pointwise = (POINTWISE_PROJ and not self.use_linear
                     and isinstance(self.proj_in, nn.Conv2d) and isinstance(self.proj_out, nn.Conv2d))
        if not (self.use_linear or pointwise):
            h = self.proj_in(h)
        h = rearrange(h, "b c y x -> b (y x) c")
        if self.use_linear:
            h = self.proj_in(h)
        elif pointwise:
            # As one 2-D product: with a batch the token view is strided across samples, and a batched product
            # would copy the weight for each sample (measured slower); reshape copies the activations once instead.
            h = F.linear(h.reshape(-1, h.shape[-1]), self.proj_in.weight.flatten(1), self.proj_in.bias)
            h = h.view(x.shape[0], -1, h.shape[-1])
        for block in self.transformer_blocks:
            h = checkpoint(block, h, context, use_reentrant=False) if checkpointed else block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        elif pointwise:
            h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        h = rearrange(h, "b (y x) c -> b c y x", y=height, x=width)
        if not (self.use_linear or pointwise):
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

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
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
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

        self.out = nn.Sequential(norm(ch), nn.SiLU(), Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor,
             context: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Deep blocks over few pixels hold little activation memory but run weight-bound products (large weights,
        # few columns); recomputing them would cost time and save next to nothing, so they keep their activations.
        checkpointed = (self.gradient_checkpointing and self.training
                        and h.shape[-2] * h.shape[-1] >= CHECKPOINT_MIN_PIXELS)
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
