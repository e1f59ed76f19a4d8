"""Same-node calls from the ingress to the router actor and engine replicas that skip
Ray: Serve handles and actor calls.

A Serve handle call costs about 4 ms on a loaded 2-core box (the caller's request
router, the replica's queue bookkeeping, Ray's task hops), a Ray actor call 1-3 ms, and
a streamed reply pays a Ray hop per token. A P/D request makes three such calls before
its first token (router, prefill, decode), so the router actor and each engine replica
of a fixed-size P/D pool also listen on an abstract Unix socket (Linux's namespace of
socket names: no file, so a replica that is killed leaves nothing behind; a connection
from another user's process is closed unanswered, by its peer credentials), and tell
their address (`unix://@name`) and node:
engines with their load reports, which the router hands out with each assignment, the
router when the ingress asks for its handle. The ingress on that node calls them there.
The ingress on another node, an autoscaled pool (Serve's autoscaler counts the requests
its handles route), or a socket that does not take the call, goes through Ray as before.

The socket is a plain stream socket served by the actor's own event loop: a message
costs one wake-up of the receiving loop, no I/O thread in between (a ZeroMQ socket here
took 0.4-0.6 ms per round trip against 0.15 ms, its I/O threads waking on both sides).

Wire format: frames of a 4-byte little-endian length and a msgpack array. Caller ->
callee: [call id, method, args], or [call id] to cancel. Callee -> caller: [call id,
kind, value], kind one of RESULT (a unary call's value), ITEM (a stream's next item),
END (a stream is over), ERROR (an OpenAI error body's `error`: message, type, param,
code). Frames of one connection arrive in order.

A callee that dies or stops closes its connections, and every call in flight on them
fails with `ReplicaGone`, as a Ray call fails with `ActorDiedError`; a caller that goes
away cancels its calls. Serve's graceful shutdown of a replica waits only for the
requests its handles routed; a stopping engine replica drains its direct calls itself.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import socket
import struct
import time
import uuid
from typing import Any, AsyncIterator, Callable

import msgspec

from serving.errors import ServingError, error_for

logger = logging.getLogger("pdserve.direct")

RESULT, ITEM, END, ERROR = "r", "i", "e", "x"
CONNECT_TIMEOUT_S = 1.0
SCHEME = "unix://"
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_LENGTH = struct.Struct("<I")


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


class _Frames(asyncio.Protocol):
    """One connection: whole messages in (`on_message`), `send` out, `on_lost` once."""

    def __init__(self, on_message: Callable[["_Frames", list], None],
                 on_lost: Callable[["_Frames"], None],
                 admit: Callable[[asyncio.BaseTransport], bool] | None = None):
        self._on_message, self._on_lost, self._admit = on_message, on_lost, admit
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admit is not None and not self._admit(transport):
            transport.close()  # connection_lost follows: on_lost drops it
            return
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.transport is None:  # not admitted
            return
        buffer = self._buffer
        buffer += data
        at = 0
        while len(buffer) - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, at)
            end = at + _LENGTH.size + size
            if len(buffer) < end:
                break
            message = _decode(buffer[at + _LENGTH.size:end])
            at = end
            self._on_message(self, message)
        del buffer[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(self)

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, message: Any) -> None:
        """Queue one frame at once; frames of one connection never overtake each other."""
        data = _encode(message)
        self.transport.write(_LENGTH.pack(len(data)) + data)  # type: ignore[union-attr]


class DirectServer:
    """Serves `unary` functions (plain or coroutine) and `streams` (async generators) of
    an actor, on its event loop."""

    def __init__(self, unary: dict[str, Callable[..., Any]],
                 streams: dict[str, Callable[..., AsyncIterator[Any]]]):
        self._unary, self._streams = unary, streams
        self.address = f"{SCHEME}@pdserve-{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self._loop = asyncio.get_running_loop()
        # Listening from here on: callers that connect before the loop serves the
        # socket wait in its backlog.
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(_socket_name(self.address))
        self._listener.listen(128)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Frames] = set()
        self._calls: dict[tuple[int, int], asyncio.Task] = {}  # (connection, call id)
        self._closed = False
        self._serving = self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        self._server = await self._loop.create_unix_server(self._accept, sock=self._listener)

    def _accept(self) -> _Frames:
        conn = _Frames(self._on_message, self._on_lost, _same_user)
        self._connections.add(conn)
        return conn

    def _on_message(self, conn: _Frames, message: list) -> None:
        if len(message) == 1:  # the caller cancels
            task = self._calls.get((id(conn), message[0]))
            if task is not None:
                task.cancel()
        elif len(message) == 3:
            call_id, method, args = message
            key = (id(conn), call_id)
            self._calls[key] = self._loop.create_task(
                self._run(conn, key, call_id, method, args))
        else:
            logger.warning("direct call with %d fields dropped", len(message))

    def _on_lost(self, conn: _Frames) -> None:
        """The caller went away: its calls stop (a stream's generator closes, which
        aborts its engine request)."""
        self._connections.discard(conn)
        for key, task in list(self._calls.items()):
            if key[0] == id(conn):
                task.cancel()

    async def _run(self, conn: _Frames, key: tuple[int, int], call_id: int, method: str,
                   args: list) -> None:
        try:
            if method in self._unary:
                result = self._unary[method](*args)
                if inspect.isawaitable(result):
                    result = await result
                self._send(conn, call_id, RESULT, result)
            elif method in self._streams:
                items = self._streams[method](*args)
                try:
                    async for item in items:
                        self._send(conn, call_id, ITEM, item)
                finally:
                    await items.aclose()  # a dropped stream aborts its engine request
                self._send(conn, call_id, END, None)
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
                self._send(conn, call_id, ERROR, err)
            except _CallerGone:
                pass
        finally:
            self._calls.pop(key, None)

    @staticmethod
    def _send(conn: _Frames, call_id: int, kind: str, value: Any) -> None:
        if not conn.open:
            raise _CallerGone("the caller's connection closed")
        conn.send((call_id, kind, value))

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the calls in flight to end (new ones are still
        served: the caller stops sending them). Returns how many are left."""
        deadline = time.monotonic() + timeout_s
        while self._calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._calls)

    def close(self) -> None:
        """Stop serving; callable from any thread (a replica's destructor)."""
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._close()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._serving.cancel()
        if self._server is not None:
            self._server.close()
        self._listener.close()
        for task in list(self._calls.values()):
            task.cancel()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()  # the callers' calls in flight fail: ReplicaGone


