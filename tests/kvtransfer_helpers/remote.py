"""A prefill-side PDWorker over ucxx in its own process, driven over a pipe.

Blocks hold known values (`1000 * layer + block`); the test process is the decode side.
"""

from __future__ import annotations

import multiprocessing as mp

import torch

from kvtransfer.config import PDConnectorConfig
from kvtransfer.metadata import LeaseGrant, PDConnectorMetadata
from kvtransfer.worker import ModelIdentity, PDWorker
from tests.kvtransfer_helpers.workers import NUM_BLOCKS, SHAPE

IDENTITY = ModelIdentity("m", 32, 2, 8)


def expected_block(layer: int, block: int) -> torch.Tensor:
    return torch.full(SHAPE[1:], float(1000 * layer + block))


def _main(conn, extra: dict) -> None:
    worker = PDWorker(PDConnectorConfig(transport="ucx", **extra), IDENTITY,
                      is_producer=True, is_consumer=False)
    caches = {f"layers.{i}": torch.zeros(SHAPE) for i in range(2)}
    for i, t in enumerate(caches.values()):
        for b in range(NUM_BLOCKS):
            t[b] = expected_block(i, b)
    worker.register_kv_caches(caches, NUM_BLOCKS)
    conn.send(worker.handshake_metadata().port)
    while (msg := conn.recv()) is not None:
        cmd, arg = msg
        if cmd == "grant":
            lease_id, blocks = arg
            worker.start_load_kv(PDConnectorMetadata(
                grants=[LeaseGrant(lease_id, tuple(blocks), 30.0)]))
        elif cmd == "write":  # the owner changes a block after peers mapped it
            block, value = arg
            for t in caches.values():
                t[block] = value
        elif cmd == "stats":
            stats = worker.get_stats()
            conn.send(stats.data if stats else {})
            continue
        elif cmd == "leases":
            conn.send(worker.leases.num_outstanding)
            continue
        conn.send("ok")
    worker.shutdown()


class RemotePrefill:
    def __init__(self, **extra):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_main, args=(child, extra))
        self._proc.start()
        if not self._conn.poll(60):
            raise TimeoutError("prefill worker did not start")
        self.port = self._conn.recv()

    def call(self, cmd: str, arg=None):
        self._conn.send((cmd, arg))
        if not self._conn.poll(30):
            raise TimeoutError(f"prefill worker did not answer {cmd}")
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send(None)
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
