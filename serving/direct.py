"""Same-node calls from the ingress to the router actor and engine replicas that skip
Ray: Serve handles and actor calls.

A Serve handle call costs about 4 ms on a loaded 2-core box (the caller's request
router, the replica's queue bookkeeping, Ray's task hops), a Ray actor call 1-3 ms, and
a streamed reply pays a Ray hop per token. A P/D request makes three such calls before
its first token (router, prefill, decode), so the router actor and each engine replica
of a fixed-size P/D pool also listen on a ZeroMQ ROUTER socket, a Unix socket in a
private directory (mode 0700: only this user's processes can connect), and tell their
address and node: engines with their load reports, which the router hands out with
each assignment, the router when the ingress asks for its handle. The ingress on that
node calls them there. The ingress on another node, an autoscaled pool (Serve's
autoscaler counts the requests its handles route), or a socket that does not take the
call, goes through Ray as before.

Wire format, msgpack frames. Caller -> callee: [call id, method, (args)], or
[call id, b"", b""] to cancel. Callee -> caller: [call id, kind, payload], kind one of
RESULT (a unary call's value), ITEM (a stream's next item), END (a stream is over),
ERROR (an OpenAI error body's `error`: message, type, param, code).

The caller watches its connection: a callee that dies closes the socket, and every
call in flight on it fails with `ReplicaGone`, as a Ray call fails with
`ActorDiedError`. Serve's graceful shutdown of a replica waits only for the requests
its handles routed; a stopping engine replica drains its direct calls itself.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import shutil
import tempfile
import time
from typing import Any, AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from serving.errors import ServingError, error_for

logger = logging.getLogger("pdserve.direct")

RESULT, ITEM, END, ERROR = b"r", b"i", b"e", b"x"
CONNECT_TIMEOUT_S = 1.0
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class DirectUnavailable(Exception):
    """The call was not sent (no connection to the replica): use the Serve handle."""


class ReplicaGone(Exception):
    """The replica's socket closed while the call was in flight (it died or stopped)."""


class RemoteError(ServingError):
    """An error the callee answered as a client-facing one (a ServingError or a
    validation error there), as the caller should pass it on."""

    def __init__(self, status: int, err_type: str, message: str, param: str | None):
        super().__init__(message, param=param)
        self.status, self.type = status, err_type


class _CallerGone(Exception):
    pass


