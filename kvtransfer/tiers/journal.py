"""Which keys a replica's tiers hold, told to the outside as numbered deltas.

The tier index calls `added`/`removed` whenever a key becomes loadable or stops being
so; `take` returns what changed since the last call (net: a key added and removed in
between is reported once, as removed). The first report is a full snapshot, so a
reader that starts from nothing ends up with the index's set. Reports travel with the
connector's stats (`PDConnectorStats.data["tier_keys"]`) once per engine step that
changed something, in order; a reader that sees a gap in `seq` has missed one.

    {"seq": 7, "full": False, "added": [key, ...], "removed": [key, ...]}
"""

from __future__ import annotations

from typing import Callable, Iterable


class KeyJournal:
    def __init__(self) -> None:
        self._changes: dict[bytes, bool] = {}  # key -> held now
        self._seq = 0

    def added(self, key: bytes) -> None:
        self._changes[key] = True

    def removed(self, key: bytes) -> None:
        self._changes[key] = False

    def removed_all(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._changes[key] = False

    def take(self, snapshot: Callable[[], list[bytes]]) -> dict | None:
        """The next report, or None when nothing changed since the last one."""
        if self._seq == 0:
            self._changes.clear()
            self._seq = 1
            return {"seq": 1, "full": True, "added": list(snapshot()), "removed": []}
        if not self._changes:
            return None
        self._seq += 1
        changes, self._changes = self._changes, {}
        return {"seq": self._seq, "full": False,
                "added": [k for k, held in changes.items() if held],
                "removed": [k for k, held in changes.items() if not held]}
