"""SD2's text encoder: the OpenCLIP ViT-H/14 text tower, in plain PyTorch under the checkpoint's key names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._state import block_count, check_tokens, shape_of
from .tokenizer import PAD_ID_OPEN_CLIP

WHAT = "OpenCLIP text encoder"
PREFIX = "model."
BLOCKS = PREFIX + "transformer.resblocks."
LAYERS = ("last", "penultimate")
# Keys a file may carry that the text tower never reads, dropped by prepare_state_dict:
# - `model.visual.*`: the image tower of the full CLIP model. SD2 deletes it before saving, but image-conditioned
#   variants (e.g. Stable Zero123) keep it; it plays no part in turning prompts into context.
# - `model.attn_mask`: the causal mask as a constant; forward builds it (is_causal=True) instead.
IGNORED_PREFIXES = (PREFIX + "visual.",)
IGNORED_KEYS = (PREFIX + "attn_mask",)


def prepare_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's text-encoder tensors (`cond_stage_model.` already stripped) minus the keys listed above."""
    return {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS}


@dataclass
class OpenClipConfig:
    """Sizes of an OpenCLIP text tower; the defaults are ViT-H/14 (SD2).

    `embed_dim` is the width of `text_projection` and `logit_scale_shape` the shape of `logit_scale` (a scalar in
    open_clip). Neither takes part in SD's conditioning; they exist so the file loads strictly, and are None
    when a file (e.g. one converted back from diffusers) does not carry them.
    """

    vocab_size: int = 49408
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    context_length: int = 77
    embed_dim: int | None = 1024
    logit_scale_shape: tuple[int, ...] | None = ()

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.width, self.layers, self.heads, self.mlp_width, self.context_length) < 1:
            raise ValueError(f"{WHAT}: every size must be positive, got {asdict(self)}")
        if self.width % self.heads:
            raise ValueError(f"{WHAT}: width {self.width} is not divisible by heads {self.heads}")
        if self.logit_scale_shape is not None:
            self.logit_scale_shape = tuple(self.logit_scale_shape)

    @classmethod
    def tiny(cls) -> OpenClipConfig:
        """A test-sized model that still takes every id the real tokenizer produces."""
        return cls(width=128, layers=3, heads=2, mlp_width=512, embed_dim=96)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> OpenClipConfig:
        """Infer the sizes from tensor shapes alone (works on meta tensors)."""
        sd = prepare_state_dict(sd)
        vocab_size, width = shape_of(sd, PREFIX + "token_embedding.weight", 2, WHAT)
        context_length, pos_width = shape_of(sd, PREFIX + "positional_embedding", 2, WHAT)
        mlp_width, fc_width = shape_of(sd, BLOCKS + "0.mlp.c_fc.weight", 2, WHAT)
        (ln_width,) = shape_of(sd, PREFIX + "ln_final.weight", 1, WHAT)
        embed_dim = None
        if PREFIX + "text_projection" in sd:
            proj_width, embed_dim = shape_of(sd, PREFIX + "text_projection", 2, WHAT)
            if proj_width != width:
                raise ValueError(f"{WHAT}: text_projection is {proj_width} x {embed_dim}, expected {width} rows")
        if not width == pos_width == fc_width == ln_width:
            raise ValueError(
                f"{WHAT}: inconsistent widths: token embedding {width}, positional embedding {pos_width}, "
                f"c_fc input {fc_width}, ln_final {ln_width}"
            )
        layers = block_count(sd, BLOCKS, WHAT)
        logit_scale = sd.get(PREFIX + "logit_scale")
        logit_scale_shape = None if logit_scale is None else tuple(logit_scale.shape)
        # Head count is not stored in the weights; OpenCLIP text towers use 64 channels per head.
        heads = max(1, width // 64)
        return cls(vocab_size, width, layers, heads, mlp_width, context_length, embed_dim, logit_scale_shape)


class Attention(nn.Module):
    """Causal multi-head self-attention with nn.MultiheadAttention's parameter names (packed q, k, v)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # [B, T, W] -> [B, heads, T, W/heads]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact GELU: ViT-H does not use CLIP's quick_gelu


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: OpenClipConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(config.width, config.heads, config.mlp_width) for _ in range(config.layers)
        )


class TextTower(nn.Module):
    """The parameters of open_clip's CLIP text side, laid out as in the file under `model.`."""

    def __init__(self, config: OpenClipConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if config.embed_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
            nn.init.normal_(self.text_projection, std=config.width**-0.5)
        if config.logit_scale_shape is not None:
            self.logit_scale = nn.Parameter(torch.full(config.logit_scale_shape, 2.6593))  # log(1 / 0.07)


class OpenClipTextEncoder(nn.Module):
    """tokens [B, T<=77] -> context [B, T, width]: ln_final applied to one block's output.

    SD2 conditions on the penultimate block (`layer="penultimate"`, the default); the last block's weights
    are still in the file and in this module, they just don't run. `layer="last"` runs every block.
    A file converted back from diffusers holds one block fewer (diffusers drops the unused last one):
    for it, "last" is what SD2's "penultimate" was.
    """

    pad_id = PAD_ID_OPEN_CLIP

    def __init__(self, config: OpenClipConfig, layer: str = "penultimate") -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"{WHAT}: layer must be one of {LAYERS}, got {layer!r}")
        if layer == "penultimate" and config.layers < 2:
            raise ValueError(f"{WHAT}: layer='penultimate' needs at least 2 blocks, config has {config.layers}")
        self.config = config
        self.layer = layer
        self.model = TextTower(config)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], layer: str = "penultimate") -> OpenClipTextEncoder:
        """Build on meta and take the tensors as they are (dtype and device of the file's tensors); keys and shapes
        are checked by load_state_dict(strict=True) (sd.load checks a whole file first, with sd.check_fits)."""
        sd = prepare_state_dict(sd)
        with torch.device("meta"):
            model = cls(OpenClipConfig.from_state_dict(sd), layer=layer)
        model.load_state_dict(sd, strict=True, assign=True)
        return model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tower = self.model
        check_tokens(tokens, tower.token_embedding.num_embeddings, self.config.context_length, WHAT)
        x = tower.token_embedding(tokens) + tower.positional_embedding[: tokens.shape[1]]
        blocks = tower.transformer.resblocks
        for block in blocks[: len(blocks) - 1] if self.layer == "penultimate" else blocks:
            x = block(x)
        return tower.ln_final(x)
