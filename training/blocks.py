"""Rank, alpha and learning rate per UNet block from the command line, and sd-scripts' block learning-rate weights.

    --block_ranks  "input_blocks.*=8,output_blocks.*=4"     rank per pattern (0: no adapter there)
    --block_alphas "middle_block.*=2"                       alpha per pattern
    --block_lrs    "output_blocks.*=5e-4"                   learning rate per pattern
    --down_lr_weight cosine   --mid_lr_weight 0.5   --up_lr_weight 0,0,0,0,0,0,1,1,1,1,1,1

Patterns are lora.inject's: globs on module paths (names = checkpoint keys, so `input_blocks.4.*` is the block
sd-scripts calls IN04), or regexes after `re:`; the first pattern that matches a layer wins. The lr weights multiply
--lr per block, as sd-scripts' down/mid/up_lr_weight do: one number per block (12 input and 12 output blocks on
SD1/SD2, 9 on SDXL), or a preset over the blocks, with an optional "+base" added to each:

    linear  i/(n-1)          reverse_linear  (n-1-i)/(n-1)
    sine    sin(π/2·i/(n-1))  cosine          sin(π/2·(n-1-i)/(n-1))        zeros  0

A block whose weight is 0 gets no adapter (sd-scripts leaves it out too).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from lora.inject import first_match

LR_WEIGHT_PRESETS = ("linear", "reverse_linear", "sine", "cosine", "zeros")


def parse_table(text: str, option: str) -> dict[str, float]:
    """"pattern=value,pattern=value" -> {pattern: value}, in order; ValueError naming the option and the bad item."""
    table: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not pattern or not math.isfinite(number) or number < 0:
            raise ValueError(f"{option}: {item!r} is not PATTERN=VALUE with a number >= 0 (e.g. "
                             f"'input_blocks.*=8,output_blocks.*=4')")
        table[pattern.strip()] = number
    return table


def lr_weight_list(text: str, n: int, option: str) -> list[float]:
    """A block lr-weight option as n numbers: a preset name with an optional +base, or n comma-separated numbers."""
    name, _, base_text = text.partition("+")
    if name in LR_WEIGHT_PRESETS:
        try:
            base = float(base_text) if base_text else 0.0
        except ValueError:
            raise ValueError(f"{option}: {text!r}: the part after + must be a number") from None
        ramp = [i / (n - 1) for i in range(n)] if n > 1 else [1.0]
        shapes = {"linear": ramp, "reverse_linear": ramp[::-1],
                  "sine": [math.sin(math.pi / 2 * x) for x in ramp],
                  "cosine": [math.sin(math.pi / 2 * x) for x in ramp[::-1]], "zeros": [0.0] * n}
        return [w + base for w in shapes[name]]
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option}: {text!r} is neither a preset ({', '.join(LR_WEIGHT_PRESETS)}) nor "
                         f"comma-separated numbers") from None
    if len(values) != n or any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"{option}: {text!r}: need {n} numbers >= 0, one per block, got {len(values)}")
    return values


def block_lr_weights(down: str, mid: str, up: str, n: int) -> dict[str, float]:
    """{module-path pattern: lr weight} for the input (down), middle and output (up) blocks; empty options add none."""
    table: dict[str, float] = {}
    if down:
        table.update({f"input_blocks.{i}.*": w for i, w in enumerate(lr_weight_list(down, n, "down_lr_weight"))})
    if mid:
        try:
            table["middle_block.*"] = float(mid)
        except ValueError:
            raise ValueError(f"mid_lr_weight: {mid!r} is not a number") from None
    if up:
        table.update({f"output_blocks.{i}.*": w for i, w in enumerate(lr_weight_list(up, n, "up_lr_weight"))})
    return table


def matching(path: str, table: Mapping[str, float]) -> float | None:
    """The value of the first pattern that matches the parameter's module: its path or any dotted prefix of it
    (`input_blocks.4.1.proj_in` for `input_blocks.4.1.proj_in.lora_down.weight`)."""
    parts = path.split(".")
    modules = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    for pattern, value in table.items():
        if any(first_match(m, {pattern: value}) is not None for m in modules):
            return value
    return None


def lr_groups(named: list[tuple[str, object]], lr: float, block_lrs: Mapping[str, float],
              weights: Mapping[str, float]) -> list[tuple[float, list[tuple[str, object]]]]:
    """Split (parameter path, parameter) pairs by learning rate: --block_lrs' first match, else lr times the block's
    lr weight, else lr. Paths are the UNet's own (no 'unet.' prefix). Groups in order of first appearance."""
    groups: dict[float, list] = {}
    for path, p in named:
        value = matching(path, block_lrs)
        if value is None:
            weight = matching(path, weights)
            value = lr if weight is None else lr * weight
        groups.setdefault(value, []).append((path, p))
    return list(groups.items())
