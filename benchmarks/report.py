"""Result documents: the JSON (vLLM's keys), the per-request CSV, the console summary,
and the markdown ratio table of an A/B comparison."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.metrics import compute_metrics, error_counts, percentile_label
from benchmarks.records import RequestOutput
from benchmarks.runner import LoadSpec, RunOutcome

MAX_ERRORS_PRINTED = 10


def build_result(outcome: RunOutcome, load: LoadSpec, percentiles: list[float],
                 slos_ms: dict[str, float], percentile_metrics: list[str],
                 meta: dict[str, Any], save_detailed: bool = False) -> dict[str, Any]:
    """One load point's result: vLLM's summary and per-request keys plus ours."""
    outs = outcome.outputs
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        **meta,
        "load_label": load.label,
        "request_rate": "inf" if math.isinf(load.request_rate) else load.request_rate,
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
        "num_warmups": load.num_warmups,
        "num_warmup_failed": outcome.num_warmup_failed,
        "goodput_slos_ms": slos_ms or None,
    }
    result.update(compute_metrics(outs, outcome.duration_s, percentiles, slos_ms,
                                  percentile_metrics))
    result["failure_reasons"] = error_counts(outs)
    kinds = sorted({o.kind for o in outs})
    if len(kinds) > 1:
        result["per_kind"] = {
            kind: compute_metrics([o for o in outs if o.kind == kind], outcome.duration_s,
                                  percentiles, slos_ms, percentile_metrics)
            for kind in kinds}
    result.update({
        "input_lens": [o.prompt_len for o in outs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outs],
        "ttfts": [o.ttft for o in outs],
        "itls": [o.itl for o in outs],
        "latencies": [o.latency for o in outs],
        "start_times": [o.start_time for o in outs],
        "kinds": [o.kind for o in outs],
        "errors": [o.error for o in outs],
    })
    if save_detailed:
        result["generated_texts"] = [o.generated_text for o in outs]
    return result


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


CSV_FIELDS = ["index", "request_id", "kind", "success", "input_len", "output_len",
              "ttft_ms", "tpot_ms", "mean_itl_ms", "max_itl_ms", "e2el_ms", "error"]


def write_requests_csv(outputs: list[RequestOutput], path: Path) -> Path:
    """One row per request (failures included, with their reason)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for i, o in enumerate(outputs):
            itl_ms = [x * 1000 for x in o.itl]
            writer.writerow([
                i, o.request_id, o.kind, o.success, o.prompt_len,
                o.output_tokens if o.success else 0, round(o.ttft * 1000, 3),
                round(o.tpot * 1000, 3),
                round(sum(itl_ms) / len(itl_ms), 3) if itl_ms else "",
                round(max(itl_ms), 3) if itl_ms else "", round(o.latency * 1000, 3),
                o.error])
    return path


SUMMARY_KEYS = ["request_rate", "max_concurrency", "completed", "failed", "duration",
                "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput"]


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of a result: what a sweep's CSV and plots are made of."""
    return {k: v for k, v in result.items()
            if k in SUMMARY_KEYS or (k.endswith("_ms") and not isinstance(v, dict))}


def write_summary_csv(results: list[dict[str, Any]], path: Path) -> Path:
    rows = [summary_row(r) for r in results]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_summary(result: dict[str, Any], percentiles: list[float],
                   percentile_metrics: list[str]) -> str:
    """The console block, laid out like vLLM's."""
    lines = ["{:=^60}".format(f" Serving Benchmark Result ({result.get('label', '')}) ")]

    def row(name: str, value: Any, fmt: str = "{:.2f}") -> None:
        text = "-" if value is None else (fmt.format(value) if fmt else str(value))
        lines.append(f"{name:<44} {text}")

    row("Successful requests:", result["completed"], "{}")
    row("Failed requests:", result["failed"], "{}")
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"], "{}")
    row("Total generated tokens:", result["total_output_tokens"], "{}")
    row("Request throughput (req/s):", result["request_throughput"])
    row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in percentile_metrics:
        lines.append("{:-^60}".format(f" {titles[name]} "))
        up = name.upper()
        row(f"Mean {up} (ms):", result[f"mean_{name}_ms"])
        row(f"Median {up} (ms):", result[f"median_{name}_ms"])
        for p in percentiles:
            label = percentile_label(p)
            row(f"P{label} {up} (ms):", result[f"p{label}_{name}_ms"])
    if result["failed"]:
        lines.append("{:-^60}".format(" Failures "))
        for reason, count in result["failure_reasons"].items():
            row(f"{reason}:", count, "{}")
        first = [e for e in result["errors"] if e][:MAX_ERRORS_PRINTED]
        lines.extend(f"  e.g. {e}" for e in dict.fromkeys(first))
    lines.append("=" * 60)
    return "\n".join(lines)
