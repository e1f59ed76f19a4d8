"""KV block pull between two processes vs a plain numpy copy, at real block geometry.

    python -m benchmarks.kv_transfer [--sizes-mib 1 4 16 256] [--model pdserve:bench]
                                     [--shm auto|off] [--direct on|off] [--inline on|off]

For each size, a prefill-side worker (kvtransfer's PDWorker, producer) holds a lease on
that many MiB of KV blocks shaped like the engine's paged cache (the model's layers,
KV heads, head size, block size 32, the CPU layout), and a decode-side worker in
another process pulls them into its own blocks: control round trip plus data, over
the same-host shm path (the prefill's KV memory mapped into the decode process) unless
`--shm off` selects UCX. Leases are granted as the engine grants them, so shm pulls
find them on the prefill's lease board and take no round trip ("shm-direct") unless
`--direct off` makes them ask. A pull starts as the engine's `start_load_kv` starts
it (`PDWorker.pull`): a shm-direct pull is copied on the calling thread, the engine's
own, unless `--inline off` hands it to the I/O thread. Next to each pull the run
times a numpy copy of the same number of bytes between two warm buffers of its own:
pull, copy, pull, copy, ..., so both see the same load and the same cache. A pull
never copies blocks it has just copied, while a copy repeated back to back in a tight
loop at 16 MiB (32 MiB touched, the L3 size of a typical server CPU) runs partly from
the cache; that figure is printed too ("copy, hot loop"), but the ratio is taken
against the alternated copy.

Then, for a 2,000-token prompt on the model, it measures the prefill time of a vLLM
engine and the pull time of that prompt's blocks, and prints their ratio.

The last line is `pull_vs_memcpy=<smallest pull/memcpy ratio at 16 MiB or more>`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 32
MIB = 1 << 20


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int = 4

    @property
    def block_bytes(self) -> int:  # one block, all layers
        return self.num_layers * self.num_kv_heads * BLOCK_SIZE * 2 * self.head_size * self.dtype_bytes


def geometry_of(model_dir: str) -> Geometry:
    import json
    import os

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    heads = cfg["num_attention_heads"]
    return Geometry(cfg["num_hidden_layers"], cfg.get("num_key_value_heads", heads),
                    cfg.get("head_dim") or cfg["hidden_size"] // heads)


def _make_worker(geo: Geometry, num_blocks: int, producer: bool, shm: str,
                 direct: bool = True, inline: bool = True):
    import torch

    from kvtransfer.config import PDConnectorConfig
    from kvtransfer.worker import ModelIdentity, PDWorker

    worker = PDWorker(PDConnectorConfig(transport="ucx", shm=shm, shm_direct=direct,
                                        shm_inline=inline),
                      ModelIdentity("bench", BLOCK_SIZE, geo.num_kv_heads, geo.head_size),
                      is_producer=producer, is_consumer=not producer)
    # Like vLLM 0.32's allocate_kv_cache: one backing allocation, a view per layer.
    shape = (num_blocks, geo.num_kv_heads, BLOCK_SIZE, 2 * geo.head_size)
    per_layer = num_blocks * geo.num_kv_heads * BLOCK_SIZE * 2 * geo.head_size
    backing = torch.full((geo.num_layers * per_layer,), 1.0 if producer else 0.0,
                         dtype=torch.float32)
    caches = {f"layers.{i}": backing[i * per_layer:(i + 1) * per_layer].view(shape)
              for i in range(geo.num_layers)}
    worker.register_kv_caches(caches, num_blocks)
    return worker, caches


def _prefill_side(conn, geo: Geometry, num_blocks: int, shm: str) -> None:
    from kvtransfer.metadata import LeaseGrant, PDConnectorMetadata

    worker, _ = _make_worker(geo, num_blocks, producer=True, shm=shm)
    conn.send(worker.handshake_metadata().port)
    while (msg := conn.recv()) is not None:
        lease_id, blocks = msg
        worker.start_load_kv(PDConnectorMetadata(grants=[LeaseGrant(lease_id, tuple(blocks), 60)]))
        conn.send("granted")
    worker.shutdown()


def pull_seconds(worker, port: int, prefill, lease_id: str, blocks: list[int],
                 modes: set[str]) -> float:
    from kvtransfer.metadata import LoadSpec

    prefill.send((lease_id, blocks))
    assert prefill.recv() == "granted"
    load = LoadSpec(lease_id, tuple(blocks), lease_id, tuple(blocks), "127.0.0.1", port)
    t0 = time.perf_counter()
    result = worker.pull(load).result()  # what the engine's start_load_kv starts
    elapsed = time.perf_counter() - t0
    if not result.ok:
        raise RuntimeError(f"pull failed: {result.reason}")
    modes.add(result.mode)
    return elapsed


def copy_seconds(dst: np.ndarray, src: np.ndarray) -> float:
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t0


def memcpy_seconds(nbytes: int, reps: int) -> float:
    """Median of a numpy copy repeated back to back (the hot-loop figure)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    return statistics.median([copy_seconds(dst, src) for _ in range(reps + 1)][1:])


