"""PNG plots from result dicts: latency CDFs (one run, or A/B overlaid) and latency and
goodput against load (sweeps). Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LOG_SCALE_SPAN = 100.0  # a CDF whose samples span more than this ratio gets a log x-axis
TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def samples_ms(result: dict[str, Any], metric: str) -> list[float]:
    """Per-request (per-gap for ITL) samples of the successful requests, in ms."""
    ok = [i for i, err in enumerate(result["errors"]) if not err]
    if metric == "ttft":
        return [result["ttfts"][i] * 1000 for i in ok]
    if metric == "e2el":
        return [result["latencies"][i] * 1000 for i in ok]
    if metric == "itl":
        return [gap * 1000 for i in ok for gap in result["itls"][i]]
    tpots = []
    for i in ok:
        n = result["output_lens"][i]
        if n > 1:
            tpots.append((result["latencies"][i] - result["ttfts"][i]) / (n - 1) * 1000)
    return tpots


def plot_cdfs(results: dict[str, dict[str, Any]], path: Path,
              metrics: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")) -> Path:
    """One panel per metric, one curve per labelled result."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        spans: list[float] = []
        for label, result in results.items():
            values = np.sort(samples_ms(result, metric))
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values),
                        where="post", label=label)
                spans.extend([values[0], values[-1]])
        positive = [v for v in spans if v > 0]
        if positive and max(positive) / min(positive) > LOG_SCALE_SPAN:
            ax.set_xscale("log")  # tails (e.g. ITL stalls behind a prefill) stay visible
        ax.set_title(f"{TITLES[metric]} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def load_of(result: dict[str, Any]) -> tuple[str, float]:
    """The x-axis of a sweep point: the request rate, else the concurrency cap."""
    rate = result["request_rate"]
    if rate != "inf" and not (isinstance(rate, float) and math.isinf(rate)):
        return "request rate (req/s)", float(rate)
    return "max concurrency", float(result["max_concurrency"] or result["num_prompts"])


def plot_vs_load(series: dict[str, list[dict[str, Any]]], path: Path,
                 percentile: str = "p99") -> Path:
    """TTFT, ITL and TPOT at `percentile`, and goodput (or throughput), against load."""
    panels = [(f"{percentile}_ttft_ms", f"TTFT {percentile} (ms)"),
              (f"{percentile}_itl_ms", f"ITL {percentile} (ms)"),
              (f"{percentile}_tpot_ms", f"TPOT {percentile} (ms)"),
              ("request_goodput", "goodput (req/s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        xlabel = "load"
        for label, results in series.items():
            points = []
            for r in results:
                xlabel, x = load_of(r)
                value = r.get(key)
                if value is None and key == "request_goodput":
                    value, title = r["request_throughput"], "throughput (req/s, no SLOs)"
                if value is not None:
                    points.append((x, value))
            points.sort()
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
