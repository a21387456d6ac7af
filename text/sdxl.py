"""SDXL's conditioning: two text towers (CLIP ViT-L + OpenCLIP ViT-bigG) giving context and pooled text, plus size embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import clip_l, open_clip
from ._state import check_tokens
from .clip_l import ClipLConfig, ClipLTextEncoder
from .open_clip import OpenClipConfig, OpenClipTextEncoder
from .tokenizer import END_ID, CLIPTokenizer

WHAT = "SDXL text encoders"
# Under the file's `conditioner.` prefix: embedder 0 is CLIP-L (transformers names), embedder 1 OpenCLIP bigG.
CLIP_L_PREFIX = "embedders.0."
OPEN_CLIP_PREFIX = "embedders.1."
# Each of the six size numbers is embedded with 256 sinusoidal channels (sgm's ConcatTimestepEmbedderND(256)).
SIZE_EMBED_DIM = 256
SIZE_FIELDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


def prepare_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's `conditioner.*` tensors (prefix stripped) with each tower's own clean-up applied
    (CLIP-L's saved position_ids, OpenCLIP's attn_mask); keys of neither tower pass through, to fail loudly later."""
    first = {k[len(CLIP_L_PREFIX):]: v for k, v in sd.items() if k.startswith(CLIP_L_PREFIX)}
    second = {k[len(OPEN_CLIP_PREFIX):]: v for k, v in sd.items() if k.startswith(OPEN_CLIP_PREFIX)}
    out = {CLIP_L_PREFIX + k: v for k, v in clip_l.prepare_state_dict(first).items()}
    out.update({OPEN_CLIP_PREFIX + k: v for k, v in open_clip.prepare_state_dict(second).items()})
    out.update({k: v for k, v in sd.items() if not k.startswith((CLIP_L_PREFIX, OPEN_CLIP_PREFIX))})
    return out


@dataclass
class SDXLTextConfig:
    """Sizes of both towers. SDXL base: CLIP ViT-L/14 (768) and OpenCLIP ViT-bigG/14 (1280, 32 blocks, 20 heads,
    a 1280 x 1280 text_projection)."""

    clip_l: ClipLConfig
    open_clip: OpenClipConfig

    def __post_init__(self) -> None:
        if self.open_clip.embed_dim is None:
            raise ValueError(f"{WHAT}: the OpenCLIP tower needs its text_projection (the pooled vector goes through it)")
        for name, cfg in (("CLIP-L", self.clip_l), ("OpenCLIP", self.open_clip)):
            if cfg.layers < 2:
                raise ValueError(f"{WHAT}: the {name} tower needs at least 2 blocks (SDXL reads the penultimate one)")

    @property
    def width(self) -> int:
        """Context width: both towers' hidden states side by side (768 + 1280 = 2048)."""
        return self.clip_l.width + self.open_clip.width

    @property
    def pooled_dim(self) -> int:
        return self.open_clip.embed_dim

    @property
    def adm_in_channels(self) -> int:
        """Width of the UNet's y: the pooled text and six size embeddings (1280 + 6 * 256 = 2816)."""
        return self.pooled_dim + SIZE_FIELDS * SIZE_EMBED_DIM

    @classmethod
    def sdxl(cls) -> SDXLTextConfig:
        return cls(ClipLConfig(), OpenClipConfig(width=1280, layers=32, heads=20, mlp_width=5120, embed_dim=1280))

    @classmethod
    def tiny(cls) -> SDXLTextConfig:
        return cls(ClipLConfig.tiny(), OpenClipConfig.tiny())

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> SDXLTextConfig:
        """Infer both towers' sizes from shapes alone (meta tensors are fine); keys without `conditioner.`."""
        sd = prepare_state_dict(sd)
        first = {k[len(CLIP_L_PREFIX):]: v for k, v in sd.items() if k.startswith(CLIP_L_PREFIX)}
        second = {k[len(OPEN_CLIP_PREFIX):]: v for k, v in sd.items() if k.startswith(OPEN_CLIP_PREFIX)}
        if not first or not second:
            raise ValueError(f"{WHAT}: expected keys under {CLIP_L_PREFIX!r} (CLIP-L) and {OPEN_CLIP_PREFIX!r} "
                             f"(OpenCLIP); found {len(first)} and {len(second)}")
        return cls(ClipLConfig.from_state_dict(first), OpenClipConfig.from_state_dict(second))