def bench_pulls(geo: Geometry, block_counts: list[int], reps: int, shm: str,
                direct: bool = True, inline: bool = True,
                ) -> tuple[dict[int, tuple[float, float, float]], str]:
    """blocks -> median seconds of (pull, numpy copy of the same bytes alternated with
    the pulls, that copy in a hot loop), and which path the pulls took (with the decode
    side's copy threads)."""
    max_blocks = max(block_counts)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    # Block 0 is vLLM's null block; requests get blocks 1, 2, ... of a fresh engine.
    pool = max_blocks + 2
    proc = ctx.Process(target=_prefill_side, args=(child, geo, pool, shm))
    proc.start()
    try:
        port = parent.recv()
        worker, caches = _make_worker(geo, pool, producer=False, shm=shm, direct=direct,
                                      inline=inline)
        out, modes = {}, set()
        for nblocks in block_counts:
            blocks = list(range(1, nblocks + 1))
            src = np.ones(nblocks * geo.block_bytes, dtype=np.uint8)
            dst = np.zeros_like(src)
            pulls, copies = [], []
            for i in range(reps + 1):  # the very first pull also handshakes: dropped
                pulls.append(pull_seconds(worker, port, parent, f"{nblocks}-{i}", blocks, modes))
                copies.append(copy_seconds(dst, src))
            assert all(bool((c[1:nblocks + 1] == 1).all()) for c in caches.values())
            del src, dst
            out[nblocks] = (statistics.median(pulls[1:]), statistics.median(copies[1:]),
                            memcpy_seconds(nblocks * geo.block_bytes, reps))
        threads = worker.receiver._copier.num_threads
        worker.shutdown()
        where = "the pulling thread" if inline else "the I/O thread"
        return out, (f"{'+'.join(sorted(modes))} (copied on {where}; "
                     f"decode copy threads: {threads})")
    finally:
        parent.send(None)
        proc.join(30)


def prefill_seconds(model_dir: str, num_tokens: int, reps: int) -> float:
    """Median time of a max_tokens=1 request (the prefill) on one vLLM CPU engine."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE,
              max_model_len=4096, max_num_batched_tokens=4096, enable_prefix_caching=False)
    rng = np.random.default_rng(0)
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    times = []
    for _ in range(reps + 1):
        prompt = {"prompt_token_ids": rng.integers(10, 4000, num_tokens).tolist()}
        t0 = time.perf_counter()
        llm.generate([prompt], sampling, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 256])
    parser.add_argument("--model", default="pdserve:bench")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--shm", choices=["auto", "off"], default="auto",
                        help="same-host shm path (auto) or UCX only (off)")
    parser.add_argument("--direct", choices=["on", "off"], default="on",
                        help="shm pulls without a round trip when the lease board allows")
    parser.add_argument("--inline", choices=["on", "off"], default="on",
                        help="direct pulls copied on the pulling thread (the engine's), "
                        "or on the I/O thread")
    args = parser.parse_args(argv)

    from serving.model import resolve_model

    model_dir = resolve_model(args.model)
    geo = geometry_of(model_dir)
    prompt_mib = -(-args.prompt_tokens // BLOCK_SIZE) * geo.block_bytes / MIB
    print(f"geometry: {args.model}: {geo.num_layers} layers x {geo.num_kv_heads} kv heads x "
          f"head {geo.head_size}, block {BLOCK_SIZE}, float32 -> "
          f"{geo.block_bytes // 1024} KiB per block (all layers)")
    counts = {mib: -(-mib * MIB // geo.block_bytes) for mib in args.sizes_mib}
    nblocks = -(-args.prompt_tokens // BLOCK_SIZE)
    timed, path = bench_pulls(geo, sorted(set(counts.values()) | {nblocks}), args.reps,
                              args.shm, args.direct == "on", args.inline == "on")
    print(f"pull path: {path}")
    print(f"{'MiB':>6} {'blocks':>6} {'pull ms':>8} {'pull GB/s':>10} {'memcpy GB/s':>12} "
          f"{'ratio':>6} {'copy, hot loop GB/s':>20}")
    ratios = {}
    for mib, n in counts.items():
        pull_s, copy_s, hot_s = timed[n]
        nbytes = n * geo.block_bytes
        ratios[mib] = copy_s / pull_s
        print(f"{mib:>6} {n:>6} {pull_s * 1e3:>8.2f} {nbytes / pull_s / 1e9:>10.2f} "
              f"{nbytes / copy_s / 1e9:>12.2f} {ratios[mib]:>6.2f} {nbytes / hot_s / 1e9:>20.2f}")
    if not args.skip_prefill:
        pull_s = timed[nblocks][0]
        prefill_s = prefill_seconds(model_dir, args.prompt_tokens, 3)
        print(f"prompt {args.prompt_tokens} tokens ({nblocks} blocks, {prompt_mib:.1f} MiB): "
              f"prefill {prefill_s * 1e3:.1f} ms, pull {pull_s * 1e3:.2f} ms, "
              f"transfer/prefill={pull_s / prefill_s:.4f}")
    big = [r for mib, r in ratios.items() if mib >= 16]
    print(f"pull_vs_memcpy={min(big):.2f}" if big else "pull_vs_memcpy=nan")


if __name__ == "__main__":
    main()
