"""The ingress's /metrics: connector transfer stats reported by the replicas, and the
Server-Timing header the P/D path sets (read back by benchmarks.pd_overhead)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.pd_overhead import parse_server_timing
from serving.dispatch import Dispatch
from serving.metrics import KVTransferTotals, ServingMetrics


def _samples(metrics: ServingMetrics) -> dict[tuple, float]:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_connector_stats_become_cumulative_kv_transfer_series():
    kv = KVTransferTotals()
    kv.observe({"bytes_received": 1000, "blocks_received": 2, "pull_ms": [1.5, 30.0],
                "failures": {"transfer_timeout": 1}, "leases_outstanding": 0})
    kv.observe({"bytes_received": 500, "blocks_received": 1, "pull_ms": [0.4],
                "failures": {"transfer_timeout": 2, "peer_unreachable": 1}})
    metrics = ServingMetrics()
    metrics.set_replica_loads([{"role": "decode", "replica_id": "d1", "num_running": 0,
                                "num_waiting": 0, "kv_cache_usage": 0.0,
                                "kv_transfer": kv.as_dict()}])
    got = _samples(metrics)
    ids = (("pool", "decode"), ("replica", "d1"))

    def sample(name, *extra):
        return got[(name, tuple(sorted(ids + extra)))]

    assert sample("pdserve_kv_transfer_bytes_total", ("direction", "received")) == 1500
    assert sample("pdserve_kv_transfer_blocks_total", ("direction", "received")) == 3
    assert sample("pdserve_kv_transfer_seconds_count") == 3
    assert abs(sample("pdserve_kv_transfer_seconds_sum") - 0.0319) < 1e-9
    assert sample("pdserve_kv_transfer_seconds_bucket", ("le", "0.0005")) == 1
    assert sample("pdserve_kv_transfer_seconds_bucket", ("le", "0.002")) == 2
    assert sample("pdserve_kv_transfer_seconds_bucket", ("le", "0.05")) == 3
    assert sample("pdserve_kv_transfer_seconds_bucket", ("le", "+Inf")) == 3
    assert sample("pdserve_kv_transfer_failures_total", ("reason", "transfer_timeout")) == 3
    assert sample("pdserve_kv_transfer_failures_total", ("reason", "peer_unreachable")) == 1


def test_replicas_without_a_connector_export_no_transfer_series():
    metrics = ServingMetrics()
    metrics.set_replica_loads([{"role": "aggregated", "replica_id": "a1", "num_running": 1,
                                "num_waiting": 0, "kv_cache_usage": 0.5}])
    assert not [key for key in _samples(metrics) if key[0].startswith("pdserve_kv_transfer")]


def test_server_timing_round_trip():
    dispatch = Dispatch(None, "remote", "remote_long", "d1", ingress_s=0.003,
                        route_s=0.0012, prefill_s=0.105, prefill_engine_s=0.1)
    timing = parse_server_timing(dispatch.server_timing())
    assert timing == {"ingress": 0.003, "route": 0.0012, "prefill": 0.105,
                      "prefill-engine": 0.1}
    local = Dispatch(None, "local", "local_short", "d1", route_s=0.002)
    assert parse_server_timing(local.server_timing()) == {"ingress": 0.0, "route": 0.002}
