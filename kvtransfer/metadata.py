"""What passes between the two halves, and what passes between engines.

- `PDConnectorMetadata` is the only thing the scheduler half hands the worker half
  (once per engine step).
- `TransferParams` is the `kv_transfer_params` contract, vLLM's field names: a prefill
  request carries `{"do_remote_decode": true}`; the prefill output carries the dict
  `TransferParams.to_dict()` builds, which a proxy passes verbatim to the decode request.

No torch, no UCX here: the scheduler process imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

from .tiers.plan import TierMetadata


@dataclass(slots=True)
class TransferParams:
    """Where a decode request's prompt KV lives: fields a vLLM P/D proxy forwards."""

    remote_engine_id: str
    remote_request_id: str
    remote_block_ids: list[int]
    remote_host: str
    remote_port: int
    remote_num_tokens: int
    remote_lease_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.remote_engine_id,
            "remote_request_id": self.remote_request_id,
            "remote_block_ids": list(self.remote_block_ids),
            "remote_host": self.remote_host,
            "remote_port": self.remote_port,
            "remote_num_tokens": self.remote_num_tokens,
            "remote_lease_s": self.remote_lease_s,
            "tp_size": 1,
        }

    @classmethod
    def from_dict(cls, params: dict[str, Any] | None) -> "TransferParams | None":
        """The remote-prefill fields of a decode request, or None if it has none.

        Also accepts vLLM NixlConnector-shaped dicts (block ids may be per group).
        """
        if not params or not params.get("do_remote_prefill"):
            return None
        try:
            block_ids = params["remote_block_ids"]
            if block_ids and isinstance(block_ids[0], (list, tuple)):
                (block_ids,) = block_ids  # one KV cache group
            return cls(
                remote_engine_id=str(params["remote_engine_id"]),
                remote_request_id=str(params["remote_request_id"]),
                remote_block_ids=[int(b) for b in block_ids],
                remote_host=str(params["remote_host"]),
                remote_port=int(params["remote_port"]),
                remote_num_tokens=int(params.get("remote_num_tokens") or 0),
                remote_lease_s=float(params.get("remote_lease_s") or 30.0),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Decode side: pull `remote_block_ids` (tail-aligned) into `local_block_ids`."""

    request_id: str
    local_block_ids: tuple[int, ...]
    remote_request_id: str
    remote_block_ids: tuple[int, ...]
    remote_host: str
    remote_port: int


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """Prefill side: hold `block_ids` of a finished request for a decode pull."""

    request_id: str
    block_ids: tuple[int, ...]
    lease_s: float


@dataclass(frozen=True, slots=True)
class PeerNotice:
    """Decode side: tell a prefill peer about leases (heartbeat or release)."""

    remote_host: str
    remote_port: int
    lease_ids: tuple[str, ...]


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    grants: list[LeaseGrant] = field(default_factory=list)
    heartbeats: list[PeerNotice] = field(default_factory=list)
    releases: list[PeerNotice] = field(default_factory=list)
    tiers: TierMetadata | None = None  # DRAM/NVMe tier loads and saves

    def is_empty(self) -> bool:
        return not (self.loads or self.grants or self.heartbeats or self.releases
                    or self.tiers)


@dataclass
class PDHandshakeMetadata(KVConnectorHandshakeMetadata):
    """Worker -> scheduler (once, at start): where this worker's listener is."""

    host: str
    port: int
