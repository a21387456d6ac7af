"""Shape hyper-parameters of the latent-diffusion UNet, its SD1/SD2 presets, and their inference from a state dict."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # One entry per resolution level; depth is 0 exactly where the level has no attention.
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    # 0 means the middle block is two ResBlocks with no transformer between them.
    transformer_depth_middle: int = 1
    context_dim: int = 768
    # Set exactly one: a fixed head count (SD1) or a fixed channels-per-head (SD2, SDXL).
    num_heads: int | None = 8
    head_dim: int | None = None
    use_linear_in_transformer: bool = False
    # SDXL's extra conditioning vector (pooled text + size embeddings) feeds `label_emb`.
    adm_in_channels: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML) but store tuples so configs compare and hash by value.
        levels = len(self.channel_mult)
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        object.__setattr__(self, "transformer_depth", tuple(int(d) for d in self.transformer_depth))
        if len(self.attention_levels) != levels or len(self.transformer_depth) != levels:
            raise ValueError(
                f"channel_mult has {levels} levels but attention_levels has {len(self.attention_levels)} "
                f"and transformer_depth has {len(self.transformer_depth)} entries"
            )
        # Keep one canonical form so a preset equals the config inferred from its own weights.
        depth = tuple(d if a else 0 for a, d in zip(self.attention_levels, self.transformer_depth))
        object.__setattr__(self, "transformer_depth", depth)
        bad = [i for i, (a, d) in enumerate(zip(self.attention_levels, depth)) if a and d < 1]
        if bad:
            raise ValueError(f"levels {bad} have attention but transformer_depth < 1")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"set exactly one of num_heads / head_dim, got {self.num_heads} / {self.head_dim}")
        odd = [c for c in self.level_channels if c % 32]
        if odd:
            raise ValueError(f"GroupNorm(32) needs channel counts divisible by 32, got {odd}")

    @property
    def level_channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) for a transformer of `channels` width."""
        n = self.num_heads if self.num_heads is not None else max(1, channels // self.head_dim)
        if channels % n:
            raise ValueError(f"{channels} channels do not split into {n} heads")
        return n, channels // n

    @classmethod
    def sd1(cls) -> UNetConfig:
        return cls()

    @classmethod
    def sd2(cls) -> UNetConfig:
        return cls(context_dim=1024, num_heads=None, head_dim=64, use_linear_in_transformer=True)

    @classmethod
    def sdxl(cls) -> UNetConfig:
        return cls(channel_mult=(1, 2, 4), attention_levels=(False, True, True), transformer_depth=(0, 2, 10),
                   transformer_depth_middle=10, context_dim=2048, num_heads=None, head_dim=64,
                   use_linear_in_transformer=True, adm_in_channels=2816)

    @classmethod
    def tiny_sd1(cls) -> UNetConfig:
        return cls(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, True),
                   transformer_depth=(1, 1), context_dim=32)

    @classmethod
    def tiny_sd2(cls) -> UNetConfig:
        return cls(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, True),
                   transformer_depth=(1, 1), context_dim=32, num_heads=None, head_dim=64,
                   use_linear_in_transformer=True)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> UNetConfig:
        """Infer the config from key names and shapes only (meta tensors are fine); keys carry no prefix."""
        required = ["input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight", "middle_block.0.in_layers.2.weight"]
        missing = [k for k in required if k not in sd]
        if missing:
            sample = sorted(sd)[:5]
            hint = " (strip the 'model.diffusion_model.' prefix first)" if any(
                k.startswith("model.diffusion_model.") for k in sd) else ""
            raise ValueError(f"not an LDM UNet state dict{hint}: missing {missing}; first keys are {sample}")

        def index_set(prefix: str) -> list[int]:
            pat = re.compile(re.escape(prefix) + r"(\d+)\.")
            return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})

        def depth(prefix: str) -> int:
            return len(index_set(prefix + "transformer_blocks."))

        mc = sd["input_blocks.0.0.weight"].shape[0]
        blocks = index_set("input_blocks.")
        if blocks != list(range(len(blocks))):
            raise ValueError(f"input_blocks indices are not contiguous: {blocks[:12]}")
        downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
        # Split block indices 1.. into levels at each downsampler.
        levels, start = [], 1
        for d in downs + [len(blocks)]:
            levels.append(list(range(start, d)))
            start = d + 1
        counts = {len(lv) for lv in levels}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"uneven res blocks per level: {[len(lv) for lv in levels]}")

        mult, attn, tdepth, context_dim, linear = [], [], [], None, None
        for lv in levels:
            out_ch = sd[f"input_blocks.{lv[0]}.0.in_layers.2.weight"].shape[0]
            if out_ch % mc:
                raise ValueError(f"input_blocks.{lv[0]}.0 has {out_ch} channels, not a multiple of {mc}")
            mult.append(out_ch // mc)
            has = [f"input_blocks.{i}.1.proj_in.weight" in sd for i in lv]
            if len(set(has)) != 1:
                raise ValueError(f"attention present on only some blocks of level {len(mult) - 1}: blocks {lv}")
            depths = {depth(f"input_blocks.{i}.1.") for i in lv}
            if len(depths) != 1:
                raise ValueError(f"transformer depth differs within level {len(mult) - 1}: {sorted(depths)}")
            attn.append(has[0])
            tdepth.append(depths.pop())
            if has[0] and context_dim is None:
                context_dim = sd[f"input_blocks.{lv[0]}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
                linear = sd[f"input_blocks.{lv[0]}.1.proj_in.weight"].ndim == 2

        mid_depth = depth("middle_block.1.") if "middle_block.1.proj_in.weight" in sd else 0
        if mid_depth and context_dim is None:
            context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
            linear = sd["middle_block.1.proj_in.weight"].ndim == 2
        if context_dim is None:
            raise ValueError("no SpatialTransformer found (no '*.proj_in.weight' key); cannot infer context_dim")
        adm = sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None
        return cls(
            in_channels=sd["input_blocks.0.0.weight"].shape[1],
            out_channels=sd["out.2.weight"].shape[0],
            model_channels=mc,
            channel_mult=tuple(mult),
            num_res_blocks=counts.pop(),
            attention_levels=tuple(attn),
            transformer_depth=tuple(tdepth),
            transformer_depth_middle=mid_depth,
            context_dim=context_dim,
            # Family rule: conv projections mean SD1 (8 heads); linear ones mean SD2/SDXL (64 channels a head).
            num_heads=None if linear else 8,
            head_dim=64 if linear else None,
            use_linear_in_transformer=linear,
            adm_in_channels=adm,
        )

