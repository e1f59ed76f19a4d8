"""Worker half of PDConnector: owns the KV memory view, the transport and the I/O loop.

Called by vLLM on the engine thread; all network work happens on the I/O loop. The
scheduler half talks to it only through `PDConnectorMetadata` (in) and the results of
`get_finished` / `get_block_ids_with_load_errors` / `get_stats` (out).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .compat import KVSpec
from .config import PDConnectorConfig
from .io_loop import IOLoop
from .leases import LeaseTable
from .memory import KVRegion, regions_from_kv_caches
from .metadata import LoadSpec, PDConnectorMetadata, PDHandshakeMetadata
from .receiver import KVReceiver, PullResult
from .sender import KVSender, SendRecord
from .stats import PDConnectorStats
from .tiers.plan import TierSpec, TierWorkerMetadata
from .transport import Transport, make_transport

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """The model-side fields of KVSpec, known before KV memory exists."""

    model: str
    block_size: int
    num_kv_heads: int
    head_size: int


class PDWorker:
    def __init__(self, config: PDConnectorConfig, identity: ModelIdentity,
                 is_producer: bool, is_consumer: bool, tiers: TierSpec | None = None):
        self.config = config
        self._tier_spec = tiers
        self.tiers = None  # TierStore, once KV memory is registered
        self._identity = identity
        self._is_producer = is_producer
        self._is_consumer = is_consumer
        self._lock = threading.Lock()
        self._stats = PDConnectorStats()
        self._done_pulls: list[PullResult] = []
        self._load_errors: set[int] = set()
        self.leases = LeaseTable()
        self.spec: KVSpec | None = None
        self.regions: list[KVRegion] = []
        self._io: IOLoop | None = None
        self.transport: Transport | None = None
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None

    # ---- start / stop -------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        self.regions, layout = regions_from_kv_caches(kv_caches, num_blocks)
        first = next(iter(kv_caches.values()))
        ident = self._identity
        self.spec = KVSpec(
            model=ident.model, dtype=str(first.dtype).removeprefix("torch."),
            block_size=ident.block_size, num_layers=len(kv_caches),
            num_kv_heads=ident.num_kv_heads, head_size=ident.head_size, layout=layout,
            region_block_bytes=tuple(r.block_bytes for r in self.regions),
            num_blocks=num_blocks,
        )
        if self._tier_spec is not None:
            from .tiers.store import TierStore

            self.tiers = TierStore(self._tier_spec, self.regions)
        self._io = IOLoop()
        self._io.run(self._start(), timeout=60)
        logger.info("kvtransfer: worker ready (%s, %d regions, listener port %s)",
                    self.config.transport, len(self.regions),
                    self.sender.port if self.sender else None)

    async def _start(self) -> None:
        import asyncio

        self.transport = make_transport(self.config.transport)
        await self.transport.start()
        if self._is_producer:
            self.sender = KVSender(self.config, self.spec, self.regions, self.transport,
                                   self.leases, self._record_send)
            await self.sender.start()
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_leases())
        if self._is_consumer:
            self.receiver = KVReceiver(self.config, self.spec, self.regions, self.transport)

    async def _expire_leases(self) -> None:
        import asyncio

        period = min(1.0, self.config.lease_s / 4)
        while True:
            await asyncio.sleep(period)
            expired = self.leases.expire()
            if expired:
                logger.info("kvtransfer: %d leases expired", len(expired))
                with self._lock:
                    self._stats.data["leases_expired"] += len(expired)

    def handshake_metadata(self) -> PDHandshakeMetadata | None:
        if self.sender is None:
            return None
        host = self.config.advertise_host or self.config.host
        return PDHandshakeMetadata(host=host, port=self.sender.port)

    def shutdown(self) -> None:
        if self._io is None:
            return

        async def drain() -> None:
            for part in (self.sender, self.receiver, self.transport):
                if part is not None:
                    await part.close()

        self._io.stop(drain)
        self._io = None
        if self.tiers is not None:
            self.tiers.close()

    # ---- per step -----------------------------------------------------------------

    def start_load_kv(self, meta: PDConnectorMetadata) -> None:
        """Act on one step's metadata; returns at once (loads are asynchronous)."""
        assert self._io is not None, "register_kv_caches must run first"
        for grant in meta.grants:
            self.leases.grant(grant.request_id, grant.block_ids, grant.lease_s)
            if self.sender is not None:
                self._io.call_soon(self.sender.notify_granted, grant.request_id)
        if meta.grants:
            with self._lock:
                self._stats.data["leases_granted"] += len(meta.grants)
        if self.tiers is not None:
            for grant in meta.grants:  # blocks are freed when lease and save both end
                self.tiers.hold(grant.request_id)
            if meta.tiers is not None:
                self.tiers.submit(meta.tiers)
        if self.receiver is None:
            return
        for note in meta.heartbeats:
            self._io.submit(self.receiver.heartbeat(
                note.remote_host, note.remote_port, list(note.lease_ids))
            ).add_done_callback(_log_failure)
        for note in meta.releases:
            for lease_id in note.lease_ids:
                self._io.submit(self.receiver.release(
                    note.remote_host, note.remote_port, lease_id)
                ).add_done_callback(_log_failure)
        for load in meta.loads:
            self.pull(load).add_done_callback(self._pull_finished)

    def pull(self, load: LoadSpec) -> concurrent.futures.Future[PullResult]:
        """Start one pull: a shm-direct one is done here, on the calling thread, with
        `shm_inline` (done within the engine's step, it is reported by this step's
        `get_finished`); any other runs on the I/O loop."""
        if self.config.shm_inline:
            result = self.receiver.pull_inline(load)
            if result is not None:
                fut: concurrent.futures.Future[PullResult] = concurrent.futures.Future()
                fut.set_result(result)
                return fut
        return self._io.submit(self.receiver.pull(load))

    def _pull_finished(self, fut) -> None:
        result: PullResult = fut.result()  # pull() never raises
        with self._lock:
            self._done_pulls.append(result)
            self._stats.record_pull(result.ok, result.num_bytes, result.num_blocks,
                                    result.seconds, result.reason, result.mode, result.phases)

    def _record_send(self, record: SendRecord) -> None:
        with self._lock:
            self._stats.record_send(record.num_bytes, record.num_blocks, record.error)

    def get_finished(self) -> tuple[set[str], set[str]]:
        """(requests whose leases ended: free their blocks, requests whose pulls ended).

        A failed pull is reported as finished too; its blocks go to the load-error set
        in the same call, so vLLM recomputes them before anything reads them.
        """
        sending = self.leases.take_finished()
        num_leases_ended = len(sending)
        loaded: set[str] = set()
        tier_errors: set[int] = set()
        if self.tiers is not None:
            sending, loaded, tier_errors = self.tiers.take_finished(sending)
        with self._lock:
            self._load_errors.update(tier_errors)
            done, self._done_pulls = self._done_pulls, []
            for result in done:
                if not result.ok:
                    self._load_errors.update(result.local_block_ids)
            self._stats.data["leases_released"] += num_leases_ended
        return sending, {r.request_id for r in done} | loaded

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def take_tier_worker_meta(self) -> TierWorkerMetadata | None:
        return self.tiers.take_worker_meta() if self.tiers is not None else None

    def get_stats(self) -> PDConnectorStats | None:
        with self._lock:
            if self.tiers is not None:
                self._stats.add_counts(self.tiers.take_stats())
            self._stats.data["leases_outstanding"] = self.leases.num_outstanding
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, PDConnectorStats()
            self._stats.data["leases_outstanding"] = stats.data["leases_outstanding"]
            return stats


def _log_failure(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logger.warning("kvtransfer: lease notice failed: %r", fut.exception())


def identity_from_vllm(vllm_config: Any) -> ModelIdentity:
    model_config = vllm_config.model_config
    name = model_config.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    return ModelIdentity(
        model=str(name or model_config.model),
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=model_config.get_num_kv_heads(vllm_config.parallel_config),
        head_size=model_config.get_head_size(),
    )
