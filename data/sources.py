"""Finding training images and their captions in folders: sd-scripts `name.txt` + `10_name` repeats, Hugging Face
`metadata.jsonl`/`metadata.csv`, or one prompt for every image (DreamBooth)."""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .images import IMAGE_EXTENSIONS

MASK_SUFFIX = ".mask"  # name.mask.png beside name.png (any image type) weights name's loss per pixel (masked loss)

# sd-scripts names training folders "<repeats>_<name>", e.g. "10_sks dog": 10 passes per epoch, class words "sks dog".
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class ImageSource:
    """One folder of training images.

    repeats: how many times each image appears per epoch; None takes it from the nearest "<N>_name" folder
             (the folder itself or one between it and the image), else the dataset default.
    prompt:  one caption for every image of this folder (DreamBooth); caption files are then ignored.
    """

    path: Path
    repeats: int | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.repeats is not None and (not isinstance(self.repeats, int) or self.repeats < 1):
            raise ValueError(f"{self.path}: repeats must be a positive integer, got {self.repeats!r}")

    @classmethod
    def parse(cls, text: str) -> ImageSource:
        """Command-line form: "DIR", or "DIR:N" for N repeats (the suffix counts only if DIR exists as a folder)."""
        head, sep, tail = text.rpartition(":")
        if sep and tail.isdigit() and not Path(text).exists() and Path(head).is_dir():
            return cls(Path(head), repeats=int(tail))
        return cls(Path(text))


@dataclass(frozen=True)
class Found:
    """An image file with its caption, before it is opened."""

    path: Path
    caption: str
    caption_source: str  # "prompt", "metadata", "caption-file" or "folder"
    repeats: int


@dataclass
class Problem:
    """A file that was left out, and why (in words). kind "image": the file itself is unusable (remembered, and
    not retried until it changes); "input": a caption or metadata problem, checked again on every run."""

    path: str
    reason: str
    kind: str = "input"


@dataclass
class CaptionRules:
    """How captions are found. Order of precedence: the source's prompt or `prompt`; a metadata.jsonl/csv row;
    the `<stem><caption_ext>` file beside the image; with folder_captions, the name part of "<N>_name"."""

    prompt: str | None = None
    caption_ext: str = ".txt"
    caption_column: str = "text"
    folder_captions: bool = False
    repeats: int = 1


@dataclass
class Scan:
    found: list[Found] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    empty_folders: list[str] = field(default_factory=list)


def scan(sources: Sequence[ImageSource], rules: CaptionRules, exclude: Iterable[Path] = ()) -> Scan:
    """Walk every source folder (recursively, sorted, skipping hidden entries and `exclude`) and pair images with captions."""
    if rules.repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {rules.repeats!r}")
    if not rules.caption_ext.startswith("."):
        raise ValueError(f"caption_ext must start with a dot, e.g. '.txt', got {rules.caption_ext!r}")
    excluded = {p.resolve() for p in exclude}
    result = Scan()
    seen: set[Path] = set()
    for source in sources:
        root = source.path
        if not root.is_dir():
            raise ValueError(f"{root}: not a folder of images" + ("" if root.exists() else " (it does not exist)"))
        before = len(result.found) + len(result.problems)
        walked = list(_walk(root, excluded))
        # Metadata first: a metadata.jsonl may name images in subfolders of its own folder.
        captions: dict[Path, str] = {}
        for folder, _, metadata in walked:
            captions.update(_read_metadata(folder, metadata, rules.caption_column, result.problems))
        for _, images, _ in walked:
            for image in images:
                resolved = image.resolve()
                if resolved in seen:
                    continue  # the same file reached through two sources
                seen.add(resolved)
                _pair(image, root, source, rules, captions, result)
        if len(result.found) + len(result.problems) == before:
            result.empty_folders.append(str(root))
    return result


def _walk(root: Path, excluded: set[Path]):
    """(folder, image files, metadata files) for root and every non-hidden subfolder, in sorted order."""
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in excluded)
        names = sorted(f for f in files if not f.startswith("."))
        images = [here / f for f in names if Path(f).suffix.lower() in IMAGE_EXTENSIONS
                  and not Path(f).stem.lower().endswith(MASK_SUFFIX)]  # name.mask.png: the loss mask of name.png
        metadata = [here / f for f in names if f in METADATA_FILES]
        yield here, images, metadata


