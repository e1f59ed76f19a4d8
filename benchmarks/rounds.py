"""Several rounds of the same A/B run, folded into one result per side and load point.

On a shared or noisy host one pass of A then B mostly measures what else ran at the
time; alternating A, B, A, B ... and taking medians shows (and damps) that drift.
"""

from __future__ import annotations

import statistics
from typing import Any


def fold(values: list[Any]) -> Any:
    """Equal values -> that value; numbers -> median; lists -> concatenated (pooled
    samples); dicts -> key by key; anything else -> the first value."""
    first = values[0]
    is_scalar = not isinstance(first, (list, dict))
    if first is None or (is_scalar and all(v == first for v in values)):
        return first  # equal everywhere (counts, seeds, labels): kept as is, type and all
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    if all(isinstance(v, list) for v in values):
        return [x for v in values for x in v]
    if all(isinstance(v, dict) for v in values):
        keys = [k for k in first if all(k in v for v in values)]
        return {k: fold([v[k] for v in values]) for k in keys}
    return first


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One load point's results from several rounds -> medians of every figure and the
    per-request samples of all rounds together; `rounds` and the spread are added."""
    if len(rounds) == 1:
        return rounds[0]
    combined = fold(rounds)
    combined["rounds"] = len(rounds)
    combined["round_values"] = {
        key: [r[key] for r in rounds]
        for key in ("p99_itl_ms", "p99_ttft_ms", "request_goodput", "request_throughput",
                    "host_load_avg_before")
        if all(key in r for r in rounds)}
    return combined
