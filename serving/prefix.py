"""Prefix-aware routing's data path: which KV blocks each replica holds, and the block
hashes of a prompt.

    engine core (tier index) --key reports, in the connector stats--> EngineServer
        `HeldBlocks`: the replica's set, and what the router has not heard yet
    EngineServer --`take_update()` with its load report--> Router
        `BlockSets`: every replica's set; a gap asks the replica for a full snapshot
    ingress `PromptHasher` --the prompt's chained block hashes--> Router.assign

Updates are deltas numbered by `version`; a delta applies only on top of the version
it names as `base`. A replica sends its whole set when it (re)starts, when a report
failed, or when the router asks (`RESYNC`): after the router restarted, dropped the
replica as stale or failed, or saw a gap.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

logger = logging.getLogger("pdserve.prefix")

RESYNC = "resync_blocks"  # key of Router.report's answer: send the whole set next time
TIER_KEYS = "tier_keys"  # = kvtransfer.stats.TIER_KEYS (not imported: it pulls in vLLM)


class HeldBlocks:
    """Replica side: the block hashes its tiers hold, from the engine's key reports
    (`kvtransfer.tiers.journal`), and the changes not yet sent to the router."""

    def __init__(self) -> None:
        self.keys: set[bytes] = set()
        self.version = 0
        self._engine_seq = 0
        self._pending: dict[bytes, bool] = {}  # key -> held, since the last update
        self._send_full = True

    def apply(self, report: dict) -> None:
        """One key report from the engine core (in order, once per changing step)."""
        if report["full"]:
            self.keys = set(report["added"])
            self._send_full = True
        else:
            if report["seq"] != self._engine_seq + 1:
                logger.error("tier key report %d after %d: one was lost, this replica's "
                             "reported blocks may be incomplete", report["seq"],
                             self._engine_seq)
            for key in report["added"]:
                self.keys.add(key)
                self._pending[key] = True
            for key in report["removed"]:
                self.keys.discard(key)
                self._pending[key] = False
        self._engine_seq = report["seq"]

    @property
    def has_update(self) -> bool:
        return self._send_full or bool(self._pending)

    def take_update(self) -> dict | None:
        """What the router needs to catch up: a delta on top of the last update, or the
        whole set; None when it knows everything."""
        if not self.has_update:
            return None
        base, self.version = self.version, self.version + 1
        changes, self._pending = self._pending, {}
        if self._send_full:
            self._send_full = False
            return {"version": self.version, "full": True, "added": list(self.keys),
                    "removed": []}
        return {"version": self.version, "base": base, "full": False,
                "added": [k for k, held in changes.items() if held],
                "removed": [k for k, held in changes.items() if not held]}

    def resync(self) -> None:
        """The last update did not arrive (or the router lost it): send the whole set."""
        self._send_full = True


class BlockSets:
    """Router side: each replica's block hashes at the version it last reported."""

    def __init__(self) -> None:
        self._sets: dict[str, tuple[int, set[bytes]]] = {}

    def get(self, replica_id: str) -> set[bytes]:
        entry = self._sets.get(replica_id)
        return entry[1] if entry is not None else set()

    def drop(self, replica_id: str) -> None:
        self._sets.pop(replica_id, None)

    def apply(self, replica_id: str, update: dict | None) -> bool:
        """Apply one replica's update (None: nothing changed). False when the router
        cannot follow (unknown replica, or a delta on another version): the replica
        must send its whole set."""
        entry = self._sets.get(replica_id)
        if update is None:
            return entry is not None
        if update["full"]:
            self._sets[replica_id] = (update["version"], set(update["added"]))
            return True
        if entry is None or entry[0] != update["base"]:
            return False
        held = entry[1]
        held.difference_update(update["removed"])
        held.update(update["added"])
        self._sets[replica_id] = (update["version"], held)
        return True


@dataclass(frozen=True, slots=True)
class HashSpec:
    """How the engines hash blocks: vLLM's `cache_config` and its NONE_HASH seed."""

    block_size: int
    algo: str
    seed: str

    @classmethod
    def of_engine(cls, vllm_config: Any) -> "HashSpec | None":
        """Read in the engine's frontend process (same environment as its core); None
        when hashes are not reproducible outside it (a non-cryptographic hash without
        PYTHONHASHSEED gets a random per-process seed)."""
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import resolve_none_hash_seed

        cache = vllm_config.cache_config
        algo = cache.prefix_caching_hash_algo
        if algo in ("xxhash", "xxhash_cbor") and os.getenv("PYTHONHASHSEED") is None:
            return None
        seed = resolve_none_hash_seed(get_hash_fn_by_name(algo))
        return cls(cache.block_size, algo, seed)


class PromptHasher:
    """The chained block hashes of a prompt's token ids, as vLLM's engine computes
    `request.block_hashes` (`kv_cache_utils.get_request_block_hasher`) for a request
    without LoRA, multimodal inputs or prompt embeddings. Assumes the KV hash block
    size equals the block size (true of every model with one KV cache group)."""

    def __init__(self, spec: HashSpec) -> None:
        from vllm.utils.hashing import get_hash_fn_by_name

        self.spec = spec
        self._hash = get_hash_fn_by_name(spec.algo)
        self._none_hash = self._hash(spec.seed)

    def block_hashes(self, token_ids: Sequence[int],
                     cache_salt: str | None = None) -> tuple[bytes, ...]:
        from vllm.v1.core.kv_cache_utils import hash_block_tokens

        size = self.spec.block_size
        parent = self._none_hash
        out = []
        for start in range(0, len(token_ids) - size + 1, size):
            extra = (("cache_salt", cache_salt),) if start == 0 and cache_salt else None
            parent = bytes(hash_block_tokens(self._hash, parent,
                                             token_ids[start:start + size], extra))
            out.append(parent)
        return tuple(out)
