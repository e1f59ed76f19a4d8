"""Prefill-side leases: which blocks are held for which decode pull, and until when.

A lease is granted when a prefill request finishes with `do_remote_decode`; its blocks
stay allocated in vLLM until the lease ends. It ends when the decode side says it is
done (or gave up), when it is released (decode request aborted), or when it expires.
Heartbeats push the expiry out. A lease being read is never ended under the reader:
the end is deferred until the last read finishes, then reported.

With a `board` (board.py, shared with same-host peers), a grant publishes the lease's
blocks and an end withdraws them before the lease is reported as finished.

Thread-safe: the engine thread grants and collects, the I/O thread reads and ends.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from .board import LeaseBoard
from .errors import BlockRangeError, LeaseUnavailable

_REMEMBER_ENDED = 4096


@dataclass(slots=True)
class Lease:
    lease_id: str
    block_ids: frozenset[int]
    expires_at: float
    num_readers: int = 0
    end_reason: str | None = None  # set while an end waits for readers


class LeaseTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # lease_id -> reason
        self._finished: set[str] = set()
        self.num_expired = 0
        self.board: LeaseBoard | None = None  # set once, before the first grant

    def grant(self, lease_id: str, block_ids: Iterable[int], duration_s: float) -> None:
        with self._lock:
            old = self._leases.get(lease_id)
            lease = self._leases[lease_id] = Lease(
                lease_id, frozenset(block_ids), self._clock() + duration_s
            )
            if self.board is not None:
                if old is not None:  # a re-grant replaces the blocks it held
                    self.board.withdraw(lease_id, old.block_ids)
                self.board.publish(lease_id, lease.block_ids)

    def extend(self, lease_id: str, duration_s: float) -> bool:
        """Push the expiry to at least now + duration; False if no such lease."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.end_reason is not None:
                return False
            lease.expires_at = max(lease.expires_at, self._clock() + duration_s)
            return True

    def is_known(self, lease_id: str) -> bool:
        with self._lock:
            return lease_id in self._leases or lease_id in self._ended

    def begin_read(self, lease_id: str, block_ids: Iterable[int]) -> None:
        """Pin the lease for a transfer of `block_ids`, which must all belong to it."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.end_reason is not None:
                why = self._ended.get(lease_id, "unknown")
                raise LeaseUnavailable(f"lease {lease_id} is not held ({why})")
            stray = set(block_ids) - lease.block_ids
            if stray:
                raise BlockRangeError(
                    f"blocks {sorted(stray)[:8]} are not part of lease {lease_id}"
                )
            lease.num_readers += 1

    def end_read(self, lease_id: str) -> None:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return
            lease.num_readers -= 1
            if lease.num_readers == 0 and lease.end_reason is not None:
                self._finish(lease, lease.end_reason)

    def release(self, lease_id: str, reason: str) -> bool:
        """End a lease now (or as soon as its readers finish). False if not held."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.end_reason is not None:
                return False
            lease.end_reason = reason
            if lease.num_readers == 0:
                self._finish(lease, reason)
            return True

    def expire(self) -> list[str]:
        """End every unread lease past its expiry; returns their ids."""
        now = self._clock()
        with self._lock:
            due = [
                lease for lease in self._leases.values()
                if lease.expires_at <= now and lease.num_readers == 0
                and lease.end_reason is None
            ]
            for lease in due:
                self._finish(lease, "expired")
            self.num_expired += len(due)
            return [lease.lease_id for lease in due]

    def take_finished(self) -> set[str]:
        """Leases that ended since the last call: their blocks may be freed now."""
        with self._lock:
            done, self._finished = self._finished, set()
            return done

    @property
    def num_outstanding(self) -> int:
        with self._lock:
            return len(self._leases)

    def _finish(self, lease: Lease, reason: str) -> None:
        if self.board is not None:  # before anyone may free the blocks
            self.board.withdraw(lease.lease_id, lease.block_ids)
        del self._leases[lease.lease_id]
        self._ended[lease.lease_id] = reason
        if len(self._ended) > _REMEMBER_ENDED:
            self._ended.popitem(last=False)
        self._finished.add(lease.lease_id)
