"""A/B comparison of two results on the same workload: a markdown table of ratios.

B/A below 1 is better for latencies; above 1 is better for goodput and throughput.
"""

from __future__ import annotations

from typing import Any

from benchmarks.metrics import percentile_label

LOWER_IS_BETTER = "lower"
HIGHER_IS_BETTER = "higher"


def comparison_rows(percentiles: list[float]) -> list[tuple[str, str, str]]:
    """(result key, row title, which way is better) for the table."""
    rows: list[tuple[str, str, str]] = []
    top = percentile_label(max(percentiles)) if percentiles else None
    for metric, title in (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"),
                          ("e2el", "E2E latency")):
        rows.append((f"median_{metric}_ms", f"{title} median (ms)", LOWER_IS_BETTER))
        if top:
            rows.append((f"p{top}_{metric}_ms", f"{title} p{top} (ms)", LOWER_IS_BETTER))
    rows += [("request_goodput", "goodput (req/s)", HIGHER_IS_BETTER),
             ("request_throughput", "request throughput (req/s)", HIGHER_IS_BETTER),
             ("output_throughput", "output throughput (tok/s)", HIGHER_IS_BETTER),
             ("failed", "failed requests", LOWER_IS_BETTER)]
    return rows


def ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a == 0:
        return None
    return b / a


def fmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _verdict(a: Any, b: Any, better: str) -> str:
    """Which side is better; "same" within 2% (timing noise is larger than that)."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "-"
    if a == b or (a and abs(b / a - 1) < 0.02):
        return "same"
    return "B" if (b < a) == (better == LOWER_IS_BETTER) else "A"


def ratio_table(a: dict[str, Any], b: dict[str, Any], a_label: str, b_label: str,
                percentiles: list[float]) -> str:
    """Markdown: one row per metric present in both results."""
    lines = [f"| metric | {a_label} (A) | {b_label} (B) | B/A | better |",
             "|---|---:|---:|---:|---|"]
    for key, title, better in comparison_rows(percentiles):
        if key not in a or key not in b:
            continue
        r = ratio(a[key], b[key])
        verdict = _verdict(a[key], b[key], better)
        lines.append(f"| {title} | {fmt_value(a[key])} | {fmt_value(b[key])} | "
                     f"{'-' if r is None else f'{r:.2f}x'} | {verdict} |")
    return "\n".join(lines)


def load_title(result: dict[str, Any]) -> str:
    conc = result.get("max_concurrency")
    return (f"request rate {result['request_rate']} req/s"
            + (f", max concurrency {conc}" if conc else ""))


def ab_markdown(a_results: list[dict[str, Any]], b_results: list[dict[str, Any]],
                a_label: str, b_label: str, percentiles: list[float]) -> str:
    """A section per load point, pairing the two sides' results in order."""
    parts = [f"# A/B: {a_label} (A) vs {b_label} (B)", ""]
    first = a_results[0] if a_results else {}
    parts.append(f"Workload: {first.get('dataset_name')}, {first.get('num_prompts')} "
                 f"requests, seed {first.get('seed')}; SLOs (ms): "
                 f"{first.get('goodput_slos_ms') or 'none'}.")
    for a, b in zip(a_results, b_results):
        parts += ["", f"## {load_title(a)}", "",
                  ratio_table(a, b, a_label, b_label, percentiles)]
    return "\n".join(parts) + "\n"
