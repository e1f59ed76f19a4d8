"""What the serving stack adds: TTFT and ITL of the same prompts through the HTTP
endpoint (`pdserve serve CONFIG`) and through vLLM's own offline async API (AsyncLLM,
same engine kwargs), measured back to back in one run.

    python -m benchmarks.endpoint_overhead [--config configs/cpu-aggregated.yaml]
        [--prompt-tokens 500] [--output-tokens 64] [--num-requests 20]

Requests are sequential and streamed, greedy, with ignore_eos so every request makes
exactly --output-tokens tokens. Last line: `ttft_ratio=<endpoint/offline> itl_ratio=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx

from benchmarks.servers import pdserve_auth_headers, start_pdserve


def _prompt(model_path: str, num_tokens: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    words = "river stone cloud seven orange window quiet market bright garden".split()
    ids = tok(" ".join(words[i % len(words)] for i in range(num_tokens * 2)),
              add_special_tokens=False)["input_ids"][:num_tokens - 1]  # + BOS
    return tok.decode(ids)


def _summary(ttfts: list[float], itls: list[float]) -> dict:
    return {"ttft_ms_median": 1000 * statistics.median(ttfts),
            "ttft_ms_mean": 1000 * statistics.fmean(ttfts),
            "itl_ms_mean": 1000 * statistics.fmean(itls),
            "itl_ms_p99": 1000 * sorted(itls)[int(0.99 * (len(itls) - 1))]}


class _TokenClock:
    """TTFT and inter-token gaps of sequential requests; the first request warms up."""

    def __init__(self) -> None:
        self.ttfts: list[float] = []
        self.itls: list[float] = []
        self.warm = False

    def request(self) -> None:
        self._start, self._last, self._gaps, self._first = time.perf_counter(), None, [], None

    def token(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._first = now - self._start
        else:
            self._gaps.append(now - self._last)
        self._last = now

    def done(self) -> None:
        if self.warm:
            self.ttfts.append(self._first)
            self.itls.extend(self._gaps)
        self.warm = True

    def summary(self) -> dict:
        return _summary(self.ttfts, self.itls)


def measure_endpoint(base_url: str, model: str, prompt: str, args) -> dict:
    clock = _TokenClock()
    body = {"model": model, "prompt": prompt, "max_tokens": args.output_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=300, headers=pdserve_auth_headers()) as client:
        for _ in range(args.num_requests + 1):
            clock.request()
            with client.stream("POST", base_url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        clock.token()
            clock.done()
    return clock.summary()


async def _measure_offline_async(model_path: str, engine_kwargs: dict, prompt: str,
                                 args) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_path, **engine_kwargs))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    clock = _TokenClock()
    try:
        for i in range(args.num_requests + 1):
            clock.request()
            async for _ in engine.generate(prompt, params, request_id=f"r{i}"):
                clock.token()
            clock.done()
    finally:
        engine.shutdown()
    return clock.summary()


def main() -> None:
    from serving.config import app_config_from_file
    from serving.model import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cpu-aggregated.yaml")
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=20)
    args = parser.parse_args()
    config, _ = app_config_from_file(args.config)
    model_path = resolve_model(config.model)
    prompt = _prompt(model_path, args.prompt_tokens)

    server, ready_s = start_pdserve(args.config)
    try:
        endpoint = measure_endpoint(server.base_url, config.model_name, prompt, args)
    finally:
        server.stop()
    pool = config.aggregated or config.decode
    os.environ.update(pool.env)
    offline = asyncio.run(_measure_offline_async(model_path, pool.engine_kwargs, prompt, args))
    print(json.dumps({"server_ready_s": ready_s, "endpoint": endpoint, "offline": offline},
                     indent=2))
    print(f"ttft_ratio={endpoint['ttft_ms_median'] / offline['ttft_ms_median']:.2f} "
          f"itl_ratio={endpoint['itl_ms_mean'] / offline['itl_ms_mean']:.2f}")


if __name__ == "__main__":
    main()
