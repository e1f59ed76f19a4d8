"""One background thread running an asyncio loop: all transfer I/O of a worker.

The loop sleeps in epoll (UCX blocking progress, sockets) when there is nothing to do,
so an idle worker costs no CPU. It does not touch thread affinity: the thread inherits
whatever `VLLM_CPU_OMP_THREADS_BIND` gave the engine thread that created it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

T = TypeVar("T")


class IOLoop:
    def __init__(self, name: str = "kvtransfer-io"):
        self._loop = asyncio.new_event_loop()
        # asyncio keeps only weak references to tasks; hold every submitted one until
        # it finishes, or an idle one may be garbage-collected mid-await.
        self._inflight: set[concurrent.futures.Future] = set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop from any thread."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return fut

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (engine thread only)."""
        return self.submit(coro).result(timeout)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def stop(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        if not self._loop.is_running():
            return
        try:
            self.run(self._drain(drain), timeout=10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    @staticmethod
    async def _drain(drain: Callable[[], Awaitable[None]] | None) -> None:
        if drain is not None:
            await drain()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
