"""`build_app(args)`: the Serve application that `serve run`, `pdserve serve` and a
RayService's serveConfigV2 all deploy."""

from __future__ import annotations

from typing import Any

from ray import serve

from serving.config import AppConfig, Role
from serving.engine import engine_deployment
from serving.ingress import ingress_deployment
from serving.router import router_deployment

POOL_DEPLOYMENT_NAMES = {Role.AGGREGATED: "AggregatedEngine", Role.PREFILL: "PrefillEngine",
                         Role.DECODE: "DecodeEngine"}


def build_app(args: dict[str, Any] | AppConfig) -> serve.Application:
    """Validate the config first, then bind router, engine pool(s) and ingress."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    data = config.model_dump()
    router = router_deployment().bind(config.router.model_dump())
    engines = {role.value: engine_deployment(pool, role, POOL_DEPLOYMENT_NAMES[role]).bind(
                   data, role.value, router)
               for role, pool in config.pools().items()}
    return ingress_deployment().bind(data, router, **engines)
