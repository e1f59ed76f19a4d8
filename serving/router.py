"""The router: one actor that holds the routing state of every engine replica and
answers `assign()` for each P/D request.

The actor is a plain Ray actor, called directly (a Ray actor call costs 1-3 ms here, a
Serve handle call ~4 ms, and every P/D request makes one); the ingress on its node
calls it over its serving.direct socket instead (under 1 ms). Serve still manages its
life: the `Router` deployment (`RouterHost`) creates and owns it, so it dies and comes
back with that replica, and hands its handle to the ingress and the engines, whose
`RouterClient` fetches it again after the actor is gone.

Engine replicas report their load (running and waiting requests, KV-cache usage)
when it changes, at most every 0.5 s, and every 2 s as a heartbeat. A replica that the
ingress saw fail is not assigned until it reports again after the failure. One that
has not reported for `STALE_AFTER_S` is stale, not dead (its event loop can be held up:
a long tokenization, a paused process): it is assigned only while no replica of its
role is fresh, so that one late report does not turn every request away, and it is
forgotten after `FORGET_AFTER_S`. A stale replica that is in fact gone fails its
request at the ingress, which marks it failed.

Prefix-aware routing: replicas with KV tiers add the changes to the block hashes they
hold (`serving.prefix`); `report` answers `{RESYNC: True}` when it needs the whole set.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import fields

import ray
from ray import serve
from ray.exceptions import RayActorError

from serving.config import RouterConfig
from serving.direct import DirectClients, DirectServer, DirectUnavailable, ReplicaGone
from serving.errors import OverloadedError
from serving.policies import ReplicaLoad, RouteRequest, make_policy
from serving.prefix import RESYNC, BlockSets

STALE_AFTER_S = 5.0
FORGET_AFTER_S = 60.0
MAX_SESSIONS = 100_000
DIRECT_METHODS = ("assign", "mark_failed", "snapshot", "hash_spec", "report")


class Router:
    def __init__(self, config: dict | None = None) -> None:
        self.config = RouterConfig.model_validate(config or {})
        self.policy = make_policy(self.config)
        self.replicas: dict[str, ReplicaLoad] = {}
        self.failed_at: dict[str, float] = {}
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self.blocks = BlockSets()
        self._hash_spec: dict | None = None
        self._direct: DirectServer | None = None

    def report(self, stats: dict) -> dict | None:
        """Called by each engine replica with its `EngineServer.stats()`; answers
        `{RESYNC: True}` when the replica must send all its block hashes next time."""
        now = time.monotonic()
        replica_id = stats["replica_id"]
        if now - self.failed_at.get(replica_id, -STALE_AFTER_S) < 1.0:
            return {RESYNC: True}  # a report sent before the failure was seen
        self.failed_at.pop(replica_id, None)
        in_sync = True
        if "blocks" in stats:
            in_sync = self.blocks.apply(replica_id, stats["blocks"])
        if stats.get("hash_spec"):
            self._hash_spec = stats["hash_spec"]
        self.replicas[replica_id] = ReplicaLoad(
            replica_id=replica_id, role=stats["role"], num_running=stats["num_running"],
            num_waiting=stats["num_waiting"], kv_cache_usage=stats["kv_cache_usage"],
            reported_at=now, counters=dict(stats.get("counters") or {}),
            block_hashes=self.blocks.get(replica_id), kv_transfer=stats.get("kv_transfer"),
            direct=stats.get("direct"))
        return None if in_sync else {RESYNC: True}

    def hash_spec(self) -> dict | None:
        """How the engines hash KV blocks (`serving.prefix.HashSpec` fields), once one
        has reported; the ingress hashes prompts the same way."""
        return self._hash_spec

    def mark_failed(self, replica_id: str) -> None:
        """The ingress saw this replica fail: stop assigning it until it reports again."""
        self.replicas.pop(replica_id, None)
        self.blocks.drop(replica_id)
        self.failed_at[replica_id] = time.monotonic()

    def snapshot(self) -> list[dict]:
        """Live replicas' latest load; of their block hashes, only the count."""
        out = []
        for load in self._live():
            row = {f.name: getattr(load, f.name) for f in fields(load)
                   if f.name not in ("block_hashes", "direct")}
            row["num_blocks_held"] = len(load.block_hashes)
            out.append(row)
        return out

    def assign(self, num_prompt_tokens: int, session: str | None = None,
               may_disaggregate: bool = True, block_hashes: tuple[bytes, ...] = (),
               block_size: int = 32) -> dict:
        """Pick {"decode": id, "prefill": id or None, "reason": ..., "matched_tokens": n,
        "policy_s": seconds the policy took, "direct": {role: the replica's
        serving.direct endpoint or None}} for one request; `block_hashes` are the
        prompt's (prefix_aware).

        Raises OverloadedError when no decode replica is live.
        """
        live = self._live()
        prefill = [r for r in live if r.role == "prefill"]
        decode = [r for r in live if r.role == "decode"]
        if not decode:
            raise OverloadedError("no decode replica is available")
        started = time.perf_counter()
        route = self.policy.route(RouteRequest(num_prompt_tokens, session, may_disaggregate,
                                               tuple(block_hashes), block_size),
                                  prefill, decode)
        policy_s = time.perf_counter() - started
        decode_id = self._sticky(session, route.decode, {r.replica_id for r in decode})
        # Count the request now, so assignments between two reports spread out.
        self.replicas[decode_id].num_waiting += 1
        if route.prefill is not None:
            self.replicas[route.prefill].num_waiting += 1
        direct = {"decode": self.replicas[decode_id].direct,
                  "prefill": (self.replicas[route.prefill].direct
                              if route.prefill is not None else None)}
        return {"decode": decode_id, "prefill": route.prefill, "reason": route.reason,
                "matched_tokens": route.matched_tokens, "policy_s": policy_s,
                "direct": direct}

    async def direct_endpoint(self) -> dict:
        """This actor's serving.direct socket (started on first ask, on the actor's
        event loop, where Ray runs every method of an actor with an async one): the
        ingress calls `assign` there, about 2 ms less per request than a Ray call."""
        if self._direct is None:
            self._direct = DirectServer({name: getattr(self, name) for name in DIRECT_METHODS},
                                        {})
        return {"node": ray.get_runtime_context().get_node_id(),
                "address": self._direct.address}

    def _sticky(self, session: str | None, chosen: str, live_decode: set[str]) -> str:
        if session is None:
            return chosen
        previous = self.sessions.get(session)
        if previous in live_decode:
            self.sessions.move_to_end(session)
            return previous
        self.sessions[session] = chosen
        if len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return chosen

    def _live(self) -> list[ReplicaLoad]:
        """The fresh replicas, and the stale ones of roles that have no fresh one."""
        now = time.monotonic()
        for replica_id in [r for r, load in self.replicas.items()
                           if now - load.reported_at > FORGET_AFTER_S]:
            del self.replicas[replica_id]
            self.blocks.drop(replica_id)
        fresh_roles = {load.role for load in self.replicas.values()
                       if now - load.reported_at <= STALE_AFTER_S}
        return [load for load in self.replicas.values()
                if load.role not in fresh_roles or now - load.reported_at <= STALE_AFTER_S]


