"""What the page can set (a Settings), read from untrusted JSON: every field checked, every size bounded."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sampling import SAMPLERS

# The model's parts a LoRA layer can sit in, and what kind of layer it is: the page's on/off switches.
GROUPS = ("down", "mid", "up", "text", "other")   # UNet encoder (input_blocks), middle, decoder, text encoder, rest
KINDS = ("attention", "conv")                      # transformer layers (attention, proj_in/out, ff) / ResBlock convs

# Bounds on one request: a page (or anyone who can reach the port) cannot ask for unbounded work.
MAX_PROMPT_CHARS = 500
MAX_STEPS = 100
MAX_IMAGES = 4            # seeds per column
MAX_SEED = 2**32 - 1
MAX_SCALE = 8.0
MAX_ALPHA = 1e4
MAX_CFG = 30.0
MAX_RANK_COLUMNS = 8      # ks compared side by side
MAX_CELLS = 32            # images in one render: columns x seeds


class SettingsError(ValueError):
    """A request the lab refuses; the server answers 400 with this message."""


@dataclass
class Settings:
    """One render: the same seeds for every column, each column one LoRA (or the base) at these settings.

    rank: k for every layer (None: no truncation); ranks: a column per k instead, for each adapter; layer_ranks: k for single layers, by name, over the global k.
    alpha: every layer re-scaled to this alpha, ΔW·alpha/alpha_file (None: the file's own). scale: the LoRA
    multiplier. groups / kinds: the layers that stay on. loras: the LoRAs shown, by index (None: all)."""

    prompt: str = ""
    negative: str = ""
    seed: int = 0
    images: int = 2
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "ddim"
    scale: float = 1.0
    rank: int | None = None
    ranks: list[int] | None = None
    layer_ranks: dict[str, int] = field(default_factory=dict)
    alpha: float | None = None
    groups: list[str] = field(default_factory=lambda: list(GROUPS))
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    base: bool = True
    loras: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _number(data: dict, key: str, lo: float, hi: float, *, integer: bool = False, optional: bool = False):
    value = data[key]
    if value is None and optional:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise SettingsError(f"{key}: expected {what} from {lo:g} to {hi:g}"
                            + (" or null" if optional else "") + f", got {value!r}"[:120])
    return value


def _string(data: dict, key: str, limit: int) -> str:
    value = data[key]
    if not isinstance(value, str) or len(value) > limit:
        raise SettingsError(f"{key}: expected text of at most {limit} characters")
    return value


def _choices(data: dict, key: str, allowed: tuple[str, ...]) -> list[str]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v in allowed for v in value):
        raise SettingsError(f"{key}: expected a list of some of {', '.join(allowed)}")
    return list(dict.fromkeys(value))


def parse_settings(data: Any, *, layer_names: set[str], max_rank: int, n_loras: int,
                   defaults: Settings | None = None) -> Settings:
    """Settings from a decoded JSON object; keys left out keep `defaults`. Raises SettingsError naming the field.

    Layer names are checked against the layers the LoRAs adapt: nothing the page sends names a file."""
    if not isinstance(data, dict):
        raise SettingsError("expected a JSON object of settings")
    known = set(Settings.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(map(str, unknown))[:200]}; known: {', '.join(sorted(known))}")
    s = Settings(**(defaults.to_json() if defaults else {}))
    if "prompt" in data:
        s.prompt = _string(data, "prompt", MAX_PROMPT_CHARS)
    if "negative" in data:
        s.negative = _string(data, "negative", MAX_PROMPT_CHARS)
    if "seed" in data:
        s.seed = _number(data, "seed", 0, MAX_SEED, integer=True)
    if "images" in data:
        s.images = _number(data, "images", 1, MAX_IMAGES, integer=True)
    if "steps" in data:
        s.steps = _number(data, "steps", 1, MAX_STEPS, integer=True)
    if "cfg" in data:
        s.cfg = float(_number(data, "cfg", 0, MAX_CFG))
    if "sampler" in data:
        if data["sampler"] not in SAMPLERS:
            raise SettingsError(f"sampler: expected one of {', '.join(SAMPLERS)}")
        s.sampler = data["sampler"]
    if "scale" in data:
        s.scale = float(_number(data, "scale", -MAX_SCALE, MAX_SCALE))
    if "rank" in data:
        s.rank = _number(data, "rank", 1, max(1, max_rank), integer=True, optional=True)
    if "ranks" in data:
        ranks = data["ranks"]
        if ranks is not None:
            if not isinstance(ranks, list) or not 1 <= len(ranks) <= MAX_RANK_COLUMNS:
                raise SettingsError(f"ranks: expected a list of 1 to {MAX_RANK_COLUMNS} ranks, or null")
            ranks = [_number({"ranks": k}, "ranks", 1, max(1, max_rank), integer=True) for k in ranks]
        s.ranks = ranks
    if "layer_ranks" in data:
        ranks = data["layer_ranks"]
        if not isinstance(ranks, dict) or len(ranks) > len(layer_names):
            raise SettingsError("layer_ranks: expected an object {layer name: rank}")
        for name in ranks:
            if name not in layer_names:
                raise SettingsError(f"layer_ranks: no adapted layer is named {str(name)[:100]!r}")
            _number(ranks, name, 1, max(1, max_rank), integer=True)
        s.layer_ranks = dict(ranks)
    if "alpha" in data:
        alpha = _number(data, "alpha", 0, MAX_ALPHA, optional=True)
        if alpha is not None and alpha <= 0:
            raise SettingsError("alpha: expected a number above 0, or null for the file's own")
        s.alpha = None if alpha is None else float(alpha)
    if "groups" in data:
        s.groups = _choices(data, "groups", GROUPS)
    if "kinds" in data:
        s.kinds = _choices(data, "kinds", KINDS)
    if "base" in data:
        if not isinstance(data["base"], bool):
            raise SettingsError("base: expected true or false")
        s.base = data["base"]
    if "loras" in data:
        loras = data["loras"]
        if loras is not None:
            if (not isinstance(loras, list) or len(loras) > n_loras
                    or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_loras for i in loras)):
                raise SettingsError(f"loras: expected a list of LoRA indices from 0 to {n_loras - 1}, or null for all")
            loras = list(dict.fromkeys(loras))
        s.loras = loras
    shown = len(range(n_loras) if s.loras is None else s.loras)
    if not s.base and not shown:
        raise SettingsError("nothing to render: no LoRA chosen and the base column is off")
    cells = (int(s.base) + shown * len(s.ranks or [None])) * s.images
    if cells > MAX_CELLS:
        raise SettingsError(f"{cells} images asked for; at most {MAX_CELLS} in one render (fewer seeds, LoRAs or ranks)")
    return s
