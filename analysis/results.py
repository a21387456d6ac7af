"""What an analysis returns: rows for a CSV, a summary for the terminal, extra data for JSON, and figures for PNGs."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomic import atomic_path, write_text


@dataclass
class Result:
    """One analysis. save(folder) writes <name>.csv (rows), <name>.json (everything) and each figure's PNG."""

    name: str
    rows: list[dict[str, Any]]                              # one per layer (or per run, per ε, ...)
    summary: list[dict[str, Any]] = field(default_factory=list)  # what table() prints
    data: dict[str, Any] = field(default_factory=dict)       # arrays too big for a CSV (spectra, φ grids)
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # file name -> draws into that path
    notes: list[str] = field(default_factory=list)

    def save(self, folder: str | os.PathLike, plots: bool = True) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [write_csv(folder / f"{self.name}.csv", self.rows)]
        payload = {"analysis": self.name, "notes": self.notes, "summary": self.summary, "rows": self.rows, **self.data}
        path = folder / f"{self.name}.json"
        write_text(path, json.dumps(_jsonable(payload), indent=1))
        written.append(path)
        if plots:
            for filename, draw in self.figures.items():
                draw(folder / filename)
                written.append(folder / filename)
        return written

    def table(self) -> str:
        text = format_table(self.summary or self.rows)
        return "\n".join([text, *self.notes])


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return x


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v, csv=True) for k, v in row.items()})
    return path


def _cell(v: Any, csv: bool = False) -> str:
    if isinstance(v, float):
        if csv:
            return repr(v)
        if v == 0 or not math.isfinite(v):
            return f"{v:g}"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and not csv and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else json.dumps(v)
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, max_rows: int = 60) -> str:
    """A plain-text table: numbers right-aligned, at most max_rows rows (the rest counted)."""
    if not rows:
        return "(nothing to show)"
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    shown = rows[:max_rows]
    cells = [[_cell(row.get(c, "")) for c in columns] for row in shown]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in shown if row.get(c, "") != "") for c in columns]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    fmt = lambda vals: "  ".join(v.rjust(w) if num else v.ljust(w)  # noqa: E731
                                 for v, w, num in zip(vals, widths, numeric)).rstrip()
    lines = [fmt(list(columns)), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells]
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more rows in the CSV")
    return "\n".join(lines)
