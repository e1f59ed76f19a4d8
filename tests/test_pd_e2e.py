"""P/D serving as a client sees it: `pdserve serve configs/cpu-pd.yaml` (prefill and
decode engines, KV over UCX) must answer exactly what one aggregated engine answers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.config import app_config_from_file
from serving.model import resolve_model
from tests.helpers.offline import reference_outputs
from tests.helpers.servers import REPO, ServerProcess, metric, running_server, wait_for
from tests.test_serving_e2e import long_prompt

pytestmark = pytest.mark.e2e

PD_CONFIG = "configs/cpu-pd.yaml"
REQUESTS = [{"prompt": long_prompt(n), "max_tokens": 24} for n in (20, 130, 390)]  # ~90, 600, 1800 tokens
SHORT = {"prompt": "Hi there", "max_tokens": 8}


@pytest.fixture(scope="module")
def pd_server():
    with running_server(PD_CONFIG) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    config, _ = app_config_from_file(REPO / PD_CONFIG)
    return reference_outputs(resolve_model(config.model), config.decode.engine_kwargs,
                             REQUESTS + [SHORT], tmp_path_factory.mktemp("pd-offline"))


def complete(server, req, **extra):
    body = {"model": "pdserve:tiny", "prompt": req["prompt"], "max_tokens": req["max_tokens"],
            "temperature": 0.0, "return_token_ids": True, **extra}
    response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_pd_output_equals_aggregated_and_decode_loaded_the_prompt(pd_server, reference):
    direct_before = {pool: metric(pd_server, "pdserve_engine_calls_total", pool=pool,
                                  channel="direct") for pool in ("prefill", "decode")}
    for req, expected in zip(REQUESTS, reference):
        remote_before = metric(pd_server, "pdserve_router_decisions_total", decision="remote")
        hits_before = _decode_prompt_hits(pd_server)
        reply = complete(pd_server, req)
        assert reply["choices"][0]["token_ids"] == expected["token_ids"]
        assert reply["choices"][0]["text"] == expected["text"]
        assert reply["usage"]["prompt_tokens"] == len(expected["prompt_token_ids"])
        assert reply["usage"]["completion_tokens"] == req["max_tokens"]
        assert metric(pd_server, "pdserve_router_decisions_total",
                      decision="remote") == remote_before + 1
        # The decode replica computed none of the prompt: every token but the last came
        # from the prefill replica, or from its own prefix cache (these prompts share a
        # prefix with each other).
        num_prompt = len(expected["prompt_token_ids"])
        wait_for(lambda: _decode_prompt_hits(pd_server) - hits_before >= num_prompt - 1)
    # Both calls of each request took the same-node socket, not Serve handles.
    for pool, before in direct_before.items():
        assert metric(pd_server, "pdserve_engine_calls_total", pool=pool,
                      channel="direct") == before + len(REQUESTS), pool


def test_pd_streaming_equals_aggregated(pd_server, reference):
    import openai

    client = openai.OpenAI(base_url=pd_server.base_url + "/v1", api_key="none", max_retries=0)
    for i, (req, expected) in enumerate(zip(REQUESTS, reference)):
        chunks = list(client.completions.create(
            model="pdserve:tiny", prompt=req["prompt"], max_tokens=req["max_tokens"],
            temperature=0.0, stream=True, extra_body={"return_token_ids": True}))
        ids = [c.choices[0].token_ids for c in chunks if c.choices and c.choices[0].token_ids]
        assert sum(ids, []) == expected["token_ids"]
        # one SSE event per token, no bursts
        bursts = {n: len(step) for n, step in enumerate(ids) if len(step) != 1}
        assert not bursts, f"request {i}: tokens per event at event index {bursts}"


def test_first_token_streams_from_the_prefill_and_the_stream_reads_as_one_engines(
        pd_server, reference):
    """The prefill's sampled token goes to the client at once (serving/head.py); the
    decode replica's events follow under the same id, its longer prompt hidden."""
    req, expected = REQUESTS[1], reference[1]
    body = {"model": "pdserve:tiny", "prompt": req["prompt"], "max_tokens": req["max_tokens"],
            "temperature": 0.0, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", pd_server.base_url + "/v1/completions", json=body,
                      timeout=120) as reply:
        assert reply.status_code == 200
        assert 'first-token;desc="prefill"' in reply.headers["server-timing"]
        events = [json.loads(line[6:]) for line in reply.iter_lines()
                  if line.startswith("data: {")]
    choices = [c for e in events for c in e["choices"]]
    assert [t for c in choices for t in c.get("token_ids") or []] == expected["token_ids"]
    assert "".join(c["text"] for c in choices) == expected["text"]
    assert choices[0]["prompt_token_ids"] == expected["prompt_token_ids"]
    assert not any(c.get("prompt_token_ids") for c in choices[1:])
    assert len({e["id"] for e in events}) == 1
    assert events[-1]["usage"]["prompt_tokens"] == len(expected["prompt_token_ids"])
    assert events[-1]["usage"]["completion_tokens"] == req["max_tokens"]

    seeded = httpx.post(pd_server.base_url + "/v1/completions", timeout=120, json={
        "model": "pdserve:tiny", "prompt": req["prompt"], "max_tokens": 4,
        "temperature": 0.8, "seed": 7})
    assert seeded.status_code == 200, seeded.text
    assert "first-token" not in seeded.headers["server-timing"]  # vLLM's convention