def _read_metadata(folder: Path, files: list[Path], column: str, problems: list[Problem]) -> dict[Path, str]:
    """file_name -> caption from metadata.jsonl / metadata.csv. File names are relative to the metadata file's folder
    and may point into subfolders, as in Hugging Face's imagefolder."""
    captions: dict[Path, str] = {}
    for meta in files:
        try:
            rows = list(_rows(meta))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            problems.append(Problem(str(meta), f"cannot read the metadata file: {err}"))
            continue
        for line, row in rows:
            where = f"{meta.name} line {line}"
            if not isinstance(row, dict):
                problems.append(Problem(str(meta), f"{where}: {row}"))
                continue
            name, text = row.get("file_name"), row.get(column)
            if not isinstance(name, str) or not name:
                problems.append(Problem(str(meta), f"{where}: no 'file_name'"))
                continue
            if not isinstance(text, str):
                problems.append(Problem(str(meta), f"{where}: no {column!r} caption for {name!r} (keys: {sorted(row)})"))
                continue
            path = folder / name
            if not path.is_file():
                problems.append(Problem(str(path), f"{where}: file_name {name!r} does not exist"))
                continue
            captions[path.resolve()] = _clean(text)
    return captions


def _rows(meta: Path):
    """(line number, dict or error text) for each row of a metadata file."""
    with open(meta, encoding="utf-8-sig", newline="") as f:
        if meta.suffix == ".csv":
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, dict(row)
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, f"not valid JSON ({err.msg})"


def _clean(text: str) -> str:
    """One line of caption: lines joined with spaces, surrounding whitespace dropped."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _pair(image: Path, root: Path, source: ImageSource, rules: CaptionRules,
          metadata: dict[Path, str], result: Scan) -> None:
    try:
        if image.stat().st_size == 0:  # say so before any caption complaint: it is the file that needs fixing
            result.problems.append(Problem(str(image), "empty file (0 bytes)", "image"))
            return
    except OSError as err:
        result.problems.append(Problem(str(image), f"cannot read the file: {err.strerror or err}", "image"))
        return
    folder_repeats, folder_name = _repeat_folder(image.parent, root)
    repeats = source.repeats or folder_repeats or rules.repeats
    prompt = source.prompt if source.prompt is not None else rules.prompt
    if prompt is not None:
        result.found.append(Found(image, _clean(prompt), "prompt", repeats))
        return
    try:
        caption = _caption_for(image, rules, metadata)
    except _CaptionError as err:
        result.problems.append(Problem(str(image), str(err)))
        return
    if caption is not None:
        result.found.append(Found(image, caption[0], caption[1], repeats))
    elif rules.folder_captions and folder_name is not None:
        result.found.append(Found(image, folder_name, "folder", repeats))
    else:
        hint = f"no {image.stem}{rules.caption_ext} and no metadata.jsonl entry"
        if folder_name is not None:
            hint += f" (folder_captions would use {folder_name!r})"
        result.problems.append(Problem(str(image), f"missing caption: {hint}"))


class _CaptionError(Exception):
    pass


def _caption_for(image: Path, rules: CaptionRules, metadata: dict[Path, str]) -> tuple[str, str] | None:
    text = metadata.get(image.resolve())
    if text is not None:
        return text, "metadata"
    caption_file = image.with_suffix(rules.caption_ext)
    if not caption_file.is_file():
        return None
    try:
        return _clean(caption_file.read_text(encoding="utf-8-sig")), "caption-file"
    except (OSError, UnicodeDecodeError) as err:
        raise _CaptionError(f"unreadable caption file {caption_file.name}: {err}") from err


def _repeat_folder(folder: Path, root: Path) -> tuple[int | None, str | None]:
    """(repeats, name) of the nearest "<N>_name" folder from the image's folder up to (and including) the root."""
    here = folder
    while True:
        match = REPEAT_FOLDER.match(here.name)
        if match and int(match.group(1)) > 0:
            return int(match.group(1)), match.group(2).strip()
        if here == root or here.parent == here:
            return None, None
        here = here.parent