class DirectClient:
    """The ingress's connection to one replica's `DirectServer`."""

    def __init__(self, address: str):
        self.address = address
        self.broken = False
        self._conn: _Frames | None = None
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future | asyncio.Queue] = {}
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.wait_for(_connected(_socket_name(self.address)),
                                          CONNECT_TIMEOUT_S)
            _, conn = await loop.create_unix_connection(
                lambda: _Frames(self._on_message, self._on_lost), sock=sock)
        except (OSError, asyncio.TimeoutError) as exc:
            logger.debug("no direct connection to %s: %r", self.address, exc)
            self._break()
            return
        if self.broken:  # closed meanwhile
            conn.transport.close()
        else:
            self._conn = conn

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

    async def _send(self, method: str, args: tuple) -> int:
        if self._conn is None and not self.broken:
            await asyncio.shield(self._connecting)  # a cancelled caller leaves it be
        if self.broken or self._conn is None or not self._conn.open:
            raise DirectUnavailable(f"no connection to {self.address}")
        call_id = next(self._ids)
        self._conn.send((call_id, method, args))
        return call_id

    def _cancel(self, call_id: int) -> None:
        """Stop a call the replica may still be running."""
        if (self._pending.pop(call_id, None) is not None and self._conn is not None
                and self._conn.open):
            self._conn.send((call_id,))

    def _on_message(self, conn: _Frames, message: list) -> None:
        call_id, kind, value = message
        waiter = self._pending.get(call_id)
        if waiter is None:  # cancelled meanwhile
            return
        if kind != ITEM:  # the call is over on the replica's side
            del self._pending[call_id]
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait((kind, value))
        elif not waiter.done():
            waiter.set_result((kind, value))

    def _on_lost(self, conn: _Frames) -> None:
        self._break()

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
        self._connecting.cancel()
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()


class DirectStream:
    def __init__(self, client: DirectClient, call_id: int, queue: asyncio.Queue):
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


def _socket_name(address: str) -> str:
    """`unix://@name` -> the abstract socket name ("\\0name"); `unix:///path` -> the path."""
    name = address.removeprefix(SCHEME)
    return "\0" + name[1:] if name.startswith("@") else name


async def _connected(name: str) -> socket.socket:
    """A Unix stream socket connected to `name`. Connected here, not by the loop: uvloop
    (Serve's event loop) refuses abstract names with EINVAL. A Unix socket connects at
    once or, with the listener's backlog full, not yet (EAGAIN): then it tries again."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(name)
                return sock
            except BlockingIOError:
                await asyncio.sleep(0.005)
    except BaseException:
        sock.close()
        raise


_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _same_user(transport: asyncio.BaseTransport) -> bool:
    """The connecting process runs as this process's user (an abstract socket has no
    file permissions: any process in the network namespace may connect)."""
    sock = transport.get_extra_info("socket")
    pid, uid, _ = _PEER_CREDENTIALS.unpack(sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
    if uid == os.geteuid():
        return True
    logger.warning("direct call connection from pid %d (uid %d) refused: not uid %d",
                   pid, uid, os.geteuid())
    return False


def _value_or_raise(kind: str, value: Any) -> Any:
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

