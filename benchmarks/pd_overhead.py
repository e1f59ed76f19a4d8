"""What P/D orchestration costs: TTFT through the P/D endpoint minus the time the
prefill engine and the KV pull take, next to TTFT and ITL through the aggregated
endpoint on the same prompts, plus start-up time and memory of each process tree.

    python -m benchmarks.pd_overhead [--pd-config configs/cpu-pd.yaml]
        [--aggregated-config configs/cpu-aggregated.yaml] [--aggregated-cores 1]
        [--prompt-tokens 1000] [--output-tokens 64] [--num-requests 20] [--no-pause]

Both servers run in this one run (started one after the other, P/D first, each timed
alone until ready), then get the same prompts alternately, one request at a time, so
both see the same machine load: sequential streamed greedy requests (low load),
ignore_eos so each makes exactly --output-tokens tokens, a distinct prompt per request
so no prefix cache hides a prefill; the first request to each warms up. Unless
--no-pause, the servers whose turn it is not are suspended (SIGSTOP, the whole process
tree) through that turn, so each request meets its server alone on the box, as the
targets' bars were measured, and not beside the others' idle Ray processes.

The timed requests go over the standard library's http.client, one kept-alive
connection per server, reading the SSE stream line by line: the overhead is the
server's, not its client's. httpx (under the OpenAI client) spends about 2 ms of its
own per streamed request on this box, so P/D also gets as many requests over httpx,
with prompts of their own, and that overhead is printed as well.

Per P/D request:
  overhead = client TTFT - prefill engine time - KV pull time (if before the first token)
where the prefill engine time is what the prefill replica reports (the ingress's
`Server-Timing: prefill-engine`, measured inside the replica around vLLM's OpenAI
handler), and the pull time is the decode replica's connector pull, read as the change
of `pdserve_kv_transfer_seconds` in /metrics (sequential requests: one pull each).
When the first token came from the prefill's reply (`Server-Timing: first-token`,
serving/head.py), the pull happens after it and is not subtracted; what remains is the
ingress, the router call and the prefill hop. Otherwise it also holds the decode
replica's request handling and its first decode step. The time to the second token and
the ITL without the first gap are printed too: with the first token from the prefill,
the decode hop, pull and first decode step move into the first gap.

The aggregated engine is pinned to --aggregated-cores cores (VLLM_CPU_OMP_THREADS_BIND),
the targets' "aggregated on one core". The issue's bar for that is vLLM's own server on
one core, so unless --no-vllm, vLLM's OpenAI server (`vllm.entrypoints.openai.api_server`,
the aggregated config's engine arguments and environment, pinned the same way, vLLM's
own spin settings) is started third and gets the same prompts in the same rotation;
its TTFT and ITL, and P/D's over them, are printed too. Tree memory is the sum over the
server process and all its descendants (Ray's GCS, raylet, workers, engine processes):
RSS, which counts shared pages once per process, and PSS, which splits them.

Each server's tokens that shared an SSE event with the one before them are counted
(the targets' one event per token). P/D's ratios over vLLM's server come with a 90%
bootstrap interval over the rounds (each round's two requests kept together): the
box's speed drifts between runs by more than the targets' margins, so one run's ratio
alone says little.

Last line: `overhead_p50_ms=.. overhead_p99_ms=.. ttft_ratio=.. itl_ratio=.. ready_s=..
tree_rss_gb=.. httpx_overhead_p50_ms=.. [vllm_ttft_ratio=.. vllm_itl_ratio=..
vllm_itl_ratio_90=LOW-HIGH]` (ratios are P/D over aggregated, or over vLLM's server,
TTFT by median, ITL by mean, all from the http.client requests).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterator

import httpx
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.servers import (ManagedServer, pdserve_auth_headers, start_pdserve,
                                start_timed)
from serving.config import Role, app_config_from_file
from serving.placement import process_name, process_tree
from serving.vllm_plugin import SPIN_ENV

METRICS_WAIT_S = 5.0
QUIET = {"PDSERVE_ENGINE_LOGS": "0"}  # server logs without every engine's lines


@dataclass(slots=True)
class Sample:
    ttft: float
    gaps: list[float]
    timing: dict[str, float] = field(default_factory=dict)  # Server-Timing, seconds
    pull: float | None = None
    head: bool = False  # the first token came from the prefill's reply


def make_prompts(model_dir: str, num_tokens: int, count: int, seed: int = 0) -> list[str]:
    """`count` different prompts of about `num_tokens` tokens each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, num_tokens * 2)
               if int(i) not in special]
        text = tok.decode(ids)
        ids = tok(text, add_special_tokens=False)["input_ids"][:num_tokens - 1]  # + BOS
        prompts.append(tok.decode(ids))
    return prompts


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`a;dur=1.5, b;dur=2` -> {"a": 0.0015, "b": 0.002}."""
    out = {}
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                out[name] = float(value) / 1e3
    return out


def pull_totals(client: httpx.Client, base_url: str) -> tuple[float, float]:
    """(pull count, pull seconds) summed over the decode replicas, from /metrics."""
    count = total = 0.0
    text = client.get(base_url + "/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name != "pdserve_kv_transfer_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("pool") != "decode":
                continue
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return count, total


def _reconnect_if_closed(conn: http.client.HTTPConnection) -> None:
    """Before the clock starts: a kept-alive connection that the server closed while
    idle (its keep-alive timeout) reads as EOF; connect again, so a request neither
    fails on it nor times the reconnect."""
    if conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
        conn.close()
    if conn.sock is None:
        conn.connect()


@contextmanager
def _stdlib_stream(conn: http.client.HTTPConnection, path: str, headers: dict[str, str],
                   body: dict) -> Iterator[tuple[Any, Iterator[str]]]:
    """POST `body` on a kept-alive connection; (reply headers, reply lines)."""
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json",
                                                 **headers})
    reply = conn.getresponse()
    try:
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()[:200]!r}")
        yield reply.headers, (raw.decode().rstrip("\r\n")
                              for raw in iter(reply.readline, b""))
    finally:
        reply.read()  # to the end of the body, so the connection can be reused


@contextmanager
def _httpx_stream(client: httpx.Client, url: str, body: dict,
                  ) -> Iterator[tuple[Any, Iterator[str]]]:
    with client.stream("POST", url, json=body) as reply:
        reply.raise_for_status()
        yield reply.headers, reply.iter_lines()


def stream_once(opened: ContextManager[tuple[Any, Iterator[str]]]) -> Sample:
    """Time one streamed request: `opened` sends it when entered (the clock starts
    just before) and yields the reply's headers and lines."""
    start = time.perf_counter()
    first = last = None
    gaps = []
    with opened as (headers, lines):
        timing = parse_server_timing(headers.get("server-timing"))
        head = "first-token" in (headers.get("server-timing") or "")
        for line in lines:
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if not json.loads(line[6:]).get("choices"):
                continue  # the usage chunk, no token
            now = time.perf_counter()
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last = now
    if first is None:
        raise RuntimeError("the stream carried no token")
    return Sample(first, gaps, timing, head=head)


