"""Summaries of repeated measurements: medians, percentiles and the ratio of two sides."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of the values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs, NaN when there is nothing to divide by."""
    return ours / theirs if theirs else float("nan")


def interleaved(sides: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, side) pairs, the order of the sides flipped every repeat (ABBA) so drift hits both."""
    order = []
    for repeat in range(repeats):
        ordered = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        order += [(repeat, side) for side in ordered]
    return order


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Median of ours[i] / theirs[i]: each pair ran back to back, so machine noise mostly cancels."""
    return median([ratio(a, b) for a, b in zip(ours, theirs, strict=True)])
