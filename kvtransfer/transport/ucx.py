"""ucxx transport: the fast path measured in DESIGN.md and nothing else.

- endpoints come from worker addresses with endpoint error handling off (error handling
  makes UCX fall back to tcp/lo here; the control channel detects dead peers instead);
- progress is event driven on the I/O loop: the loop sleeps in epoll on the UCX
  worker's fd; on a wake-up (or after posting work) we progress, collect completed
  requests and re-arm. ucxx's own asyncio layer is not used: its "blocking" mode never
  re-arms after the first event and its request.wait() polls with sleep(0) — both spin
  a core. Without Python futures, completion is read from `request.completed`;
- tags are used as given; the receiver picks them per pull.

On GPU boxes the same code moves CUDA memory: the buffers are CUDA tensors and UCX
chooses cuda_ipc / rdma by itself (see kvtransfer/README.md for the UCX settings).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from .base import PeerLink, Transport

_SAFETY_TICK_S = 1.0  # progress now and then even without an event (UCX's advice)


class _Progress:
    """Drives one UCX worker from an asyncio loop without polling."""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop):
        self._worker = worker
        self._loop = loop
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._scheduled = False
        worker.init_blocking_progress_mode()
        self._fd = worker.epoll_file_descriptor
        loop.add_reader(self._fd, self._drive)
        self._tick = loop.call_later(_SAFETY_TICK_S, self._on_tick)

    def track(self, request: Any) -> asyncio.Future:
        fut = self._loop.create_future()
        self._pending.append((request, fut))
        self.kick()
        return fut

    def kick(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drive)

    def _on_tick(self) -> None:
        self._drive()
        self._tick = self._loop.call_later(_SAFETY_TICK_S, self._on_tick)

    def _drive(self) -> None:
        self._scheduled = False
        while True:
            self._worker.progress()
            self._reap()
            if self._worker.arm():  # armed: the next event wakes the fd
                return

    def _reap(self) -> None:
        still = []
        for request, fut in self._pending:
            if not request.completed:
                still.append((request, fut))
                continue
            if fut.done():
                continue
            try:
                request.check_error()
                fut.set_result(None)
            except Exception as e:  # UCXCanceled, truncation, peer errors
                fut.set_exception(ConnectionError(f"ucx request failed: {e!r}"))
        self._pending = still

    def close(self) -> None:
        self._tick.cancel()
        self._loop.remove_reader(self._fd)


class _UcxLink(PeerLink):
    def __init__(self, endpoint: Any, progress: _Progress):
        self._ep = endpoint
        self._progress = progress

    async def send(self, buffer: Any, tag: int) -> None:
        from ucxx._lib.arr import Array
        from ucxx._lib.libucxx import UCXXTag

        await self._progress.track(self._ep.tag_send(Array(buffer), UCXXTag(tag)))


class UcxTransport(Transport):
    def __init__(self) -> None:
        self._worker: Any = None
        self._progress: _Progress | None = None

    async def start(self) -> None:
        import ucxx._lib.libucxx as ucx_api

        context = ucx_api.UCXContext(
            {}, feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP)
        )
        self._worker = ucx_api.UCXWorker(context)
        self._progress = _Progress(self._worker, asyncio.get_running_loop())

    def address(self) -> bytes:
        return self._worker.address.tobytes()

    async def connect(self, peer_address: bytes) -> PeerLink:
        import ucxx._lib.libucxx as ucx_api

        addr = ucx_api.UCXAddress.create_from_buffer(peer_address)
        ep = ucx_api.UCXEndpoint.create_from_worker_address(self._worker, addr, False)
        self._progress.kick()
        return _UcxLink(ep, self._progress)

    def post_recv(self, buffer: Any, tag: int) -> Awaitable[None]:
        from ucxx._lib.arr import Array
        from ucxx._lib.libucxx import UCXXTag, UCXXTagMaskFull

        return self._progress.track(
            self._worker.tag_recv(Array(buffer), UCXXTag(tag), UCXXTagMaskFull))

    def cancel_receives(self) -> None:
        self._worker.cancel_inflight_requests()
        self._progress.kick()

    async def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        self._progress = None
