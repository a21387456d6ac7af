"""encode_dataset: image folders -> a latent cache, encoding each image once; re-runs encode only what is new or changed."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from devices import resolve_device

from .buckets import Geometry, Placement, apply
from .cache import (FORMAT, FORMAT_VERSION, MANIFEST, CacheMismatchError, DataError, ShardWriter, collect_garbage,
                    read_manifest, shard_files, write_json_atomic)
from .images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, has_alpha, image_size, load_mask, load_rgb,
                     sha256_file)
from .sources import MASK_SUFFIX, CaptionRules, ImageSource, Problem, scan

log = logging.getLogger("data")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# The layer SD itself conditions on, per family; "clip skip" fine-tunes change it via text_layer. SDXL's is fixed:
# both towers' penultimate hidden states (and bigG's pooled vector), see text.sdxl.
DEFAULT_TEXT_LAYER = {"sd1": "last", "sd2": "penultimate", "sdxl": "penultimate"}
# SDXL's six size numbers per image, in the order the UNet's y embeds them (text.sdxl.size_embedding).
SIZE_CONDITIONING = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
TEXT_BATCH = 32


@dataclass
class EncodeConfig:
    """Options of encode_dataset and `python -m data.encode` (same names, dashes for underscores).

    The geometry fields (resolution, bucket, and with bucketing bucket_step, min_side, max_side, no_upscale;
    crop, and seed for random crops) and the model decide the pixels of every latent: a cache made with other
    values is refused unless overwrite=True.
    flip and text may change between runs; only the missing entries are encoded.
    """

    # Geometry: see data.buckets.Geometry.
    resolution: int | str | tuple[int, int] = 512
    bucket: bool = False
    bucket_step: int = 64
    min_side: int | None = None
    max_side: int | None = None
    no_upscale: bool = False
    crop: str = "center"
    seed: int = 0
    # Variants and text.
    flip: bool = False                 # also encode the mirror image, for random flips at training time
    text: bool = True                  # store text-encoder outputs (frozen text encoder); tokens are always stored
    text_layer: str | None = None      # "last" / "penultimate" (clip skip); None: the family's default (SDXL: fixed)
    # New tokens being trained (textual inversion): ((token, vectors), ...), added in this order after the vocabulary
    # (text.new_tokens), so the stored ids are those the trainer's tokenizer gives. Needs text=False.
    added_tokens: tuple = ()
    # Captions and repeats: see data.sources.CaptionRules.
    prompt: str | None = None
    caption_ext: str = ".txt"
    caption_column: str = "text"
    folder_captions: bool = False
    repeats: int = 1
    # Bad input.
    max_pixels: int = DEFAULT_MAX_PIXELS
    strict: bool = False               # raise on the first bad file instead of skipping it
    overwrite: bool = False            # re-encode everything when the cache was made for another model/geometry
    # Running.
    device: str = "auto"               # "auto": cuda when available, else cpu (ignored for an already loaded model)
    dtype: str = "float32"
    batch_size: int = 4
    workers: int = 4                   # threads decoding and resizing images while the VAE runs
    shard_mb: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.text_layer not in (None, "last", "penultimate"):
            raise ValueError(f"text_layer must be 'last', 'penultimate' or None, got {self.text_layer!r}")
        for name in ("batch_size", "shard_mb", "max_pixels", "repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers!r}")
        resolve_device(self.device)
        self.added_tokens = tuple((str(t), int(n)) for t, n in self.added_tokens)
        if self.added_tokens and self.text:
            raise ValueError("added_tokens: a cache cannot store text embeddings of tokens being trained; use text=False")
        self.geometry()  # validates the geometry fields
        self.caption_rules()

    def geometry(self) -> Geometry:
        return Geometry(resolution=self.resolution, bucket=self.bucket, step=self.bucket_step, min_side=self.min_side,
                        max_side=self.max_side, no_upscale=self.no_upscale, crop=self.crop, seed=self.seed)

    def caption_rules(self) -> CaptionRules:
        if not self.caption_ext.startswith("."):
            raise ValueError(f"caption_ext must start with a dot, e.g. '.txt', got {self.caption_ext!r}")
        return CaptionRules(prompt=self.prompt, caption_ext=self.caption_ext, caption_column=self.caption_column,
                            folder_captions=self.folder_captions, repeats=self.repeats)


@dataclass
class EncodeReport:
    """What one encode_dataset run did. str() gives the summary the command line prints."""

    cache_dir: Path
    images: int = 0                  # usable images now in the cache
    samples_per_epoch: int = 0       # images times their repeats
    encoded: int = 0                 # images whose latents were computed in this run
    reused: int = 0                  # images whose latents were already cached
    latents_written: int = 0         # entries written, flips included
    captions_encoded: int = 0
    truncated_captions: list[str] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    model_loaded: bool = False       # the model was needed: loaded from the path, or used if passed in loaded
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"{self.images} images in {self.cache_dir} ({self.samples_per_epoch} samples per epoch with repeats): "
                 f"{self.encoded} encoded{_mirrors(self)}, {self.reused} reused, {len(self.skipped)} skipped; "
                 f"{self.captions_encoded} captions encoded; {self.seconds:.1f} s"]
        if self.buckets:
            lines.append("buckets (WxH: images): " + ", ".join(f"{b}: {n}" for b, n in self.buckets.items()))
        if self.truncated_captions:
            lines.append(f"{len(self.truncated_captions)} captions longer than 75 tokens were cut, e.g. "
                         f"{self.truncated_captions[0][:80]!r}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {p.path}: {p.reason}" for p in self.skipped[:50]]
            if len(self.skipped) > 50:
                lines.append(f"  ... and {len(self.skipped) - 50} more (all listed in {MANIFEST} under 'skipped')")
        return "\n".join(lines)


def _mirrors(report: EncodeReport) -> str:
    return f" ({report.latents_written} latents with mirror images)" if report.latents_written > report.encoded else ""


# ----------------------------------------------------------------------------------------------------------------
# Model identity


_HASHES: dict[tuple[str, int, int], str] = {}


def model_hash(path: str | os.PathLike, known: dict | None = None) -> str:
    """sha256 of the checkpoint file's bytes, the identity a cache is tied to (its first 10 hex digits are the
    short hash A1111 and Civitai show). Reading a multi-GB file takes seconds, so the result is remembered per
    (path, size, mtime): in this process, and through `known`, a manifest's model record from an earlier run."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    if known and (known.get("path"), known.get("size"), known.get("mtime_ns")) == key and known.get("sha256"):
        digest = known["sha256"]
    else:
        if stat.st_size > 256 << 20:
            log.info("hashing %s (%.1f GB) once, to tie the cache to this model", path.name, stat.st_size / 1e9)
        digest = sha256_file(path)
    _HASHES[key] = digest
    return digest


