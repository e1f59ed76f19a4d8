"""TTFT of a repeated 2,000-token prefix served from the KV tiers vs recomputing it.

    python -m benchmarks.kv_tiers [--model pdserve:bench] [--prefix-tokens 2000] [--rounds 3]

Two vLLM CPU engines with PDConnector tiers, vLLM's own prefix cache off in both (so
only a tier can supply a prefix): `dram` keeps blocks in its DRAM tier; `nvme` has no
DRAM tier, so blocks go straight to files, whose page-cache pages the benchmark drops
(fsync + POSIX_FADV_DONTNEED) before the repeat, so the repeat reads from the disk.
Each round takes a fresh random prefix: the first request on each engine recomputes it
(the baseline), the second (same prefix, other suffix) loads it from the tier. TTFT is
the time to the first token (max_tokens=1). Rounds alternate the engines; medians.

The last line is `dram_vs_recompute=<ratio> nvme_vs_recompute=<ratio>`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SUFFIX_TOKENS = 16


class _Counters:
    """A vLLM stat logger that sums the connector's counters (tier bytes stored, hits)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.sums: dict[str, int] = {}

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        for key, value in ((scheduler_stats and scheduler_stats.kv_connector_stats) or {}).items():
            if isinstance(value, int):
                self.sums[key] = self.sums.get(key, 0) + value

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass


def _engine(model: str, tiers: dict[str, Any]):
    from vllm import AsyncEngineArgs
    from vllm.config import KVTransferConfig
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    counters: list[_Counters] = []

    class Logger(_Counters, StatLoggerBase):
        def __init__(self, vllm_config, engine_index=0):
            super().__init__(vllm_config, engine_index)
            counters.append(self)

    args = AsyncEngineArgs(
        model=model, dtype="float32", enforce_eager=True, block_size=32,
        max_model_len=4096, max_num_batched_tokens=4096, enable_prefix_caching=False,
        disable_log_stats=False,
        kv_transfer_config=KVTransferConfig(
            kv_connector="PDConnector", kv_connector_module_path="kvtransfer",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"tiers": tiers}))
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[Logger])
    return engine, counters[0]


async def _ttft(engine, prompt: list[int]) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    async for _ in engine.generate({"prompt_token_ids": prompt}, params,
                                   request_id=uuid.uuid4().hex):
        return time.perf_counter() - start
    raise RuntimeError("no output")


async def _stored(counters: _Counters, before: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    total = lambda: sum(counters.sums.get(k, 0)  # noqa: E731
                        for k in ("dram_bytes_stored", "nvme_bytes_stored"))
    while total() <= before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the stats of one step may trail the copy


def _drop_page_cache(root: Path) -> None:
    for path in root.rglob("*.kv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def _round(engine, counters: _Counters, prefix: list[int], rng: random.Random,
                 nvme_root: Path | None) -> tuple[float, float, dict[str, int]]:
    suffix = lambda: [rng.randrange(10, 4000) for _ in range(SUFFIX_TOKENS)]  # noqa: E731
    before = dict(counters.sums)
    recompute = await _ttft(engine, prefix + suffix())
    await _stored(counters, before.get("dram_bytes_stored", 0)
                  + before.get("nvme_bytes_stored", 0))
    if nvme_root is not None:
        _drop_page_cache(nvme_root)
    loaded = await _ttft(engine, prefix + suffix())
    await asyncio.sleep(0.3)
    delta = {k: v - before.get(k, 0) for k, v in counters.sums.items()}
    return recompute, loaded, delta


async def run(model: str, prefix_tokens: int, rounds: int, disk: str) -> tuple[float, float]:
    dram, dram_counters = _engine(model, {"dram_bytes": 1 << 30})
    nvme, nvme_counters = _engine(model, {"dram_bytes": 0, "nvme_dir": disk})
    rng = random.Random(0)
    results: dict[str, list[tuple[float, float]]] = {"dram": [], "nvme": []}
    try:
        warm = [rng.randrange(10, 4000) for _ in range(64)]
        for engine in (dram, nvme):
            await _ttft(engine, warm)
        for i in range(rounds):
            order = [("dram", dram, dram_counters, None),
                     ("nvme", nvme, nvme_counters, Path(disk))]
            for name, engine, counters, root in (order if i % 2 == 0 else order[::-1]):
                prefix = [rng.randrange(10, 4000) for _ in range(prefix_tokens)]
                recompute, loaded, delta = await _round(engine, counters, prefix, rng, root)
                results[name].append((recompute, loaded))
                print(f"round {i} {name}: recompute {recompute * 1e3:.0f} ms, "
                      f"from {name} {loaded * 1e3:.0f} ms, hits "
                      f"{delta.get(name + '_hits', 0)} blocks, "
                      f"load failures {delta.get('tier_load_failures', 0)}", flush=True)
    finally:
        dram.shutdown()
        nvme.shutdown()
    ratios = []
    for name in ("dram", "nvme"):
        rec = statistics.median(r for r, _ in results[name])
        hit = statistics.median(h for _, h in results[name])
        print(f"{name}: TTFT recompute {rec * 1e3:.0f} ms, from {name} {hit * 1e3:.0f} ms "
              f"(median of {rounds})")
        ratios.append(hit / rec)
    return ratios[0], ratios[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pdserve:bench")
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None,
                        help="NVMe tier directory (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from serving.model import resolve_model

    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory(dir=args.dir) as disk:
        dram_ratio, nvme_ratio = asyncio.run(
            run(model, args.prefix_tokens, args.rounds, disk))
        gc.collect()  # engines' finalizers run now, not noisily at interpreter exit
    print(f"dram_vs_recompute={dram_ratio:.3f} nvme_vs_recompute={nvme_ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
