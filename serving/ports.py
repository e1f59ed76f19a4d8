"""Free ports for servers that are told their port before they bind it."""

from __future__ import annotations

import random
import socket

# Ray's workers listen on 10002-19999 unless told otherwise (`--min-worker-port`).
LOWEST = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, below the kernel's ephemeral range when there is room.
    A port the kernel picks (binding port 0) comes from that range, and until the
    server binds it, any process binding port 0 meanwhile may be handed it too: Ray's
    daemons and workers, UCX, kvtransfer's handshake. Once, a Serve ingress starting
    17 s after its port was chosen found it taken, and the app failed to deploy. (The
    next port stays below the range too: `pdserve serve` gives its ingress two.)"""
    low = _ephemeral_low()
    if low - LOWEST > 100:
        for port in random.sample(range(LOWEST, low - 1), 50):
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:  # in use
                    continue
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return LOWEST  # unknown: let the kernel pick