class _Model:
    """The checkpoint behind a cache: hashed always, loaded only when something has to be encoded."""

    def __init__(self, model, cfg: EncodeConfig):
        self.cfg = cfg
        if isinstance(model, (str, os.PathLike)):
            self.loaded, self.path = None, Path(model)
            if not self.path.is_file():
                raise ValueError(f"{self.path}: no such checkpoint file")
        elif all(hasattr(model, a) for a in ("vae", "text_encoder", "tokenize", "source")):  # sd.StableDiffusion
            if model.source is None:
                raise ValueError("the model has no source file to identify the cache with; pass the checkpoint path")
            self.loaded, self.path = model, Path(model.source)
        else:
            raise ValueError(f"model must be a checkpoint path or a loaded sd.StableDiffusion, got {type(model).__name__}")

    def get(self):
        if self.loaded is None:
            import sd

            device = resolve_device(self.cfg.device)
            log.info("loading %s on %s in %s", self.path.name, device, self.cfg.dtype)
            self.loaded = sd.load(self.path, dtype=DTYPES[self.cfg.dtype], device=device,
                                  text_layer=self.cfg.text_layer)
        return self.loaded

    def record(self, sha: str) -> dict:
        """The manifest's model record (loads nothing if the model is not loaded: callers merge with the old one)."""
        stat = self.path.resolve().stat()
        out = {"sha256": sha, "short_hash": sha[:10], "path": str(self.path.resolve()), "size": stat.st_size,
               "mtime_ns": stat.st_mtime_ns}
        if self.loaded is not None:
            m = self.loaded
            out.update(version=m.version, scale_factor=m.scale_factor, latent_channels=m.vae.cfg.embed_dim,
                       downsample_factor=m.vae.cfg.downsample_factor, context_dim=int(m.text_encoder.config.width))
            if hasattr(m.text_encoder, "pad_ids"):  # SDXL: two towers, padded differently, and a pooled vector
                out.update(pad_ids=[int(i) for i in m.text_encoder.pad_ids],
                           pooled_dim=int(m.text_encoder.config.pooled_dim))
            else:
                out.update(pad_id=int(m.text_encoder.pad_id))
        return out


