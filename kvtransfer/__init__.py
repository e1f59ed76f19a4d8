"""kvtransfer: a vLLM KV connector that moves prefill KV blocks to decode over UCX.

`from kvtransfer import PDConnector` (imported lazily: vLLM's factory asks this package
for the class by name, and the scheduler process should not pay for worker imports).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PDConnector", "PDConnectorConfig"]


def __getattr__(name: str) -> Any:
    if name == "PDConnector":
        from .connector import PDConnector

        return PDConnector
    if name == "PDConnectorConfig":
        from .config import PDConnectorConfig

        return PDConnectorConfig
    raise AttributeError(f"module 'kvtransfer' has no attribute {name!r}")
