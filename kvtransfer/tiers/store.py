"""Worker half of the tiers: the DRAM slots, the NVMe files, and the thread that copies.

`TierStore.submit(meta)` queues a step's loads and saves on one worker thread and
returns at once (the engine step is not blocked). Plans run in submission order, which
is what `TierIndex` assumes (a plan's spills are read before its stores reuse the
slots). Results go back through `take_finished` (requests whose saves or loads ended,
block ids whose load failed), `take_worker_meta` (plans done: keys loadable) and
`take_stats`.

A finished request's blocks stay allocated while they are copied out: the scheduler
half makes vLLM delay their free (`request_finished` -> True) and this side reports the
request in `finished_sending` when every hold on it (its save, a P/D lease) has ended.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch

from ..memory import KVRegion
from . import files
from .plan import NVME, Place, TierLoad, TierMetadata, TierSave, TierSpec, TierWorkerMetadata

logger = logging.getLogger(__name__)


class TierStore:
    def __init__(self, spec: TierSpec, regions: list[KVRegion]):
        self.spec = spec
        self.regions = regions
        row_bytes = sum(r.block_bytes for r in regions)
        if row_bytes != spec.block_bytes:
            raise ValueError(f"KV block is {row_bytes} bytes, tiers sized for "
                             f"{spec.block_bytes}")
        # torch.empty does not touch the pages: the budget is reserved, not resident
        self._dram = [torch.empty((spec.num_slots, r.block_bytes), dtype=torch.uint8)
                      for r in regions] if spec.num_slots else []
        self._scratch = torch.empty(row_bytes, dtype=torch.uint8)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-tiers")
        self._lock = threading.Lock()
        self._holds: Counter[str] = Counter()
        self._released: set[str] = set()
        self._loaded: set[str] = set()
        self._load_errors: set[int] = set()
        self._meta = TierWorkerMetadata()
        self._stats: Counter[str] = Counter()

    # ---- engine thread ---------------------------------------------------------------

    def hold(self, request_id: str) -> None:
        """Another part (a P/D lease) also holds this request's blocks."""
        with self._lock:
            self._holds[request_id] += 1

    def submit(self, meta: TierMetadata) -> None:
        with self._lock:
            self._stats.update(meta.counts)
            for save in meta.saves:
                self._holds[save.request_id] += 1
        for load in meta.loads:
            self._pool.submit(self._guard, self._load, load)
        for save in meta.saves:
            self._pool.submit(self._guard, self._save, save)

    def take_finished(self, released: Iterable[str]) -> tuple[set[str], set[str], set[int]]:
        """(requests whose blocks may be freed, requests loaded, block ids not loaded).

        `released` are requests another holder let go of; ids this store never held
        pass straight through.
        """
        with self._lock:
            sending = set()
            for req_id in [*released, *self._released]:
                if req_id not in self._holds:
                    sending.add(req_id)
                    continue
                self._holds[req_id] -= 1
                if self._holds[req_id] <= 0:
                    del self._holds[req_id]
                    sending.add(req_id)
            self._released = set()
            loaded, self._loaded = self._loaded, set()
            errors, self._load_errors = self._load_errors, set()
        return sending, loaded, errors

    def take_worker_meta(self) -> TierWorkerMetadata | None:
        with self._lock:
            meta, self._meta = self._meta, TierWorkerMetadata()
        if meta.saved_plans or meta.failed_plans or meta.bad_keys:
            return meta
        return None

    def take_stats(self) -> dict[str, int]:
        with self._lock:
            stats, self._stats = self._stats, Counter()
        return dict(stats)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    # ---- tier thread -----------------------------------------------------------------

    @staticmethod
    def _guard(fn, arg) -> None:
        try:
            fn(arg)
        except Exception:  # a bug here must not kill the thread; the plan reported failure
            logger.exception("kvtransfer tiers: %s failed", fn.__name__)

    def _load(self, load: TierLoad) -> None:
        failed: list[int] = []
        bad: list[bytes] = []
        counts: Counter[str] = Counter()
        try:
            dram = [(b, p) for b, p in zip(load.block_ids, load.sources) if p.slot != NVME]
            if dram:
                self._copy_in(dram)
                counts["dram_hits"] += len(dram)
                counts["dram_bytes_loaded"] += len(dram) * self.spec.block_bytes
            for block_id, place in zip(load.block_ids, load.sources):
                if place.slot != NVME:
                    continue
                try:
                    self._read_file(place.key, block_id)
                except files.BlockFileError as exc:
                    logger.warning("kvtransfer tiers: %s; block recomputed", exc)
                    failed.append(block_id)
                    bad.append(place.key)
                    files.delete_block(self.spec.nvme_root, place.key)
                    continue
                counts["nvme_hits"] += 1
                counts["nvme_bytes_loaded"] += self.spec.block_bytes
        except Exception:
            failed = list(load.block_ids)
            raise
        finally:
            counts["tier_load_failures"] += len(failed)
            with self._lock:
                self._stats.update(counts)
                self._load_errors.update(failed)
                self._meta.bad_keys.extend(bad)
                self._loaded.add(load.request_id)

    def _copy_in(self, pairs: list[tuple[int, Place]]) -> None:
        ids = torch.tensor([b for b, _ in pairs], dtype=torch.long)
        slots = torch.tensor([p.slot for _, p in pairs], dtype=torch.long)
        for region, buf in zip(self.regions, self._dram):
            region.blocks.index_copy_(0, ids, buf.index_select(0, slots))

    def _read_file(self, key: bytes, block_id: int) -> None:
        files.read_block(self.spec.nvme_root, key, memoryview(self._scratch.numpy()))
        offset = 0
        for region in self.regions:
            region.blocks[block_id].copy_(self._scratch[offset:offset + region.block_bytes])
            offset += region.block_bytes

    def _save(self, save: TierSave) -> None:
        ok = False
        counts: Counter[str] = Counter()
        try:
            root = self.spec.nvme_root
            for key in save.deletes:
                files.delete_block(root, key)
            for place in save.spills:
                files.write_block(root, place.key, [b[place.slot].numpy() for b in self._dram])
                counts["nvme_bytes_stored"] += self.spec.block_bytes
            pairs = list(zip(save.block_ids, save.targets))
            dram = [(b, p) for b, p in pairs if p.slot != NVME]
            if dram:
                ids = torch.tensor([b for b, _ in dram], dtype=torch.long)
                slots = torch.tensor([p.slot for _, p in dram], dtype=torch.long)
                for region, buf in zip(self.regions, self._dram):
                    buf.index_copy_(0, slots, region.blocks.index_select(0, ids))
                counts["dram_bytes_stored"] += len(dram) * self.spec.block_bytes
            for block_id, place in pairs:
                if place.slot == NVME:
                    files.write_block(root, place.key,
                                      [r.blocks[block_id].numpy() for r in self.regions])
                    counts["nvme_bytes_stored"] += self.spec.block_bytes
            ok = True
        except OSError as exc:
            logger.warning("kvtransfer tiers: save of %s failed: %r", save.request_id, exc)
        finally:
            with self._lock:
                self._stats.update(counts)
                (self._meta.saved_plans if ok else self._meta.failed_plans).append(
                    save.plan_id)
                self._released.add(save.request_id)