# ----------------------------------------------------------------------------------------------------------------
# encode_dataset


def encode_dataset(images: str | os.PathLike | ImageSource | Sequence[str | os.PathLike | ImageSource],
                   out: str | os.PathLike, model, config: EncodeConfig | None = None, **options) -> EncodeReport:
    """Encode image folders into the latent cache `out`, or bring an existing cache up to date.

    images: a folder, an ImageSource (folder with its own repeats/prompt), or a list of them.
    model:  checkpoint path (loaded only if something must be encoded) or a loaded sd.StableDiffusion; pass it
            before any LoRA is injected into its text encoder, since the stored embeddings come from it.
    config / options: EncodeConfig, or its fields as keywords (options override config).

    Only images that are new or whose bytes changed are encoded (files are recognised by path, size and mtime,
    then by sha256); files that failed before are not retried until they change. A cache made for another model
    or geometry raises CacheMismatchError, or is wiped and re-encoded with overwrite=True. Unusable files are
    skipped, logged and listed in the report (strict=True raises instead). Open the result with LatentCache(out).
    """
    cfg = dataclasses.replace(config or EncodeConfig(), **options)
    started = time.monotonic()
    out = Path(out)
    geometry, rules = cfg.geometry(), cfg.caption_rules()
    sources = _as_sources(images, out)
    report = EncodeReport(cache_dir=out)

    old = _read_old(out, cfg.overwrite)
    found = scan(sources, rules, exclude=[out])
    problems = list(found.problems)
    if not found.found:
        raise DataError(_empty_text(sources, problems))
    for folder in found.empty_folders:
        log.warning("no images in %s", folder)

    model = _Model(model, cfg)
    sha = model_hash(model.path, old["model"] if old else None)
    if old is not None:
        mismatch = _mismatch(old, sha, geometry)
        if mismatch and not cfg.overwrite:
            raise CacheMismatchError(
                f"{out}: this cache was made for {'; '.join(mismatch)}. It is not reused: pass --overwrite "
                f"(overwrite=True) to replace it, or choose another --out folder.")
        if mismatch:
            log.warning("%s: cache made for %s: re-encoding everything (overwrite)", out, "; ".join(mismatch))
            old = None
    if old is None and out.exists():
        _wipe(out)
    out.mkdir(parents=True, exist_ok=True)

    manifest = old or {"format": FORMAT, "format_version": FORMAT_VERSION, "entries": {}, "items": [], "skipped": []}
    manifest["model"] = {**manifest.get("model", {}), **model.record(sha)}
    manifest["geometry"] = geometry.to_json()
    manifest["sources"] = [{"path": str(s.path.resolve()), "repeats": s.repeats, "prompt": s.prompt} for s in sources]
    manifest["captions"] = dataclasses.asdict(rules)
    save = lambda: write_json_atomic(out / MANIFEST, manifest)  # noqa: E731

    items, plan_problems = _plan_items(found.found, manifest, geometry, cfg)
    problems += plan_problems
    if cfg.strict and problems:  # everything found so far in one message; files that fail to decode stop it later
        raise DataError(_problem_text("bad input (strict mode)", problems))
    if not items:
        raise DataError(_empty_text(sources, problems))
    _log_problems(problems)

    def loaded_model():
        if not report.model_loaded:
            _check_model_fits(model.get(), geometry)
            manifest["model"] = {**manifest["model"], **model.record(sha)}
            report.model_loaded = True
        return model.get()

    entries = manifest["entries"]
    todo_images = [it for it in items if any(k not in entries for k in it["latents"].values())]
    report.reused = len(items) - len(todo_images)
    writer = ShardWriter(out, manifest, save, max_bytes=cfg.shard_mb << 20)
    failed: list[tuple[dict, Problem]] = []
    try:
        if todo_images:
            failed, report.latents_written = _encode_images(loaded_model, todo_images, writer, cfg)
            report.encoded = len(todo_images) - len(failed)
        unreadable = {id(it) for it, _ in failed}
        todo_masks = [it for it in items if id(it) not in unreadable
                      and any(k not in entries for k in it.get("masks", {}).values())]
        if todo_masks:
            failed += _encode_masks(lambda: pixel_multiple(loaded_model()), todo_masks, writer, cfg)
        gone = {id(it) for it, _ in failed}
        items = [it for it in items if id(it) not in gone]
        problems += [p for _, p in failed]
        if not items:
            raise DataError(_empty_text(sources, problems))

        # Which layer the stored embeddings come from; a first run has loaded the model by now.
        version = manifest["model"].get("version") or loaded_model().version
        if version == "sdxl" and cfg.text_layer is not None:
            raise ValueError(f"text_layer={cfg.text_layer!r} is for SD1/SD2; SDXL's layers are fixed (both towers' "
                             "penultimate hidden states): leave text_layer unset")
        layer = None
        if cfg.text:
            layer = cfg.text_layer or (getattr(model.loaded.text_encoder, "layer", None) if model.loaded else None) \
                or DEFAULT_TEXT_LAYER[version]
        for item in items:
            item["text"] = _text_key(item["caption"], layer, cfg.added_tokens)
            if version == "sdxl":
                item["size_conditioning"] = size_conditioning(item)
        empty_key = _text_key("", layer, cfg.added_tokens)
        todo_text = sorted({it["caption"] for it in items if it["text"] not in entries}
                           | ({""} if empty_key not in entries else set()))
        if todo_text:
            report.truncated_captions = _encode_text(loaded_model(), todo_text, layer, writer, cfg)
            report.captions_encoded = len(todo_text)
    finally:
        writer.flush()  # keep finished work even when interrupted

    manifest["text"] = {"embeddings": cfg.text, "layer": layer}
    if cfg.added_tokens:  # what the stored ids past the vocabulary stand for
        manifest["text"]["added_tokens"] = [list(t) for t in cfg.added_tokens]
    if version == "sdxl":  # SD1/SD2 manifests stay as they were
        manifest["text"]["pooled"] = cfg.text  # bigG's pooled vector is stored beside each context
        manifest["size_conditioning"] = list(SIZE_CONDITIONING)
    manifest["flip"] = cfg.flip
    manifest["items"] = items
    manifest["empty_text"] = empty_key
    manifest["skipped"] = [_skip_record(p) for p in problems]
    live = {k for it in items for k in (*it["latents"].values(), it["text"], *it.get("masks", {}).values())}
    live |= {empty_key}
    collect_garbage(out, manifest, live, save)

    report.images = len(items)
    report.samples_per_epoch = sum(it["repeats"] for it in items)
    report.skipped = problems
    report.buckets = dict(sorted(Counter(f"{it['bucket'][0]}x{it['bucket'][1]}" for it in items).items(),
                                 key=lambda kv: -kv[1]))
    report.seconds = time.monotonic() - started
    return report


