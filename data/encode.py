"""Command line: `python -m data.encode --ckpt MODEL --images DIR --out CACHE --resolution 512`, see --help."""
from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

from devices import precision_warning, resolve_device

from .cache import DataError
from .pipeline import DTYPES, EncodeConfig, encode_dataset
from .sources import ImageSource

EXAMPLES = """\
captions (first match wins):
  --prompt TEXT                     one caption for every image (DreamBooth); caption files are ignored
  metadata.jsonl / metadata.csv     rows with "file_name" and "text" (Hugging Face imagefolder), in any folder
  NAME.txt beside NAME.png          the sd-scripts convention (--caption-ext to change .txt)
  folder "10_sks dog"               with --folder-captions, images without a caption get "sks dog"
  Images with none of these are skipped and listed (or stop the run with --strict).

repeats: a folder named "<N>_<name>" (e.g. "10_sks dog") repeats its images N times per epoch, as in sd-scripts;
  "--images DIR:N" sets N for one folder; --repeats sets it for all other folders.

The cache folder holds manifest.json and shard-*.safetensors: for every image the VAE posterior mean and
log-variance (fp16, unscaled) and, unless --no-text, the caption's text-encoder output; token ids always.
SDXL: also bigG's pooled text vector, and each image's size conditioning (original size, crop top-left, target
size = its bucket), from the resize and crop actually done to it, for the UNet's y.
Running the same command again encodes only new or changed images (seconds when nothing changed). A cache made
for another checkpoint or geometry (resolution, bucketing, crop) is refused; --overwrite replaces it.

examples:
  python -m data.encode --ckpt v1-5.safetensors --images photos --out photos/cache --resolution 512 \\
      --prompt "a photo of sks dog" --flip
  python -m data.encode --ckpt v1-5.safetensors --images train --out cache --resolution 512 --bucket --no-upscale
  python -m data.encode --ckpt sd_xl_base_1.0.safetensors --images train --out cache --resolution 1024 --bucket
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except the uninformative None/False/True of optional values and switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = EncodeConfig()
    p = argparse.ArgumentParser(
        prog="python -m data.encode", formatter_class=_Formatter, epilog=EXAMPLES,
        description="Encode folders of training images (and captions) once into a latent cache for LoRA training.")
    p.add_argument("--ckpt", required=True, help="Stable Diffusion 1.x/2.x or SDXL base checkpoint (.safetensors or .ckpt)")
    p.add_argument("--images", required=True, action="append", metavar="DIR[:N]",
                   help="folder of images, searched recursively; repeat the option for several folders; "
                        ":N gives this folder N repeats")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache folder (created, or updated if it exists)")
    p.add_argument("--resolution", default="512",
                   help="training resolution: N for NxN, or W,H; a multiple of 8 for SD (SDXL: 1024)")

    g = p.add_argument_group("captions and repeats")
    g.add_argument("--prompt", default=None, help="one caption for every image (DreamBooth instance prompt)")
    g.add_argument("--caption-ext", default=d.caption_ext, help="extension of caption files beside the images")
    g.add_argument("--caption-column", default=d.caption_column, help="caption column of metadata.jsonl / .csv")
    g.add_argument("--folder-captions", action="store_true",
                   help="images without a caption take the name of their '<N>_<name>' folder")
    g.add_argument("--repeats", type=int, default=d.repeats,
                   help="repeats for images whose folder has no '<N>_' prefix and no :N")

    g = p.add_argument_group("geometry (a cache is tied to these)")
    g.add_argument("--bucket", action="store_true",
                   help="aspect-ratio bucketing: each image goes to the bucket (area about the resolution squared) "
                        "closest to its aspect ratio, instead of a square crop")
    g.add_argument("--bucket-step", type=int, default=d.bucket_step,
                   help="bucket sides are multiples of this; 64 is the SD convention, any multiple of 8 works")
    g.add_argument("--min-side", type=int, default=None, help="smallest bucket side (default: half the resolution)")
    g.add_argument("--max-side", type=int, default=None, help="largest bucket side (default: twice the resolution)")
    g.add_argument("--no-upscale", action="store_true",
                   help="with --bucket: never enlarge an image; each gets a bucket of its own size (at most the "
                        "resolution's area), cropped to the step grid")
    g.add_argument("--crop", choices=("center", "random"), default=d.crop,
                   help="where to cut the resized image; a random crop is drawn once per image from --seed")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of random crops")

    g = p.add_argument_group("what to store")
    g.add_argument("--flip", action="store_true", help="also encode each image mirrored, for random flips in training")
    g.add_argument("--no-text", dest="text", action="store_false",
                   help="do not store text-encoder outputs (the text encoder will be trained); token ids are still stored")
    g.add_argument("--text-layer", choices=("last", "penultimate"), default=None,
                   help="text-encoder layer to store ('penultimate' is 'clip skip 2'); default: the model family's own "
                        "(SD1 last, SD2 penultimate); not for SDXL, whose layers are fixed")

    g = p.add_argument_group("bad input")
    g.add_argument("--strict", action="store_true",
                   help="stop at bad input (unreadable, corrupt, empty, oversized, no caption) instead of skipping it")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="refuse images with more pixels than this (decompression bombs)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a cache made for another checkpoint or geometry instead of refusing it")

    g = p.add_argument_group("running")
    g.add_argument("--device", default=d.device, help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype,
                   help="precision of the VAE and text encoder while encoding (the cache is fp16 either way); "
                        "float16 is faster on GPU but the SD VAE can overflow, which stops the run with a message; "
                        "SDXL's VAE overflows in float16, so with float16 it runs in float32 (bfloat16 is fine)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per VAE call (mirrors count)")
    g.add_argument("--workers", type=int, default=d.workers, help="threads decoding and resizing images")
    g.add_argument("--shard-mb", type=int, default=d.shard_mb, help="approximate size of each cache shard file")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-file messages; summary only")
    return p


class _TqdmHandler(logging.Handler):
    """Log lines that do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("data")
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.ERROR if args.quiet else logging.INFO)
    options = {k: v for k, v in vars(args).items() if k not in ("ckpt", "images", "out", "quiet")}
    try:
        warning = precision_warning(args.dtype, resolve_device(args.device))
        if warning and not args.quiet:
            print(f"warning: {warning}", file=sys.stderr)
        config = EncodeConfig(progress=not args.quiet, **options)
        report = encode_dataset([ImageSource.parse(s) for s in args.images], args.out, args.ckpt, config)
    except (DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the shards written so far are kept; run the same command to continue", file=sys.stderr)
        return 130
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