class Client:
    """Sequential streamed requests to one server; on P/D, each request's KV pull time.

    Requests go over the standard library's http.client on one kept-alive connection
    (what a server costs, not its client: httpx, which the OpenAI client uses, spends
    about 2 ms of its own per streamed request here), or with `via_httpx` over httpx."""

    def __init__(self, base_url: str, model: str, output_tokens: int, with_pulls: bool):
        self.http = httpx.Client(timeout=300, headers=pdserve_auth_headers(), trust_env=False)
        url = httpx.URL(base_url)
        self.conn = http.client.HTTPConnection(url.host, url.port, timeout=300)
        self.base_url, self.model, self.output_tokens = base_url, model, output_tokens
        self.pulls = pull_totals(self.http, base_url) if with_pulls else None

    def request(self, prompt: str, via_httpx: bool = False) -> Sample:
        if not via_httpx:
            _reconnect_if_closed(self.conn)
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.output_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True}
        sample = stream_once(
            _httpx_stream(self.http, self.base_url + "/v1/completions", body) if via_httpx
            else _stdlib_stream(self.conn, "/v1/completions", pdserve_auth_headers(), body))
        if self.pulls is not None:
            after = _wait_for_pull(self.http, self.base_url, self.pulls)
            if after[0] == self.pulls[0] + 1:
                sample.pull = after[1] - self.pulls[1]
            self.pulls = after
        return sample

    def close(self) -> None:
        self.http.close()
        self.conn.close()


