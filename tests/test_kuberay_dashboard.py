"""The Grafana dashboard of deploy/grafana/: well-formed, and about pdserve's own series.

Every series a panel queries, and every label it groups by, must be defined by the
ingress's metrics (serving/metrics.py); a rename on either side fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "pdserve-dashboard.json"
SUFFIXES = re.compile(r"_(bucket|sum|count|total|created)$")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row"
            for t in p["targets"]]


def _series(expr: str) -> set[str]:
    return {SUFFIXES.sub("", name) for name in re.findall(r"\b(pdserve_[a-z0-9_]+)", expr)}


def test_dashboard_is_well_formed():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, f"{panel['title']!r} uses undefined variables {used}"


def test_dashboard_covers_latency_queues_kv_transfer_and_router():
    queries = _queries(_dashboard())
    series = set().union(*(_series(e) for _, e in queries))
    assert {"pdserve_time_to_first_token_seconds", "pdserve_inter_token_latency_seconds",
            "pdserve_replica_waiting_requests", "pdserve_kv_transfer_bytes",
            "pdserve_router_decisions"} <= series
    assert any("by (pool)" in e and "waiting" in e for _, e in queries), \
        "queue depth must be shown per pool"


def _populated_metrics():
    """ServingMetrics with one sample in every family, so label names can be read."""
    metrics = pytest.importorskip("serving.metrics", reason="serving/metrics.py not importable")
    serving = metrics.ServingMetrics()
    kv = metrics.KVTransferTotals()
    kv.observe({"bytes_received": 1 << 20, "blocks_received": 4, "pull_ms": [1.5],
                "failures": {"transfer_timeout": 1}, "leases_outstanding": 1})
    serving.set_replica_loads([{
        "role": "decode", "replica_id": "d1", "num_running": 1, "num_waiting": 0,
        "kv_cache_usage": 0.1, "counters": {"external_hit_tokens": 5}, "kv_transfer": kv.as_dict(),
    }])
    serving.requests.labels("completions", "200").inc()
    serving.ttft.labels("completions", "remote").observe(0.01)
    serving.itl.labels("completions", "remote").observe(0.01)
    serving.decisions.labels("remote", "long_prompt").inc()
    serving.e2e.labels("completions").observe(0.1)
    serving.prefill_seconds.labels("engine").observe(0.01)
    return serving


def test_dashboard_series_and_labels_exist():
    families = {f.name: f for f in _populated_metrics().registry.collect()}
    for title, expr in _queries(_dashboard()):
        for name in _series(expr):
            assert name in families, \
                f"panel {title!r} queries {name}, which serving/metrics.py does not define " \
                f"(defined: {sorted(families)})"
        # labels grouped by or matched on (namespace is added by the scrape)
        used = set(re.findall(r"by \(([a-z_, ]+)\)", expr))
        used = {label.strip() for group in used for label in group.split(",")} - {"le"}
        used |= set(re.findall(r"([a-z_]+)=~?\"", expr)) - {"namespace"}
        names = _series(expr)
        have = {label for name in names for sample in families[name].samples
                for label in sample.labels}
        assert used <= have, f"panel {title!r} uses labels {sorted(used - have)} that " \
                             f"{sorted(names)} do not have (they have {sorted(have)})"