def test_short_prompt_is_prefilled_locally(pd_server, reference):
    before = metric(pd_server, "pdserve_router_decisions_total", decision="local",
                    reason="local_short")
    reply = complete(pd_server, SHORT)
    assert reply["choices"][0]["token_ids"] == reference[-1]["token_ids"]
    assert metric(pd_server, "pdserve_router_decisions_total", decision="local",
                  reason="local_short") == before + 1


def test_both_engines_vllm_metrics_reach_rays_metrics_endpoint(pd_server):
    """vLLM's own engine metrics, from both pools, on the Ray metrics port given to
    `pdserve serve --metrics-port`: a series per engine replica (ReplicaId), each
    counting the request it finished."""
    def finished() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{pd_server.metrics_port}/metrics").text
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ray_vllm_request_success_total":
                    replica = sample.labels["ReplicaId"]
                    counts[replica] = counts.get(replica, 0.0) + sample.value
        return counts

    before = finished()
    complete(pd_server, REQUESTS[0])  # remote: prefilled by one engine, decoded by the other

    def both_counted() -> bool:  # (a replica Serve replaced has a series of its own)
        after = finished()
        return sum(n > before.get(replica, 0.0) for replica, n in after.items()) == 2

    # Ray's workers report their metrics to its agent every 10 s.
    wait_for(both_counted, timeout_s=40, what="a finished request in each engine's metrics")


