"""Scheduler half of PDConnector: decides what to load and what to hold. No torch, no UCX.

Prefill engine (request carries `do_remote_decode`): when the request finishes normally,
keep its blocks (`request_finished` returns True), grant a lease on them to the worker,
and return the `TransferParams` the decode request needs. Aborted requests free at once.

Decode engine (request carries `do_remote_prefill` + remote fields): report the prompt
as loadable asynchronously, hand the worker a `LoadSpec` once blocks are allocated, and
heartbeat the prefill lease while the request waits for blocks.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .config import PDConnectorConfig
from .metadata import (
    LeaseGrant, LoadSpec, PDConnectorMetadata, PDHandshakeMetadata, PeerNotice,
    TransferParams,
)
from .stats import TIER_KEYS, PDConnectorStats

if TYPE_CHECKING:
    from .tiers.scheduler import TierScheduler
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_PROCESSED = "_pd_processed"  # marks a decode request whose load was planned


class PDScheduler:
    def __init__(self, config: PDConnectorConfig, engine_id: str,
                 tiers: "TierScheduler | None" = None):
        self.config = config
        self.tiers = tiers
        self.engine_id = engine_id
        self.host = config.advertise_host or config.host
        self.port = config.port
        self._meta = PDConnectorMetadata()
        # decode request id -> (peer host, port, remote lease id), until its load starts
        self._waiting: dict[str, tuple[str, int, str]] = {}
        self._last_heartbeat = time.monotonic()

    def set_handshake_metadata(self, metadata: dict[Any, Any]) -> None:
        for meta in metadata.values():
            if isinstance(meta, PDHandshakeMetadata):
                self.host, self.port = meta.host, meta.port
                return

    # ---- decode side --------------------------------------------------------------

    @staticmethod
    def _remote(request: "Request") -> TransferParams | None:
        params = request.kv_transfer_params
        if not params or params.get(_PROCESSED):
            return None
        return TransferParams.from_dict(params)

    def on_new_request(self, request: "Request") -> None:
        remote = self._remote(request)
        if remote is not None:
            self._waiting[request.request_id] = (
                remote.remote_host, remote.remote_port, remote.remote_request_id)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int):
        """The prompt tokens the peer computed and we did not load asynchronously from
        it (a prompt may run past them: the peer's sampled token, appended by a proxy
        that already sent it to the client); without a peer, the longest prefix stored
        in a tier loads asynchronously."""
        remote = self._remote(request)
        if remote is None:
            if self.tiers is not None:
                return self.tiers.get_num_new_matched_tokens(request, num_computed_tokens)
            return 0, False
        num_tokens = request.num_prompt_tokens
        if remote.remote_num_tokens > 0:
            num_tokens = min(num_tokens, remote.remote_num_tokens)
        count = num_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        remote = self._remote(request)
        if remote is None:
            if self.tiers is not None:
                self.tiers.update_state_after_alloc(request, blocks, num_external_tokens)
            return
        request.kv_transfer_params[_PROCESSED] = True
        self._waiting.pop(request.request_id, None)
        if num_external_tokens == 0:  # everything was a local prefix hit
            self._release(remote)
            return
        (local,) = blocks.get_unhashed_block_ids_all_groups()
        self._meta.loads.append(LoadSpec(
            request_id=request.request_id, local_block_ids=tuple(local),
            remote_request_id=remote.remote_request_id,
            remote_block_ids=tuple(remote.remote_block_ids),
            remote_host=remote.remote_host, remote_port=remote.remote_port,
        ))

    def _release(self, remote: TransferParams) -> None:
        self._meta.releases.append(PeerNotice(
            remote.remote_host, remote.remote_port, (remote.remote_request_id,)))

    def _heartbeats(self) -> list[PeerNotice]:
        now = time.monotonic()
        if not self._waiting or now - self._last_heartbeat < self.config.heartbeat_period_s:
            return []
        self._last_heartbeat = now
        by_peer: dict[tuple[str, int], list[str]] = {}
        for host, port, lease_id in self._waiting.values():
            by_peer.setdefault((host, port), []).append(lease_id)
        return [PeerNotice(h, p, tuple(ids)) for (h, p), ids in by_peer.items()]

    # ---- both sides ---------------------------------------------------------------

    def request_finished(self, request: "Request", block_ids: list[int]):
        """Prefill: hold the blocks under a lease and return where they are.
        Decode: a request that never started its load releases the peer's lease.
        Either: tiers store the computed blocks (held until they are copied)."""
        hold, params = self._finish_transfer(request, block_ids)
        if self.tiers is not None and self.tiers.request_finished(request, block_ids):
            hold = True
        return hold, params

    def _finish_transfer(self, request: "Request", block_ids: list[int]):
        from vllm.v1.request import RequestStatus

        self._waiting.pop(request.request_id, None)
        params = request.kv_transfer_params or {}
        remote = self._remote(request)
        if remote is not None:  # aborted before its blocks were allocated
            request.kv_transfer_params[_PROCESSED] = True
            self._release(remote)
            return False, None
        if not params.get("do_remote_decode") or not block_ids:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted: free now, nobody will pull
        lease_s = float(params.get("kv_lease_s") or self.config.lease_s)
        self._meta.grants.append(LeaseGrant(request.request_id, tuple(block_ids), lease_s))
        out = TransferParams(
            remote_engine_id=self.engine_id, remote_request_id=request.request_id,
            remote_block_ids=list(block_ids), remote_host=self.host, remote_port=self.port,
            remote_num_tokens=request.num_computed_tokens, remote_lease_s=lease_s,
        )
        return True, out.to_dict()

    def build_connector_meta(self) -> PDConnectorMetadata:
        meta, self._meta = self._meta, PDConnectorMetadata()
        meta.heartbeats = self._heartbeats()
        if self.tiers is not None:
            meta.tiers = self.tiers.build_meta()
        return meta

    def get_kv_connector_stats(self) -> "PDConnectorStats | None":
        """Scheduler-side stats for this step: the tiers' key report, if any changed
        (vLLM merges them into the worker's and hands them to the stat loggers)."""
        report = self.tiers.take_key_report() if self.tiers is not None else None
        if report is None:
            return None
        stats = PDConnectorStats()
        stats.data[TIER_KEYS] = report
        return stats

    def update_connector_output(self, finished_recving: set[str] | None,
                                worker_meta: Any = None) -> None:
        for req_id in finished_recving or ():
            self._waiting.pop(req_id, None)
        if self.tiers is not None:
            self.tiers.update_connector_output(finished_recving, worker_meta)
