"""Run a workload against one server at every load point, and save what was measured.

Files for a result stem S (in --result-dir):
  one load point:  S.json, S.csv (per request), S-cdf.png
  a sweep:         S-<load>.json/.csv/-cdf.png per point, plus S-sweep.json (all the
                   summaries), S-sweep.csv and S-vs-load.png
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.client import EndpointSpec
from benchmarks.plots import plot_cdfs, plot_vs_load
from benchmarks.records import SampleRequest
from benchmarks.report import (build_result, format_summary, summary_row, write_json,
                               write_requests_csv, write_summary_csv)
from benchmarks.runner import LoadSpec, run_load


@dataclass(slots=True)
class StatOptions:
    percentiles: list[float]
    percentile_metrics: list[str]
    slos_ms: dict[str, float]
    save_detailed: bool = False


@dataclass(slots=True)
class SaveOptions:
    """Where results go; `stem` None means no files (console only)."""

    result_dir: Path = Path(".")
    stem: str | None = None
    plots: bool = True


@dataclass(slots=True)
class SuiteResult:
    results: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def num_completed(self) -> int:
        return sum(r["completed"] for r in self.results)


def list_models(base_url: str, headers: dict[str, str] | None = None,
                timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The server's /v1/models entries; [] when it cannot be asked."""
    try:
        resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers,
                         timeout=timeout_s, trust_env=False)
        resp.raise_for_status()
        data = resp.json().get("data") or []
        return [m for m in data if isinstance(m, dict) and m.get("id")]
    except (httpx.HTTPError, ValueError, AttributeError):
        return []


def safe_name(text: str) -> str:
    """`text` usable in a file name (labels and model names may hold '/', ':' or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def default_stem(label: str, model: str, load: LoadSpec | None) -> str:
    now = datetime.now().strftime("%Y%m%d-%H%M%S")
    point = f"-{load.label}" if load else ""
    return safe_name(f"{label}{point}-{model.rstrip('/').split('/')[-1]}-{now}")


def run_suite(endpoint: EndpointSpec, requests: list[SampleRequest],
              loads: list[LoadSpec], tokenizer: Any, stats: StatOptions,
              meta: dict[str, Any], save: SaveOptions, quiet: bool = False) -> SuiteResult:
    """Every load point in turn, each on the same requests; files per `save`."""
    suite = SuiteResult()
    sweep = len(loads) > 1
    for load in loads:
        load_before = os.getloadavg()[0]
        outcome = asyncio.run(run_load(endpoint, requests, load, tokenizer))
        # The 1-minute load average around the run: a busy shared host shows up here.
        host = {"host_load_avg_before": load_before, "host_load_avg_after": os.getloadavg()[0]}
        result = build_result(outcome, load, stats.percentiles, stats.slos_ms,
                              stats.percentile_metrics, {**meta, **host}, stats.save_detailed)
        suite.results.append(result)
        if not quiet:
            print(format_summary(result, stats.percentiles, stats.percentile_metrics),
                  flush=True)
        if save.stem:
            stem = f"{save.stem}-{load.label}" if sweep else save.stem
            base = save.result_dir / stem
            suite.files.append(write_json(result, base.with_suffix(".json")))
            suite.files.append(write_requests_csv(outcome.outputs, base.with_suffix(".csv")))
            if save.plots:
                label = meta.get("label", "run")
                suite.files.append(plot_cdfs({label: result},
                                             save.result_dir / f"{stem}-cdf.png"))
    if save.stem and sweep:
        base = save.result_dir / save.stem
        summary = {"label": meta.get("label"), "points": [summary_row(r) for r in suite.results]}
        path = base.parent / f"{base.name}-sweep.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
        suite.files.append(path)
        suite.files.append(write_summary_csv(suite.results,
                                             base.parent / f"{base.name}-sweep.csv"))
        if save.plots:
            suite.files.append(plot_vs_load({meta.get("label", "run"): suite.results},
                                            base.parent / f"{base.name}-vs-load.png"))
    return suite
