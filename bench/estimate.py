"""Counting on the meta device (no memory, no time): model FLOPs per step and the memory a LoRA step needs.

    python bench/estimate.py --res 512            # FLOPs and the expected GPU memory, with and without checkpointing

FLOPs come from torch.utils.flop_counter on our SD1.5 UNet / VAE. Memory is weights + LoRA state (factors,
gradients, two AdamW moments, fp32) + activations, where the activations are the tensors autograd saves for
backward, counted once per storage. With gradient checkpointing each ResBlock and transformer block keeps only
its inputs, plus one block's activations while it is recomputed. SDPA is counted as a fused (flash) kernel, which saves
q, k, v, the output and a log-sum-exp instead of the attention matrix, as the CUDA and CPU kernels do.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastpaths  # noqa: E402
import lora  # noqa: E402
from unet import UNetConfig, UNetModel  # noqa: E402
from vae import AutoencoderKL, VAEConfig  # noqa: E402

GB = 2**30


def meta_unet(with_lora: bool, dtype: torch.dtype = torch.float32, rank: int = 4) -> UNetModel:
    """SD1.5's UNet on meta. The LoRA factors get `dtype` too: meta tensors know no autocast, and this way the
    activations they save are what autocast gives (the layer input itself, not a float32 copy of it)."""
    with torch.device("meta"):
        unet = fastpaths.apply(UNetModel(UNetConfig.sd1()).to(dtype))  # sd.load's layers, which keep less for backward
        if with_lora:
            lora.inject(unet, rank, rank, "attn", dtype=dtype)
    return unet


def unet_inputs(res: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = res // 8
    return (torch.empty(batch, 4, s, s, device="meta"), torch.zeros(batch, dtype=torch.long, device="meta"),
            torch.empty(batch, 77, 768, device="meta", dtype=dtype))


def train_flops(res: int, batch: int = 1) -> int:
    """Model FLOPs of one LoRA step: the forward, plus the backward to the inputs of every layer on the path to a
    LoRA factor (frozen weights get no gradient). Recomputation under checkpointing is not counted."""
    unet = meta_unet(True).train()
    with FlopCounterMode(display=False) as counter:
        unet(*unet_inputs(res, batch, torch.float32)).float().square().mean().backward()
    return counter.get_total_flops()


def forward_flops(res: int, batch: int) -> int:
    unet = meta_unet(False).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(*unet_inputs(res, batch, torch.float32))
    return counter.get_total_flops()


def vae_flops(res: int, batch: int, encode: bool) -> int:
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sd()).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if encode:
            vae.encode(torch.empty(batch, 3, res, res, device="meta"))
        else:
            vae.decode(torch.empty(batch, 4, res // 8, res // 8, device="meta"))
    return counter.get_total_flops()


@contextlib.contextmanager
def fused_sdpa():
    """Count attention as the fused CPU flash kernel (its meta version saves what a flash kernel saves)."""
    original = F.scaled_dot_product_attention

    def flash(q, k, v, *args, **kwargs):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activations(res: int, batch: int, dtype: torch.dtype) -> dict[str, float]:
    """Bytes autograd keeps for backward in a LoRA step, without and with gradient checkpointing.

    Checkpointing (unet.model) recomputes each ResBlock and transformer block: their saved tensors are replaced by
    their inputs, plus, during backward, the saved tensors of the one unit being recomputed."""
    from unet.model import BasicTransformerBlock, ResBlock

    unet = meta_unet(True, dtype).train()
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    units = [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    per_unit = [0] * len(units)
    seen: set[int] = set()
    unit_inputs: dict[int, int] = {}
    state = {"unit": None, "outside": 0, "largest": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            state["largest"] = max(state["largest"], nbytes)
            if state["unit"] is None:
                state["outside"] += nbytes
            else:
                per_unit[state["unit"]] += nbytes
        return t

    def enter(i):
        def hook(module, args):
            state["unit"] = i
            h = args[0]  # the tensor a checkpointed unit keeps instead of its activations
            unit_inputs[h.untyped_storage()._cdata] = h.untyped_storage().nbytes()
        return hook

    def leave(module, args, out):
        state["unit"] = None

    handles = [u.register_forward_pre_hook(enter(i)) for i, u in enumerate(units)]
    handles += [u.register_forward_hook(leave) for u in units]
    try:
        with fused_sdpa(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(*unet_inputs(res, batch, dtype))
    finally:
        for h in handles:
            h.remove()
    no_gc = state["outside"] + sum(per_unit)
    gc = state["outside"] + sum(unit_inputs.values()) + max(per_unit)
    # Transients during backward: a gradient and a temporary the size of the largest saved tensor, roughly.
    return {"no_gc": no_gc, "gc": gc, "transient": 2 * state["largest"], "output": out.numel() * 4}


def lora_state_bytes(rank: int = 4) -> int:
    """fp32 LoRA factors + their gradients + AdamW's two moments."""
    unet = meta_unet(True, torch.float32, rank=rank)
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return 4 * n * 4


def weight_bytes(dtype: torch.dtype) -> int:
    unet = meta_unet(False, dtype)
    return sum(p.numel() * p.element_size() for p in unet.parameters())


def expected_memory(res: int, batch: int, dtype: torch.dtype, gc: bool) -> dict[str, float]:
    """GiB per component for a LoRA step with only the UNet resident (latents and contexts pre-encoded)."""
    act = saved_activations(res, batch, dtype)
    parts = {"weights": weight_bytes(dtype), "lora+adam": lora_state_bytes(),
             "activations": act["gc" if gc else "no_gc"], "transient": act["transient"]}
    out = {k: v / GB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    print(f"SD1.5 UNet at {args.res} px, batch {args.batch}")
    print(f"  forward: {forward_flops(args.res, args.batch) / 1e9:.1f} GFLOP;"
          f" LoRA train step: {train_flops(args.res, args.batch) / 1e9:.1f} GFLOP")
    for name, dtype in (("fp32", torch.float32), ("bf16/fp16", torch.bfloat16)):
        for gc in (False, True):
            m = expected_memory(args.res, args.batch, dtype, gc)
            detail = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "total")
            print(f"  {name:9s} {'checkpointing' if gc else 'no checkpointing':16s}: {m['total']:.2f} GiB ({detail})")


if __name__ == "__main__":
    main()
