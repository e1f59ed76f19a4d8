"""Routing policies: given the pools' current load, pick a prefill replica (or none:
the decode replica prefills locally) and a decode replica.

Policies are pure: they see `ReplicaLoad` records and a `RouteRequest`, and return a
`Route`. The router actor owns the state they read.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import AbstractSet, Protocol

from serving.config import RouterConfig


@dataclass(slots=True)
class ReplicaLoad:
    replica_id: str
    role: str
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    reported_at: float
    counters: dict[str, int] = field(default_factory=dict)
    block_hashes: AbstractSet[bytes] = frozenset()  # KV blocks its tiers hold (prefix_aware)
    kv_transfer: dict | None = None  # serving.metrics.KVTransferTotals.as_dict()
    direct: dict | None = None  # {"node", "address"} of its serving.direct socket

    @property
    def queue(self) -> int:
        return self.num_running + self.num_waiting


@dataclass(frozen=True, slots=True)
class RouteRequest:
    num_prompt_tokens: int
    session: str | None = None
    may_disaggregate: bool = True  # False for requests P/D cannot serve (n > 1, echo, ...)
    block_hashes: tuple[bytes, ...] = ()  # the prompt's chained KV block hashes
    block_size: int = 32  # tokens per hashed block


@dataclass(frozen=True, slots=True)
class Route:
    decode: str
    prefill: str | None  # None: the decode replica prefills locally
    # remote | local_short | local_queue | local_unsupported | local_no_prefill
    # | local_cached (prefix_aware: the decode replica holds all but a short tail)
    reason: str
    matched_tokens: int = 0  # prompt tokens the chosen prefilling replica holds (prefix_aware)


class Policy(Protocol):
    def route(self, request: RouteRequest, prefill: list[ReplicaLoad],
              decode: list[ReplicaLoad]) -> Route: ...


def _least_loaded(replicas: list[ReplicaLoad]) -> ReplicaLoad:
    return min(replicas, key=lambda r: (r.queue, r.kv_cache_usage, r.replica_id))


def _in_turn(replicas: list[ReplicaLoad], turn: itertools.count) -> ReplicaLoad:
    ordered = sorted(replicas, key=lambda r: r.replica_id)
    return ordered[next(turn) % len(ordered)]


class LeastLoaded:
    """Fewest running + waiting requests (KV-cache usage breaks ties), always remote."""

    def __init__(self, config: RouterConfig):
        self.config = config

    def pick_decode(self, decode: list[ReplicaLoad]) -> ReplicaLoad:
        return _least_loaded(decode)

    def pick_prefill(self, prefill: list[ReplicaLoad]) -> ReplicaLoad:
        return _least_loaded(prefill)

    def local_reason(self, request: RouteRequest, prefill: list[ReplicaLoad],
                     decode: list[ReplicaLoad]) -> str | None:
        if not request.may_disaggregate:
            return "local_unsupported"
        if not prefill:
            return "local_no_prefill"
        return None

    def route(self, request: RouteRequest, prefill: list[ReplicaLoad],
              decode: list[ReplicaLoad]) -> Route:
        chosen = self.pick_decode(decode)
        reason = self.local_reason(request, prefill, decode)
        if reason is not None:
            return Route(chosen.replica_id, None, reason)
        return Route(chosen.replica_id, self.pick_prefill(prefill).replica_id, "remote")


class RoundRobin(LeastLoaded):
    """Each pool in turn, regardless of load."""

    def __init__(self, config: RouterConfig):
        super().__init__(config)
        self._decode_turn = itertools.count()
        self._prefill_turn = itertools.count()

    def pick_decode(self, decode: list[ReplicaLoad]) -> ReplicaLoad:
        return _in_turn(decode, self._decode_turn)

    def pick_prefill(self, prefill: list[ReplicaLoad]) -> ReplicaLoad:
        return _in_turn(prefill, self._prefill_turn)


class Conditional(LeastLoaded):
    """Least-loaded, but prefill on the decode replica when remote prefill would not
    pay off: a short prompt, or a prefill queue much longer than decode's."""

    def local_reason(self, request: RouteRequest, prefill: list[ReplicaLoad],
                     decode: list[ReplicaLoad]) -> str | None:
        reason = super().local_reason(request, prefill, decode)
        if reason is not None:
            return reason
        if request.num_prompt_tokens <= self.config.local_prefill_max_tokens:
            return "local_short"
        prefill_wait = sum(r.num_waiting for r in prefill) / len(prefill)
        decode_wait = sum(r.num_waiting for r in decode) / len(decode)
        if prefill_wait > self.config.prefill_queue_ratio * (decode_wait + 1):
            return "local_queue"
        return None


def matched_blocks(request: RouteRequest, held: AbstractSet[bytes]) -> int:
    """Leading blocks of the request a replica holds (hashes are chained: block i names
    the whole prefix up to it, and a tier loads only an unbroken prefix)."""
    n = 0
    for key in request.block_hashes:
        if key not in held:
            break
        n += 1
    return n


class PrefixAware(Conditional):
    """Conditional, but the replica that prefills (prefill pool, or decode when local)
    is the one whose reported block hashes (its tiers' index) cover the longest prefix
    of the prompt, less `prefix_tokens_per_request` tokens per request in its queue.
    A decode replica that holds all of the prompt but `local_prefill_max_tokens`
    prefills it itself ("local_cached"). A remote decode goes to the least-loaded
    replica, among equals the one holding fewest blocks (new prefixes spread out)."""

    def pick_decode(self, decode: list[ReplicaLoad]) -> ReplicaLoad:
        return min(decode, key=lambda r: (r.queue, r.kv_cache_usage, len(r.block_hashes),
                                          r.replica_id))

    def _best(self, request: RouteRequest, pool: list[ReplicaLoad]) -> tuple[ReplicaLoad, int]:
        weight = self.config.prefix_tokens_per_request
        scored = [(matched_blocks(request, r.block_hashes) * request.block_size, r)
                  for r in pool]
        matched, best = max(scored, key=lambda s: (s[0] - weight * s[1].queue,
                                                   -s[1].kv_cache_usage, s[1].replica_id))
        return best, matched

    def route(self, request: RouteRequest, prefill: list[ReplicaLoad],
              decode: list[ReplicaLoad]) -> Route:
        reason = self.local_reason(request, prefill, decode)
        if reason is not None:
            chosen, matched = self._best(request, decode)
            return Route(chosen.replica_id, None, reason, matched)
        holder, matched = self._best(request, decode)
        if matched and (request.num_prompt_tokens - matched
                        <= self.config.local_prefill_max_tokens):
            return Route(holder.replica_id, None, "local_cached", matched)
        chosen, matched = self._best(request, prefill)
        return Route(self.pick_decode(decode).replica_id, chosen.replica_id, "remote", matched)


POLICIES: dict[str, type[LeastLoaded]] = {
    "least_loaded": LeastLoaded, "round_robin": RoundRobin, "conditional": Conditional,
    "prefix_aware": PrefixAware}


def make_policy(config: RouterConfig) -> LeastLoaded:
    try:
        return POLICIES[config.policy](config)
    except KeyError:
        raise ValueError(f"unknown routing policy {config.policy!r}; known: "
                         f"{', '.join(POLICIES)}") from None