class DirectServer:
    """Serves `unary` functions (plain or coroutine) and `streams` (async generators) of
    an actor, on its event loop."""

    def __init__(self, unary: dict[str, Callable[..., Any]],
                 streams: dict[str, Callable[..., AsyncIterator[Any]]]):
        self._unary, self._streams = unary, streams
        self._dir = tempfile.mkdtemp(prefix="pdserve-")  # mode 0700
        self.address = f"ipc://{self._dir}/calls.sock"
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished caller: stop its call
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.address)
        self._calls: dict[tuple[bytes, bytes], asyncio.Task] = {}
        self._loop_task = self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 4:
                logger.warning("direct call with %d frames dropped", len(frames))
                continue
            caller, call_id, method, payload = frames
            key = (caller, call_id)
            if not method:
                task = self._calls.get(key)
                if task is not None:
                    task.cancel()
                continue
            self._calls[key] = asyncio.create_task(self._run(key, method.decode(), payload))

    async def _run(self, key: tuple[bytes, bytes], method: str, payload: bytes) -> None:
        try:
            args = _decode(payload)
            if method in self._unary:
                result = self._unary[method](*args)
                if inspect.isawaitable(result):
                    result = await result
                self._send(key, RESULT, result)
            elif method in self._streams:
                items = self._streams[method](*args)
                try:
                    async for item in items:
                        self._send(key, ITEM, item)
                finally:
                    await items.aclose()  # a dropped stream aborts its engine request
                self._send(key, END, None)
            else:
                raise ValueError(f"no method {method!r}")
        except asyncio.CancelledError:
            pass
        except _CallerGone as exc:
            logger.debug("direct call %s dropped: %s", method, exc)
        except Exception as exc:
            status, body = error_for(exc, "direct call")  # logs a 500's traceback here
            err = body["error"]
            if status == 500:
                err["message"] = f"{type(exc).__name__}: {exc}"
            try:
                self._send(key, ERROR, err)
            except _CallerGone:
                pass
        finally:
            self._calls.pop(key, None)

    def _send(self, key: tuple[bytes, bytes], kind: bytes, value: Any) -> None:
        try:
            _send_now(self._sock, [key[0], key[1], kind, _encode(value)])
        except zmq.ZMQError as exc:  # EHOSTUNREACH (ROUTER_MANDATORY): the caller is gone
            raise _CallerGone(str(exc)) from exc

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the calls in flight to end (new ones are still
        served: the caller stops sending them). Returns how many are left."""
        deadline = time.monotonic() + timeout_s
        while self._calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._calls)

    def close(self) -> None:
        """Stop serving; callable from any thread (a replica's destructor)."""
        shutil.rmtree(self._dir, ignore_errors=True)
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._close()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        self._loop_task.cancel()
        for task in list(self._calls.values()):
            task.cancel()
        self._sock.close(linger=0)


class DirectClient:
    """The ingress's connection to one replica's `DirectServer`."""

    def __init__(self, address: str):
        self.address = address
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # send only over a live connection
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self._sock.connect(address)
        self._connected = asyncio.Event()
        self.broken = False
        self._ids = itertools.count()
        self._pending: dict[bytes, asyncio.Future | asyncio.Queue] = {}
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]

    async def call(self, method: str, *args: Any) -> Any:
        """A unary call's value; raises DirectUnavailable (not sent), ReplicaGone,
        RemoteError (a 4xx answer) or RuntimeError (the replica failed)."""
        call_id = await self._send(method, args)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            kind, value = await future
        except asyncio.CancelledError:
            self._cancel(call_id)
            raise
        return _value_or_raise(kind, value)

    async def stream(self, method: str, *args: Any) -> "DirectStream":
        """A stream's items, as an async iterator with `cancel()` (a Serve streaming
        response's interface); raises DirectUnavailable if the call was not sent."""
        call_id = await self._send(method, args)
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[call_id] = queue
        return DirectStream(self, call_id, queue)

    async def _send(self, method: str, args: tuple) -> bytes:
        if not self._connected.is_set() and not self.broken:
            try:
                await asyncio.wait_for(self._connected.wait(), CONNECT_TIMEOUT_S)
            except asyncio.TimeoutError:
                self._break()
        if self.broken:
            raise DirectUnavailable(f"no connection to {self.address}")
        call_id = next(self._ids).to_bytes(8, "little")
        try:
            _send_now(self._sock, [call_id, method.encode(), _encode(args)])
        except zmq.Again as exc:  # IMMEDIATE: no completed connection right now
            raise DirectUnavailable(f"no connection to {self.address}") from exc
        return call_id

    def _cancel(self, call_id: bytes) -> None:
        """Stop a call the replica may still be running."""
        if self._pending.pop(call_id, None) is not None and not self.broken:
            try:
                _send_now(self._sock, [call_id, b"", b""])
            except zmq.ZMQError:
                pass

    async def _read(self) -> None:
        while True:
            call_id, kind, payload = await self._sock.recv_multipart()
            waiter = self._pending.get(call_id)
            if waiter is None:  # cancelled meanwhile
                continue
            if kind != ITEM:  # the call is over on the replica's side
                del self._pending[call_id]
            value = _decode(payload)
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait((kind, value))
            elif not waiter.done():
                waiter.set_result((kind, value))

    async def _watch(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            event = (await recv_monitor_message(self._monitor))["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # IMMEDIATE sends from here on
                self._connected.set()
            else:
                self._break()
                return

    def _break(self) -> None:
        """The replica's end closed: fail what is in flight, take no more calls."""
        if self.broken:
            return
        self.broken = True
        gone = ReplicaGone(f"engine replica at {self.address} went away")
        for waiter in self._pending.values():
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait((None, gone))
            elif not waiter.done():
                waiter.set_exception(gone)
        self._pending.clear()

    def close(self) -> None:
        self._break()
        for task in self._tasks:
            task.cancel()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)


class DirectStream:
    def __init__(self, client: DirectClient, call_id: bytes, queue: asyncio.Queue):
        self._client, self._call_id, self._queue = client, call_id, queue
        self._done = False

    def __aiter__(self) -> "DirectStream":
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        kind, value = await self._queue.get()
        if kind == ITEM:
            return value
        self._done = True
        if kind == END:
            raise StopAsyncIteration
        if kind is None:
            raise value
        return _value_or_raise(kind, value)

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._client._cancel(self._call_id)


def _send_now(sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
    """Send at once or raise (zmq.Again, EHOSTUNREACH): pyzmq tries a NOBLOCK send on
    the spot and returns it as a finished future. Nothing waits, so frames of one stream
    never overtake each other."""
    sock.send_multipart(frames, flags=zmq.NOBLOCK).result()


def _value_or_raise(kind: bytes, value: Any) -> Any:
    if kind != ERROR:
        return value
    if value.get("code", 500) != 500:
        raise RemoteError(value["code"], value["type"], value["message"], value.get("param"))
    raise RuntimeError(f"engine replica failed: {value['message']}")


class DirectClients:
    """The ingress's clients, one per replica address on this node."""

    def __init__(self) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self._clients: dict[str, DirectClient] = {}
        self._gone: set[str] = set()  # a replica's socket never comes back: new ones get new

    def get(self, endpoint: dict | None) -> DirectClient | None:
        """A client for a replica's reported `{"node", "address"}` if it is on this node
        and its socket has not closed; None: use the Serve handle."""
        if not endpoint or endpoint.get("node") != self.node_id:
            return None
        address = endpoint["address"]
        if address in self._gone:
            return None
        client = self._clients.get(address)
        if client is not None and client.broken:
            client.close()
            del self._clients[address]
            self._gone.add(address)
            return None
        if client is None:
            client = self._clients[address] = DirectClient(address)
        return client