def _skip_record(problem: Problem) -> dict:
    """A skipped file as the manifest keeps it; size and mtime let the next run skip it again without reading it."""
    record = {"file": problem.path, "reason": problem.reason}
    if problem.kind != "image":
        return record
    try:
        stat = os.stat(problem.path)
        record.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    except OSError:
        pass
    return record


def _as_sources(images, out: Path) -> list[ImageSource]:
    if isinstance(images, (str, os.PathLike, ImageSource)):
        images = [images]
    sources = [i if isinstance(i, ImageSource) else ImageSource(Path(i)) for i in images]
    if not sources:
        raise ValueError("no image folders given")
    for source in sources:
        if source.path.resolve() == out.resolve():
            raise ValueError(f"{out}: the cache folder must not be an image folder; use e.g. {out / 'cache'}")
    return sources


def _read_old(out: Path, overwrite: bool) -> dict | None:
    try:
        return read_manifest(out)
    except DataError:
        if overwrite:
            return None
        raise


def _mismatch(old: dict, sha: str, geometry: Geometry) -> list[str]:
    """Human-readable differences between an existing cache and this run, in what decides the latents."""
    diffs = []
    old_model = old.get("model", {})
    if old_model.get("sha256") != sha:
        diffs.append(f"another model ({Path(old_model.get('path', '?')).name}, sha256 {old_model.get('sha256', '?')[:10]}; "
                     f"now sha256 {sha[:10]})")
    new = geometry.to_json()
    for name, value in new.items():
        if old.get("geometry", {}).get(name) != value:
            diffs.append(f"{name}={old.get('geometry', {}).get(name)!r} (now {value!r})")
    return diffs


