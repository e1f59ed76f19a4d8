"""Ports chosen for servers that bind them later (serving/ports.py)."""

from __future__ import annotations

import socket

from serving.ports import LOWEST, _ephemeral_low, free_port


def test_a_free_port_is_bindable_and_outside_the_kernels_ephemeral_range():
    low = _ephemeral_low()
    for _ in range(20):
        port = free_port()
        if low - LOWEST > 100:
            assert LOWEST <= port < low - 1
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
