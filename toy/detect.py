"""Detectors for the toy world, by plain image geometry: what an image shows (background, objects, their colour,
shape, size and place), and from that the concept score and the forgetting score of a set of generated images.

How an image is read:
1. background = the median colour of the 1-pixel border (objects never touch it);
2. foreground = pixels farther than FG_THRESHOLD from the background, split into 4-connected blobs,
   blobs smaller than MIN_AREA pixels are dropped as specks, and so are blobs that cannot be one flat-coloured
   object (more than MAX_AREA_FRACTION of the image, or core colours spread more than MAX_COLOUR_SPREAD): this is
   what keeps noise from reading as a big object;
3. colour of a blob = the nearest palette colour (held-out ones included) to the mean of its core pixels, or
   "other" when even the nearest is more than COLOUR_TOLERANCE away (a red-blue blend is not purple);
4. shape of a blob, from three numbers: solidity (area / area of its convex hull; a star is far from convex),
   points (prominent peaks of the outline's distance from the centroid, by angle: a star has 5) and fill
   (area / area of its bounding box: square ~1, circle ~pi/4, triangle ~1/2, or 3 points). A star needs both a
   low solidity and 4-6 points, so that a ragged blob from a poorly trained model is not taken for one; other
   blobs with solidity below IRREGULAR_SOLIDITY are "irregular", which matches no caption;
5. size from the bounding box's larger side; position from the offset of the box's centre from the image centre
   (the box, not the centroid: a triangle's centroid sits low in its box).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import world

FG_THRESHOLD = 50.0       # RGB distance; the closest object/background pair in the palette is ~100 apart
MIN_AREA = 8              # pixels; the smallest object (8 px wide triangle) has ~30
MAX_AREA_FRACTION = 0.5   # the largest object (18 px square) covers ~25% of a 32 x 32 image
MAX_COLOUR_SPREAD = 40.0  # RGB std of a blob's core pixels; drawn objects have ~10 (jitter, edges)
COLOUR_TOLERANCE = 70.0   # RGB distance to the nearest palette colour; half the closest pair (purple-blue, ~120)
STAR_SOLIDITY = 0.8       # stars ~0.62, convex shapes > 0.85 once rasterised
IRREGULAR_SOLIDITY = 0.7  # a convex shape drawn badly, but still a shape, stays above this
STAR_POINTS = (4, 6)      # a drawn star has 5; one point may merge or split in a generated image
ANGLE_BINS = 24           # 15 degrees each: star points are 72 apart
POINT_PROMINENCE = 0.2    # a point rises this fraction of the outline's largest radius above its surroundings
# Convex shapes. Thresholds are set on ground-truth images and on their VAE reconstructions, which round corners
# (a decoded square fills 0.87-0.97 of its box, a circle 0.76-0.82, a triangle 0.60-0.68 but keeps its 3 points).
SQUARE_FILL = 0.86        # squares ~1.0
TRIANGLE_FILL = 0.6       # triangles ~0.5; below this a blob is a triangle whatever its points
LARGE_SIDE = 13           # px; small objects are 8-10 wide, large ones 16-18
CENTRE_TOLERANCE = 3.0    # px of centroid offset still read as "center"


@dataclass
class Blob:
    colour: str
    shape: str
    size: str
    position: str
    area: int
    centre: tuple[float, float]   # (x, y) of the bounding box centre, in pixels
    solidity: float
    fill: float
    points: int


@dataclass
class Reading:
    """What one image shows according to the detectors."""

    background: str
    blobs: list[Blob] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.blobs)

    @property
    def main(self) -> Blob | None:
        """The largest blob: the object a single-object prompt asks for."""
        return max(self.blobs, key=lambda b: b.area) if self.blobs else None


def as_uint8_images(images) -> np.ndarray:
    """uint8 [N, H, W, 3] from: uint8 arrays/tensors [N, H, W, 3] or [N, 3, H, W] (or one image without N),
    or float arrays/tensors in [-1, 1] (what the VAE decodes to) in either layout."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy() if images.is_floating_point() else images.cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[3]):
        raise ValueError(f"expected images [N, H, W, 3] or [N, 3, H, W], got shape {arr.shape}")
    if arr.shape[3] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be uint8 or floating point in [-1, 1], got {arr.dtype}")
    return np.clip(np.rint((arr + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]], tolerance: float = np.inf) -> str:
    names = list(palette)
    dist = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float64) - colour, axis=1)
    best = int(np.argmin(dist))
    return names[best] if dist[best] <= tolerance else "other"


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (row, col) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, pixels = [(r0, c0)], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pixels))
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        chain: list = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]), dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def count_points(pixels: np.ndarray) -> int:
    """Prominent outward points of a blob: peaks of its outline's largest radius from the centroid, by angle."""
    centre = pixels.mean(axis=0)
    inside = set(map(tuple, pixels.tolist()))
    edge = np.array([p for p in pixels.tolist()
                     if any((p[0] + dr, p[1] + dc) not in inside for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))])
    offsets = edge - centre
    radius = np.hypot(offsets[:, 0], offsets[:, 1]) + 0.5  # to the pixel's outer side, roughly
    bins = ((np.arctan2(offsets[:, 0], offsets[:, 1]) + np.pi) / (2 * np.pi) * ANGLE_BINS).astype(int) % ANGLE_BINS
    profile = np.zeros(ANGLE_BINS)
    np.maximum.at(profile, bins, radius)
    for b in np.flatnonzero(profile == 0):  # an empty bin (small blob): borrow its neighbours' radius
        profile[b] = 0.5 * (profile[b - 1] + profile[(b + 1) % ANGLE_BINS])
    profile = (np.roll(profile, 1) + 2 * profile + np.roll(profile, -1)) / 4
    window = lambda b, k: profile[[(b + d) % ANGLE_BINS for d in range(-k, k + 1)]]  # noqa: E731
    return sum(
        1 for b in range(ANGLE_BINS)
        if profile[b] == window(b, 2).max() and profile[b] > profile[b - 1]
        and profile[b] - window(b, 3).min() >= POINT_PROMINENCE * profile.max()
    )