def _wait_for_pull(client: httpx.Client, base_url: str,
                   before: tuple[float, float]) -> tuple[float, float]:
    deadline = time.monotonic() + METRICS_WAIT_S
    while True:
        now = pull_totals(client, base_url)
        if now[0] > before[0] or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


@dataclass(slots=True)
class ProcessMemory:
    name: str
    rss: int
    pss: int


def tree_memory(root_pid: int) -> list[ProcessMemory]:
    """RSS and PSS of `root_pid` and each of its descendants."""
    out = []
    for pid in process_tree(root_pid):
        name = process_name(pid)
        if name is None:
            continue
        try:
            sizes = {}
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("Rss", "Pss"):
                        sizes[key] = int(value.split()[0]) * 1024
        except OSError:
            continue
        out.append(ProcessMemory(os.path.basename(name), sizes.get("Rss", 0),
                                 sizes.get("Pss", 0)))
    return out


def pinned_config(config_path: str, cores: int, out_dir: str) -> str:
    """A copy of an aggregated config whose engine OMP threads are bound to the last
    `cores` cores: the idle P/D tree keeps its Ray and serving processes on the first
    (configs/cpu-pd.yaml's `serving_cpus`), so the aggregated and vLLM workers get the
    cores least in use."""
    doc = yaml.safe_load(Path(config_path).read_text())
    last = max(os.sched_getaffinity(0))
    bind = str(last) if cores == 1 else f"{last - cores + 1}-{last}"
    for app in doc["applications"]:
        pool = app["args"]["aggregated"]
        pool["env"] = {**pool.get("env", {}), "VLLM_CPU_OMP_THREADS_BIND": bind}
    path = Path(out_dir) / f"aggregated-{cores}core.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def vllm_server(agg_config: str, model_dir: str, served_name: str, log_path: Path,
                ) -> tuple[ManagedServer, float]:
    """vLLM's own OpenAI server with the aggregated pool's engine arguments and
    environment (as `pinned_config` left them), started and ready; (server, seconds)."""
    config, _ = app_config_from_file(agg_config)
    pool = config.pools()[Role.AGGREGATED]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", "{port}"]
    for key, value in pool.engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (dict, list)):
            argv += [flag, json.dumps(value)]  # vLLM's CLI takes JSON for these
        elif value is not False:
            argv += [flag, str(value)]
    env = {k: str(v) for k, v in pool.env.items() if k != SPIN_ENV}  # vLLM as it ships
    return start_timed(ManagedServer(argv, env=env, log_path=log_path, ready_timeout_s=600))


@dataclass(slots=True)
class ServerRun:
    ready_s: float
    memory: list[ProcessMemory] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    httpx_samples: list[Sample] = field(default_factory=list)  # P/D, other prompts

    @property
    def rss(self) -> int:
        return sum(p.rss for p in self.memory)

    @property
    def pss(self) -> int:
        return sum(p.pss for p in self.memory)


