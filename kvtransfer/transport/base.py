"""The data-plane contract: move byte buffers between two processes' registered memory.

All methods are called on the worker's I/O event loop. Buffers are what
`kvtransfer.memory.KVRegion.view` returns (host: numpy, device: torch CUDA tensor).
Control messages never travel here; they use the control channel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Awaitable


class PeerLink(ABC):
    """A sending handle to one peer, made from the peer's transport address."""

    @abstractmethod
    async def send(self, buffer: Any, tag: int) -> None:
        """Send `buffer` to the peer's receive posted with `tag`. Raises on failure."""


class Transport(ABC):
    @abstractmethod
    async def start(self) -> None:
        """Create the endpoint machinery; must run on the I/O loop."""

    @abstractmethod
    def address(self) -> bytes:
        """Opaque address a peer passes to `connect`."""

    @abstractmethod
    async def connect(self, peer_address: bytes) -> PeerLink:
        """Open a sending link to a peer (once per peer; the caller caches it)."""

    @abstractmethod
    def post_recv(self, buffer: Any, tag: int) -> Awaitable[None]:
        """Post a receive of exactly `buffer`'s size for `tag`; await it for completion.

        Posting happens before this returns, so a sender may start right after.
        """

    @abstractmethod
    def cancel_receives(self) -> None:
        """Cancel every posted receive, so no late data lands in memory handed back to
        vLLM. Coarse on purpose (UCX cancels per worker); callers fail the pulls hit."""

    @abstractmethod
    async def close(self) -> None:
        """Release the endpoint machinery."""
