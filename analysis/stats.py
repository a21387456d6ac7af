"""Means with 95% confidence intervals over seeds (Student's t), and grouping rows by configuration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# t_{0.975, df}: the two-sided 95% quantile of Student's t for df = 1..30 (standard tables, 4 decimals).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (above 30: the Cornish-Fisher expansion
    around z = 1.95996, within 1e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of its 95% CI, n): half = t_{0.975, n-1} · s / √n with s the sample standard deviation
    (n − 1 in the denominator); NaN for fewer than two values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n), n


def aggregate(rows: Sequence[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per distinct value of the `by` columns (in first-seen order): those columns, n (rows in the group),
    and for each metric present its mean and `<metric>_ci95` (the CI's half-width)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out = []
    for key, these in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["n"] = len(these)
        for m in metrics:
            values = [r[m] for r in these if isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool)]
            if values:
                mean, half, _ = mean_ci(values)
                row[m], row[f"{m}_ci95"] = mean, half
        out.append(row)
    return out


def pm(mean: float, half: float, digits: int = 3) -> str:
    """'0.412 ± 0.051' (just the mean when the CI is undefined)."""
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}g}" if math.isnan(half) else f"{mean:.{digits}g} ± {half:.2g}"
