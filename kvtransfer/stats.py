"""Connector stats, carried by vLLM's hooks: worker `get_kv_connector_stats()` ->
KVConnectorOutput -> SchedulerStats.kv_connector_stats -> stat loggers, which rebuild
this class with `PDConnector.build_kv_connector_stats(data)`.

`data` stays a plain dict of numbers and lists so it crosses process boundaries as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

_COUNTERS = (
    "num_pulls", "num_pull_failures", "bytes_received", "blocks_received",
    "num_sends", "num_send_failures", "bytes_sent", "blocks_sent",
    "leases_granted", "leases_released", "leases_expired", "num_pulls_shm",
    "num_pulls_direct",  # shm pulls without a round trip (a subset of num_pulls_shm)
    # tiers: hits and misses in blocks (a miss: looked up, not found in that tier)
    "dram_hits", "dram_misses", "dram_bytes_loaded", "dram_bytes_stored", "dram_evictions",
    "nvme_hits", "nvme_misses", "nvme_bytes_loaded", "nvme_bytes_stored", "nvme_evictions",
    "tier_load_failures",
)
# Scheduler half: the tiers' key report of this step (kvtransfer.tiers.journal)
TIER_KEYS = "tier_keys"


def _empty() -> dict[str, Any]:
    data: dict[str, Any] = {name: 0 for name in _COUNTERS}
    data["pull_ms"] = []
    data["failures"] = {}
    data["pull_phase_ms"] = {}  # phase -> summed ms over successful pulls
    data["leases_outstanding"] = 0
    return data


@dataclass
class PDConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        if not self.data:
            self.data = _empty()

    def reset(self) -> None:
        outstanding = self.data.get("leases_outstanding", 0)
        self.data = _empty()
        self.data["leases_outstanding"] = outstanding

    def record_pull(self, ok: bool, num_bytes: int, num_blocks: int, seconds: float,
                    reason: str | None, mode: str = "ucx",
                    phases: dict[str, float] | None = None) -> None:
        self.data["num_pulls"] += 1
        if ok:
            self.data["bytes_received"] += num_bytes
            self.data["blocks_received"] += num_blocks
            self.data["pull_ms"].append(round(seconds * 1e3, 3))
            self.data["num_pulls_shm"] += mode.startswith("shm")
            self.data["num_pulls_direct"] += mode == "shm-direct"
            _add(self.data["pull_phase_ms"], phases or {})
        else:
            self._fail(reason or "error", "num_pull_failures")

    def record_send(self, num_bytes: int, num_blocks: int, reason: str | None) -> None:
        self.data["num_sends"] += 1
        if reason is None:
            self.data["bytes_sent"] += num_bytes
            self.data["blocks_sent"] += num_blocks
        else:
            self._fail(reason, "num_send_failures")

    def add_counts(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.data[name] += n

    def _fail(self, reason: str, counter: str) -> None:
        self.data[counter] += 1
        self.data["failures"][reason] = self.data["failures"].get(reason, 0) + 1

    def aggregate(self, other: KVConnectorStats) -> "PDConnectorStats":
        for name in _COUNTERS:
            self.data[name] += other.data.get(name, 0)
        self.data["pull_ms"].extend(other.data.get("pull_ms", []))
        for reason, n in other.data.get("failures", {}).items():
            self.data["failures"][reason] = self.data["failures"].get(reason, 0) + n
        _add(self.data["pull_phase_ms"], other.data.get("pull_phase_ms", {}))
        if TIER_KEYS in other.data:
            self.data[TIER_KEYS] = other.data[TIER_KEYS]
        self.data["leases_outstanding"] = other.data.get(
            "leases_outstanding", self.data["leases_outstanding"]
        )
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {name: self.data[name] for name in _COUNTERS}
        lat = sorted(self.data["pull_ms"])
        out["leases_outstanding"] = self.data["leases_outstanding"]
        if lat:
            out["pull_ms_avg"] = round(sum(lat) / len(lat), 3)
            out["pull_ms_p99"] = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            secs = sum(lat) / 1e3
            out["pull_gbps"] = round(self.data["bytes_received"] / secs / 1e9, 3) if secs else 0
        for reason, n in self.data["failures"].items():
            out[f"failures_{reason}"] = n
        for phase, ms in self.data["pull_phase_ms"].items():
            out[f"pull_{phase}_ms_avg"] = round(ms / len(lat), 3) if lat else 0
        return out

    def is_empty(self) -> bool:
        return (all(self.data.get(name, 0) == 0 for name in _COUNTERS)
                and TIER_KEYS not in self.data)


def _add(into: dict[str, float], values: dict[str, float]) -> None:
    for key, value in values.items():
        into[key] = round(into.get(key, 0) + value, 3)


class PDPromMetrics(KVConnectorPromMetrics):
    """Prometheus view of PDConnectorStats (created by vLLM per engine process)."""

    _COUNTERS = {
        "bytes_received": "Bytes of KV pulled into this engine.",
        "bytes_sent": "Bytes of KV served to decode peers.",
        "blocks_received": "KV blocks pulled into this engine.",
        "num_pulls": "KV pulls attempted by this engine.",
        "leases_granted": "Prefill leases granted.",
        "leases_expired": "Prefill leases that expired before a pull came.",
        "dram_hits": "KV blocks loaded from the DRAM tier.",
        "nvme_hits": "KV blocks loaded from the NVMe tier.",
        "dram_misses": "KV blocks looked up and not found in the DRAM tier.",
        "nvme_misses": "KV blocks looked up and not found in the NVMe tier.",
        "dram_evictions": "KV blocks evicted from the DRAM tier.",
        "nvme_evictions": "KV blocks evicted from the NVMe tier.",
    }

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            key: create_metric_per_engine(
                self._counter_cls(name=f"vllm:pd_kv_{key}", documentation=doc,
                                  labelnames=labelnames),
                per_engine_labelvalues)
            for key, doc in self._COUNTERS.items()
        }
        self._pull_seconds = create_metric_per_engine(
            self._histogram_cls(
                name="vllm:pd_kv_pull_seconds", documentation="Duration of one KV pull.",
                buckets=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5],
                labelnames=labelnames),
            per_engine_labelvalues)
        self._leases = create_metric_per_engine(
            self._gauge_cls(name="vllm:pd_kv_leases_outstanding",
                            documentation="Prefill leases currently held.",
                            labelnames=labelnames),
            per_engine_labelvalues)
        self._failures = self._counter_cls(
            name="vllm:pd_kv_failures", documentation="Failed pulls and sends by reason.",
            labelnames=[*labelnames, "reason"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        data = transfer_stats_data
        for key, counter in self._counters.items():
            if data.get(key):
                counter[engine_idx].inc(data[key])
        for ms in data.get("pull_ms", []):
            self._pull_seconds[engine_idx].observe(ms / 1e3)
        self._leases[engine_idx].set(data.get("leases_outstanding", 0))
        labels = self.per_engine_labelvalues[engine_idx]
        for reason, n in data.get("failures", {}).items():
            self._failures.labels(*labels, reason).inc(n)