def _wipe(out: Path) -> None:
    """Remove a cache's own files (shards, manifest, temp files) and nothing else."""
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    for path in shard_files(out):
        path.unlink()
    for path in [out / MANIFEST, *out.glob(".shard-*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")]:
        path.unlink(missing_ok=True)


def _text_key(caption: str, layer: str | None, added_tokens: tuple = ()) -> str:
    digest = hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]
    if added_tokens:  # the same caption tokenizes differently with new tokens: its own entry
        added = hashlib.sha256(json.dumps([list(t) for t in added_tokens]).encode()).hexdigest()[:12]
        return f"tokens/{added}/{digest}"
    return f"text/{layer}/{digest}" if layer else f"tokens/{digest}"


def _latent_key(sha: str, placement: Placement, variant: str) -> str:
    (w, h), (top, left) = placement.bucket, placement.crop
    return f"latent/{sha[:32]}/{w}x{h}/{top}_{left}/{variant}"


def _mask_key(mask: dict, placement: Placement, variant: str) -> str:
    (w, h), (top, left) = placement.bucket, placement.crop
    return f"mask/{mask['sha256'][:32]}/{'file' if mask['file'] else 'alpha'}/{w}x{h}/{top}_{left}/{variant}"


def _mask_of(image: Path, sha: str, max_pixels: int) -> dict | None:
    """The loss mask of an image: {"file": path of name.mask.png, "sha256": its hash}, or {"file": None,
    "sha256": the image's} for an image with transparency (its alpha channel), or None."""
    candidates = [image.with_name(image.stem + MASK_SUFFIX + ext) for ext in (".png", ".webp", ".jpg")]
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        return {"file": str(found.resolve()), "sha256": sha256_file(found)}
    try:
        return {"file": None, "sha256": sha} if has_alpha(image, max_pixels) else None
    except BadImage:
        return None  # the image itself is reported where it is decoded


