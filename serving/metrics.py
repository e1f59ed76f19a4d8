"""Prometheus metrics of the OpenAI ingress, served on GET /metrics.

Latency metrics are observed where the client sees them: TTFT and ITL on streamed
responses (the time to the first token event and every gap between token events),
end-to-end latency on every request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                   1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
MATCHED_TOKEN_BUCKETS = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
ROUTE_BUCKETS = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                 0.1, 0.5)
GAP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
               0.512, 1.024, 2.048)


class ServingMetrics:
    """All metric families, in a registry of their own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("pdserve_requests", "Finished HTTP requests.",
                                ["endpoint", "status"], registry=reg)
        # path: aggregated, remote (P/D), local (decode prefilled), fallback (a remote
        # prefill failed and decode prefilled)
        self.ttft = Histogram("pdserve_time_to_first_token_seconds",
                              "Time to the first token of streamed responses.",
                              ["endpoint", "path"], buckets=LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("pdserve_inter_token_latency_seconds",
                             "Gap between consecutive token events of streamed responses.",
                             ["endpoint", "path"], buckets=GAP_BUCKETS, registry=reg)
        self.decisions = Counter("pdserve_router_decisions",
                                 "Where requests were prefilled, and why.",
                                 ["decision", "reason"], registry=reg)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds",
                             "Request latency from arrival to the last byte.",
                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens processed.",
                                     registry=reg)
        self.generation_tokens = Counter("pdserve_generation_tokens",
                                         "Tokens generated.", registry=reg)
        labels = ["pool", "replica"]
        self.running = Gauge("pdserve_replica_running_requests",
                             "Requests running in each engine replica.", labels, registry=reg)
        self.waiting = Gauge("pdserve_replica_waiting_requests",
                             "Requests waiting in each engine replica.", labels, registry=reg)
        self.kv_usage = Gauge("pdserve_replica_kv_cache_usage_ratio",
                              "Fraction of each replica's KV cache in use.", labels,
                              registry=reg)
        self.prefill_seconds = Histogram(
            "pdserve_prefill_seconds",
            "Remote prefill time: 'engine' inside the prefill replica, 'call' as the "
            "ingress saw it (engine plus the hops).", ["scope"], buckets=LATENCY_BUCKETS,
            registry=reg)
        self.matched_prefix_tokens = Histogram(
            "pdserve_router_matched_prefix_tokens",
            "prefix_aware routing: prompt tokens whose KV the chosen prefilling replica "
            "held (its tiers), per decision.", ["decision"],
            buckets=MATCHED_TOKEN_BUCKETS, registry=reg)
        self.route_seconds = Histogram(
            "pdserve_router_decision_seconds",
            "Routing decision time: 'assign' as the ingress saw the router call, "
            "'policy' inside the router.", ["scope"], buckets=ROUTE_BUCKETS, registry=reg)
        self.engine_calls = Counter(
            "pdserve_engine_calls", "Calls from the ingress to P/D engine replicas, by "
            "pool and channel: 'direct' (same-node socket) or 'serve' (Serve handle).",
            ["pool", "channel"], registry=reg)
        self.blocks_held = Gauge("pdserve_replica_tier_blocks",
                                 "KV blocks each replica's tiers hold, as the router "
                                 "knows them (prefix_aware).", labels, registry=reg)
        self.replica_counters = _ReplicaCounters()
        reg.register(self.replica_counters)
        reg.register(_KVTransferCollector(self.replica_counters))

    def set_replica_loads(self, loads: list[dict]) -> None:
        self.replica_counters.loads = loads
        for gauge in (self.running, self.waiting, self.kv_usage, self.blocks_held):
            gauge.clear()
        for load in loads:
            labels = (load["role"], load["replica_id"])
            self.running.labels(*labels).set(load["num_running"])
            self.waiting.labels(*labels).set(load["num_waiting"])
            self.kv_usage.labels(*labels).set(load["kv_cache_usage"])
            if load.get("num_blocks_held") is not None:
                self.blocks_held.labels(*labels).set(load["num_blocks_held"])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCounters:
    """Cumulative per-replica counts as the replicas last reported them."""

    HELP = {"external_hit_tokens": "Prompt tokens whose KV came through the connector "
                                   "(remote prefill) instead of being computed.",
            "external_query_tokens": "Prompt tokens the connector was asked about.",
            "local_hit_tokens": "Prompt tokens served from the replica's own prefix cache."}

    def __init__(self) -> None:
        self.loads: list[dict] = []

    def collect(self):
        for name, help_text in self.HELP.items():
            family = CounterMetricFamily(f"pdserve_replica_{name}", help_text,
                                         labels=["pool", "replica"])
            for load in self.loads:
                value = (load.get("counters") or {}).get(name)
                if value is not None:
                    family.add_metric([load["role"], load["replica_id"]], value)
            yield family


