"""SD1's text encoder: OpenAI CLIP ViT-L/14's text tower (transformers' CLIPTextModel) under the file's key names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._state import block_count, check_tokens, shape_of
from .tokenizer import END_ID, PAD_ID_CLIP_L, START_ID

WHAT = "CLIP-L text encoder"
PREFIX = "transformer.text_model."
# Some SD1 files were written from a CLIPTextModel without the `text_model` level (transformers 5 has none),
# so they store `transformer.embeddings...`; both layouts load.
_OLD_PREFIX = "transformer."
# A constant arange that old transformers saved with the weights; rebuilt by materialize_buffers instead.
POSITION_IDS_KEY = PREFIX + "embeddings.position_ids"
LAYERS = ("last", "penultimate")


def prepare_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring a file's text-encoder tensors (`cond_stage_model.` already stripped) to this module's keys:
    add the `text_model.` level old files lack and drop the saved `position_ids`. Other keys pass through
    unchanged, so a wrong file still fails loudly later."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        if key.startswith(_OLD_PREFIX) and not key.startswith(PREFIX):
            new = PREFIX + key[len(_OLD_PREFIX) :]
        if new == POSITION_IDS_KEY:
            continue
        if new in out:
            raise ValueError(f"{WHAT}: {key!r} and another key both map to {new!r} (file mixes old and new layouts)")
        out[new] = value
    return out


@dataclass
class ClipLConfig:
    """Sizes of a CLIP text transformer; the defaults are CLIP ViT-L/14 (SD1)."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    context_length: int = 77

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.width, self.layers, self.heads, self.mlp_width, self.context_length) < 1:
            raise ValueError(f"{WHAT}: every size must be positive, got {asdict(self)}")
        if self.width % self.heads:
            raise ValueError(f"{WHAT}: width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def tiny(cls) -> ClipLConfig:
        """A test-sized model that still takes every id the real tokenizer produces."""
        return cls(width=128, layers=2, heads=2, mlp_width=256)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> ClipLConfig:
        """Infer the sizes from tensor shapes alone (works on meta tensors), in either key layout."""
        sd = prepare_state_dict(sd)
        vocab_size, width = shape_of(sd, PREFIX + "embeddings.token_embedding.weight", 2, WHAT)
        context_length, pos_width = shape_of(sd, PREFIX + "embeddings.position_embedding.weight", 2, WHAT)
        mlp_width, fc1_width = shape_of(sd, PREFIX + "encoder.layers.0.mlp.fc1.weight", 2, WHAT)
        (ln_width,) = shape_of(sd, PREFIX + "final_layer_norm.weight", 1, WHAT)
        if not width == pos_width == fc1_width == ln_width:
            raise ValueError(
                f"{WHAT}: inconsistent widths: token embedding {width}, position embedding {pos_width}, "
                f"fc1 input {fc1_width}, final layer norm {ln_width}"
            )
        layers = block_count(sd, PREFIX + "encoder.layers.", WHAT)
        # Head count is not stored in the weights; every CLIP text tower uses 64 channels per head.
        heads = max(1, width // 64)
        return cls(vocab_size, width, layers, heads, mlp_width, context_length)

    def to_transformers(self) -> "CLIPTextConfig":  # noqa: F821
        from transformers import CLIPTextConfig  # imported here: transformers takes seconds to import

        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.width,
            intermediate_size=self.mlp_width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.context_length,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=START_ID,
            eos_token_id=END_ID,
            pad_token_id=PAD_ID_CLIP_L,
        )


class ClipLTextEncoder(nn.Module):
    """tokens [B, T<=77] -> context [B, T, width]: CLIP hidden states after the final layer norm.

    `layer="penultimate"` feeds the second-to-last block's output to the final layer norm instead
    ("clip skip 2", used by some SD1 fine-tunes); SD1 itself uses "last".
    """

    pad_id = PAD_ID_CLIP_L

    def __init__(self, config: ClipLConfig, layer: str = "last") -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"{WHAT}: layer must be one of {LAYERS}, got {layer!r}")
        if layer == "penultimate" and config.layers < 2:
            raise ValueError(f"{WHAT}: layer='penultimate' needs at least 2 blocks, config has {config.layers}")
        self.config = config
        self.layer = layer
        from transformers import CLIPTextModel

        model = CLIPTextModel(config.to_transformers())
        if hasattr(model, "text_model"):  # transformers 4.x already nests the layers under `text_model`
            self.transformer = model
        else:  # transformers 5 dropped that level; a plain holder module puts it back into the key names
            self.transformer = nn.Module()
            self.transformer.text_model = model

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], layer: str = "last") -> ClipLTextEncoder:
        """Build on meta and take the tensors as they are (dtype and device of the file's tensors); keys and shapes
        are checked by load_state_dict(strict=True) (sd.load checks a whole file first, with sd.check_fits)."""
        sd = prepare_state_dict(sd)
        with torch.device("meta"):
            model = cls(ClipLConfig.from_state_dict(sd), layer=layer)
        model.load_state_dict(sd, strict=True, assign=True)
        model.materialize_buffers()
        return model

    def materialize_buffers(self, device: torch.device | str | None = None) -> None:
        """Re-create the non-persistent `position_ids` buffer, which a meta-built model still holds on meta
        after load_state_dict(assign=True). Defaults to the device of the weights."""
        embeddings = self.transformer.text_model.embeddings
        if device is None:
            device = embeddings.token_embedding.weight.device
        embeddings.position_ids = torch.arange(self.config.context_length, device=device).unsqueeze(0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        text_model = self.transformer.text_model
        # The table's own size: with new tokens (text.new_tokens) it takes ids past the vocabulary
        check_tokens(tokens, text_model.embeddings.token_embedding.num_embeddings, self.config.context_length, WHAT)
        # Explicit positions, so the forward never depends on the buffer having been materialized.
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        penultimate = self.layer == "penultimate"
        out = text_model(input_ids=tokens, position_ids=positions, output_hidden_states=penultimate)
        if penultimate:
            return text_model.final_layer_norm(out.hidden_states[-2])
        return out.last_hidden_state
