"""What `python train.py` does on the built-in toy besides training: its images, its prior images, its scores before
and after, and the labelled before/after picture. train.py calls these only when the checkpoint is the shipped toy.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from atomic import write_text

from . import world

CHECKPOINT = Path(__file__).resolve().parent / "tiny_sd.safetensors"

# 96 base prompts (8 per shape-colour pair) and 48 concept prompts: one image moves a score by 0.01 or 0.02
N_BASE, N_CONCEPT, N_WORLD = 96, 48, 8


def is_builtin_toy(ckpt: str | Path) -> bool:
    """Whether ckpt is the shipped toy model (toy/tiny_sd.safetensors), train.py's default --ckpt."""
    return Path(ckpt).resolve() == CHECKPOINT


def write_folder_once(folder: Path, images: np.ndarray, scenes) -> Path:
    """Generated images and captions, written beside `folder` and renamed: a half-written folder never counts."""
    if folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    world.write_folder(tmp, images, scenes)
    tmp.rename(folder)
    return folder


def concept_images(concept: str, n: int, out: Path, word: str | None = None) -> Path:
    """The default dataset: n captioned images of the toy world's held-out concept, written once as PNG + .txt; with
    `word` (a new token, a rare word), the captions name the concept by it."""
    if not word or word == concept:
        folder = Path(out) / f"toy_{concept}_images"
        return folder if folder.is_dir() else write_folder_once(folder, *world.concept_dataset(concept, n))
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in word)
    folder = Path(out) / f"toy_{concept}_as_{safe}_images"
    if folder.is_dir():
        return folder
    images, scenes = world.concept_dataset(concept, n)
    return write_folder_once(folder, images, [world.caption_with_word(s, concept, word) for s in scenes])


def prior_images(n: int, seed: int, out: Path) -> Path:
    """n captioned scenes of the toy's base world, for prior preservation: what the LoRA should leave as it was."""
    folder = Path(out) / f"toy_prior_images_{n}"
    return folder if folder.is_dir() else write_folder_once(folder, *world.make_dataset(n, seed=seed + 2000))


def scores(model, concept: str, seed: int, label: str, steps: int = 25, word: str | None = None) -> dict:
    """Concept and forgetting scores from the toy world's detectors, with a progress bar named after `label`;
    `word` names the concept in its prompts (default: the concept's own name)."""
    from .evaluate import evaluate

    start = time.perf_counter()
    result = evaluate(model, concept, n_base=N_BASE, n_concept=N_CONCEPT, n_world=N_WORLD, seed=seed, steps=steps,
                      progress=f"toy scores, {label} model", concept_word=word)
    result["seconds"] = time.perf_counter() - start
    print(f"toy scores, {label} model: {sum(len(v) for v in result['images'].values())} images in "
          f"{result['seconds']:.0f} s")
    return result


def summary(concept: str, before: dict, after: dict, out: Path, word: str | None = None) -> str:
    """The two numbers of the toy experiment, base vs trained, written to scores.txt/scores.json, and a labelled
    before/after picture. Returns the table."""
    named = f"'{word}' prompts show a {concept}" if word and word != concept else f"'{concept}' prompts show a {concept}"
    rows = [("concept score", named, "concept_score"),
            ("forgetting score", "base-world prompts: colour+shape accuracy", "forgetting_score")]
    lines = [f"{'':18}{'base':>8}{'trained':>9}   what it measures"]
    lines += [f"{name:18}{before[key]:8.2f}{after[key]:9.2f}   {what}" for name, what, key in rows]
    text = "\n".join(lines)
    out = Path(out)
    write_text(out / "scores.txt", text + "\n")
    keys = ("concept_score", "forgetting_score", "base_accuracy")
    write_text(out / "scores.json",
               json.dumps({k: {key: r[key] for key in keys} for k, r in (("base", before), ("trained", after))}, indent=2))
    before_after_grid(word if word and word != concept else concept, before, after, out / "before_after.png")
    return text


def before_after_grid(concept: str, before: dict, after: dict, path: Path, n: int = 8) -> Path:
    """Four labelled rows on the same prompts and seeds: concept prompts by the base and by the trained model, then
    base-world prompts by each."""
    from PIL import Image

    from sampling import grid, save_png

    from .detect import as_uint8_images

    rows = [(f"'{concept}' prompts, base", before["images"]["concept"]),
            (f"'{concept}' prompts, trained", after["images"]["concept"]),
            ("base-world prompts, base", before["images"]["base"]),
            ("base-world prompts, trained", after["images"]["base"])]
    cells = [Image.fromarray(a) for _, images in rows for a in as_uint8_images(images[:n])]
    sheet = grid(cells, cols=n, row_labels=[label for label, _ in rows], min_cell=96)
    return save_png(sheet, path)
