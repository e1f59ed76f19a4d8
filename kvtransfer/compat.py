"""What two engines must agree on before blocks may move between them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import IncompatiblePeer
from .protocol import PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class KVSpec:
    """The shape of one engine's paged KV cache, as its peers see it.

    `num_blocks` is informative (peers differ); everything else must match, because a
    block from the peer is written byte for byte into a local block, and the two must
    speak one wire protocol (`protocol`; 0 from a peer older than the field).
    """

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    layout: str
    region_block_bytes: tuple[int, ...]
    num_blocks: int = 0
    protocol: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["region_block_bytes"] = list(self.region_block_bytes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KVSpec":
        known = {f.name for f in fields(cls)}
        missing = known - set(data) - {"num_blocks", "protocol"}
        if missing:
            raise IncompatiblePeer(f"peer KV spec lacks fields {sorted(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        values["region_block_bytes"] = tuple(values["region_block_bytes"])
        values.setdefault("protocol", 0)
        return cls(**values)


_MUST_MATCH = (
    "protocol", "model", "dtype", "block_size", "num_layers", "num_kv_heads", "head_size",
    "layout", "region_block_bytes",
)


def check_compatible(local: KVSpec, remote: KVSpec) -> None:
    """Raise IncompatiblePeer naming every field on which the two specs differ."""
    diffs = [
        f"{name}: local={getattr(local, name)!r} peer={getattr(remote, name)!r}"
        for name in _MUST_MATCH
        if getattr(local, name) != getattr(remote, name)
    ]
    if diffs:
        raise IncompatiblePeer("KV caches are incompatible (" + "; ".join(diffs) + ")")
