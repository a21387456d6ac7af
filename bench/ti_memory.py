"""What textual inversion adds to a training step's memory: the text encoder runs in the loop, and autograd keeps its
activations for the new rows' gradient. Counted exactly with saved-tensor hooks (weights excluded: they are resident
anyway), for the built-in toy's text encoder and for SD1.5's CLIP-L (real shapes, random weights; nothing downloaded).

    python bench/ti_memory.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sd  # noqa: E402
from text import ClipLConfig, ClipLTextEncoder, CLIPTokenizer, new_tokens  # noqa: E402


def saved_activation_bytes(encoder, tokenizer: CLIPTokenizer, batch: int) -> int:
    """Bytes autograd keeps between forward and backward for one batch of prompts holding the new token."""
    weights = {p.data_ptr() for p in encoder.parameters()}
    seen: set = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.data_ptr(), tuple(t.shape))
        if t.data_ptr() not in weights and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    ids = tokenizer(["a photo of <tok> on a table"] * batch, pad_id=encoder.pad_id)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = encoder(ids)
    out.float().sum().backward()
    return total


def main() -> None:
    toy = Path(__file__).resolve().parent.parent / "toy" / "tiny_sd.safetensors"
    for name, make in (("toy text encoder", lambda: sd.load(toy).text_encoder),
                       ("SD1.5 CLIP-L", lambda: ClipLTextEncoder(ClipLConfig()))):
        for dtype in (torch.float32, torch.bfloat16):
            encoder = make().requires_grad_(False).to(dtype)
            tokenizer = CLIPTokenizer()
            new_tokens.add_token(encoder, tokenizer, "<tok>", new_tokens.initial_vectors(encoder, tokenizer, 1, "dog"))
            new_tokens.new_vectors(encoder)["clip_l"].requires_grad_(True)
            params = sum(p.numel() * p.element_size() for n, p in encoder.named_parameters() if "new_vectors" not in n)
            per = {b: saved_activation_bytes(encoder, tokenizer, b) / 2**20 for b in (1, 8)}
            print(f"{name:18} {str(dtype).removeprefix('torch.'):9} weights {params / 2**20:7.1f} MiB   saved "
                  f"activations {per[1]:6.2f} MiB per image, {per[8]:7.2f} MiB at batch 8")


if __name__ == "__main__":
    main()
