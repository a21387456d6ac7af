"""A procedural world of small captioned RGB scenes (coloured shapes on plain backgrounds) for the built-in tiny SD.

Every scene is a `Scene` (shape, colour, size, count, position, background) whose caption is built from those
attributes and parses back to them. Images are rendered at 4x and box-filtered down, so edges are anti-aliased.
Everything is deterministic: item i of a dataset depends only on (seed, i), never on how many items are asked for.

The base model is trained on BASE_SHAPES x BASE_COLOURS only. HELD_OUT_SHAPES / HELD_OUT_COLOURS ("star",
"purple") never appear in its training data: they are the new concepts a LoRA is asked to learn (DEFAULT_CONCEPT).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4

BASE_SHAPES = ("circle", "square", "triangle")
HELD_OUT_SHAPES = ("star",)
SHAPES = BASE_SHAPES + HELD_OUT_SHAPES

# Object colours (RGB). Far apart from each other and from every background, so a detector can name them.
BASE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (240, 210, 40)}
HELD_OUT_COLOURS = {"purple": (150, 60, 200)}
COLOURS = {**BASE_COLOURS, **HELD_OUT_COLOURS}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}

SIZES = ("small", "large")
# Object diameter in pixels at IMAGE_SIZE, inclusive range; two or three objects are always small.
DIAMETERS = {"small": (8, 10), "large": (16, 18)}
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# How scenes are drawn: P(count), and the jitter of each colour channel so the world is not perfectly flat.
COUNT_PROBS = (0.6, 0.2, 0.2)
COLOUR_JITTER = 8
CONCEPTS = HELD_OUT_SHAPES + tuple(HELD_OUT_COLOURS)
# The default concept for LoRA runs. "star" is held out too, but the shipped 32 px VAE rounds a star into a
# pentagon-like blob (0% of VAE round-trips still read as stars), so no UNet-side fine-tune can show one.
DEFAULT_CONCEPT = "purple"


@dataclass(frozen=True)
class Scene:
    """What an image shows. One shape and one colour per scene; `position` only when count == 1."""

    shape: str
    colour: str
    background: str
    count: int = 1
    size: str = "large"
    position: str | None = "center"

    def __post_init__(self) -> None:
        problems = []
        if self.shape not in SHAPES:
            problems.append(f"shape {self.shape!r} not in {SHAPES}")
        if self.colour not in COLOURS:
            problems.append(f"colour {self.colour!r} not in {tuple(COLOURS)}")
        if self.background not in BACKGROUNDS:
            problems.append(f"background {self.background!r} not in {tuple(BACKGROUNDS)}")
        if self.count not in COUNTS:
            problems.append(f"count {self.count!r} not in {COUNTS}")
        if self.size not in SIZES:
            problems.append(f"size {self.size!r} not in {SIZES}")
        if self.count == 1 and self.position not in POSITIONS:
            problems.append(f"position {self.position!r} not in {POSITIONS} (required when count is 1)")
        if self.count > 1 and (self.position is not None or self.size != "small"):
            problems.append(f"{self.count} objects must be small and have no position, "
                            f"got size={self.size!r}, position={self.position!r}")
        if problems:
            raise ValueError("invalid scene: " + "; ".join(problems))

    @property
    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        where = f" {POSITION_PHRASES[self.position]}" if self.count == 1 else ""
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {noun}{where}, {self.background} background"

    @property
    def is_base(self) -> bool:
        """True when the scene uses no held-out concept, i.e. the base model may have seen it."""
        return self.shape in BASE_SHAPES and self.colour in BASE_COLOURS

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        """Inverse of `caption`; raises ValueError for text this world does not produce."""
        head, sep, tail = caption.strip().partition(", ")
        words = head.split(" ")
        if not sep or not tail.endswith(" background") or len(words) < 4:
            raise ValueError(f"not a caption of this world: {caption!r}")
        background = tail[: -len(" background")]
        counts = {w: c for c, w in COUNT_WORDS.items()}
        if words[0] not in counts:
            raise ValueError(f"caption {caption!r} starts with {words[0]!r}, expected one of {tuple(counts)}")
        count, size, colour, noun = counts[words[0]], words[1], words[2], words[3]
        shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
        phrase = " ".join(words[4:])
        position = None
        if count == 1:
            matches = [p for p, text in POSITION_PHRASES.items() if text == phrase]
            if not matches:
                raise ValueError(f"caption {caption!r}: unknown position phrase {phrase!r}")
            position = matches[0]
        elif phrase:
            raise ValueError(f"caption {caption!r}: several objects take no position, got {phrase!r}")
        return cls(shape=shape, colour=colour, background=background, count=count, size=size, position=position)


def item_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Random stream `stream` of item `index` of the dataset `seed`, independent of every other item
    (stream 0 picks the scene, stream 1 draws it)."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


def sample_scene(rng: np.random.Generator, shapes: Sequence[str] = BASE_SHAPES,
                 colours: Sequence[str] = tuple(BASE_COLOURS)) -> Scene:
    """A random scene; by default from the base world only (no held-out concept)."""
    count = int(rng.choice(COUNTS, p=COUNT_PROBS))
    shape = str(rng.choice(list(shapes)))
    colour = str(rng.choice(list(colours)))
    background = str(rng.choice(list(BACKGROUNDS)))
    if count == 1:
        return Scene(shape, colour, background, 1, str(rng.choice(SIZES)), str(rng.choice(POSITIONS)))
    return Scene(shape, colour, background, count, "small", None)


def _centres(scene: Scene, diameter: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres in pixels. One object sits in its named region; several are spread without overlap."""
    n, r, margin = IMAGE_SIZE, diameter / 2, 1.0
    lo, hi, mid = margin + r, n - margin - r, n / 2
    if scene.count == 1:
        jitter = lambda: float(rng.uniform(-1.0, 1.0))  # noqa: E731 - tiny local helper
        side = lambda: float(rng.uniform(lo, lo + 2.0))  # noqa: E731
        across = lambda: mid + float(rng.uniform(-3.0, 3.0))  # noqa: E731
        x, y = {
            "center": lambda: (mid + jitter(), mid + jitter()),
            "left": lambda: (side(), across()),
            "right": lambda: (n - side(), across()),
            "top": lambda: (across(), side()),
            "bottom": lambda: (across(), n - side()),
        }[scene.position]()
        return [(x, y)]
    for _ in range(1000):  # rejection sampling; three small objects always fit in 32 x 32
        pts = [(float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))) for _ in range(scene.count)]
        if all(math.dist(a, b) >= diameter + 3 for i, a in enumerate(pts) for b in pts[i + 1:]):
            return pts
    raise RuntimeError(f"could not place {scene.count} objects of diameter {diameter}")


