"""Write a full-size SD1.5-layout checkpoint with random weights, so the benchmark needs no download.

    python bench/make_checkpoint.py                  # -> ~/.cache/sd-lora-bench/sd15_random_fp16.safetensors
    python bench/make_checkpoint.py --dtype fp32 --out /tmp/sd15.safetensors

The weights are PyTorch's default inits under a fixed seed; only shapes and speed matter here, not images.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sd.checkpoint import write_state_dict  # noqa: E402
from sd.model import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def default_path(dtype: str = "fp16") -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-lora-bench"
    return root / f"sd15_random_{dtype}.safetensors"


def make_checkpoint(path: Path, dtype: str = "fp16", seed: int = 0) -> Path:
    """Build UNet, VAE and CLIP-L one at a time (to bound memory), and write them with their original prefixes."""
    from text import ClipLConfig, ClipLTextEncoder
    from unet import UNetConfig, UNetModel
    from vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, build in ((UNET_PREFIX, lambda: UNetModel(UNetConfig.sd1())),
                          (VAE_PREFIX, lambda: AutoencoderKL(VAEConfig.sd())),
                          (TEXT_PREFIX, lambda: ClipLTextEncoder(ClipLConfig()))):
        module = build()
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.to(DTYPES[dtype]) if v.is_floating_point() else v
        del module
    return write_state_dict(path, tensors, {"note": f"random weights, seed {seed}, for bench/ only"})


def ensure_checkpoint(path: Path | None = None, dtype: str = "fp16") -> Path:
    path = Path(path) if path else default_path(dtype)
    if not path.exists():
        t0 = time.perf_counter()
        print(f"writing a random SD1.5 checkpoint to {path} (once) ...", file=sys.stderr, flush=True)
        make_checkpoint(path, dtype)
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = args.out or default_path(args.dtype)
    t0 = time.perf_counter()
    make_checkpoint(out, args.dtype, args.seed)
    print(f"{out} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
