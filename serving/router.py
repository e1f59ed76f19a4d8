"""The router: one actor that holds the routing state of every engine replica.

Engine replicas report their load (running and waiting requests, KV-cache usage)
every ~0.5 s; the ingress reads a snapshot for metrics and health. A replica that
has not reported for `STALE_AFTER_S` is treated as gone.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ray import serve

STALE_AFTER_S = 5.0


@dataclass(slots=True)
class ReplicaLoad:
    replica_id: str
    role: str
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    reported_at: float


class Router:
    def __init__(self) -> None:
        self.replicas: dict[str, ReplicaLoad] = {}

    def report(self, stats: dict) -> None:
        """Called by each engine replica with its `EngineServer.stats()`."""
        self.replicas[stats["replica_id"]] = ReplicaLoad(
            replica_id=stats["replica_id"], role=stats["role"],
            num_running=stats["num_running"], num_waiting=stats["num_waiting"],
            kv_cache_usage=stats["kv_cache_usage"], reported_at=time.monotonic())

    def snapshot(self) -> list[dict]:
        """Live replicas' latest load; forgets replicas that stopped reporting."""
        now = time.monotonic()
        for replica_id in [r for r, load in self.replicas.items()
                           if now - load.reported_at > STALE_AFTER_S]:
            del self.replicas[replica_id]
        return [asdict(load) for load in self.replicas.values()]


def router_deployment() -> serve.Deployment:
    return serve.deployment(Router).options(
        name="Router", num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False})
