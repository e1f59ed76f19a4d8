"""What the tier halves pass each other. Scheduler -> worker: `TierMetadata` inside
PDConnectorMetadata; worker -> scheduler: `TierWorkerMetadata` through vLLM's
`build_connector_worker_meta`. No torch here.

A block's `Place` is a DRAM slot (`slot >= 0`) or its NVMe file (`slot == NVME`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

NVME = -1


@dataclass(frozen=True, slots=True)
class TierSpec:
    """What both halves derive from the config and the engine: where NVMe files live
    (a directory per KV geometry), how many blocks DRAM holds, one block's bytes."""

    nvme_root: Path | None
    nvme_bytes: int | None
    num_slots: int
    block_bytes: int


@dataclass(frozen=True, slots=True)
class Place:
    key: bytes
    slot: int  # DRAM slot, or NVME

    @property
    def tier(self) -> str:
        return "nvme" if self.slot == NVME else "dram"


@dataclass(frozen=True, slots=True)
class TierLoad:
    """Copy `sources[i]` into local KV block `block_ids[i]`; report `request_id` done."""

    request_id: str
    block_ids: tuple[int, ...]
    sources: tuple[Place, ...]


@dataclass(frozen=True, slots=True)
class TierSave:
    """Store a finished request's blocks. In order: delete `deletes` (NVMe evictions),
    write `spills` (DRAM slot -> its file), then copy `block_ids[i]` to `targets[i]`."""

    request_id: str
    plan_id: int
    block_ids: tuple[int, ...]
    targets: tuple[Place, ...]
    spills: tuple[Place, ...] = ()
    deletes: tuple[bytes, ...] = ()


@dataclass(slots=True)
class TierMetadata:
    loads: list[TierLoad] = field(default_factory=list)
    saves: list[TierSave] = field(default_factory=list)
    # scheduler-side counts since the last step (misses, evictions), for stats
    counts: dict[str, int] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.loads or self.saves or self.counts)


@dataclass
class TierWorkerMetadata(KVConnectorWorkerMetadata):
    """Saves that completed (their blocks are now loadable) and keys found bad."""

    saved_plans: list[int] = field(default_factory=list)
    failed_plans: list[int] = field(default_factory=list)
    bad_keys: list[bytes] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "TierWorkerMetadata":
        assert isinstance(other, TierWorkerMetadata)
        self.saved_plans.extend(other.saved_plans)
        self.failed_plans.extend(other.failed_plans)
        self.bad_keys.extend(other.bad_keys)
        return self