def measure(pd_config: str, agg_config: str, model: str, prompts: list[str],
            httpx_prompts: list[str], output_tokens: int, logs: Path, gap_s: float,
            vllm_model_dir: str | None = None, pause_others: bool = True,
            ) -> tuple[ServerRun, ServerRun, ServerRun | None]:
    """Start P/D, then aggregated (each alone, for its ready time); then alternate one
    request to each, so both see the same machine load, and one more to P/D over httpx
    with a prompt of its own; the first round warms up.

    `gap_s` between requests lets the engine that just ran go idle: vLLM's engine and
    worker processes busy-poll their message queue for 1 s after each message
    (`shm_broadcast`'s busy loop), and the aggregated engine shares its core with the
    prefill engine. With `vllm_model_dir`, vLLM's own server (`vllm_server`) is started
    third and takes its turn after aggregated. With `pause_others`, the servers whose
    turn it is not are suspended through the gap and the request (`_alone`)."""
    with ExitStack() as stack:
        pd_server, pd_ready = start_pdserve(pd_config, logs / "pd.log", QUIET)
        stack.callback(pd_server.stop)
        agg_server, agg_ready = start_pdserve(agg_config, logs / "aggregated.log", QUIET)
        stack.callback(agg_server.stop)
        pd, agg = ServerRun(pd_ready), ServerRun(agg_ready)
        clients = [(pd, Client(pd_server.base_url, model, output_tokens, True)),
                   (agg, Client(agg_server.base_url, model, output_tokens, False))]
        servers = [(pd, pd_server), (agg, agg_server)]
        vllm = None
        if vllm_model_dir is not None:
            vllm_srv, vllm_ready = vllm_server(agg_config, vllm_model_dir, model,
                                               logs / "vllm.log")
            stack.callback(vllm_srv.stop)
            vllm = ServerRun(vllm_ready)
            clients.append((vllm, Client(vllm_srv.base_url, model, output_tokens, False)))
            servers.append((vllm, vllm_srv))
        for i, (prompt, other) in enumerate(zip(prompts, httpx_prompts)):
            for run, client in clients:
                with _alone(servers, run, pause_others):
                    time.sleep(gap_s)
                    sample = client.request(prompt)
                if i:
                    run.samples.append(sample)
            with _alone(servers, pd, pause_others):
                time.sleep(gap_s)
                sample = clients[0][1].request(other, via_httpx=True)
            if i:
                pd.httpx_samples.append(sample)
        for run, server in servers:
            run.memory = tree_memory(server.proc.pid)
        for _, client in clients:
            client.close()
    return pd, agg, vllm


@contextmanager
def _alone(servers: list[tuple[ServerRun, ManagedServer]], current: ServerRun,
           enabled: bool) -> Iterator[None]:
    """The other servers' process trees suspended (SIGSTOP) meanwhile. Idle, each still
    wakes its Ray processes (GCS, raylet, Serve's controller) many times a second, on
    any core: on this 2-core box, with the other two trees idle beside it, P/D's mean
    ITL was 5.8-6.0 ms against 4.6 ms alone, vLLM's 4.7-5.0 against 4.1. A tree is
    suspended whole, so none of its processes misses another's beats; a few seconds
    later it runs on as before."""
    others = [server for run, server in servers if run is not current] if enabled else []
    for server in others:
        server.pause()
    try:
        yield
    finally:
        for server in others:
            server.resume()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _remote(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.pull is not None and "prefill-engine" in s.timing]


def _overhead(samples: list[Sample]) -> list[float]:
    return [s.ttft - s.timing["prefill-engine"] - (0.0 if s.head else s.pull)
            for s in samples]


def merged_tokens(samples: list[Sample], output_tokens: int) -> int:
    """Tokens that reached the client in an SSE event with the one before them (each
    request makes exactly `output_tokens`, ignore_eos): the targets' "no bursts"."""
    return sum(output_tokens - 1 - len(s.gaps) for s in samples)


