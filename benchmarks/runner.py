"""Drive one load point: warm-up, then the workload on its arrival schedule.

Every request runs as its own task; `max_concurrency` caps how many are in flight
(a request whose send time has come waits for a slot, as in vLLM). The run ends when
every request has finished or failed, so `duration` covers the slowest request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.arrivals import arrival_offsets
from benchmarks.client import EndpointSpec, send_request
from benchmarks.records import RequestOutput, SampleRequest
from benchmarks.tokens import count_tokens


@dataclass(slots=True)
class LoadSpec:
    """How hard to push: arrival process, concurrency cap, warm-up, timeout."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 0
    seed: int = 0
    request_timeout_s: float = 600.0
    show_progress: bool = True

    @property
    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        conc = f"-concurrency{self.max_concurrency}" if self.max_concurrency else ""
        return f"{rate}qps{conc}"


@dataclass(slots=True)
class RunOutcome:
    outputs: list[RequestOutput]
    duration_s: float
    num_warmup_failed: int = 0


def _client(load: LoadSpec, num_requests: int) -> httpx.AsyncClient:
    limit = max(1, min(num_requests, load.max_concurrency or num_requests))
    return httpx.AsyncClient(
        timeout=httpx.Timeout(load.request_timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        trust_env=False)


def fill_output_tokens(outputs: list[RequestOutput], tokenizer: Any | None) -> None:
    """Count output tokens where the server reported no usage."""
    for out in outputs:
        if out.success and not out.output_tokens:
            num_chunks = 1 + len(out.itl)
            counted = count_tokens(tokenizer, out.generated_text) if tokenizer else 0
            out.output_tokens = max(num_chunks, counted)


async def _warm_up(client: httpx.AsyncClient, endpoint: EndpointSpec,
                   requests: list[SampleRequest], load: LoadSpec) -> int:
    """Send `num_warmups` requests (not measured); return how many failed."""
    if load.num_warmups <= 0:
        return 0
    picks = [dataclasses.replace(requests[i % len(requests)], request_id=f"warmup-{i}")
             for i in range(load.num_warmups)]
    gate = asyncio.Semaphore(load.max_concurrency or len(picks))

    async def one(req: SampleRequest) -> RequestOutput:
        async with gate:
            return await send_request(client, endpoint, req)

    outs = await asyncio.gather(*(one(r) for r in picks))
    return sum(not o.success for o in outs)


async def run_load(endpoint: EndpointSpec, requests: list[SampleRequest], load: LoadSpec,
                   tokenizer: Any | None = None) -> RunOutcome:
    """Run `requests` against `endpoint` under `load`; never raises for failed requests."""
    offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, load.seed)
    gate = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    async with _client(load, len(requests)) as client:
        num_warmup_failed = await _warm_up(client, endpoint, requests, load)
        with tqdm(total=len(requests), disable=not load.show_progress,
                  desc=f"bench {load.label}", unit="req") as bar:

            async def one(req: SampleRequest, offset: float, start: float) -> RequestOutput:
                await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
                if gate is None:
                    out = await send_request(client, endpoint, req)
                else:
                    async with gate:
                        out = await send_request(client, endpoint, req)
                bar.update(1)
                return out

            start = time.perf_counter()
            outputs = await asyncio.gather(*(one(r, o, start)
                                             for r, o in zip(requests, offsets)))
            duration = time.perf_counter() - start
    fill_output_tokens(outputs, tokenizer)
    return RunOutcome(list(outputs), duration, num_warmup_failed)
