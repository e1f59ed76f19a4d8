"""Latency and throughput statistics with `vllm bench serve`'s definitions and keys.

- TTFT: request start to the first token chunk.
- ITL: every gap between consecutive token chunks (all requests pooled).
- TPOT: per request, (E2E latency - TTFT) / (output tokens - 1); requests with one
  output token have none (and count as 0 for goodput, as vLLM does).
- E2EL: request start to the last token chunk.
- Goodput (DistServe): completed requests per second that meet *every* SLO given.
Percentiles interpolate linearly (numpy's default), as vLLM's do.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from benchmarks.errors import BenchConfigError
from benchmarks.records import RequestOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


def percentile_label(p: float) -> str:
    """vLLM's spelling of a percentile in a key: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if int(p) == p else str(p)


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise BenchConfigError(f"--metric-percentiles: not numbers: {text!r}") from err
    if not values or any(not 0 < v < 100 for v in values):
        raise BenchConfigError(f"--metric-percentiles: want values in (0, 100), got {text!r}")
    return values


def parse_percentile_metrics(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise BenchConfigError(f"--percentile-metrics: unknown {unknown or text!r}; "
                               f"known: {', '.join(METRICS)}")
    return names


def parse_goodput(pairs: Iterable[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> `{"ttft": 500.0, "tpot": 50.0}` (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name not in SLO_METRICS or ms < 0:
            raise BenchConfigError(
                f"--goodput: bad SLO {pair!r}; write NAME:MS with NAME one of "
                f"{', '.join(SLO_METRICS)} and MS >= 0, e.g. ttft:500 tpot:50")
        slos[name] = ms
    return slos


def summarize(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean/median/std/pNN in milliseconds of values given in seconds (0 when empty)."""
    arr = np.asarray(values_s or [0.0], dtype=float) * 1000.0
    out = {"mean": float(np.mean(arr)), "median": float(np.median(arr)),
           "std": float(np.std(arr))}
    for p in percentiles:
        out[f"p{percentile_label(p)}"] = float(np.percentile(arr, p))
    return out


def is_good(out: RequestOutput, slos_ms: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO (DistServe's goodput test)."""
    observed_s = {"ttft": out.ttft, "tpot": out.tpot, "e2el": out.latency}
    return all(observed_s[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def metric_values(outputs: list[RequestOutput]) -> dict[str, list[float]]:
    """Per-metric samples (seconds) over the successful requests."""
    ok = [o for o in outputs if o.success]
    return {
        "ttft": [o.ttft for o in ok],
        "tpot": [o.tpot for o in ok if o.output_tokens > 1],
        "itl": [gap for o in ok for gap in o.itl],
        "e2el": [o.latency for o in ok],
    }


def compute_metrics(outputs: list[RequestOutput], duration_s: float,
                    percentiles: list[float], slos_ms: dict[str, float],
                    percentile_metrics: Iterable[str] = METRICS) -> dict[str, float | int | None]:
    """The summary part of a result: counts, throughputs and latency statistics."""
    ok = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in ok)
    total_output = sum(o.output_tokens for o in ok)
    duration = max(duration_s, 1e-9)
    result: dict[str, float | int | None] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "request_goodput": (sum(is_good(o, slos_ms) for o in ok) / duration
                            if slos_ms else None),
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    values = metric_values(outputs)
    for name in percentile_metrics:
        for stat, value in summarize(values[name], percentiles).items():
            result[f"{stat}_{name}_ms"] = value
    return result


def error_counts(outputs: list[RequestOutput]) -> dict[str, int]:
    """Failures grouped by reason (the text before the first ':' of the error)."""
    return dict(Counter(o.error.split(":", 1)[0] for o in outputs if not o.success))
