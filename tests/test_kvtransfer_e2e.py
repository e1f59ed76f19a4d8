"""Prefill and decode as two real vLLM CPU engines (tiny model) moving KV over ucxx.

The decode engine doubles as the aggregated reference: a request without
kv_transfer_params is prefilled and decoded there as in any single engine (prefix
caching is off, so the reference run leaves nothing behind for the P/D run to hit).

Both engines run on this host, so pulls take the same-host shm path by default; a
third engine with `shm: off` keeps the UCX path tested against the same prefill.
"""

from __future__ import annotations

import random
import time

import psutil
import pytest

from serving.model import resolve_model
from tests.kvtransfer_helpers.engines import EngineProcess, engine_kwargs, wait_until

pytestmark = pytest.mark.e2e

BLOCK = 32
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engines():
    model = resolve_model("pdserve:tiny")
    prefill = EngineProcess(engine_kwargs(model, "kv_producer"))
    decode = EngineProcess(engine_kwargs(model, "kv_consumer", {"transfer_timeout_s": 5}))
    try:
        prefill.wait_ready()
        decode.wait_ready()
        yield prefill, decode
    finally:
        prefill.stop()
        decode.stop()


@pytest.fixture(scope="module")
def ucx_decode(engines):
    decode = EngineProcess(engine_kwargs(
        resolve_model("pdserve:tiny"), "kv_consumer", {"transfer_timeout_s": 5, "shm": "off"}))
    try:
        yield decode.wait_ready()
    finally:
        decode.stop()


def make_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 4000) for _ in range(n)]


def prefill_then_decode(prefill, decode, prompts, prefill_params=None):
    params = [{"do_remote_decode": True, **(prefill_params or {})} for _ in prompts]
    firsts = prefill.generate(prompts, 1, params)
    for f in firsts:
        assert f.kv_transfer_params and f.kv_transfer_params["do_remote_prefill"]
    return decode.generate(prompts, MAX_TOKENS, [f.kv_transfer_params for f in firsts])


def connector(engine) -> dict:
    return engine.stats().connector


def leases_settled(prefill) -> bool:
    stats = prefill.stats()
    c = stats.connector
    return stats.kv_cache_usage == 0 and c.get("leases_granted", 0) == c.get("leases_released", 0)


@pytest.mark.parametrize("num_tokens", [40, 600, 1800])
def test_pd_output_equals_aggregated(engines, num_tokens):
    prefill, decode = engines
    prompt = make_prompt(num_tokens, seed=num_tokens)
    expected = decode.generate([prompt], MAX_TOKENS)[0].token_ids
    before = connector(decode)

    (out,) = prefill_then_decode(prefill, decode, [prompt])

    assert out.token_ids == expected
    num_blocks = -(-num_tokens // BLOCK)
    want = {
        "blocks_received": before.get("blocks_received", 0) + num_blocks,
        "external_hits": before.get("external_hits", 0) + num_tokens,
        "num_pull_failures": before.get("num_pull_failures", 0),
        "num_pulls_shm": before.get("num_pulls_shm", 0) + 1,  # the same-host path
        "num_pulls_direct": before.get("num_pulls_direct", 0) + 1,  # no round trip
    }
    assert wait_until(lambda: {k: connector(decode).get(k, 0) for k in want} == want, 10), (
        connector(decode))
    assert wait_until(lambda: leases_settled(prefill), 10), prefill.stats()


def test_eight_concurrent_requests_and_leases_released(engines):
    prefill, decode = engines
    prompts = [make_prompt(100 + 97 * i, seed=100 + i) for i in range(8)]
    expected = [c.token_ids for c in decode.generate(prompts, MAX_TOKENS)]
    before = connector(decode)

    outs = prefill_then_decode(prefill, decode, prompts)

    assert [o.token_ids for o in outs] == expected
    assert connector(decode).get("num_pull_failures", 0) == before.get("num_pull_failures", 0)
    assert wait_until(lambda: leases_settled(prefill), 10), prefill.stats()


def test_pd_over_ucx_when_shm_is_off(engines, ucx_decode):
    prefill, _ = engines
    prompt = make_prompt(600, seed=600)
    expected = ucx_decode.generate([prompt], MAX_TOKENS)[0].token_ids
    before = connector(ucx_decode)

    (out,) = prefill_then_decode(prefill, ucx_decode, [prompt])

    assert out.token_ids == expected
    want = {"blocks_received": before.get("blocks_received", 0) + -(-600 // BLOCK),
            "num_pulls": before.get("num_pulls", 0) + 1, "num_pulls_shm": 0}
    assert wait_until(lambda: {k: connector(ucx_decode).get(k, 0) for k in want} == want, 10), (
        connector(ucx_decode))
    assert wait_until(lambda: leases_settled(prefill), 10), prefill.stats()


def test_idle_pair_does_not_spin(engines):
    """After the transfers above, an idle prefill/decode pair sleeps (< 2% of a core)."""
    prefill, decode = engines
    assert wait_until(lambda: leases_settled(prefill), 10)
    time.sleep(2)  # let the last engine steps finish
    procs = [psutil.Process(pid) for pid in prefill.pids + decode.pids]
    before = [p.cpu_times() for p in procs]
    time.sleep(5)
    after = [p.cpu_times() for p in procs]
    usage = {
        f"{p.pid}:{p.name()}": round(100 * (a.user + a.system - b.user - b.system) / 5, 2)
        for p, b, a in zip(procs, before, after)
    }
    assert all(u < 2.0 for u in usage.values()), usage


def test_expired_lease_frees_blocks_and_decode_recomputes(engines):
    prefill, decode = engines
    prompt = make_prompt(300, seed=7)
    expected = decode.generate([prompt], MAX_TOKENS)[0].token_ids
    expired_before = connector(prefill).get("leases_expired", 0)
    (first,) = prefill.generate([prompt], 1, [{"do_remote_decode": True, "kv_lease_s": 1.0}])

    assert wait_until(lambda: connector(prefill).get("leases_expired", 0) > expired_before, 10)
    assert wait_until(lambda: leases_settled(prefill), 10), prefill.stats()

    failures_before = connector(decode).get("failures", {}).get("lease_unavailable", 0)
    (out,) = decode.generate([prompt], MAX_TOKENS, [first.kv_transfer_params])
    assert out.token_ids == expected
    assert wait_until(lambda: connector(decode).get("failures", {}).get(
        "lease_unavailable", 0) == failures_before + 1, 10)


def test_prefill_killed_before_pull_decode_recomputes(engines):
    """Runs last in this module: it kills the shared prefill engine.

    The decode side recomputes once it has seen the control socket close. If its I/O
    thread runs late (a busy box), the pull may be handled before the close: a direct
    pull then copies from the dead peer's mapped memory, where the lease was still
    held at death and nothing can write any more, which is correct too."""
    prefill, decode = engines
    prompt = make_prompt(500, seed=11)
    expected = decode.generate([prompt], MAX_TOKENS)[0].token_ids
    before = connector(decode)
    (first,) = prefill.generate([prompt], 1, [{"do_remote_decode": True}])
    prefill.kill()

    (out,) = decode.generate([prompt], MAX_TOKENS, [first.kv_transfer_params])

    assert out.token_ids == expected

    def recomputed_or_direct() -> bool:
        now = connector(decode)
        unreachable = now.get("failures", {}).get("peer_unreachable", 0)
        return (unreachable > before.get("failures", {}).get("peer_unreachable", 0)
                or now.get("num_pulls_direct", 0) > before.get("num_pulls_direct", 0))

    assert wait_until(recomputed_or_direct, 10), connector(decode)