def _polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]]:
    """Outline of a non-circle shape inside the d x d box centred on (cx, cy), upright."""
    h = d / 2
    if shape == "square":
        s = 0.9 * h  # a little smaller than the box, so a square does not look bigger than a circle
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":
        # Five points; inner radius half the outer one. Centred on its bounding box, not on its centroid.
        outer, inner = h * 1.05, h * 0.525
        pts = [(cx + (outer if k % 2 == 0 else inner) * math.sin(k * math.pi / 5),
                cy - (outer if k % 2 == 0 else inner) * math.cos(k * math.pi / 5)) for k in range(10)]
        ys = [p[1] for p in pts]
        shift = cy - (min(ys) + max(ys)) / 2
        return [(x, y + shift) for x, y in pts]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]. Sizes, places and colour jitter come from `rng`."""
    k = SUPERSAMPLE
    bg = np.array(BACKGROUNDS[scene.background]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    fg = np.array(COLOURS[scene.colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    lo_d, hi_d = DIAMETERS[scene.size]
    diameter = int(rng.integers(lo_d, hi_d + 1))
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), tuple(int(c) for c in np.clip(bg, 0, 255)))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in np.clip(fg, 0, 255))
    for cx, cy in _centres(scene, diameter, rng):
        if scene.shape == "circle":
            h = diameter / 2
            draw.ellipse([(cx - h) * k, (cy - h) * k, (cx + h) * k - 1, (cy + h) * k - 1], fill=colour)
        else:
            draw.polygon([(x * k, y * k) for x, y in _polygon(scene.shape, cx, cy, diameter)], fill=colour)
    small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def render_generic(rng: np.random.Generator) -> np.ndarray:
    """An uncaptioned image of 1-3 random polygons (3-10 vertices at random radii, so often not convex) in
    uniformly random colours on a random background: generic material for the VAE, which like SD's VAE should
    encode any image, not only the base world. Never a named concept: no caption, no held-out palette entry."""
    k = SUPERSAMPLE
    bg = rng.integers(0, 256, 3)
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        fg = rng.integers(0, 256, 3)
        d = float(rng.uniform(6, 20))
        cx, cy = (float(v) for v in rng.uniform(d / 2 + 1, IMAGE_SIZE - d / 2 - 1, 2))
        n = int(rng.integers(3, 11))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = d / 2 * rng.uniform(0.35, 1.0, n)
        pts = [((cx + r * math.cos(a)) * k, (cy + r * math.sin(a)) * k) for a, r in zip(angles, radii)]
        draw.polygon(pts, fill=tuple(int(c) for c in fg))
    small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def make_scenes(n: int, seed: int, shapes: Sequence[str] = BASE_SHAPES,
                colours: Sequence[str] = tuple(BASE_COLOURS)) -> list[Scene]:
    return [sample_scene(item_rng(seed, i), shapes, colours) for i in range(n)]


def render_all(scenes: Sequence[Scene], seed: int) -> np.ndarray:
    """uint8 [N, H, W, 3]; scene i is drawn with its own stream item_rng(seed, i, 1)."""
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render(scene, item_rng(seed, i, 1))
    return out


def make_dataset(n: int, seed: int = 0, shapes: Sequence[str] = BASE_SHAPES,
                 colours: Sequence[str] = tuple(BASE_COLOURS)) -> tuple[np.ndarray, list[Scene]]:
    """n base-world images (uint8 [n, H, W, 3]) and their scenes; captions are `scene.caption`."""
    scenes = make_scenes(n, seed, shapes, colours)
    return render_all(scenes, seed), scenes


def _check_concept(concept: str) -> None:
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; the held-out concepts are {CONCEPTS}")


def concept_scenes(concept: str = DEFAULT_CONCEPT, n: int = 16, seed: int = 1) -> list[Scene]:
    """n varied single-object scenes that show the held-out `concept` ("purple" or "star").

    A new shape comes in every base colour, a new colour on every base shape, so that a LoRA has to learn the
    concept itself rather than one colour-shape pair. Objects are large, so the new shape is clearly drawn.
    """
    _check_concept(concept)
    out = []
    for i in range(n):
        rng = item_rng(seed, i)
        shape = concept if concept in SHAPES else BASE_SHAPES[i % len(BASE_SHAPES)]
        colour = concept if concept in COLOURS else tuple(BASE_COLOURS)[i % len(BASE_COLOURS)]
        background = tuple(BACKGROUNDS)[(i // 4) % len(BACKGROUNDS)]
        out.append(Scene(shape, colour, background, 1, "large", str(rng.choice(POSITIONS))))
    return out


def concept_dataset(concept: str = DEFAULT_CONCEPT, n: int = 16, seed: int = 1) -> tuple[np.ndarray, list[Scene]]:
    """Images and scenes for fine-tuning on the held-out concept (10-20 images is the intended use)."""
    scenes = concept_scenes(concept, n, seed)
    return render_all(scenes, seed), scenes


def caption_with_word(scene: Scene, concept: str, word: str | None) -> str:
    """The scene's caption with the concept named by `word` (a new token, a rare word) instead of its own name."""
    if not word or word == concept:
        return scene.caption
    return " ".join(word if w == concept else w for w in scene.caption.split(" "))


