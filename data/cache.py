"""The on-disk latent cache: a JSON manifest plus safetensors shards, written atomically and read memory-mapped.

Layout of a cache folder:
    manifest.json              what was encoded, from which files, with which model and geometry (see below)
    shard-00000.safetensors    tensors named "<entry key>.<part>", fp16 moments and embeddings, int64 tokens

Entries are content-addressed: a latent entry's key names the source image's sha256, its bucket, crop and
variant ("latent/<sha>/<W>x<H>/<top>_<left>/plain" with parts "mean" and "logvar", unscaled VAE space); a text
entry's key names the caption's sha256 and the text layer ("text/<layer>/<sha>" with parts "context" and
"tokens", or "tokens/<sha>" with only "tokens" when embeddings are not stored). So an unchanged image whose
caption changed keeps its latents, and duplicate images share them. manifest["entries"] maps key -> shard.

SDXL caches (manifest["model"]["version"] == "sdxl") hold more, and say so in the manifest: text entries also have
"tokens_g" (bigG's padding) and, with embeddings, "pooled" (bigG's pooled vector, manifest["text"]["pooled"]); the
context is both towers' (768 + 1280). Every item has "size_conditioning": per variant the six numbers of
manifest["size_conditioning"] (original height, width; crop top, left; target height, width) that build the
UNet's y. SD1/SD2 manifests have none of these keys.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atomic import atomic_path

MANIFEST = "manifest.json"
FORMAT = "sd-latent-cache"
FORMAT_VERSION = 1
SHARD_NAME = re.compile(r"^shard-(\d+)\.safetensors$")
VARIANTS = ("plain", "flip")


class DataError(ValueError):
    """A dataset or cache that cannot be used; the message names the files and what to do."""


class CacheMismatchError(DataError):
    """An existing cache was made with another model or geometry; it is never reused silently."""


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON to a temp file in the same folder and rename it over `path`: readers see old or new, never half."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors shard, written atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a cache folder, None if the folder has none. A damaged manifest raises DataError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: damaged cache manifest ({err}); delete the cache folder or re-encode with overwrite") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a latent cache made by data.encode (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: cache format version {manifest.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; re-encode with overwrite")
    return manifest


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if SHARD_NAME.match(p.name)) if folder.is_dir() else []


class ShardWriter:
    """Collects entries and writes them as new shards of about `max_bytes`; after each shard the manifest is saved,
    so an interrupted run keeps everything written so far and the next run picks up from there."""

    def __init__(self, folder: Path, manifest: dict, save: Callable[[], None], max_bytes: int = 256 << 20):
        self.folder, self.manifest, self.save, self.max_bytes = folder, manifest, save, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_keys: list[str] = []
        self.bytes = 0
        numbers = [int(SHARD_NAME.match(p.name).group(1)) for p in shard_files(folder)]
        numbers += [int(SHARD_NAME.match(s).group(1)) for s in manifest["entries"].values()]
        self.next_number = max(numbers, default=-1) + 1

    def add(self, key: str, parts: dict[str, torch.Tensor]) -> None:
        for part, tensor in parts.items():
            # clone: a row of a batch would otherwise keep the whole batch alive and share storage in the file
            self.pending[f"{key}.{part}"] = tensor.detach().to("cpu").clone()
            self.bytes += tensor.numel() * tensor.element_size()
        self.pending_keys.append(key)
        if self.bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.write(self.pending, self.pending_keys)
        self.pending, self.pending_keys, self.bytes = {}, [], 0

    def write(self, tensors: dict[str, torch.Tensor], keys: list[str]) -> None:
        """One new shard holding `tensors`; `keys` (the entries they make up) then point at it."""
        name = f"shard-{self.next_number:05d}.safetensors"
        self.next_number += 1
        write_safetensors_atomic(self.folder / name, tensors, metadata={"format": FORMAT})
        for key in keys:
            self.manifest["entries"][key] = name
        self.save()


def collect_garbage(folder: Path, manifest: dict, live: Iterable[str], save: Callable[[], None]) -> None:
    """Forget entries no item uses, rewrite shards that became mostly dead, and delete shard and temp files
    the manifest no longer names. The manifest is saved before any file it might name is removed."""
    live = set(live)
    entries = manifest["entries"]
    for key in [k for k in entries if k not in live]:
        del entries[key]
    save()
    by_shard: dict[str, list[str]] = {}
    for key, shard in entries.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        path = folder / shard
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
            wanted = [n for n in names if n.rsplit(".", 1)[0] in live]
            if len(wanted) * 2 >= len(names):
                continue  # mostly alive: not worth rewriting
            tensors = {n: f.get_tensor(n).clone() for n in wanted}  # owned copies: the old file goes away
        ShardWriter(folder, manifest, save).write(tensors, keys)
    named = set(entries.values())
    for path in shard_files(folder):
        if path.name not in named:
            path.unlink()
    for path in [*folder.glob(".shard-*.tmp"), *folder.glob(f".{MANIFEST}.*.tmp")]:  # from writes killed half-way
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class CacheItem:
    """One image of the dataset as the cache describes it."""

    file: str
    sha256: str
    caption: str
    repeats: int
    bucket: tuple[int, int]          # (width, height) in pixels of the encoded crop
    original_size: tuple[int, int]   # (width, height) after EXIF orientation
    crop: tuple[int, int]            # (top, left) in the resized image
    latents: dict[str, str]          # variant ("plain", "flip") -> entry key
    text: str                        # entry key of the caption's tokens (and embedding, if stored)
    # SDXL only: variant -> [original h, w, crop top, left, target h, w] in pixels (see data.pipeline.size_conditioning)
    size_conditioning: dict[str, list[int]] | None = None
    # variant -> entry key of the loss mask at latent resolution, for images with a mask (name.mask.png or alpha)
    masks: dict[str, str] = field(default_factory=dict)


class LatentCache:
    """A cache folder opened for reading. Tensors are read from memory-mapped shards on demand.

    check() refuses a cache made for another model or resolution. Latents come back as stored (unscaled VAE
    mean and log-variance in fp16); data.loader.LatentLoader draws samples and applies `scale_factor`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise DataError(f"{self.folder}: no latent cache here (no {MANIFEST}); create one with "
                            f"`python -m data.encode --out {self.folder} ...`")
        self.manifest = manifest
        self.items = [CacheItem(
            file=i["file"], sha256=i["sha256"], caption=i["caption"], repeats=int(i["repeats"]),
            bucket=tuple(i["bucket"]), original_size=tuple(i["original_size"]), crop=tuple(i["crop"]),
            latents=dict(i["latents"]), text=i["text"], size_conditioning=i.get("size_conditioning"),
            masks=dict(i.get("masks", {})))
            for i in manifest["items"]]
        if not self.items:
            raise DataError(f"{self.folder}: the cache holds no images")
        entries = manifest["entries"]
        missing = sorted({k for it in self.items for k in (*it.latents.values(), it.text, *it.masks.values())
                          if k not in entries})
        absent = sorted({s for s in entries.values() if not (self.folder / s).is_file()})
        if missing or absent:
            raise DataError(f"{self.folder}: incomplete cache (entries without data: {missing[:3]}, missing shard "
                            f"files: {absent[:3]}); run data.encode again on it to repair")
        self._handles: dict[str, object] = {}

    # What the cache was made with.
    @property
    def model_sha256(self) -> str:
        return self.manifest["model"]["sha256"]

    @property
    def scale_factor(self) -> float:
        return float(self.manifest["model"]["scale_factor"])

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.manifest["geometry"]["resolution"])

    @property
    def has_flip(self) -> bool:
        return all("flip" in it.latents for it in self.items)

    @property
    def has_context(self) -> bool:
        return bool(self.manifest["text"]["embeddings"])

    @property
    def version(self) -> str | None:
        """The model family the cache was encoded with ('sd1', 'sd2', 'sdxl'), None if the manifest does not say."""
        return self.manifest["model"].get("version")

    @property
    def has_pooled(self) -> bool:
        """SDXL: the pooled text vector is stored beside each context."""
        return bool(self.manifest["text"].get("pooled"))

    @property
    def has_size_conditioning(self) -> bool:
        """SDXL: every item has its original size, crop and target size for the UNet's y."""
        return "size_conditioning" in self.manifest and all(it.size_conditioning for it in self.items)

    @property
    def fingerprint(self) -> str:
        """A short hash of what the loader sees (items in order: content, caption, repeats, entries, model).
        A training checkpoint can keep it: if it differs on resume, the batch order will not match the first run."""
        digest = hashlib.sha256(self.model_sha256.encode())
        for it in self.items:
            digest.update(json.dumps([it.sha256, it.caption, it.repeats, sorted(it.latents.items()), it.text]).encode())
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.items)

    def check(self, model_sha256: str | None = None, resolution: int | str | tuple[int, int] | None = None,
              version: str | None = None, context_dim: int | None = None) -> None:
        """Raise CacheMismatchError if the cache was made for another model (file sha256), resolution, model family
        or text width, or, for version='sdxl', lacks what SDXL's y needs (pooled vector, size conditioning)."""
        from .buckets import parse_resolution

        problems = []
        if model_sha256 is not None and model_sha256 != self.model_sha256:
            problems.append(f"model sha256 {self.model_sha256[:10]} in the cache, {model_sha256[:10]} asked for")
        if resolution is not None and parse_resolution(resolution) != self.resolution:
            problems.append(f"resolution {self.resolution} in the cache, {parse_resolution(resolution)} asked for")
        if version is not None and self.version is not None and version != self.version:
            problems.append(f"a {self.version} model in the cache, {version} asked for")
        elif version == "sdxl":
            if not self.has_size_conditioning:
                problems.append("no SDXL size conditioning (original size, crop, target size per image)")
            if self.has_context and not self.has_pooled:
                problems.append("text embeddings without SDXL's pooled vector")
        cached_dim = self.manifest["model"].get("context_dim")
        if context_dim is not None and self.has_context and cached_dim is not None and cached_dim != context_dim:
            problems.append(f"text context width {cached_dim} in the cache, {context_dim} asked for")
        if problems:
            raise CacheMismatchError(f"{self.folder}: cache made for something else: {'; '.join(problems)}. "
                                     "Re-encode it (data.encode with --overwrite) or point at another cache folder.")

    def _read(self, key: str, part: str) -> torch.Tensor:
        shard = self.manifest["entries"][key]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(self.folder / shard, framework="pt", device="cpu")
        return handle.get_tensor(f"{key}.{part}")

    def moments(self, index: int, variant: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each fp16 [C, h, w], of the VAE posterior of image `index` (unscaled)."""
        key = self.items[index].latents[variant]
        return self._read(key, "mean"), self._read(key, "logvar")

    @property
    def has_masks(self) -> bool:
        """Some image has a loss mask (name.mask.png or an alpha channel)."""
        return any(it.masks for it in self.items)

    def mask(self, index: int, variant: str = "plain") -> torch.Tensor | None:
        """The loss mask [1, h, w] in fp16, in [0, 1], at latent resolution (area average of the pixel mask);
        None for an image without one."""
        key = self.items[index].masks.get(variant)
        return None if key is None else self._read(key, "mask")

    def tokens(self, index: int) -> torch.Tensor:
        """Token ids [77] of the caption, for a text encoder that is trained and so must run every step."""
        return self._read(self.items[index].text, "tokens")

    def context(self, index: int) -> torch.Tensor | None:
        """Frozen text-encoder output [77, D] in fp16 for the caption, or None if embeddings were not stored."""
        return self._read(self.items[index].text, "context") if self.has_context else None

    def tokens_g(self, index: int) -> torch.Tensor | None:
        """SDXL: the caption's token ids [77] padded for the second tower (OpenCLIP bigG); None for SD1/SD2."""
        return self._read(self.items[index].text, "tokens_g") if self.version == "sdxl" else None

    def pooled(self, index: int) -> torch.Tensor | None:
        """SDXL: bigG's pooled text vector [1280] in fp16 for the caption; None when not stored."""
        return self._read(self.items[index].text, "pooled") if self.has_pooled else None

    def size_conditioning(self, index: int, variant: str = "plain") -> torch.Tensor | None:
        """SDXL: [6] float32 (original h, w, crop top, left, target h, w) in pixels of image `index`'s `variant`."""
        sizes = self.items[index].size_conditioning
        return None if sizes is None else torch.tensor(sizes[variant], dtype=torch.float32)

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, context) of the empty caption "", for caption dropout / unconditional training."""
        key = self.manifest["empty_text"]
        return self._read(key, "tokens"), (self._read(key, "context") if self.has_context else None)

    def empty_pooled(self) -> torch.Tensor | None:
        """SDXL: the pooled vector of the empty caption "" (None when not stored)."""
        return self._read(self.manifest["empty_text"], "pooled") if self.has_pooled else None

    def close(self) -> None:
        self._handles.clear()
