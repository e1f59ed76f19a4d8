"""The lease board: which lease holds each KV block, in memory a same-host peer maps.

The prefill side writes it (`LeaseBoard`, driven by leases.py): when a lease is granted
each of its blocks gets the lease's tag; when the lease ends, before its blocks are
reported to vLLM for freeing, the blocks still carrying that tag are cleared. A block
in two leases (a shared prefix) carries the later grant's tag only, so the earlier
lease simply does not show there. A tag is a keyed 64-bit hash of the lease id
(nonzero; the key is random per engine and travels in the authenticated shm offer).

The decode side reads it (`BoardView.holds`) to pull without a round trip: if every
block it copied still carries its lease's tag after the copy, the lease was held all
through the copy (a lease never comes back, and a cleared or retagged block is never
set to that tag again), so vLLM had not freed those blocks and nobody wrote them.
Ordering: the prefill's clear happens before the free (same thread, then locks), and
the reader's board load comes after its copy's loads (a lock joins the copy threads);
x86-TSO and ARMv8 keep loads in that order across processes.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Iterable

import numpy as np

_EMPTY = 0


def lease_tag(key: bytes, lease_id: str) -> np.uint64:
    digest = hashlib.blake2b(lease_id.encode(), digest_size=8, key=key).digest()
    return np.uint64(int.from_bytes(digest, "little") or 1)


class LeaseBoard:
    """Prefill side: one uint64 per block (`cells`, shared), written under the lease
    table's lock."""

    def __init__(self, cells: np.ndarray):
        self.cells = cells
        self.key = secrets.token_bytes(16)

    def publish(self, lease_id: str, block_ids: Iterable[int]) -> None:
        ids = self._ids(block_ids)
        self.cells[ids] = lease_tag(self.key, lease_id)

    def withdraw(self, lease_id: str, block_ids: Iterable[int]) -> None:
        ids = self._ids(block_ids)
        ids = ids[self.cells[ids] == lease_tag(self.key, lease_id)]
        self.cells[ids] = _EMPTY

    def _ids(self, block_ids: Iterable[int]) -> np.ndarray:
        ids = np.fromiter(block_ids, dtype=np.int64)
        return ids[(ids >= 0) & (ids < len(self.cells))]


class BoardView:
    """Decode side: a peer's board, mapped read-only."""

    def __init__(self, cells: np.ndarray, key: bytes):
        self._cells = cells
        self._key = key

    def holds(self, lease_id: str, block_ids: Iterable[int]) -> bool:
        """True if lease `lease_id` holds every one of `block_ids` now."""
        return self.holds_spans(lease_id, [(b, 1) for b in block_ids])

    def holds_spans(self, lease_id: str, spans: Iterable[tuple[int, int]]) -> bool:
        """True if lease `lease_id` holds every block of `spans` ((first, count)
        pairs, at least one) now."""
        tag = lease_tag(self._key, lease_id)
        cells, seen = self._cells, False
        for first, count in spans:
            if first < 0 or count < 1 or first + count > len(cells):
                return False
            if not (cells[first:first + count] == tag).all():
                return False
            seen = True
        return seen
