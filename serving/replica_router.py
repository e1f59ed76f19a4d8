"""Serve's request router for engine pools: the replica our router actor chose.

The ingress passes the chosen replica as the `replica_id` keyword of the call; when it
is absent or that replica is gone, Serve's power-of-two-choices picks as usual.
"""

from __future__ import annotations

from typing import List, Optional

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica


class PinnedReplicaRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        target = pending_request.kwargs.get("replica_id") if pending_request else None
        if target is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == target:
                    return [[replica]]
        return await super().choose_replicas(candidate_replicas, pending_request)
