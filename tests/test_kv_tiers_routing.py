"""The prefix-aware routing policy: matched prefix (from the block hashes replicas
report) against load, the matched tokens it reports, and its decision time."""

from __future__ import annotations

import statistics
import time

from serving.config import RouterConfig
from serving.policies import ReplicaLoad, RouteRequest, make_policy


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def replica(replica_id: str, role: str, held=(), waiting: int = 0) -> ReplicaLoad:
    return ReplicaLoad(replica_id, role, 0, waiting, 0.0, reported_at=0.0,
                       block_hashes=frozenset(held))


PROMPT = RouteRequest(num_prompt_tokens=2000, block_hashes=tuple(key(i) for i in range(62)))
POLICY = make_policy(RouterConfig(policy="prefix_aware", prefix_tokens_per_request=512))


def test_longest_matched_prefix_wins_at_equal_load():
    prefill = [replica("p1", "prefill", [key(i) for i in range(10)]),
               replica("p2", "prefill", [key(i) for i in range(40)]),
               replica("p3", "prefill", [key(i) for i in range(1, 62)])]  # no first block
    route = POLICY.route(PROMPT, prefill, [replica("d", "decode")])
    assert (route.prefill, route.reason, route.matched_tokens) == ("p2", "remote", 40 * 32)


def test_queue_outweighs_a_short_prefix():
    prefill = [replica("p1", "prefill", [key(i) for i in range(10)], waiting=3),
               replica("p2", "prefill")]
    assert POLICY.route(PROMPT, prefill, [replica("d", "decode")]).prefill == "p2"
    prefill[0] = replica("p1", "prefill", [key(i) for i in range(62)], waiting=3)
    assert POLICY.route(PROMPT, prefill, [replica("d", "decode")]).prefill == "p1"


def test_local_prefill_goes_to_the_decode_replica_with_the_prefix():
    decode = [replica("d1", "decode"), replica("d2", "decode", [key(0), key(1)])]
    route = POLICY.route(PROMPT, [], decode)
    assert (route.decode, route.prefill, route.reason, route.matched_tokens) == (
        "d2", None, "local_no_prefill", 64)


def test_decision_time():
    """16 prefill replicas holding 20,000 blocks each, a 2,000-token prompt."""
    prefill = [replica(f"p{r}", "prefill", [key(r * 100_000 + i) for i in range(20_000)],
                       waiting=r % 3) for r in range(16)]
    prefill[7] = replica("p7", "prefill", [key(i) for i in range(20_000)])
    decode = [replica(f"d{r}", "decode") for r in range(16)]
    samples = []
    for _ in range(500):
        t0 = time.perf_counter()
        route = POLICY.route(PROMPT, prefill, decode)
        samples.append(time.perf_counter() - t0)
    assert route.prefill == "p7"
    median_us = statistics.median(samples) * 1e6
    print(f"prefix_aware decision: median {median_us:.1f} us, "
          f"p99 {sorted(samples)[494] * 1e6:.1f} us")
    assert median_us < 1000
