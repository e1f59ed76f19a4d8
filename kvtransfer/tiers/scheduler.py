"""Scheduler half of the tiers: which prompt blocks to load from a tier, which finished
blocks to store. No torch, no I/O (besides the NVMe directory scan at start).

Keys are vLLM's block hashes (`request.block_hashes`, chained, sha256 by default with a
fixed seed, so they are the same after a restart), one per KV block.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TierConfig
from . import files
from .index import TierIndex
from .plan import NVME, Place, TierLoad, TierMetadata, TierSave, TierSpec, TierWorkerMetadata

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request


def tier_spec(config: TierConfig, vllm_config: Any, kv_cache_config: Any) -> TierSpec:
    """Sizes and the NVMe directory, derived the same way in both engine processes."""
    block_bytes = sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names)
                      for g in kv_cache_config.kv_cache_groups)
    root = None
    if config.nvme_dir is not None:
        mc, cc = vllm_config.model_config, vllm_config.cache_config
        root = Path(config.nvme_dir) / files.namespace(
            mc.model, mc.dtype, cc.block_size, cc.prefix_caching_hash_algo, block_bytes)
    return TierSpec(nvme_root=root, nvme_bytes=config.nvme_bytes,
                    num_slots=config.dram_bytes // block_bytes, block_bytes=block_bytes)


class TierScheduler:
    def __init__(self, config: TierConfig, spec: TierSpec, block_size: int,
                 hash_block_size: int | None = None):
        self.config = config
        self.block_size = block_size
        self._hashes_per_block = block_size // (hash_block_size or block_size)
        self.index = TierIndex(spec.num_slots, spec.block_bytes, spec.nvme_root,
                               spec.nvme_bytes)
        self._found: dict[str, tuple[int, list[Place], int]] = {}  # lookup per request
        self._loading: dict[str, list[bytes]] = {}  # pinned keys until loaded
        self._meta = TierMetadata()

    def keys(self, request: "Request") -> list[bytes]:
        k = self._hashes_per_block
        return [bytes(h) for h in request.block_hashes[k - 1::k]]

    def _count(self, name: str, n: int) -> None:
        if n:
            self._meta.counts[name] = self._meta.counts.get(name, 0) + n

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens of the longest stored prefix beyond `num_computed_tokens` (loaded
        asynchronously). At least one prompt token is always left to compute."""
        if not self.config.load:
            return 0, False
        start = num_computed_tokens // self.block_size
        limit = (request.num_prompt_tokens - 1) // self.block_size
        wanted = self.keys(request)[start:limit]
        found = self.index.lookup(wanted)
        self._found[request.request_id] = (start, found, len(wanted))
        return (len(found) * self.block_size, True) if found else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        entry = self._found.pop(request.request_id, None)
        if entry is None:
            return
        start, found, num_wanted = entry
        num_dram = sum(p.slot != NVME for p in found)
        self._count("dram_misses", num_wanted - num_dram)
        self._count("nvme_misses", num_wanted - len(found))
        n = num_external_tokens // self.block_size
        if n == 0:
            return
        places = found[:n]
        block_ids = blocks.get_block_ids()[0][start:start + n]
        self.index.prepare_load(places)
        self._loading[request.request_id] = [p.key for p in places]
        self._meta.loads.append(TierLoad(request.request_id, tuple(block_ids), tuple(places)))

    def request_finished(self, request: "Request", block_ids: list[int]) -> bool:
        """Plan storing the request's computed blocks; True while they must stay
        allocated (the worker reports the request in finished_sending after the copy)."""
        from vllm.v1.request import RequestStatus

        self._found.pop(request.request_id, None)
        if not self.config.store or request.request_id in self._loading:
            return False
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False
        keys = self.keys(request)[: min(request.num_computed_tokens // self.block_size,
                                        len(block_ids))]
        self.index.touch(keys)
        plan = self.index.prepare_store(keys)
        self._count("dram_evictions", plan.num_dram_evicted)
        self._count("nvme_evictions", len(plan.deletes))
        if not plan.keys:
            return False
        block_of = dict(zip(keys, block_ids))
        self._meta.saves.append(TierSave(
            request.request_id, plan.plan_id, tuple(block_of[k] for k in plan.keys),
            tuple(plan.targets), tuple(plan.spills), tuple(plan.deletes)))
        return True

    def update_connector_output(self, finished_recving: set[str] | None,
                                worker_meta: Any) -> None:
        for req_id in finished_recving or ():
            keys = self._loading.pop(req_id, None)
            if keys:
                self.index.complete_load(keys)
        if isinstance(worker_meta, TierWorkerMetadata):
            for plan_id in worker_meta.saved_plans:
                self.index.complete_store(plan_id, ok=True)
            for plan_id in worker_meta.failed_plans:
                self.index.complete_store(plan_id, ok=False)
            self.index.forget(worker_meta.bad_keys)

    def take_key_report(self) -> dict | None:
        """Changes to the loadable keys since the last call (see `journal`)."""
        return self.index.journal.take(self.index.keys)

    def build_meta(self) -> TierMetadata | None:
        if self._meta.is_empty():
            return None
        meta, self._meta = self._meta, TierMetadata()
        return meta
