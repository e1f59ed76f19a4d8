"""User-facing connector settings, read from `kv_connector_extra_config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TierConfig(BaseModel):
    """KV tiers of one engine: finished blocks are kept by block hash in DRAM (LRU) and,
    evicted from there, in NVMe files; a new request loads its stored prefix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dram_bytes: int = Field(
        1 << 30, ge=0, description="DRAM tier budget in bytes (0: no DRAM tier; blocks "
        "go straight to NVMe if `nvme_dir` is set).")
    nvme_dir: str | None = Field(
        None, description="Directory of the NVMe tier (local disk, one per replica); "
        "unset: no NVMe tier. Its index is rebuilt from the files at start.")
    nvme_bytes: int | None = Field(
        None, gt=0, description="NVMe tier budget in bytes (LRU files are deleted); "
        "unset: unbounded.")
    load: bool = Field(True, description="Load stored prefixes instead of recomputing.")
    store: bool = Field(True, description="Store the blocks of finished requests.")


class PDConnectorConfig(BaseModel):
    """Settings of PDConnector; unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: Literal["ucx", "loopback"] = Field(
        "ucx", description="Data plane: 'ucx' (ucxx) or 'loopback' (in-process, tests)."
    )
    host: str = Field(
        "127.0.0.1", description="Address the handshake/control listener binds to."
    )
    port: int = Field(0, ge=0, le=65535, description="Listener port; 0 picks a free one.")
    advertise_host: str | None = Field(
        None, description="Host decode peers dial; defaults to `host`."
    )
    lease_s: float = Field(
        30.0, gt=0, description="How long prefill holds blocks for a pull that has not come."
    )
    heartbeat_s: float | None = Field(
        None, gt=0, description="Decode heartbeat period while a request waits; lease_s/6 if unset."
    )
    transfer_timeout_s: float = Field(
        10.0, gt=0, description="Deadline for one pull (reply and all data) before recompute."
    )
    grant_wait_s: float = Field(
        2.0, ge=0, description="How long prefill waits for a lease grant a pull races ahead of."
    )
    handshake_timeout_s: float = Field(5.0, gt=0, description="Deadline for connect + handshake.")
    max_message_bytes: int = Field(
        256 << 20, ge=1,
        description="Largest single UCX message; longer block runs are split (on one host "
        "fewer, larger CMA reads are fastest; a cap helps RDMA pipelining).",
    )
    shared_secret: str | None = Field(
        None, description="If set, both sides must prove it (HMAC) during the handshake."
    )
    shm: Literal["auto", "off"] = Field(
        "auto", description="Same-host data path: 'auto' maps the prefill's KV memory "
        "into a decode peer on the same host (host memory only; else UCX); 'off': UCX.",
    )
    shm_direct: bool = Field(
        True, description="With shm: pull without a round trip when the prefill's "
        "lease board shows the lease holding the blocks before and after the copy; "
        "False: always ask the prefill (a request/reply per pull).",
    )
    shm_inline: bool = Field(
        True, description="With shm_direct: a pull that can go direct is copied on the "
        "thread that starts it, vLLM's engine thread, within the step (no hand-off to "
        "the I/O thread and back, which vLLM's CPU binding puts on the engine's cores "
        "too, where it competes with the step); False: on the I/O thread.",
    )
    tiers: TierConfig | None = Field(
        None, description="DRAM/NVMe KV tiers with prefix reuse; unset: none.")

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> "PDConnectorConfig":
        return cls(**(extra or {}))

    @property
    def heartbeat_period_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.lease_s / 6