class KVTransferTotals:
    """Cumulative KV transfer numbers of one engine replica.

    Fed with the connector's per-step stats (`SchedulerStats.kv_connector_stats`, the
    dict `kvtransfer.PDConnectorStats` carries); `as_dict()` travels with the replica's
    load report to the router and ends up in the ingress's /metrics.
    """

    def __init__(self) -> None:
        self.bytes = {"received": 0, "sent": 0}
        self.blocks = {"received": 0, "sent": 0}
        self.pull_buckets = [0] * len(TRANSFER_BUCKETS)
        self.pull_count = 0
        self.pull_sum = 0.0
        self.failures: dict[str, int] = {}
        self.leases_outstanding = 0
        self.leases_expired = 0

    def observe(self, data: dict) -> None:
        self.bytes["received"] += data.get("bytes_received", 0)
        self.bytes["sent"] += data.get("bytes_sent", 0)
        self.blocks["received"] += data.get("blocks_received", 0)
        self.blocks["sent"] += data.get("blocks_sent", 0)
        for ms in data.get("pull_ms", ()):
            seconds = ms / 1e3
            self.pull_count += 1
            self.pull_sum += seconds
            for i, bound in enumerate(TRANSFER_BUCKETS):
                if seconds <= bound:
                    self.pull_buckets[i] += 1
        for reason, n in (data.get("failures") or {}).items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        self.leases_outstanding = data.get("leases_outstanding", self.leases_outstanding)
        self.leases_expired += data.get("leases_expired", 0)

    def as_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "blocks": dict(self.blocks),
                "pull_buckets": list(self.pull_buckets), "pull_count": self.pull_count,
                "pull_sum": self.pull_sum, "failures": dict(self.failures),
                "leases_outstanding": self.leases_outstanding,
                "leases_expired": self.leases_expired}


class _KVTransferCollector:
    """pdserve_kv_transfer_* series from the replicas' last `KVTransferTotals` reports."""

    def __init__(self, source: _ReplicaCounters) -> None:
        self.source = source

    def collect(self):
        labels = ["pool", "replica"]
        moved = CounterMetricFamily("pdserve_kv_transfer_bytes",
                                    "KV bytes moved between prefill and decode replicas.",
                                    labels=[*labels, "direction"])
        blocks = CounterMetricFamily("pdserve_kv_transfer_blocks", "KV blocks moved.",
                                     labels=[*labels, "direction"])
        seconds = HistogramMetricFamily("pdserve_kv_transfer_seconds",
                                        "Duration of one KV pull (decode side).",
                                        labels=labels)
        failures = CounterMetricFamily("pdserve_kv_transfer_failures",
                                       "Failed KV pulls and sends (each one recomputes).",
                                       labels=[*labels, "reason"])
        leases = GaugeMetricFamily("pdserve_kv_transfer_leases_outstanding",
                                   "Prefill leases holding KV blocks for a pull.",
                                   labels=labels)
        expired = CounterMetricFamily("pdserve_kv_transfer_leases_expired",
                                      "Prefill leases that expired before their pull.",
                                      labels=labels)
        for load in self.source.loads:
            kv = load.get("kv_transfer")
            if not kv:
                continue
            ids = [load["role"], load["replica_id"]]
            for direction in ("received", "sent"):
                moved.add_metric([*ids, direction], kv["bytes"][direction])
                blocks.add_metric([*ids, direction], kv["blocks"][direction])
            cumulative = [(str(bound), n) for bound, n in
                          zip(TRANSFER_BUCKETS, kv["pull_buckets"])]
            seconds.add_metric(ids, [*cumulative, ("+Inf", kv["pull_count"])],
                               sum_value=kv["pull_sum"])
            for reason, n in kv["failures"].items():
                failures.add_metric([*ids, reason], n)
            leases.add_metric(ids, kv["leases_outstanding"])
            expired.add_metric(ids, kv["leases_expired"])
        yield from (moved, blocks, seconds, failures, leases, expired)


@dataclass(slots=True)
class RequestTimer:
    """Timestamps of one request's token events, flushed into metrics at the end."""

    endpoint: str
    path: str = "none"
    start: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    gaps: list[float] = field(default_factory=list)
    ttft: float | None = None

    def token_event(self) -> None:
        now = time.perf_counter()
        if self.last_token is None:
            self.ttft = now - self.start
        else:
            self.gaps.append(now - self.last_token)
        self.last_token = now

    def finish(self, metrics: ServingMetrics, status: int, usage: dict | None) -> None:
        metrics.requests.labels(self.endpoint, str(status)).inc()
        metrics.e2e.labels(self.endpoint).observe(time.perf_counter() - self.start)
        if self.ttft is not None:
            metrics.ttft.labels(self.endpoint, self.path).observe(self.ttft)
        itl = metrics.itl.labels(self.endpoint, self.path)
        for gap in self.gaps:
            itl.observe(gap)
        if usage:
            metrics.prompt_tokens.inc(usage.get("prompt_tokens") or 0)
            metrics.generation_tokens.inc(usage.get("completion_tokens") or 0)
