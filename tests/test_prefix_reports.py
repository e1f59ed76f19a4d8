"""Prefix-aware routing's data path without engines: the tier index's key reports, the
replica's mirror and its deltas to the router (with resync), the router's decision
with hashes, and the ingress's block hashes against vLLM's own hasher."""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

from kvtransfer.stats import TIER_KEYS as KV_TIER_KEYS, PDConnectorStats
from kvtransfer.tiers.index import TierIndex
from serving.prefix import RESYNC, TIER_KEYS, BlockSets, HashSpec, HeldBlocks, PromptHasher
from serving.router import Router


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def store(index: TierIndex, keys: list[bytes]) -> None:
    index.complete_store(index.prepare_store(keys).plan_id)


def test_tier_index_reports_a_snapshot_then_net_changes():
    index = TierIndex(num_slots=2, block_bytes=64)
    take = lambda: index.journal.take(index.keys)  # noqa: E731
    assert take() == {"seq": 1, "full": True, "added": [], "removed": []}
    assert take() is None
    store(index, [key(1), key(2)])
    assert take() == {"seq": 2, "full": False, "added": [key(1), key(2)], "removed": []}
    store(index, [key(3)])  # DRAM full, no NVMe: the LRU key is dropped
    assert take() == {"seq": 3, "full": False, "added": [key(3)], "removed": [key(1)]}
    index.forget([key(2)])
    assert take()["removed"] == [key(2)]


def test_scheduler_stats_carry_the_report_through_aggregation():
    report = {"seq": 1, "full": True, "added": [key(1)], "removed": []}
    scheduler = PDConnectorStats()
    scheduler.data[KV_TIER_KEYS] = report
    assert not scheduler.is_empty() and KV_TIER_KEYS == TIER_KEYS
    worker = PDConnectorStats()
    worker.data["num_pulls"] = 1
    assert worker.aggregate(scheduler).data[KV_TIER_KEYS] == report


def engine_report(seq, added=(), removed=(), full=False):
    return {"seq": seq, "full": full, "added": list(added), "removed": list(removed)}


def test_replica_sends_deltas_and_the_router_asks_for_a_snapshot_when_lost():
    held, sets = HeldBlocks(), BlockSets()
    held.apply(engine_report(1, [key(1), key(2)], full=True))
    first = held.take_update()
    assert first["full"] and sets.apply("r", first)
    held.apply(engine_report(2, [key(3)], [key(1)]))
    delta = held.take_update()
    assert not delta["full"] and delta["added"] == [key(3)] and delta["removed"] == [key(1)]
    assert sets.apply("r", delta) and sets.get("r") == {key(2), key(3)}
    assert held.take_update() is None and sets.apply("r", None)
    held.apply(engine_report(3, [key(4)]))
    held.take_update()  # lost on the way
    held.apply(engine_report(4, [key(5)]))
    assert not sets.apply("r", held.take_update())  # a gap: resync
    held.resync()
    assert sets.apply("r", held.take_update())
    assert sets.get("r") == {key(2), key(3), key(4), key(5)} == held.keys
    assert not sets.apply("new", None)  # a replica the router does not know yet


def stats(replica_id, role, blocks=None, **extra):
    return {"replica_id": replica_id, "role": role, "num_running": 0, "num_waiting": 0,
            "kv_cache_usage": 0.0, "blocks": blocks, **extra}


def full(version, keys):
    return {"version": version, "full": True, "added": list(keys), "removed": []}


def test_router_routes_a_cached_prompt_to_its_decode_holder_and_resyncs():
    router = Router({"policy": "prefix_aware", "local_prefill_max_tokens": 64})
    spec = {"block_size": 32, "algo": "sha256", "seed": "s"}
    assert router.report(stats("p", "prefill", full(1, []), hash_spec=spec)) is None
    assert router.report(stats("d1", "decode", full(1, []))) is None
    assert router.report(stats("d2", "decode", full(1, [key(i) for i in range(30)]))) is None
    assert router.hash_spec() == spec
    prompt = tuple(key(i) for i in range(31))
    route = router.assign(31 * 32 + 10, None, True, prompt, 32)
    assert (route["decode"], route["prefill"], route["reason"], route["matched_tokens"]) == (
        "d2", None, "local_cached", 30 * 32)
    route = router.assign(31 * 32 + 10, None, True, tuple(key(100 + i) for i in range(31)), 32)
    assert route["reason"] == "remote" and route["decode"] == "d1"  # fewer blocks held
    assert {row["replica_id"]: row["num_blocks_held"] for row in router.snapshot()} == {
        "p": 0, "d1": 0, "d2": 30}
    router.mark_failed("d2")
    assert router.report(stats("d2", "decode"))[RESYNC]  # before the failure was seen
    router.failed_at["d2"] -= 2
    assert router.report(stats("d2", "decode"))[RESYNC]  # forgotten: needs the whole set
    assert router.report(stats("d2", "decode", full(5, [key(0)]))) is None


def test_ingress_hashes_equal_vllms_request_block_hashes():
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    spec = HashSpec(32, "sha256", kv_cache_utils.DEFAULT_NONE_HASH_SEED)
    hash_fn = get_hash_fn_by_name("sha256")
    kv_cache_utils.init_none_hash(hash_fn)
    hasher = kv_cache_utils.get_request_block_hasher(32, hash_fn)
    tokens = list(range(1000, 1100))
    for salt in (None, "tenant-a"):
        request = SimpleNamespace(block_hashes=[], num_tokens=len(tokens), mm_features=[],
                                  all_token_ids=tokens, lora_request=None, cache_salt=salt,
                                  prompt_embeds=None)
        expected = tuple(bytes(h) for h in hasher(request))
        assert len(expected) == 3
        assert PromptHasher(spec).block_hashes(tokens, salt) == expected


def test_router_decision_time_with_hashes():
    """16 prefill + 16 decode replicas, 20,000 blocks each, a 2,000-token prompt:
    Router.assign (policy plus bookkeeping) in-process, without the actor call."""
    router = Router({"policy": "prefix_aware"})
    for r in range(16):
        for role in ("prefill", "decode"):
            base = (r if role == "prefill" else 16 + r) * 100_000
            blocks = [key(i) for i in range(20_000)] if (role, r) == ("prefill", 7) else \
                [key(base + i) for i in range(20_000)]
            router.report(stats(f"{role[0]}{r}", role, full(1, blocks)))
    prompt = tuple(key(i) for i in range(62))
    samples, policy = [], []
    for _ in range(500):
        t0 = time.perf_counter()
        route = router.assign(2000, None, True, prompt, 32)
        samples.append(time.perf_counter() - t0)
        policy.append(route["policy_s"])
        for load in router.replicas.values():
            load.num_waiting = 0  # keep the load equal: the prefix decides
    assert route["prefill"] == "p7" and route["matched_tokens"] == 62 * 32
    print(f"Router.assign: median {statistics.median(samples) * 1e6:.1f} us, policy "
          f"median {statistics.median(policy) * 1e6:.1f} us, "
          f"p99 {sorted(samples)[494] * 1e6:.1f} us")
    assert statistics.median(samples) < 2e-3
