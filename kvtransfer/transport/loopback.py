"""In-process fake of the data plane: same contract as UcxTransport, plain copies.

Transports register under a unique address in a process-wide table; a send copies
into the matching posted receive (or waits for it, like a rendezvous send).
`fail_sends_after` makes a sender fail after that many messages, to test short and
failed transfers.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any, Awaitable

import numpy as np
import torch

from .base import PeerLink, Transport

_REGISTRY: dict[bytes, "LoopbackTransport"] = {}
_REGISTRY_LOCK = threading.Lock()
_IDS = itertools.count()


def _as_bytes(buffer: Any) -> np.ndarray:
    if isinstance(buffer, torch.Tensor):
        buffer = buffer.cpu().numpy()  # device tensors are not exercised in-process
    return np.asarray(buffer).reshape(-1).view(np.uint8)


class _LoopbackLink(PeerLink):
    def __init__(self, owner: "LoopbackTransport", peer: "LoopbackTransport"):
        self._owner = owner
        self._peer = peer

    async def send(self, buffer: Any, tag: int) -> None:
        owner = self._owner
        if owner.fail_sends_after is not None:
            if owner.num_sent >= owner.fail_sends_after:
                raise ConnectionError("loopback: injected send failure")
        owner.num_sent += 1
        await self._peer._deliver(_as_bytes(buffer), tag)


class LoopbackTransport(Transport):
    def __init__(self) -> None:
        self._address = f"loopback-{next(_IDS)}".encode()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._posted: dict[int, tuple[np.ndarray, asyncio.Future]] = {}
        self.fail_sends_after: int | None = None
        self.num_sent = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with _REGISTRY_LOCK:
            _REGISTRY[self._address] = self

    def address(self) -> bytes:
        return self._address

    async def connect(self, peer_address: bytes) -> PeerLink:
        with _REGISTRY_LOCK:
            peer = _REGISTRY.get(peer_address)
        if peer is None:
            raise ConnectionError(f"loopback: no transport at {peer_address!r}")
        return _LoopbackLink(self, peer)

    def post_recv(self, buffer: Any, tag: int) -> Awaitable[None]:
        assert self._loop is not None
        fut = self._loop.create_future()
        with self._lock:
            self._posted[tag] = (_as_bytes(buffer), fut)
        return fut

    async def _deliver(self, data: np.ndarray, tag: int) -> None:
        for _ in range(1000):  # a rendezvous send waits for its receive
            with self._lock:
                posted = self._posted.pop(tag, None)
            if posted is not None:
                break
            await asyncio.sleep(0.005)
        else:
            raise ConnectionError(f"loopback: no receive posted for tag {tag:#x}")
        dest, fut = posted
        if dest.nbytes != data.nbytes:
            self._complete(fut, ConnectionError("loopback: message size mismatch"))
            raise ConnectionError("loopback: message size mismatch")
        np.copyto(dest, data)
        self._complete(fut, None)

    def _complete(self, fut: asyncio.Future, error: Exception | None) -> None:
        def done() -> None:
            if not fut.done():
                fut.set_exception(error) if error else fut.set_result(None)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(done)

    def cancel_receives(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, {}
        for _, fut in posted.values():
            self._complete(fut, asyncio.CancelledError())

    async def close(self) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self._address, None)