class RouterHost:
    """The Serve replica that owns the router actor (see the module docstring)."""

    def __init__(self, config: dict | None = None) -> None:
        self.actor = ray.remote(Router).options(num_cpus=0).remote(config)

    def actor_handle(self) -> ray.actor.ActorHandle:
        return self.actor

    async def check_health(self) -> None:
        await self.actor.snapshot.remote()  # a dead actor fails this replica: Serve restarts it


class RouterClient:
    """Calls the router actor, given the Serve handle of the `Router` deployment; with
    `direct` (the ingress's clients), over the actor's direct socket when it is on this
    node."""

    def __init__(self, host: serve.handle.DeploymentHandle,
                 direct: DirectClients | None = None) -> None:
        self._host = host
        self._actor: ray.actor.ActorHandle | None = None
        self._direct = direct
        self._endpoint: dict | None = None

    async def call(self, method: str, *args):
        """`Router.<method>(*args)`; its exceptions propagate as they are."""
        for attempt in range(2):
            if self._actor is None:
                self._actor = await self._host.actor_handle.remote()
                if self._direct is not None:
                    self._endpoint = await self._actor.direct_endpoint.remote()
            client = self._direct.get(self._endpoint) if self._direct is not None else None
            try:
                if client is not None:
                    try:
                        return await client.call(method, *args)
                    except DirectUnavailable:
                        pass  # not sent
                return await getattr(self._actor, method).remote(*args)
            except (RayActorError, ReplicaGone):  # ActorDiedError, ActorUnavailableError
                self._actor = None  # the host replica is being replaced; ask it again
                if attempt:
                    raise


def router_deployment() -> serve.Deployment:
    return serve.deployment(RouterHost).options(
        name="Router", num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False})