def test_every_listener_is_on_loopback(pd_server):
    """HTTP, Ray (GCS, raylet, workers, agents), Serve replicas, vLLM, UCX and the KV
    handshake: nothing in the server's process tree listens beyond 127.0.0.1."""
    complete(pd_server, REQUESTS[1])  # transports and handshakes are up
    root = psutil.Process(pd_server.proc.pid)
    tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
    listeners = [(c.laddr.ip, c.laddr.port, tree[c.pid].name())
                 for c in psutil.net_connections(kind="inet")
                 if c.pid in tree and (c.status == psutil.CONN_LISTEN
                                       or (c.type == socket.SOCK_DGRAM and not c.raddr))]
    assert len(listeners) > 10
    outside = [entry for entry in listeners if entry[0] not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert not outside, outside


def test_only_the_decode_engine_and_the_prefill_side_use_the_decode_core(pd_server):
    """configs/cpu-pd.yaml's placement: each engine computes on its bound core, in its
    EngineCore (a child of the replica; `distributed_executor_backend: uni`), whose
    other threads (input, output, ZeroMQ's) run on its pool's `cpus`; the prefill
    replica on core 1, everything else (Ray, ingress, router, the decode replica) on
    core 0."""
    config, _ = app_config_from_file(REPO / PD_CONFIG)
    serving = {int(config.serving_cpus)}
    complete(pd_server, REQUESTS[0])
    root = psutil.Process(pd_server.proc.pid)
    tree = [root, *root.children(recursive=True)]
    placed, computing = {}, {}
    for role, pool in (("Prefill", config.prefill), ("Decode", config.decode)):
        assert pool.engine_kwargs["distributed_executor_backend"] == "uni"
        assert pool.engine_cpus is None
        (replica,) = [p for p in tree if f"pdserve:{role}Engine" in " ".join(p.cmdline())]
        placed[replica.pid] = {int(pool.cpus)}
        for child in replica.children():  # its EngineCore (and multiprocessing's helper)
            placed[child.pid] = {int(pool.cpus)}
            if child.name().startswith("VLLM::EngineCor"):
                computing[child.pid] = {int(pool.env["VLLM_CPU_OMP_THREADS_BIND"])}
    assert len(computing) == 2 and len(placed) >= 4  # each pool: replica, EngineCore
    assert not [p for p in tree if p.name().startswith("VLLM::Worker")]
    wrong = []
    for process in tree:
        for thread in process.threads():
            main = thread.id == process.pid
            expected = (computing[process.pid] if main and process.pid in computing
                        else placed.get(process.pid, serving))
            try:
                cpus = os.sched_getaffinity(thread.id)
            except ProcessLookupError:  # ended meanwhile
                continue
            if cpus != expected:
                wrong.append((process.name(), thread.id, cpus, expected))
    assert not wrong, wrong[:10]


def test_every_thread_of_the_tree_runs_at_one_nice_value(pd_server):
    """No thread of Ray's (daemons, a worker's RPC threads) goes ahead of the replicas'
    per-token work on the cores they share: with Ray's default, workers run at 15 but
    their RPC threads and Ray's daemons at 0 (serving/placement.py)."""
    root = psutil.Process(pd_server.proc.pid)
    nice = {}
    for process in [root, *root.children(recursive=True)]:
        for thread in process.threads():
            try:
                nice.setdefault(os.getpriority(os.PRIO_PROCESS, thread.id), set()).add(
                    process.name())
            except ProcessLookupError:  # ended meanwhile
                continue
    assert len(nice) == 1, nice


def test_decode_replica_late_to_report_still_serves(pd_server, reference):
    """A decode replica held up past the router's STALE_AFTER_S (paused here; in
    production a long tokenization, a stalled box) is stale, not dead: a request sent
    meanwhile waits for it and succeeds, where it was turned away with 503."""
    from serving.router import STALE_AFTER_S

    root = psutil.Process(pd_server.proc.pid)
    (replica,) = [p for p in root.children(recursive=True)
                  if "ServeReplica:pdserve:DecodeEngine" in " ".join(p.cmdline())]
    req, expected = REQUESTS[1], reference[1]
    replies = []
    sender = threading.Thread(target=lambda: replies.append(complete(pd_server, req)))
    replica.suspend()
    try:
        time.sleep(STALE_AFTER_S + 1.5)  # heartbeats come every 2 s
        sender.start()
        time.sleep(1.0)
    finally:
        replica.resume()
    sender.join(60)
    assert len(replies) == 1, "the request failed or hung (its assertion is above)"
    assert replies[0]["choices"][0]["token_ids"] == expected["token_ids"]


def test_killing_prefill_mid_run_loses_no_request(pd_server, reference):
    results, errors, slowest = [], [], 0.0
    killed = threading.Event()
    for i in range(20):
        if i == 4:
            _kill_replica(pd_server, "PrefillEngine")
            killed.set()
        req, expected = REQUESTS[i % len(REQUESTS)], reference[i % len(REQUESTS)]
        started = time.monotonic()
        try:
            reply = complete(pd_server, req)
            results.append(reply["choices"][0]["token_ids"] == expected["token_ids"])
        except AssertionError as exc:
            errors.append(str(exc))
        slowest = max(slowest, time.monotonic() - started)
    assert killed.is_set() and not errors, errors
    assert results == [True] * 20
    # No request waits for the replacement prefill replica (prefill_assign_timeout_s 2).
    assert slowest < 10, f"a request took {slowest:.1f} s while prefill was down"
    assert metric(pd_server, "pdserve_router_decisions_total", decision="fallback") + \
        metric(pd_server, "pdserve_router_decisions_total", decision="local",
               reason="local_no_prefill") >= 1


def test_client_leaving_mid_stream_stops_the_decode(pd_server):
    """A client that closes its connection mid-stream ends the request at the engine:
    Serve cancels the ingress's request (counted as status 499), which closes the decode
    replica's stream."""
    body = {"model": "pdserve:tiny", "prompt": REQUESTS[0]["prompt"], "max_tokens": 3900,
            "ignore_eos": True, "temperature": 0.0, "stream": True}
    def decode_running() -> float:
        return metric(pd_server, "pdserve_replica_running_requests", pool="decode")
    def left() -> float:
        return metric(pd_server, "pdserve_requests_total", endpoint="completions",
                      status="499")

    left_before = left()
    with httpx.stream("POST", pd_server.base_url + "/v1/completions", json=body,
                      timeout=60) as reply:
        assert reply.status_code == 200
        tokens = 0
        for line in reply.iter_lines():  # 3900 tokens: 17 s or more
            tokens += line.startswith("data: {")
            if tokens >= 5 and decode_running() > 0:
                break  # leaving the block closes the connection
    assert tokens < 1000, "the decode replica never showed the request as running"
    wait_for(lambda: left() == left_before + 1, 8, "the ingress counting the stream left")
    # Still running, the engine would report it with every step. Stopped, it reports
    # nothing (vLLM's counts come with a step's outputs): the replica drops its last
    # counts once none of its calls is in flight, so the router's view is fresh too.
    # Well short of the 17 s the request would run, with room for a box that is busy
    # restarting the prefill replica the test before killed (5 s was missed by 0.6 s).
    wait_for(lambda: decode_running() == 0, 8, "the decode replica reporting no request")


def test_decode_death_mid_stream_ends_the_stream_with_an_error(pd_server, reference):
    """Runs last: the decode replica is killed while it streams. The client gets an
    error event and [DONE] (no hang); requests meanwhile fail fast with 503 or succeed;
    once Serve has replaced the replica, the router assigns the new one."""
    body = {"model": "pdserve:tiny", "prompt": REQUESTS[0]["prompt"], "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0.0, "stream": True}
    events = []
    with httpx.stream("POST", pd_server.base_url + "/v1/completions", json=body,
                      timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 10:
                    _kill_replica(pd_server, "DecodeEngine")
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "went away" in error["message"], error
    assert len(events) < 1000, "the stream went on after the decode replica died"

    deadline = time.monotonic() + 180
    statuses = []
    while True:
        started = time.monotonic()
        response = httpx.post(pd_server.base_url + "/v1/completions", timeout=60, json={
            "model": "pdserve:tiny", "prompt": REQUESTS[1]["prompt"], "temperature": 0.0,
            "max_tokens": REQUESTS[1]["max_tokens"], "return_token_ids": True})
        assert time.monotonic() - started < 30, "a request hung while decode was down"
        statuses.append(response.status_code)
        if response.status_code == 200:
            assert response.json()["choices"][0]["token_ids"] == reference[1]["token_ids"]
            break
        assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, f"decode never came back: {statuses[-5:]}"
        time.sleep(1.0)


def _decode_prompt_hits(server) -> float:
    return (metric(server, "pdserve_replica_external_hit_tokens_total", pool="decode")
            + metric(server, "pdserve_replica_local_hit_tokens_total", pool="decode"))


def _kill_replica(server: ServerProcess, deployment: str) -> None:
    """SIGKILL a replica's actor process (a child of our server only)."""
    root = psutil.Process(server.proc.pid)
    for child in root.children(recursive=True):
        try:
            if re.search(rf"ServeReplica:pdserve:{deployment}", " ".join(child.cmdline())):
                os.kill(child.pid, signal.SIGKILL)
                return
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no {deployment} replica process found under the server")
