"""PDConnector: the class vLLM instantiates. It only dispatches by role.

    KVTransferConfig(kv_connector="PDConnector", kv_connector_module_path="kvtransfer",
                     kv_role="kv_producer" | "kv_consumer" | "kv_both",
                     kv_load_failure_policy="recompute",
                     kv_connector_extra_config={...PDConnectorConfig fields...})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .config import PDConnectorConfig
from .metadata import PDConnectorMetadata
from .stats import PDConnectorStats, PDPromMetrics

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class PDConnector(KVConnectorBase_V1):
    """Disaggregated prefill/decode KV connector over UCX (see kvtransfer/README.md)."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = self._kv_transfer_config
        config = PDConnectorConfig.from_extra_config(ktc.kv_connector_extra_config)
        self.scheduler = None
        self.worker = None
        tiers = None
        if config.tiers is not None:
            from .tiers.scheduler import tier_spec

            tiers = tier_spec(config.tiers, vllm_config, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler import PDScheduler

            self.scheduler = PDScheduler(config, ktc.engine_id,
                                         self._tier_scheduler(config, tiers, vllm_config))
        else:
            from .worker import PDWorker, identity_from_vllm

            self.worker = PDWorker(config, identity_from_vllm(vllm_config),
                                   is_producer=ktc.is_kv_producer,
                                   is_consumer=ktc.is_kv_consumer, tiers=tiers)

    def _tier_scheduler(self, config: PDConnectorConfig, spec: Any, vllm_config: Any):
        if spec is None:
            return None
        from .tiers.scheduler import TierScheduler

        return TierScheduler(config.tiers, spec, vllm_config.cache_config.block_size,
                             self._kv_cache_config.hash_block_size)

    # ---- scheduler side -------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int):
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int):
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta()

    def on_new_request(self, request: "Request") -> None:
        self.scheduler.on_new_request(request)

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        self.scheduler.update_connector_output(connector_output.finished_recving,
                                               connector_output.kv_connector_worker_meta)

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: "Request") -> tuple[int, ...]:
        return self._kv_cache_config.transfer_group_ids

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        self.scheduler.set_handshake_metadata(metadata)

    # ---- worker side ----------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]):
        self.worker.register_kv_caches(kv_caches, self._kv_cache_config.num_blocks)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self.worker.handshake_metadata()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PDConnectorMetadata)
        self.worker.start_load_kv(meta)

    def has_connector_metadata(self) -> bool:
        """False: nothing happens per attention layer (loads complete before a request
        is scheduled, the decode side pulls, nothing is saved), and vLLM asks this only
        to decide whether to wrap each layer's attention in `wait_for_layer_load` and
        `save_kv_layer` calls (kv_transfer_utils.maybe_transfer_kv_layer): two Python
        calls per layer per step, 1.5% of the decode worker's forward time here."""
        return False

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # the decode side pulls; nothing is pushed

    def wait_for_save(self):
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        return self.worker.get_finished()

    def build_connector_worker_meta(self):
        return self.worker.take_tier_worker_meta()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> PDConnectorStats | None:
        if self.worker is not None:
            return self.worker.get_stats()
        return self.scheduler.get_kv_connector_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PDConnectorStats:
        return PDConnectorStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return PDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        if self.worker is not None:
            self.worker.shutdown()
