"""Two PDWorkers in one process over the loopback transport (no vLLM engine)."""

from __future__ import annotations

import time

import torch

from kvtransfer.config import PDConnectorConfig
from kvtransfer.metadata import LeaseGrant, LoadSpec, PDConnectorMetadata
from kvtransfer.worker import ModelIdentity, PDWorker

NUM_BLOCKS = 16
SHAPE = (NUM_BLOCKS, 2, 32, 16)  # CPU layout: [blocks, kv heads, block size, 2*head]


def make_worker(producer: bool, layers: int = 2, identity: ModelIdentity | None = None,
                **config) -> tuple[PDWorker, dict[str, torch.Tensor]]:
    cfg = PDConnectorConfig(transport="loopback", **config)
    worker = PDWorker(cfg, identity or ModelIdentity("m", 32, 2, 8),
                      is_producer=producer, is_consumer=not producer)
    caches = {f"layers.{i}": torch.zeros(SHAPE) for i in range(layers)}
    if producer:
        for i, t in enumerate(caches.values()):
            for b in range(NUM_BLOCKS):
                t[b] = 1000 * i + b
    worker.register_kv_caches(caches, NUM_BLOCKS)
    return worker, caches


def grant(worker: PDWorker, lease_id: str, blocks, lease_s: float = 30.0) -> None:
    worker.start_load_kv(PDConnectorMetadata(grants=[LeaseGrant(lease_id, tuple(blocks), lease_s)]))


def load(worker: PDWorker, prefill: PDWorker, req: str, lease_id: str, local, remote) -> None:
    port = prefill.handshake_metadata().port
    spec = LoadSpec(req, tuple(local), lease_id, tuple(remote), "127.0.0.1", port)
    worker.start_load_kv(PDConnectorMetadata(loads=[spec]))


def wait_finished(worker: PDWorker, timeout: float = 30.0) -> tuple[set, set, set]:
    """Poll like the engine does; returns (sending, recving, load-error blocks)."""
    sending, recving, errors = set(), set(), set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s, r = worker.get_finished()
        sending |= s
        recving |= r
        errors |= worker.get_block_ids_with_load_errors()
        if s or r:
            return sending, recving, errors
        time.sleep(0.01)
    return sending, recving, errors