def _plan_items(found, manifest: dict, geometry: Geometry, cfg: EncodeConfig) -> tuple[list[dict], list[Problem]]:
    """One manifest item per usable image: content hash (reusing the old one when path, size and mtime match),
    size and placement (from the old manifest when the same bytes were seen before)."""
    by_path = {it["file"]: it for it in manifest["items"]}
    by_sha = {it["sha256"]: it for it in manifest["items"]}
    known_bad = {r["file"]: r for r in manifest.get("skipped", []) if "size" in r}
    buckets = geometry.buckets()
    variants = ("plain", "flip") if cfg.flip else ("plain",)
    items, problems = [], []
    bar = tqdm(found, desc="checking images", unit="img", disable=not cfg.progress or len(found) < 200, leave=False)
    for f in bar:
        path = str(f.path.resolve())
        try:
            stat = f.path.stat()
        except OSError as err:
            problems.append(Problem(str(f.path), f"cannot read the file: {err}"))
            continue
        bad = known_bad.get(path) or known_bad.get(str(f.path))
        if bad and (bad["size"], bad["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            problems.append(Problem(str(f.path), bad["reason"], "image"))  # failed before and unchanged: not retried
            continue
        prior = by_path.get(path)
        if prior and (prior["size"], prior["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            sha = prior["sha256"]
        else:
            if stat.st_size == 0:
                problems.append(Problem(str(f.path), "empty file (0 bytes)", "image"))
                continue
            sha = sha256_file(f.path)
            prior = by_sha.get(sha)
        if prior is not None:
            size = tuple(prior["original_size"])
        else:
            try:
                size = image_size(f.path, cfg.max_pixels)
            except BadImage as err:
                problems.append(Problem(str(f.path), str(err), "image"))
                continue
        placement = geometry.plan(size, sha, buckets)
        if placement is None:
            problems.append(Problem(str(f.path), f"too small: {size[0]}x{size[1]} has a side under the bucket step "
                                                 f"{geometry.step} and no_upscale is set", "image"))
            continue
        items.append({
            "file": path, "sha256": sha, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "caption": f.caption, "caption_source": f.caption_source, "repeats": f.repeats,
            "original_size": list(size), "resized": list(placement.resized), "bucket": list(placement.bucket),
            "crop": list(placement.crop), "latents": {v: _latent_key(sha, placement, v) for v in variants},
        })
        mask = _mask_of(f.path, sha, cfg.max_pixels)
        if mask is not None:
            items[-1].update(mask=mask, masks={v: _mask_key(mask, placement, v) for v in variants})
    return items, problems


def pixel_multiple(model) -> int:
    """Image sides must be multiples of this for the model: the VAE's factor (8 for SD). The UNet takes any
    latent size, since its upsamplers follow the skip connections' sizes."""
    return model.vae.cfg.downsample_factor


def _check_model_fits(model, geometry: Geometry) -> None:
    multiple = pixel_multiple(model)
    sides = [geometry.step] if geometry.bucket else list(geometry.resolution)
    if any(s % multiple for s in sides):
        what = (f"bucket step {geometry.step}" if geometry.bucket
                else f"resolution {geometry.resolution[0]}x{geometry.resolution[1]}")
        raise ValueError(f"{what} is not a multiple of {multiple}, which this model's VAE needs; "
                         "choose one that is")


def size_conditioning(item: dict) -> dict[str, list[int]]:
    """SDXL's size/crop conditioning of one manifest item, per variant: the six SIZE_CONDITIONING numbers in pixels.

    original = the file's (height, width) after EXIF orientation; crop = (top, left) of the bucket in the resized
    image; target = the bucket's (height, width). These are what the SDXL base saw in training (sgm's
    original_size_as_tuple, crop_coords_top_left, target_size_as_tuple). The mirror image was cut from the mirrored
    resized image, so its left offset is counted from the other side."""
    (ow, oh), (rw, _), (bw, bh), (top, left) = item["original_size"], item["resized"], item["bucket"], item["crop"]
    out = {"plain": [oh, ow, top, left, bh, bw]}
    if "flip" in item["latents"]:
        out["flip"] = [oh, ow, top, rw - bw - left, bh, bw]
    return out


@torch.inference_mode()
def _encode_text(model, captions: list[str], layer: str | None, writer: ShardWriter, cfg: EncodeConfig) -> list[str]:
    """Tokens (and, with a layer, frozen embeddings in fp16) of each caption; returns the captions that were cut.
    SDXL adds bigG's tokens ("tokens_g") and, with a layer, its pooled vector ("pooled")."""
    if layer is not None and getattr(model.text_encoder, "layer", layer) != layer:
        raise ValueError(f"the loaded text encoder uses layer {model.text_encoder.layer!r} but text_layer={layer!r} "
                         "was asked for; load the model with sd.load(..., text_layer=...) or pass the path")
    tokenizer = model.tokenizer
    if cfg.added_tokens:  # a tokenizer of its own that knows the new tokens; the model's stays as it is
        tokenizer = copy.copy(tokenizer)
        tokenizer.added_tokens, tokenizer._added_pattern = {}, None
        for token, vectors in cfg.added_tokens:
            tokenizer.add_token(token, vectors)
    cut = [c for c in captions if len(tokenizer.encode(c)) > tokenizer.context_length - 2]
    device = next(model.text_encoder.parameters()).device
    bar = tqdm(total=len(captions), desc="encoding captions", unit="caption", disable=not cfg.progress or len(captions) < 50)
    xl = model.version == "sdxl"
    for start in range(0, len(captions), TEXT_BATCH):
        chunk = captions[start:start + TEXT_BATCH]
        # SDXL: one token tensor per tower (the same ids, padded differently), and a pooled vector from bigG.
        if xl:
            tokens, tokens_g = model.text_encoder.tokenize(tokenizer, chunk)
        else:
            tokens, tokens_g = tokenizer(chunk, pad_id=model.text_encoder.pad_id), None
        context = pooled = None
        if layer is not None:
            if xl:
                context, pooled = model.text_encoder(tokens.to(device), tokens_g.to(device))
                context, pooled = context.float(), pooled.float()
            else:
                context = model.text_encoder(tokens.to(device)).float()
            if not (torch.isfinite(context).all() and (pooled is None or torch.isfinite(pooled).all())):
                raise DataError(f"the text encoder produced NaN/inf in {next(model.text_encoder.parameters()).dtype}; "
                                "encode with dtype float32")
        for row, caption in enumerate(chunk):
            parts = {"tokens": tokens[row]}
            if tokens_g is not None:
                parts["tokens_g"] = tokens_g[row]
            if context is not None:
                parts["context"] = context[row].to(torch.float16)
            if pooled is not None:
                parts["pooled"] = pooled[row].to(torch.float16)
            writer.add(_text_key(caption, layer, cfg.added_tokens), parts)
        bar.update(len(chunk))
    bar.close()
    return cut


def _prepare(item: dict, max_pixels: int) -> np.ndarray:
    """Decode, orient, convert and crop one image: uint8 [H, W, 3]. Runs in worker threads."""
    placement = Placement(bucket=tuple(item["bucket"]), resized=tuple(item["resized"]), crop=tuple(item["crop"]))
    # A JPEG may come back decoded at reduced scale, never below `resized`: the same resize and crop still apply.
    image = apply(load_rgb(item["file"], max_pixels, min_size=placement.resized), placement)
    return np.asarray(image, dtype=np.uint8)


def _encode_masks(factor: Callable[[], int], items: list[dict], writer: ShardWriter,
                  cfg: EncodeConfig) -> list[tuple[dict, Problem]]:
    """Each item's loss mask, resized and cropped as its image, mirrored for the flip variant, and averaged over
    factor x factor pixel blocks down to latent resolution: weights in [0, 1], fp16 [1, h, w]. A mask that cannot
    be read or whose size differs from its image's drops the image (reported like a bad image)."""
    failed: list[tuple[dict, Problem]] = []
    f = factor()
    for item in tqdm(items, desc="encoding masks", unit="img", disable=not cfg.progress or len(items) < 50):
        mask = item["mask"]
        where = mask["file"] or item["file"]
        try:
            image = load_mask(where, alpha=mask["file"] is None, max_pixels=cfg.max_pixels)
            if list(image.size) != list(item["original_size"]):
                raise BadImage(f"mask {where} is {image.size[0]}x{image.size[1]}, its image "
                               f"{item['original_size'][0]}x{item['original_size'][1]}")
        except BadImage as err:
            if cfg.strict:
                raise DataError(f"{item['file']}: {err} (strict mode)") from err
            failed.append((item, Problem(item["file"], str(err), "image")))
            continue
        placement = Placement(bucket=tuple(item["bucket"]), resized=tuple(item["resized"]), crop=tuple(item["crop"]))
        pixels = torch.from_numpy(np.asarray(apply(image, placement), dtype=np.float32) / 255.0)
        for variant, key in item["masks"].items():
            plane = pixels if variant == "plain" else pixels.flip(-1)
            small = torch.nn.functional.avg_pool2d(plane[None, None], f)[0]
            writer.add(key, {"mask": small.to(torch.float16)})
    return failed


def _prefetch(fn: Callable, items: Sequence, workers: int, ahead: int) -> Iterator[tuple[object, Future]]:
    """(item, Future) in order, keeping at most `ahead` items in flight on `workers` threads."""
    if workers == 0:
        for item in items:
            future: Future = Future()
            try:
                future.set_result(fn(item))
            except Exception as err:  # noqa: BLE001 - handed to the caller, as a thread pool would
                future.set_exception(err)
            yield item, future
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="data-encode") as pool:
        queue: deque = deque()
        pending = iter(items)
        for item in pending:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) >= ahead:
                break
        while queue:
            item, future = queue.popleft()
            nxt = next(pending, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(fn, nxt)))
            yield item, future


@torch.inference_mode()
def _encode_images(get_model: Callable, items: list[dict], writer: ShardWriter,
                   cfg: EncodeConfig) -> tuple[list[tuple[dict, Problem]], int]:
    """VAE posterior moments of every item (and its mirror image), batched within a bucket. The model is loaded
    at the first readable image. Returns the items that could not be read, and the number of entries written."""
    entries = writer.manifest["entries"]
    items = sorted(items, key=lambda it: (it["bucket"], it["file"]))  # same-size images batch together
    failed: list[tuple[dict, Problem]] = []
    queued: set[str] = set()  # keys encoded in this run (duplicate images share them)
    written = 0
    batch: list[tuple[str, np.ndarray]] = []
    bar = tqdm(total=len(items), desc="encoding images", unit="img", disable=not cfg.progress)

    def run() -> None:
        nonlocal written
        if not batch:
            return
        vae = get_model().vae
        weight = next(vae.parameters())
        pixels = torch.from_numpy(np.stack([a for _, a in batch])).to(weight.device)
        pixels = pixels.permute(0, 3, 1, 2).to(weight.dtype) / 127.5 - 1.0
        posterior = vae.encode(pixels)
        mean, logvar = posterior.mean.float().cpu(), posterior.logvar.float().cpu()
        if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
            raise DataError(f"the VAE produced NaN/inf in {weight.dtype} (e.g. for {batch[0][0]}); "
                            "encode with dtype float32")
        for row, (key, _) in enumerate(batch):
            writer.add(key, {"mean": mean[row].to(torch.float16), "logvar": logvar[row].to(torch.float16)})
        written += len(batch)
        batch.clear()

    prepare = lambda item: _prepare(item, cfg.max_pixels)  # noqa: E731
    try:
        for item, future in _prefetch(prepare, items, cfg.workers, ahead=max(2 * cfg.batch_size, 8)):
            try:
                array = future.result()
            except BadImage as err:
                if cfg.strict:
                    raise DataError(f"{item['file']}: {err} (strict mode)") from err
                log.warning("skipped %s: %s", item["file"], err)
                failed.append((item, Problem(item["file"], str(err), "image")))
                bar.update(1)
                continue
            if batch and batch[0][1].shape != array.shape:
                run()  # the bucket changed
            for variant, key in item["latents"].items():
                if key in entries or key in queued:
                    continue
                queued.add(key)
                batch.append((key, array if variant == "plain" else np.ascontiguousarray(array[:, ::-1])))
                if len(batch) >= cfg.batch_size:
                    run()
            bar.update(1)
        run()
    finally:
        bar.close()
    return failed, written


# ----------------------------------------------------------------------------------------------------------------
# Messages


def _problem_text(title: str, problems: list[Problem]) -> str:
    shown = "\n".join(f"  {p.path}: {p.reason}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{title}: {len(problems)} file(s):\n{shown}{more}"


def _empty_text(sources: list[ImageSource], problems: list[Problem]) -> str:
    folders = ", ".join(str(s.path) for s in sources)
    if problems:
        return _problem_text(f"no usable images in {folders}; every candidate was skipped", problems)
    return (f"no images found in {folders} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}; "
            "hidden files and folders are ignored)")


def _log_problems(problems: list[Problem]) -> None:
    for p in problems[:20]:
        log.warning("skipped %s: %s", p.path, p.reason)
    if len(problems) > 20:
        log.warning("... and %d more skipped files (listed in the report and the manifest)", len(problems) - 20)
