"""Writing results: A1111's `parameters` PNG text, atomic PNG saving, and labelled image grids."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from atomic import atomic_path

from .samplers import A1111_NAMES


def _quote(value: object) -> str:
    """A1111 quotes a value that holds a comma, colon or newline (as JSON), so the line still splits on ', '."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(x: float) -> str:
    return f"{x:g}"


def a1111_parameters(prompt: str, negative: str = "", *, steps: int, sampler: str, cfg: float, seed: int,
                     width: int, height: int, model: str | None = None, karras: bool = False, eta: float = 0.0,
                     spacing: str = "leading", loras: Sequence[tuple[str, float]] = (),
                     extra: Mapping[str, object] | None = None) -> str:
    """The text A1111 stores under the PNG key `parameters`, which A1111's "PNG Info", ComfyUI and civitai read:

        <prompt> <lora:name:scale> ...
        Negative prompt: <negative>            (only when there is one)
        Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 0, Size: 512x512, Model: name, ...

    loras: (name, multiplier) pairs, written into the prompt as <lora:name:multiplier> as A1111 users type them.
    """
    prompt_line = " ".join([prompt] + [f"<lora:{name}:{_number(scale)}>" for name, scale in loras])
    fields: dict[str, object] = {"Steps": steps, "Sampler": A1111_NAMES.get(sampler, sampler)}
    if karras:
        fields["Schedule type"] = "Karras"
    fields.update({"CFG scale": _number(cfg), "Seed": seed, "Size": f"{width}x{height}"})
    if model:
        fields["Model"] = model
    if eta:
        fields["Eta DDIM"] = _number(eta)
    if spacing != "leading":
        fields["Timestep spacing"] = spacing
    fields.update(extra or {})
    lines = [prompt_line.replace("\n", " ")]
    if negative:
        lines.append(f"Negative prompt: {negative}".replace("\n", " "))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """The inverse, for checks: {'prompt', 'negative', and every 'Key': 'value' of the last line}."""
    lines = text.split("\n")
    out = {"prompt": lines[0], "negative": ""}
    for line in lines[1:-1]:
        if line.startswith("Negative prompt: "):
            out["negative"] = line[len("Negative prompt: "):]
    for key, value in re.findall(r'\s*([^:,]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', lines[-1]):
        out[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return out


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write `image` as PNG with the `parameters` text chunk, atomically (temp file in the same folder, then rename),
    so a crash never leaves a half-written image under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def next_index(folder: str | os.PathLike) -> int:
    """1 + the largest leading number of the files in `folder` (A1111's 00000-seed.png numbering), or 0."""
    folder = Path(folder)
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := re.match(r"(\d+)-", p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def label_font(size: int):
    """The font labels are drawn in: Pillow's scalable default (FreeType), or its bitmap font without FreeType."""
    return ImageFont.load_default(size=size)


def cell_scale(width: int, height: int, labels: Sequence[str], font, min_cell: int = 0) -> int:
    """The integer factor that images of width x height are enlarged by in a grid, so that every column label fits
    its column with a margin and a cell is at least min_cell pixels a side (32 px toy images become readable)."""
    margin = int(getattr(font, "size", 12))
    widest = max((int(font.getlength(s)) for s in labels), default=0)
    need = max(widest + margin if labels else 0, min_cell)
    return max(1, math.ceil(need / width), math.ceil(min_cell / height) if min_cell else 1)


def grid(images: Sequence[Image.Image], cols: int | None = None, col_labels: Sequence[str] | None = None,
         row_labels: Sequence[str] | None = None, min_cell: int = 0) -> Image.Image:
    """Images laid out row by row (default: a near-square grid), with optional labels above columns / left of rows.

    Labels stay legible at every image size: the font is at least 12 px, and small images are enlarged by an
    integer factor (nearest neighbour, so pixels stay sharp) until each column label fits its column."""
    if not images:
        raise ValueError("no images to put in a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w0, h0 = images[0].size
    font_size = max(12, min(w0, h0) // 16)
    font = label_font(font_size)
    scale = cell_scale(w0, h0, list(col_labels or []), font, min_cell)
    w, h = w0 * scale, h0 * scale
    top = font_size * 2 if col_labels else 0
    left = max((int(font.getlength(s)) for s in row_labels), default=0) + font_size if row_labels else 0
    out = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(out)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC
    for i, image in enumerate(images):
        cell = image.convert("RGB")
        if cell.size != (w, h):
            cell = cell.resize((w, h), resample)
        out.paste(cell, (left + (i % cols) * w, top + (i // cols) * h))
    for c, label in enumerate(col_labels or []):
        _centred(draw, (left + c * w + w // 2, top // 2), label, font)
    for r, label in enumerate(row_labels or []):
        _centred(draw, (left // 2, top + r * h + h // 2), label, font)
    return out


def _centred(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font) -> None:
    try:
        draw.text(xy, text, fill="black", font=font, anchor="mm")
    except ValueError:  # Pillow without FreeType has only a bitmap font, which cannot anchor
        draw.text((xy[0] - int(font.getlength(text)) // 2, xy[1] - 5), text, fill="black", font=font)
