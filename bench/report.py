"""Benchmark results: one JSON file per benchmark under bench/results/, and a printed table."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One line of the table: our side, the baseline users would run instead (if any), the target."""

    metric: str
    ours: float
    unit: str = ""
    baseline: float | None = None
    target: str = ""
    met: bool | None = None
    paired_ratio: float | None = None  # median of ours/baseline over back-to-back pairs, when measured so

    @property
    def ratio(self) -> float | None:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.baseline is None:
            return None
        return self.ours / self.baseline if self.baseline else float("nan")


def paired(metric: str, unit: str, ours: list[float], theirs: list[float]) -> Row:
    """A row from back-to-back pairs of measurements: medians of each side, median of the pair ratios."""
    from bench.stats import median, paired_ratio

    return Row(metric, median(ours), unit, median(theirs), paired_ratio=paired_ratio(ours, theirs))


@dataclass
class Result:
    name: str
    rows: list[Row] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None


def machine() -> dict:
    """What the numbers were measured on: they only mean something next to this."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    mem_kb = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")), 0)
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def write(result: Result, results_dir: Path | None = None) -> Path:
    results_dir = results_dir or RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result.name}.json"
    rows = [{**asdict(row), "ratio": row.ratio} for row in result.rows]
    document = {
        "name": result.name,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": result.params,
        "rows": rows,
        "raw": result.raw,
        "error": result.error,
        "skipped": result.skipped,
    }
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def table(results: list[Result]) -> str:
    """A plain-text table of every row; the ratio is ours / baseline."""
    header = ("benchmark", "metric", "ours", "baseline", "ratio", "target", "met")
    lines = [header]
    for result in results:
        if result.error or result.skipped:
            note = f"ERROR: {result.error}" if result.error else f"skipped: {result.skipped}"
            lines.append((result.name, note, "", "", "", "", ""))
        for row in result.rows:
            met = "" if row.met is None else ("yes" if row.met else "NO")
            ours = f"{_fmt(row.ours)} {row.unit}".strip()
            base = f"{_fmt(row.baseline)} {row.unit}".strip() if row.baseline is not None else ""
            lines.append((result.name, row.metric, ours, base, _fmt(row.ratio), row.target, met))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = [" | ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(out)


def markdown(results: list[Result]) -> str:
    """The same table in Markdown, for docs/performance.md."""
    out = ["| benchmark | metric | ours | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for result in results:
        if result.error or result.skipped:
            out.append(
                f"| {result.name} | {'error: ' + result.error if result.error else 'skipped: ' + result.skipped} |||||"
            )
        for row in result.rows:
            met = "" if row.met is None else ("yes" if row.met else "**no**")
            ours = f"{_fmt(row.ours)} {row.unit}".strip()
            base = f"{_fmt(row.baseline)} {row.unit}".strip() if row.baseline is not None else ""
            out.append(f"| {result.name} | {row.metric} | {ours} | {base} | {_fmt(row.ratio)} | {row.target} | {met} |")
    return "\n".join(out)
