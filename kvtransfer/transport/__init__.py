"""Transports by name, imported only when chosen."""

from __future__ import annotations

import importlib

from .base import PeerLink, Transport

_TRANSPORTS = {
    "ucx": "kvtransfer.transport.ucx:UcxTransport",
    "loopback": "kvtransfer.transport.loopback:LoopbackTransport",
}


def make_transport(name: str) -> Transport:
    try:
        module, cls = _TRANSPORTS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; known: {sorted(_TRANSPORTS)}") from None
    return getattr(importlib.import_module(module), cls)()


__all__ = ["PeerLink", "Transport", "make_transport"]
