"""Shape hyper-parameters of the SD first-stage VAE (AutoencoderKL), and how to read them off a state dict."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class VAEConfig:
    """Mirrors the `ddconfig` + `embed_dim` of the original yaml (resolution, dropout and attn_resolutions are
    left out: SD uses no attention inside the levels, and neither value changes a weight)."""

    ch: int = 128                          # channels after conv_in; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2                # per encoder level; the decoder uses one more
    z_channels: int = 4                    # channels of the latent seen by the decoder
    embed_dim: int = 4                     # channels of the latent after quant_conv (what diffusion runs on)
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True                  # the encoder predicts mean and log-variance together
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.double_z:
            raise ValueError("AutoencoderKL needs double_z=True: its encoder predicts a mean and a log-variance")
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError(f"need at least one level and one res block, got ch_mult={self.ch_mult}, "
                             f"num_res_blocks={self.num_res_blocks}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if self.ch % self.norm_groups or bad:
            raise ValueError(f"channel counts {[self.ch, *bad]} are not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def sd(cls) -> VAEConfig:
        """The VAE shared by SD 1.x, SD 2.x (and SDXL, whose weights differ but whose shapes do not)."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Two levels, one block each: for tests."""
        return cls(ch=32, ch_mult=(1, 2), num_res_blocks=1)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> VAEConfig:
        """Infer the config from key names and shapes only (meta tensors are fine); keys must already have
        `first_stage_model.` stripped. Only the keys the sizes are read from are looked at: whether every key and
        shape fits the model is sd.load's one check (sd.check_fits)."""
        prefixed = sorted(k for k in sd if k.startswith("first_stage_model."))
        if prefixed:
            raise ValueError(f"strip the 'first_stage_model.' prefix first; e.g. {prefixed[:3]}")
        needed = ["encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight",
                  "decoder.conv_in.weight", "decoder.conv_out.weight"]
        missing = [k for k in needed if k not in sd]
        if missing:
            raise ValueError(f"not an AutoencoderKL state dict: missing {missing}; "
                             f"first keys given: {sorted(sd)[:5]}")

        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        if not levels or levels != list(range(len(levels))) or not blocks:
            raise ValueError(f"encoder.down.* keys are missing or not numbered 0..n-1 (levels found: {levels})")

        ch = sd["encoder.conv_in.weight"].shape[0]
        ch_mult = []
        for i in levels:
            key = f"encoder.down.{i}.block.0.conv1.weight"
            if key not in sd or sd[key].shape[0] % ch:
                raise ValueError(f"cannot read the width of level {i} from {key!r}")
            ch_mult.append(sd[key].shape[0] // ch)

        try:
            return cls(
                ch=ch,
                ch_mult=tuple(ch_mult),
                num_res_blocks=max(blocks) + 1,
                z_channels=sd["decoder.conv_in.weight"].shape[1],
                embed_dim=sd["quant_conv.weight"].shape[0] // 2,
                in_channels=sd["encoder.conv_in.weight"].shape[1],
                out_ch=sd["decoder.conv_out.weight"].shape[0],
            )
        except ValueError as e:
            raise ValueError(f"state dict does not describe a valid AutoencoderKL: {e}") from None