def paired_interval(ours: list[Sample], theirs: list[Sample], statistic,
                    draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """`statistic(ours) / statistic(theirs)` over the requests, and its 90% bootstrap
    interval: rounds drawn with replacement, each keeping its pair (the two servers met
    the same prompt one after the other, so the box's drift cancels)."""
    rng = np.random.default_rng(seed)
    n = min(len(ours), len(theirs))
    ratios = []
    for _ in range(draws):
        picked = rng.integers(0, n, n)
        ratios.append(statistic([ours[i] for i in picked])
                      / statistic([theirs[i] for i in picked]))
    low, high = np.percentile(ratios, [5, 95])
    return statistic(ours[:n]) / statistic(theirs[:n]), float(low), float(high)


def _ttft_p50(samples: list[Sample]) -> float:
    return statistics.median(s.ttft for s in samples)


def _itl_mean(samples: list[Sample]) -> float:
    return statistics.fmean(g for s in samples for g in s.gaps)


def report(pd: ServerRun, agg: ServerRun, prompt_tokens: int, output_tokens: int,
           vllm: ServerRun | None = None) -> str:
    ms = 1e3
    remote = _remote(pd.samples)
    overhead = _overhead(remote)
    overhead_httpx = _overhead(_remote(pd.httpx_samples))
    pd_ttft = [s.ttft for s in pd.samples]
    agg_ttft = [s.ttft for s in agg.samples]
    pd_itl = _itl_mean(pd.samples)
    agg_itl = _itl_mean(agg.samples)
    pd_second = [s.ttft + s.gaps[0] for s in pd.samples if s.gaps]
    agg_second = [s.ttft + s.gaps[0] for s in agg.samples if s.gaps]
    pd_itl_rest = statistics.fmean(g for s in pd.samples for g in s.gaps[1:])
    agg_itl_rest = statistics.fmean(g for s in agg.samples for g in s.gaps[1:])
    lines = [f"{len(pd.samples)} requests per server, {prompt_tokens}-token prompts, "
             f"{output_tokens} tokens out, sequential, streamed (http.client; "
             f"{len(pd.httpx_samples)} more to P/D over httpx)",
             f"{'':24}{'P/D':>10}{'aggregated':>12}{'ratio':>8}",
             f"{'TTFT p50 ms':24}{statistics.median(pd_ttft) * ms:>10.1f}"
             f"{statistics.median(agg_ttft) * ms:>12.1f}"
             f"{statistics.median(pd_ttft) / statistics.median(agg_ttft):>8.2f}",
             f"{'TTFT p99 ms':24}{percentile(pd_ttft, .99) * ms:>10.1f}"
             f"{percentile(agg_ttft, .99) * ms:>12.1f}"
             f"{percentile(pd_ttft, .99) / percentile(agg_ttft, .99):>8.2f}",
             f"{'ITL mean ms':24}{pd_itl * ms:>10.2f}{agg_itl * ms:>12.2f}"
             f"{pd_itl / agg_itl:>8.2f}",
             f"{'ITL mean, 2nd gap on':24}{pd_itl_rest * ms:>10.2f}{agg_itl_rest * ms:>12.2f}"
             f"{pd_itl_rest / agg_itl_rest:>8.2f}",
             f"{'2nd token p50 ms':24}{statistics.median(pd_second) * ms:>10.1f}"
             f"{statistics.median(agg_second) * ms:>12.1f}"
             f"{statistics.median(pd_second) / statistics.median(agg_second):>8.2f}",
             f"{'first token from prefill':24}{sum(s.head for s in pd.samples):>10}",
             f"{'tokens sharing an event':24}{merged_tokens(pd.samples, output_tokens):>10}"
             f"{merged_tokens(agg.samples, output_tokens):>12}",
             f"{'ready s':24}{pd.ready_s:>10.1f}{agg.ready_s:>12.1f}",
             f"{'tree RSS GB':24}{pd.rss / 1e9:>10.2f}{agg.rss / 1e9:>12.2f}",
             f"{'tree PSS GB':24}{pd.pss / 1e9:>10.2f}{agg.pss / 1e9:>12.2f}",
             f"{'processes':24}{len(pd.memory):>10}{len(agg.memory):>12}",
             "largest P/D processes (RSS / PSS GB): " + ", ".join(
                 f"{p.name} {p.rss / 1e9:.2f}/{p.pss / 1e9:.2f}"
                 for p in sorted(pd.memory, key=lambda p: -p.rss)[:6])]
    vllm_ratios = ""
    if vllm is not None and vllm.samples:
        v_ttft = _ttft_p50(vllm.samples)
        v_itl = _itl_mean(vllm.samples)
        v_rest = statistics.fmean(g for s in vllm.samples for g in s.gaps[1:])
        ttft = paired_interval(pd.samples, vllm.samples, _ttft_p50)
        itl = paired_interval(pd.samples, vllm.samples, _itl_mean)
        lines.append(
            f"vLLM's own server, same engine and cores: TTFT p50 {v_ttft * ms:.1f} ms, "
            f"ITL mean {v_itl * ms:.2f} ms ({v_rest * ms:.2f} from the 2nd gap), "
            f"{merged_tokens(vllm.samples, output_tokens)} tokens sharing an event, ready "
            f"{vllm.ready_s:.1f} s, tree RSS {vllm.rss / 1e9:.2f} GB; over it: P/D TTFT "
            f"{ttft[0]:.2f} ({ttft[1]:.2f}-{ttft[2]:.2f}), ITL {itl[0]:.2f} "
            f"({itl[1]:.2f}-{itl[2]:.2f}) (90% intervals, requests paired by round); "
            f"aggregated TTFT {statistics.median(agg_ttft) / v_ttft:.2f}, "
            f"ITL {agg_itl / v_itl:.2f}")
        vllm_ratios = (f" vllm_ttft_ratio={ttft[0]:.2f} vllm_itl_ratio={itl[0]:.2f}"
                       f" vllm_itl_ratio_90={itl[1]:.2f}-{itl[2]:.2f}")
    if not remote:
        lines.append("no request took the remote P/D path: overhead not measured")
        lines.append("overhead_p50_ms=nan overhead_p99_ms=nan")
        return "\n".join(lines)
    parts = {"ingress (checks, tokens)": [s.timing.get("ingress", 0) for s in remote],
             "route (router call)": [s.timing.get("route", 0) for s in remote],
             "prefill call": [s.timing.get("prefill", 0) for s in remote],
             "prefill engine": [s.timing["prefill-engine"] for s in remote],
             "KV pull": [s.pull for s in remote],
             "overhead": overhead}
    lines.append(f"P/D TTFT breakdown over {len(remote)} remote requests "
                 f"(ms)   p50      p99")
    if overhead_httpx:
        parts["overhead, httpx client"] = overhead_httpx
    for name, values in parts.items():
        lines.append(f"  {name:30}{statistics.median(values) * ms:>8.2f}"
                     f"{percentile(values, .99) * ms:>9.2f}")
    lines.append(
        f"overhead_p50_ms={statistics.median(overhead) * ms:.2f} "
        f"overhead_p99_ms={percentile(overhead, .99) * ms:.2f} "
        f"ttft_ratio={statistics.median(pd_ttft) / statistics.median(agg_ttft):.2f} "
        f"itl_ratio={pd_itl / agg_itl:.2f} ready_s={pd.ready_s:.1f} "
        f"tree_rss_gb={pd.rss / 1e9:.2f} httpx_overhead_p50_ms="
        f"{statistics.median(overhead_httpx) * ms if overhead_httpx else float('nan'):.2f}"
        + vllm_ratios)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from serving.model import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pd-config", default="configs/cpu-pd.yaml")
    parser.add_argument("--aggregated-config", default="configs/cpu-aggregated.yaml")
    parser.add_argument("--aggregated-cores", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=20)
    parser.add_argument("--gap-s", type=float, default=1.5,
                        help="pause before each request (lets the other engine go idle)")
    parser.add_argument("--log-dir", default=None, help="server logs (default: a temp dir)")
    parser.add_argument("--no-vllm", action="store_true",
                        help="leave out vLLM's own server (the targets' one-core bar)")
    parser.add_argument("--no-pause", action="store_true",
                        help="leave the other servers running through each request")
    args = parser.parse_args(argv)

    config, _ = app_config_from_file(args.pd_config)
    prompts = make_prompts(resolve_model(config.model), args.prompt_tokens,
                           2 * (args.num_requests + 1))
    with tempfile.TemporaryDirectory(prefix="pd-overhead-") as tmp:
        logs = Path(args.log_dir or tmp)
        agg_config = pinned_config(args.aggregated_config, args.aggregated_cores, tmp)
        half = args.num_requests + 1
        pd, agg, vllm = measure(
            args.pd_config, agg_config, config.model_name, prompts[:half], prompts[half:],
            args.output_tokens, logs, args.gap_s,
            None if args.no_vllm else resolve_model(config.model),
            pause_others=not args.no_pause)
    print(report(pd, agg, args.prompt_tokens, args.output_tokens, vllm))


if __name__ == "__main__":
    main()