def classify_shape(pixels: np.ndarray) -> tuple[str, float, float, int]:
    """(shape, solidity, fill, points) of one blob given as (row, col) pixel coordinates."""
    area = len(pixels)
    # Hull of the pixels' corners, not centres: a filled square then has solidity exactly 1.
    corners = np.concatenate([pixels + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))])
    solidity = area / max(_hull_area(corners), 1.0)
    (r0, c0), (r1, c1) = pixels.min(0), pixels.max(0)
    fill = area / float((r1 - r0 + 1) * (c1 - c0 + 1))
    points = count_points(pixels)
    if solidity < STAR_SOLIDITY and STAR_POINTS[0] <= points <= STAR_POINTS[1]:
        shape = "star"
    elif solidity < IRREGULAR_SOLIDITY:
        shape = "irregular"
    elif fill >= SQUARE_FILL:
        shape = "square"
    elif points == 3 or fill < TRIANGLE_FILL:
        shape = "triangle"
    else:
        shape = "circle"
    return shape, solidity, fill, points


def _position(cx: float, cy: float, size: int) -> str:
    dx, dy = cx - size / 2, cy - size / 2
    if max(abs(dx), abs(dy)) <= CENTRE_TOLERANCE:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def read_image(image: np.ndarray) -> Reading:
    """Detect background and objects in one uint8 [H, W, 3] image."""
    img = np.asarray(image, dtype=np.float64)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=2)
    reading = Reading(background=_nearest(bg, world.BACKGROUNDS))
    for pixels in _components(dist > FG_THRESHOLD):
        if not MIN_AREA <= len(pixels) <= MAX_AREA_FRACTION * h * w:
            continue
        d = dist[pixels[:, 0], pixels[:, 1]]
        core = pixels[d >= 0.75 * np.percentile(d, 90)]  # skip anti-aliased edge pixels, which mix in the background
        core_rgb = img[core[:, 0], core[:, 1]]
        if np.sqrt(core_rgb.var(axis=0).sum()) > MAX_COLOUR_SPREAD:
            continue
        colour = _nearest(core_rgb.mean(axis=0), world.COLOURS, COLOUR_TOLERANCE)
        shape, solidity, fill, points = classify_shape(pixels)
        (r0, c0), (r1, c1) = pixels.min(0), pixels.max(0)
        side = max(r1 - r0 + 1, c1 - c0 + 1)
        cx, cy = (c0 + c1 + 1) / 2, (r0 + r1 + 1) / 2
        reading.blobs.append(Blob(colour=colour, shape=shape, size="large" if side >= LARGE_SIDE else "small",
                                  position=_position(cx, cy, w), area=len(pixels), centre=(float(cx), float(cy)),
                                  solidity=float(solidity), fill=float(fill), points=points))
    return reading


def read_images(images) -> list[Reading]:
    return [read_image(im) for im in as_uint8_images(images)]


ATTRIBUTES = ("colour", "shape", "background", "count", "size", "position")


def agreement(scene: world.Scene, reading: Reading) -> dict[str, bool]:
    """Per attribute: does the image show what the scene's caption says? Colour, shape and size are those of
    the largest blob; position is judged for single objects only (True when the scene has several)."""
    main = reading.main
    return {
        "colour": main is not None and main.colour == scene.colour,
        "shape": main is not None and main.shape == scene.shape,
        "background": reading.background == scene.background,
        "count": reading.count == scene.count,
        "size": main is not None and main.size == scene.size,
        "position": scene.count > 1 or (main is not None and main.position == scene.position),
    }


def accuracy(images, scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Fraction of images agreeing with their scene, per attribute."""
    readings = read_images(images)
    if len(readings) != len(scenes):
        raise ValueError(f"{len(readings)} images but {len(scenes)} scenes")
    rows = [agreement(s, r) for s, r in zip(scenes, readings)]
    return {a: float(np.mean([row[a] for row in rows])) for a in ATTRIBUTES}


def shows_concept(reading: Reading, concept: str) -> bool:
    """Whether the image's main object is a star (concept "star") or purple (concept "purple")."""
    if concept not in world.CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; the held-out concepts are {world.CONCEPTS}")
    main = reading.main
    if main is None:
        return False
    return main.shape == concept if concept in world.SHAPES else main.colour == concept


def concept_score(images, concept: str = world.DEFAULT_CONCEPT) -> float:
    """Fraction of images (made for prompts naming `concept`) whose main object shows the concept."""
    readings = read_images(images)
    if not readings:
        raise ValueError("concept_score needs at least one image")
    return float(np.mean([shows_concept(r, concept) for r in readings]))


def forgetting_score(images, scenes: Sequence[world.Scene]) -> float:
    """Agreement of images made for base-world prompts with those prompts: mean of colour and shape accuracy.

    Compare the base model's value with the fine-tuned model's: a drop means the fine-tune overwrote what the
    base knew (e.g. every shape drawn as the new star). Chance is about (1/5 + 1/4) / 2 for random blobs."""
    acc = accuracy(images, scenes)
    return 0.5 * (acc["colour"] + acc["shape"])
