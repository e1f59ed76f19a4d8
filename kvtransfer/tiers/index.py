"""Where each stored block is: the scheduler's index of the DRAM and NVMe tiers.

Two-phase, in the manner of vLLM's `kv_offload` managers, keyed by block hashes
(chained: a key names its whole prefix):

- `lookup(keys)`            the leading keys that are loadable, with their places
- `prepare_load(places)`    pin them (not evicted) until `complete_load(keys)`
- `prepare_store(keys)`     pick a place per new key, evicting LRU entries: DRAM
                            spills into NVMe, NVMe deletes; returns a `StorePlan`
- `complete_store(plan_id)` the worker copied the data: the plan's keys are loadable

The worker executes plans in order, so a plan's spills are read before its stores
overwrite the same slots. Entries are loadable only after `complete_store`; a key the
worker found bad is dropped with `forget`. DRAM capacity is counted in slots (the
byte budget over one block's bytes), NVMe in bytes. No torch, no I/O besides the scan.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

from . import files
from .journal import KeyJournal
from .plan import NVME, Place


@dataclass(slots=True)
class StorePlan:
    plan_id: int
    keys: list[bytes] = field(default_factory=list)
    targets: list[Place] = field(default_factory=list)
    spills: list[Place] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)
    num_dram_evicted: int = 0  # spilled or, without NVMe, dropped


class TierIndex:
    def __init__(self, num_slots: int, block_bytes: int, nvme_root: Path | None = None,
                 nvme_bytes: int | None = None):
        self.block_bytes = block_bytes
        self.nvme_root = nvme_root
        self.nvme_budget = nvme_bytes
        self._dram: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, LRU first
        self._nvme: OrderedDict[bytes, int] = OrderedDict()  # key -> file bytes
        self._nvme_used = 0
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._pins: Counter[bytes] = Counter()
        self._pending: dict[int, StorePlan] = {}
        self._pending_keys: set[bytes] = set()
        self._plan_ids = count(1)
        self.journal = KeyJournal()  # what a prefix-aware router is told
        if nvme_root is not None:
            for key, size in files.scan(nvme_root):
                self._nvme[key] = size
                self._nvme_used += size

    @property
    def has_nvme(self) -> bool:
        return self.nvme_root is not None

    @property
    def num_dram(self) -> int:
        return len(self._dram)

    @property
    def num_nvme(self) -> int:
        return len(self._nvme)

    def keys(self) -> list[bytes]:
        """Every loadable key (what a replica reports to a prefix-aware router)."""
        return [*self._dram, *self._nvme]

    def lookup(self, keys: list[bytes]) -> list[Place]:
        """Places of the longest loadable prefix of `keys`."""
        found: list[Place] = []
        for key in keys:
            slot = self._dram.get(key)
            if slot is None:
                if key not in self._nvme:
                    break
                slot = NVME
            found.append(Place(key, slot))
        return found

    def prepare_load(self, places: list[Place]) -> None:
        for place in places:
            self._pins[place.key] += 1
            lru = self._dram if place.slot != NVME else self._nvme
            if place.key in lru:
                lru.move_to_end(place.key)

    def complete_load(self, keys: list[bytes]) -> None:
        for key in keys:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def contains(self, key: bytes) -> bool:
        return key in self._dram or key in self._nvme or key in self._pending_keys

    def touch(self, keys: list[bytes]) -> None:
        for key in keys:
            for lru in (self._dram, self._nvme):
                if key in lru:
                    lru.move_to_end(key)

    def prepare_store(self, keys: list[bytes]) -> StorePlan:
        """Places for the keys not stored yet; keys that fit nowhere are skipped."""
        plan = StorePlan(next(self._plan_ids))
        for key in keys:
            if self.contains(key):
                continue
            place = self._dram_place(key, plan) or self._nvme_place(key, plan)
            if place is None:
                continue
            plan.keys.append(key)
            plan.targets.append(place)
            self._pending_keys.add(key)
        if plan.keys:
            self._pending[plan.plan_id] = plan
        return plan

    def _dram_place(self, key: bytes, plan: StorePlan) -> Place | None:
        if not self._free_slots:
            victim = self._evictable(self._dram)
            if victim is None:
                return None
            slot = self._dram.pop(victim)
            self.journal.removed(victim)
            plan.num_dram_evicted += 1
            if self.has_nvme and self._make_nvme_room(plan):
                plan.spills.append(Place(victim, slot))
                self._pending_keys.add(victim)
            self._free_slots.append(slot)
        return Place(key, self._free_slots.pop())

    def _nvme_place(self, key: bytes, plan: StorePlan) -> Place | None:
        if self.has_nvme and self._make_nvme_room(plan):
            return Place(key, NVME)
        return None

    def _make_nvme_room(self, plan: StorePlan) -> bool:
        """Reserve one block's bytes on NVMe, deleting LRU files; False if it cannot."""
        if self.nvme_budget is not None:
            while self._nvme_used + self.block_bytes > self.nvme_budget:
                victim = self._evictable(self._nvme)
                if victim is None:
                    return False
                self._nvme_used -= self._nvme.pop(victim)
                self.journal.removed(victim)
                plan.deletes.append(victim)
        self._nvme_used += self.block_bytes
        return True

    def _evictable(self, lru: OrderedDict[bytes, int]) -> bytes | None:
        return next((k for k in lru if k not in self._pins), None)

    def complete_store(self, plan_id: int, ok: bool = True) -> StorePlan | None:
        """The worker finished plan `plan_id`; its keys become loadable if `ok`."""
        plan = self._pending.pop(plan_id, None)
        if plan is None:
            return None
        for place in plan.spills:
            self._settle_nvme(place.key, ok)
        for place in plan.targets:
            if place.slot == NVME:
                self._settle_nvme(place.key, ok)
                continue
            self._pending_keys.discard(place.key)
            if ok:
                self._dram[place.key] = place.slot
                self.journal.added(place.key)
            else:
                self._free_slots.append(place.slot)
        return plan

    def _settle_nvme(self, key: bytes, ok: bool) -> None:
        self._pending_keys.discard(key)
        if ok:
            self._nvme[key] = self.block_bytes
            self.journal.added(key)
        else:
            self._nvme_used -= self.block_bytes

    def forget(self, keys: list[bytes]) -> None:
        """Drop keys whose data the worker found bad (a failed load or write)."""
        self.journal.removed_all(keys)
        for key in keys:
            slot = self._dram.pop(key, None)
            if slot is not None:
                self._free_slots.append(slot)
            size = self._nvme.pop(key, None)
            if size is not None:
                self._nvme_used -= size