class SDXLTextEncoder(nn.Module):
    """(CLIP-L tokens, OpenCLIP tokens) -> (context [B, T, 768 + 1280], pooled [B, 1280]), as sgm's conditioner.

    Context: each tower's penultimate hidden state WITHOUT its final layer norm (CLIP-L's hidden state 11 of 12,
    bigG's output of block 31 of 32), concatenated on the channel axis. Pooled: bigG's last block, then ln_final,
    read at the end token and multiplied by text_projection. CLIP-L's last block and final norm are in the file
    (and here) but take no part.
    """

    # CLIP-L pads with the end token (transformers' tokenizer), OpenCLIP with 0 (open_clip.tokenize).
    pad_ids = (ClipLTextEncoder.pad_id, OpenClipTextEncoder.pad_id)

    def __init__(self, config: SDXLTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embedders = nn.ModuleList([ClipLTextEncoder(config.clip_l, layer="penultimate"),
                                        OpenClipTextEncoder(config.open_clip, layer="penultimate")])

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> SDXLTextEncoder:
        """Build on meta and take the tensors as they are (keys without the `conditioner.` prefix); keys and shapes
        are checked by load_state_dict(strict=True) (sd.load checks a whole file first, with sd.check_fits)."""
        sd = prepare_state_dict(sd)
        with torch.device("meta"):
            model = cls(SDXLTextConfig.from_state_dict(sd))
        model.load_state_dict(sd, strict=True, assign=True)
        model.materialize_buffers()
        return model

    def materialize_buffers(self, device: torch.device | str | None = None) -> None:
        self.embedders[0].materialize_buffers(device)

    def tokenize(self, tokenizer: CLIPTokenizer, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids for each tower [B, 77]: the same ids, padded differently."""
        return tokenizer(prompts, pad_id=self.pad_ids[0]), tokenizer(prompts, pad_id=self.pad_ids[1])

    def clip_l_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP-L's penultimate hidden state, before the final layer norm."""
        te = self.embedders[0]
        check_tokens(tokens, te.transformer.text_model.embeddings.token_embedding.num_embeddings, te.config.context_length,
                     "CLIP-L text encoder")
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        out = te.transformer.text_model(input_ids=tokens, position_ids=positions, output_hidden_states=True)
        return out.hidden_states[-2]

    def open_clip_hidden_and_pooled(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bigG's penultimate hidden state (no ln_final) and its pooled, projected end-token vector."""
        te = self.embedders[1]
        check_tokens(tokens, te.model.token_embedding.num_embeddings, te.config.context_length, "OpenCLIP text encoder")
        tower = te.model
        x = tower.token_embedding(tokens) + tower.positional_embedding[: tokens.shape[1]]
        *blocks, last = tower.transformer.resblocks
        for block in blocks:
            x = block(x)
        hidden = x
        x = tower.ln_final(last(x))
        # The end token's position: its id (49407) is the largest, so sgm takes argmax of the ids; so do we,
        # but on "is the end token", which also holds when a caller pads with the end token.
        end = (tokens == END_ID).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), end] @ tower.text_projection
        return hidden, pooled

    def forward(self, tokens_l: torch.Tensor, tokens_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_l = self.clip_l_hidden(tokens_l)
        hidden_g, pooled = self.open_clip_hidden_and_pooled(tokens_g)
        return torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1), pooled

    def encode(self, tokenizer: CLIPTokenizer, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) for prompts. Gradients flow as usual; wrap in torch.no_grad() when frozen."""
        device = next(self.parameters()).device
        tokens_l, tokens_g = self.tokenize(tokenizer, prompts)
        return self(tokens_l.to(device), tokens_g.to(device))


Size = tuple[int, int] | Sequence[int] | torch.Tensor


def _as_pairs(value: Size, batch: int, name: str, device: torch.device) -> torch.Tensor:
    """A (a, b) pair for every image, or one [B, 2] tensor (per image, e.g. from aspect-ratio buckets) -> [B, 2]."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.shape == (2,):
        t = t.expand(batch, 2)
    if t.shape != (batch, 2):
        raise ValueError(f"{name} must be a (first, second) pair or a [{batch}, 2] tensor, got shape {tuple(t.shape)}")
    return t


def size_embedding(original_size: Size, crop_top_left: Size, target_size: Size, batch: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """SDXL's micro-conditioning [B, 6 * 256]: the sinusoidal embedding (the UNet's timestep embedding, cos | sin)
    of original height, original width, crop top, crop left, target height, target width, in that order
    (sgm's original_size_as_tuple, crop_coords_top_left, target_size_as_tuple; diffusers' add_time_ids)."""
    from unet.model import timestep_embedding  # the same embedding the UNet gives its timesteps

    device = torch.device(device)
    numbers = torch.cat([_as_pairs(original_size, batch, "original_size", device),
                         _as_pairs(crop_top_left, batch, "crop_top_left", device),
                         _as_pairs(target_size, batch, "target_size", device)], dim=1)  # [B, 6]
    return timestep_embedding(numbers.flatten(), SIZE_EMBED_DIM).view(batch, SIZE_FIELDS * SIZE_EMBED_DIM)


def vector_conditioning(pooled: torch.Tensor, original_size: Size, crop_top_left: Size = (0, 0),
                        target_size: Size | None = None) -> torch.Tensor:
    """The UNet's y [B, pooled + 1536]: pooled text, then the size embeddings (sgm's order of embedders).

    Sizes are in pixels, (height, width) and (top, left). target_size defaults to original_size: at sampling time
    both are the image size and the crop is (0, 0), which asks for a centred, uncropped picture.
    """
    if pooled.ndim != 2:
        raise ValueError(f"pooled must be [B, D], got shape {tuple(pooled.shape)}")
    sizes = size_embedding(original_size, crop_top_left, original_size if target_size is None else target_size,
                           pooled.shape[0], pooled.device)
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=1)
