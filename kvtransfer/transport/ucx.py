"""ucxx transport: the fast path measured in DESIGN.md and nothing else.

- endpoints come from worker addresses with endpoint error handling off (error handling
  makes UCX fall back to tcp/lo here; the control channel detects dead peers instead);
- progress is "blocking": the I/O loop sleeps on the worker's epoll fd, so an idle
  process does not spin;
- tags are used as given (force_tag), the receiver picks them per pull.

On GPU boxes the same code moves CUDA memory: the buffers are CUDA tensors and UCX
chooses cuda_ipc / rdma by itself (see kvtransfer/README.md for the UCX settings).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from .base import PeerLink, Transport


class _UcxLink(PeerLink):
    def __init__(self, endpoint: Any):
        self._ep = endpoint

    async def send(self, buffer: Any, tag: int) -> None:
        await self._ep.send(buffer, tag=tag, force_tag=True)


class UcxTransport(Transport):
    def __init__(self) -> None:
        self._ctx: Any = None

    async def start(self) -> None:
        from ucxx._lib_async.application_context import ApplicationContext

        self._ctx = ApplicationContext(progress_mode="blocking")

    def address(self) -> bytes:
        return self._ctx.worker_address.tobytes()

    async def connect(self, peer_address: bytes) -> PeerLink:
        import ucxx._lib.libucxx as ucx_api

        addr = ucx_api.UCXAddress.create_from_buffer(peer_address)
        ep = await self._ctx.create_endpoint_from_worker_address(
            addr, endpoint_error_handling=False
        )
        return _UcxLink(ep)

    def post_recv(self, buffer: Any, tag: int) -> Awaitable[None]:
        from ucxx._lib.arr import Array
        from ucxx.types import Tag

        request = self._ctx.worker.tag_recv(Array(buffer), Tag(tag))
        return asyncio.ensure_future(request.wait())

    def cancel_receives(self) -> None:
        self._ctx.worker.cancel_inflight_requests()

    async def close(self) -> None:
        self._ctx = None
