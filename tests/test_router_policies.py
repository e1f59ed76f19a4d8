"""Routing policies and the router's state, without Ray."""

import pytest

from serving.config import RouterConfig
from serving.errors import OverloadedError
from serving.policies import ReplicaLoad, RouteRequest, make_policy
from serving.router import Router


def load(replica_id, role, running=0, waiting=0, usage=0.0):
    return ReplicaLoad(replica_id, role, running, waiting, usage, reported_at=0.0)


def report(router, replica_id, role, running=0, waiting=0):
    router.report({"replica_id": replica_id, "role": role, "num_running": running,
                   "num_waiting": waiting, "kv_cache_usage": 0.0})


def test_least_loaded_picks_the_shortest_queues():
    policy = make_policy(RouterConfig(policy="least_loaded"))
    route = policy.route(RouteRequest(1000), [load("p1", "prefill", 3), load("p2", "prefill", 1)],
                         [load("d1", "decode", 2, 2), load("d2", "decode", 5)])
    assert (route.prefill, route.decode, route.reason) == ("p2", "d1", "remote")


def test_round_robin_alternates():
    policy = make_policy(RouterConfig(policy="round_robin"))
    decode = [load("d1", "decode"), load("d2", "decode")]
    picks = [policy.route(RouteRequest(1000), [load("p", "prefill")], decode).decode
             for _ in range(4)]
    assert sorted(picks) == ["d1", "d1", "d2", "d2"]


@pytest.mark.parametrize("tokens, prefill_waiting, expected", [
    (10, 0, "local_short"), (1000, 0, "remote"), (1000, 50, "local_queue")])
def test_conditional_disaggregation(tokens, prefill_waiting, expected):
    policy = make_policy(RouterConfig(policy="conditional", local_prefill_max_tokens=64,
                                      prefill_queue_ratio=4))
    route = policy.route(RouteRequest(tokens), [load("p", "prefill", 1, prefill_waiting)],
                         [load("d", "decode", 1, 1)])
    assert route.reason == expected
    assert (route.prefill is None) == (expected != "remote")


def test_requests_p_d_cannot_serve_prefill_locally():
    policy = make_policy(RouterConfig())
    route = policy.route(RouteRequest(1000, may_disaggregate=False), [load("p", "prefill")],
                         [load("d", "decode")])
    assert route.prefill is None and route.reason == "local_unsupported"


def test_router_spreads_between_reports_and_keeps_sessions():
    router = Router({"policy": "least_loaded"})
    for rid in ("d1", "d2"):
        report(router, rid, "decode")
    report(router, "p1", "prefill")
    first, second = router.assign(1000), router.assign(1000)
    assert {first["decode"], second["decode"]} == {"d1", "d2"}
    sticky = router.assign(1000, session="abc")["decode"]
    assert all(router.assign(1000, session="abc")["decode"] == sticky for _ in range(5))


def test_failed_replica_is_skipped_until_it_reports_again(monkeypatch):
    router = Router()
    report(router, "d1", "decode")
    report(router, "p1", "prefill")
    router.mark_failed("p1")
    route = router.assign(1000)
    assert (route["decode"], route["prefill"], route["reason"]) == ("d1", None,
                                                                    "local_no_prefill")
    router.mark_failed("d1")
    with pytest.raises(OverloadedError):
        router.assign(1000)


def test_stale_replica_is_assigned_only_while_its_role_has_no_fresh_one(monkeypatch):
    """A late report (a replica's event loop held up) is not a death: with no fresh
    decode replica, the stale one still serves rather than every request getting 503."""
    import serving.router as router_module

    now = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: now[0])
    router = Router({"policy": "least_loaded"})
    report(router, "d1", "decode")
    report(router, "p1", "prefill")
    now[0] += router_module.STALE_AFTER_S + 1
    route = router.assign(1000)
    assert (route["decode"], route["prefill"]) == ("d1", "p1")
    assert {row["replica_id"] for row in router.snapshot()} == {"d1", "p1"}

    report(router, "d2", "decode")  # a fresh decode replica: the stale one waits
    assert {router.assign(1000)["decode"] for _ in range(4)} == {"d2"}
    assert router.assign(1000)["prefill"] == "p1"  # still no fresh prefill replica

    now[0] += router_module.FORGET_AFTER_S
    report(router, "d2", "decode")
    route = router.assign(1000)
    assert (route["decode"], route["prefill"], route["reason"]) == ("d2", None,
                                                                    "local_no_prefill")
    assert {row["replica_id"] for row in router.snapshot()} == {"d2"}


def test_unknown_policy_lists_known_ones():
    config = RouterConfig.model_construct(policy="random")
    with pytest.raises(ValueError, match="least_loaded"):
        make_policy(config)


def test_replica_counts_left_by_an_abort_do_not_stand():
    """vLLM reports counts with a step's outputs; an abort that empties the engine
    reports none, so its last counts would show an idle replica busy for good."""
    from types import SimpleNamespace

    from serving.engine import STALE_COUNTS_S, LoadStatLogger

    load = LoadStatLogger()
    prefix = SimpleNamespace(hits=0)
    load.record(SimpleNamespace(num_running_reqs=1, num_waiting_reqs=2, kv_cache_usage=0.1,
                                connector_prefix_cache_stats=None, prefix_cache_stats=prefix,
                                kv_connector_stats=None), None)
    assert load.counts(in_flight=False) == (1, 2)  # just reported: a step's numbers
    load.reported_at -= 2 * STALE_COUNTS_S  # no step since
    assert load.counts(in_flight=True) == (1, 2)  # a call of ours waits on the engine
    assert load.counts(in_flight=False) == (0, 0)