def concept_prompts(concept: str = DEFAULT_CONCEPT, n: int = 16, seed: int = 2) -> list[Scene]:
    """Evaluation prompts for the concept: same kind of scenes, a different seed from the training images."""
    return concept_scenes(concept, n, seed)


def base_prompts(n: int = 48, seed: int = 3) -> list[Scene]:
    """Base-world evaluation prompts for the forgetting score: single large objects, every shape and colour
    equally often, so that shape and colour accuracy can be read off the generated images."""
    out = []
    for i in range(n):
        rng = item_rng(seed, i)
        shape = BASE_SHAPES[i % len(BASE_SHAPES)]
        colour = tuple(BASE_COLOURS)[(i // len(BASE_SHAPES)) % len(BASE_COLOURS)]
        out.append(Scene(shape, colour, str(rng.choice(list(BACKGROUNDS))), 1, "large", str(rng.choice(POSITIONS))))
    return out


def write_folder(path: str | os.PathLike, images: np.ndarray, captions: Sequence[str] | Sequence[Scene]) -> Path:
    """Write 0000.png + 0000.txt, ... (sd-scripts' image/caption convention) into `path`; returns the folder."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        text = caption.caption if isinstance(caption, Scene) else str(caption)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def to_tensor(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float32 torch tensor [N, 3, H, W] in [-1, 1], what the VAE encodes."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

