"""Decode side of a transfer: pull a prefill request's blocks into local blocks.

One `KVReceiver` per worker process. It keeps one control session per prefill peer
(handshake once, then reused); the session's socket doubles as the liveness signal:
when it closes, every pull waiting on that peer fails at once instead of timing out.

A pull: agree on runs of (peer block -> local block), ask the peer, post receives
straight into the local blocks, wait for all of them, tell the peer it may free. Any
failure after receives were posted cancels them, so no late byte lands in blocks that
vLLM is about to recompute into.

Same-host peers (shm.py): if the handshake offered the peer's KV memory, the session
maps it once (with the peer's lease board, board.py), and a pull takes one of two
paths, both synchronous and bounded copies, so nothing is left to cancel on failure:

- "shm-direct", no round trip: when every block lies in the shared windows and the
  board shows the lease holding all of them, copy, then read the board again. Still
  held after the copy means held all through it (leases never come back), so vLLM had
  not freed the blocks and they did not change. The result goes back at once; the
  PullDone that frees the lease follows off the critical path. With the session open,
  this runs on the thread that starts the pull (`pull_inline`: vLLM's engine thread,
  config `shm_inline`), not on the I/O loop. A lease not (yet) on
  the board, e.g. a pull that raced ahead of its grant, or one that ended during the
  copy, takes the path below.
- "shm", copy first, then ask: copy the blocks in the shared windows, then send the
  request and wait for the reply (and for UCX messages carrying the few pieces
  outside the windows). The copy only counts if the reply is ok: the peer pinned the
  lease, and a lease held at the reply was held since the peer's request finished,
  before we knew the block ids, so the blocks did not change under the copy. A
  refused reply turns the copied blocks into load errors, as any failure does.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from dataclasses import dataclass, field

from .compat import KVSpec
from .config import PDConnectorConfig
from .errors import (
    BlockRangeError, KVTransferError, PeerUnreachable, TransferFailed, TransferTimeout,
    error_from_reason,
)
from .handshake import client_handshake
from .memory import KVRegion, Run, check_block_ids, coalesce, split_runs
from .metadata import LoadSpec
from .protocol import (
    Heartbeat, PullAbort, PullDone, PullReply, PullRequest, Release, encode, read_message,
    write_message,
)
from .shm import ParallelCopier, PeerMemory, host_identity
from .transport import Transport

logger = logging.getLogger(__name__)

_DONE_BATCH_S = 0.002  # see _Session.send_done_later


class PullState(enum.Enum):
    CONNECTING = "connecting"
    REQUESTED = "requested"
    RECEIVING = "receiving"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class PullResult:
    request_id: str
    local_block_ids: list[int]
    state: PullState = PullState.CONNECTING
    num_bytes: int = 0
    num_blocks: int = 0
    seconds: float = 0.0
    reason: str | None = None
    mode: str = "ucx"
    phases: dict[str, float] = field(default_factory=dict)  # ms, see KVReceiver._pull

    @property
    def ok(self) -> bool:
        return self.state is PullState.DONE


@dataclass(slots=True)
class _Session:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    replies: dict[int, asyncio.Future] = field(default_factory=dict)
    aborts: dict[int, asyncio.Future] = field(default_factory=dict)
    closed: bool = False
    reader_task: asyncio.Task | None = None  # held: asyncio only keeps weak references
    memory: PeerMemory | None = None  # the peer's KV memory, mapped (same host only)
    done_notices: list[PullDone] = field(default_factory=list)

    def send_done_later(self, msg: PullDone) -> None:
        """Send a successful pull's PullDone soon, batched (best effort).

        Nothing waits on it: it lets the peer free blocks it holds under a lease of
        seconds. Sent at once, it wakes the peer just as the pull's result wakes its
        caller, both wanting a core; so the notices of pulls that end within
        `_DONE_BATCH_S` go together, that long after the first.
        """
        if not self.done_notices:
            asyncio.get_running_loop().call_later(_DONE_BATCH_S, self.flush_done)
        self.done_notices.append(msg)

    def flush_done(self) -> None:
        notices, self.done_notices = self.done_notices, []
        if notices and not self.closed:
            self.writer.write(b"".join(map(encode, notices)))

    async def send(self, msg) -> None:
        if self.closed:
            raise PeerUnreachable("control session closed")
        try:
            await write_message(self.writer, msg)
        except (ConnectionError, OSError) as e:
            raise PeerUnreachable(f"control session broke: {e}") from e

    async def read_loop(self) -> None:
        try:
            while True:
                msg = await read_message(self.reader)
                if isinstance(msg, PullReply) and msg.xfer_id in self.replies:
                    self.replies.pop(msg.xfer_id).set_result(msg)
                elif isinstance(msg, PullAbort) and msg.xfer_id in self.aborts:
                    fut = self.aborts[msg.xfer_id]
                    if not fut.done():
                        fut.set_exception(error_from_reason(msg.reason, msg.message))
        except Exception:
            pass
        finally:
            self.closed = True
            self.writer.close()
            if self.memory is not None:
                self.memory.close()
            for fut in [*self.replies.values(), *self.aborts.values()]:
                if not fut.done():
                    fut.set_exception(PeerUnreachable("peer closed the control session"))
            self.replies.clear()


class KVReceiver:
    def __init__(
        self, config: PDConnectorConfig, spec: KVSpec, regions: list[KVRegion],
        transport: Transport,
    ):
        self._config = config
        self._spec = spec
        self._regions = regions
        self._transport = transport
        self._sessions: dict[tuple[str, int], _Session] = {}
        self._connecting: dict[tuple[str, int], asyncio.Lock] = {}
        self._xfer_ids = itertools.count(1)
        self._receiving: set[asyncio.Future] = set()
        self._host_id = host_identity()
        # Only host memory copies from a mapped peer; device memory goes over UCX.
        self._host_memory = all(r.host_storage_span() is not None for r in regions)
        self._copier = ParallelCopier()
        self._loop = asyncio.get_running_loop()  # the I/O loop: made there

    async def _session(self, host: str, port: int) -> _Session:
        key = (host, int(port))
        session = self._sessions.get(key)
        if session is not None and not session.closed:
            return session
        lock = self._connecting.setdefault(key, asyncio.Lock())
        async with lock:
            session = self._sessions.get(key)
            if session is not None and not session.closed:
                return session
            timeout = self._config.handshake_timeout_s
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port)), timeout)
            except (OSError, asyncio.TimeoutError) as e:
                raise PeerUnreachable(f"cannot reach {host}:{port}: {e!r}") from e
            try:
                info = await asyncio.wait_for(client_handshake(
                    reader, writer, self._spec, self._transport.address(),
                    self._config.shared_secret, self._host_id), timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
                writer.close()
                raise PeerUnreachable(f"handshake with {host}:{port} failed: {e!r}") from e
            except BaseException:
                writer.close()
                raise
            session = _Session(reader, writer)
            session.memory = await self._map_peer_memory(info, host, port)
            session.reader_task = asyncio.get_running_loop().create_task(session.read_loop())
            self._sessions[key] = session
            return session

    async def _map_peer_memory(self, info, host: str, port: int) -> PeerMemory | None:
        if (self._config.shm != "auto" or not info.shm_offer or not self._host_id
                or info.host_id != self._host_id or not self._host_memory):
            return None
        try:
            return await asyncio.to_thread(
                PeerMemory.attach, info.shm_offer, [r.block_bytes for r in self._regions],
                self._config.handshake_timeout_s)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("kvtransfer: cannot map %s:%s's KV memory, using UCX: %r",
                           host, port, e)
            return None

    async def pull(self, load: LoadSpec) -> PullResult:
        """Run one pull to completion; never raises, the result says what happened."""
        result = PullResult(load.request_id, list(load.local_block_ids))
        start = time.monotonic()
        try:
            if not self._pull_direct(load, result):
                # A timeout scope, not wait_for: wait_for runs the pull as a task of
                # its own, whose extra loop turns cost 0.1-0.2 ms of every pull here.
                async with asyncio.timeout(self._config.transfer_timeout_s):
                    await self._pull(load, result)
            result.state = PullState.DONE
        except TimeoutError:
            result.reason = TransferTimeout.reason
        except KVTransferError as e:
            result.reason = e.reason
            logger.warning("kvtransfer: pull for %s failed: %s", load.request_id, e)
        except Exception as e:
            result.reason = TransferFailed.reason
            logger.warning("kvtransfer: pull for %s failed: %r", load.request_id, e)
        if not result.ok:
            self._abandon(result)
            await self._notify(load, PullDone(load.remote_request_id, False))
        result.seconds = time.monotonic() - start
        return result

    def _plan(self, load: LoadSpec):
        local = list(load.local_block_ids)
        remote = list(load.remote_block_ids)
        check_block_ids(local, self._regions[0].num_blocks, "local")
        if len(local) > len(remote):
            raise BlockRangeError(f"{len(local)} local blocks but peer offers {len(remote)}")
        # Blocks already computed locally (prefix hits) are the peer's leading ones.
        runs = coalesce(remote[len(remote) - len(local):], local)
        largest = max(r.block_bytes for r in self._regions)
        return split_runs(runs, max(1, self._config.max_message_bytes // largest))

    def pull_inline(self, load: LoadSpec) -> PullResult | None:
        """The shm-direct pull on the calling thread (any thread): when the peer's
        session is open with its memory mapped and its lease board shows the lease, a
        bounded copy with nothing to wait for. None: nothing done that counts (no such
        session yet, the lease not on the board, or an error): run `pull` on the I/O
        loop, which takes the other paths and reports failures."""
        result = PullResult(load.request_id, list(load.local_block_ids))
        start = time.monotonic()
        try:
            if not self._pull_direct(load, result, inline=True):
                return None
        except Exception as e:
            logger.debug("kvtransfer: inline pull for %s: %r", load.request_id, e)
            return None
        result.state = PullState.DONE
        result.seconds = time.monotonic() - start
        return result

    def _pull_direct(self, load: LoadSpec, result: PullResult, inline: bool = False) -> bool:
        """A pull on an open session with mapped memory tries the shm-direct path here
        first: it never awaits, so it needs no timeout scope. False: `_pull`."""
        session = self._sessions.get((load.remote_host, int(load.remote_port)))
        if (session is None or session.closed or session.memory is None
                or not self._config.shm_direct):
            return False
        marks = {"start": time.monotonic()}
        runs = self._plan(load)
        marks["session"] = time.monotonic()
        return self._direct(load, result, session, runs, marks, inline)

    def _direct(self, load: LoadSpec, result: PullResult, session: _Session,
                runs: list[Run], marks: dict[str, float], inline: bool = False) -> bool:
        """Copy without asking if the peer's lease board shows the lease holding every
        block before the copy and still after it (see the module docstring); False:
        nothing counts, ask the peer."""
        pairs, outside = session.memory.plan(runs, self._regions)
        if outside or not pairs:
            return False
        board, spans = session.memory.board, [(r.src, r.length) for r in runs]
        if not board.holds_spans(load.remote_request_id, spans):
            return False
        self._copier.copy(pairs)
        if not board.holds_spans(load.remote_request_id, spans):
            return False
        result.mode = "shm-direct"
        marks["copy"] = time.monotonic()
        self._pulled(load, result, session, marks, len(load.local_block_ids), inline)
        return True

    async def _pull(self, load: LoadSpec, result: PullResult) -> None:
        marks = {"start": time.monotonic()}
        runs = self._plan(load)
        session = await self._session(load.remote_host, load.remote_port)
        marks["session"] = time.monotonic()
        if (session.memory is not None and self._config.shm_direct
                and self._direct(load, result, session, runs, marks)):
            return
        plan = session.memory.plan(runs, self._regions) if session.memory else None
        await self._ask(load, runs, plan, session, result, marks)
        self._pulled(load, result, session, marks, 0)

    def _pulled(self, load: LoadSpec, result: PullResult, session: _Session,
                marks: dict[str, float], num_copied: int, inline: bool = False) -> None:
        result.num_blocks = len(load.local_block_ids)
        result.num_bytes = result.num_blocks * sum(r.block_bytes for r in self._regions)
        result.phases = _phases(marks)
        done = PullDone(load.remote_request_id, True, num_copied)
        if inline:
            self._loop.call_soon_threadsafe(session.send_done_later, done)
        else:
            session.send_done_later(done)
        logger.debug("kvtransfer: pull %s %s %d blocks %.1f MiB phases(ms) %s",
                     load.request_id, result.mode, result.num_blocks,
                     result.num_bytes / 2**20, result.phases)

    async def _ask(self, load: LoadSpec, runs: list[Run], plan, session: _Session,
                   result: PullResult, marks: dict[str, float]) -> None:
        """The round trip: request, reply, then receive what the peer sends (for a shm
        pull, copy first; the copy counts only if the reply is ok)."""
        loop = asyncio.get_running_loop()
        if plan is None:
            pairs, recv_views = [], [
                region.view(r.dst, r.length) for region in self._regions for r in runs]
        else:
            result.mode = "shm"
            pairs, outside = plan
            recv_views = [self._regions[i].view(r.dst, r.length) for i, r in outside]
        xfer_id = next(self._xfer_ids)
        reply_fut, abort_fut = loop.create_future(), loop.create_future()
        session.replies[xfer_id], session.aborts[xfer_id] = reply_fut, abort_fut
        try:
            result.state = PullState.REQUESTED
            # Copy first, then ask: the copy counts only if the reply is ok (see the
            # module docstring). Overlapping them was slower here: the peer's handling
            # of the request competes with the copy threads for the same cores.
            if pairs:
                self._copier.copy(pairs)
                marks["copy"] = time.monotonic()
            await session.send(PullRequest(
                xfer_id, load.remote_request_id, [[r.src, r.length] for r in runs],
                xfer_id << 32, result.mode))
            marks["request"] = time.monotonic()
            reply: PullReply = await reply_fut
            marks["reply"] = time.monotonic()
            await self._receive(xfer_id, reply, recv_views, abort_fut, result)
            marks["receive"] = time.monotonic()
        finally:
            session.replies.pop(xfer_id, None)
            session.aborts.pop(xfer_id, None)
            if not abort_fut.done():
                abort_fut.cancel()

    async def _receive(self, xfer_id: int, reply: PullReply, views: list,
                       abort_fut: asyncio.Future, result: PullResult) -> None:
        """Check the reply; post and wait for receives of the messages it announces."""
        if not reply.ok:
            raise error_from_reason(reply.reason, f"peer refused pull: {reply.message}")
        if reply.num_messages != len(views):
            raise TransferFailed(f"peer sends {reply.num_messages} messages, expected {len(views)}")
        if not views:
            return
        result.state = PullState.RECEIVING
        waits = [self._transport.post_recv(v, (xfer_id << 32) + i) for i, v in enumerate(views)]
        gathered = asyncio.gather(*waits)
        self._receiving.add(gathered)
        try:
            await asyncio.wait({gathered, abort_fut}, return_when=asyncio.FIRST_COMPLETED)
            if abort_fut.done() and not abort_fut.cancelled():
                abort_fut.result()  # raises what the peer reported
            gathered.result()
        finally:
            self._receiving.discard(gathered)
            if not gathered.done():  # abandoned; cancel_receives() will finish it
                gathered.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _abandon(self, result: PullResult) -> None:
        if result.state is PullState.RECEIVING:
            # Receives may still be posted into blocks vLLM will recompute into; UCX
            # cancels per worker, so other pulls in flight fail (and recompute) too.
            logger.warning("kvtransfer: cancelling receives (%d pulls in flight)",
                           len(self._receiving))
            self._transport.cancel_receives()
        result.state = PullState.FAILED

    async def _notify(self, load: LoadSpec, msg) -> None:
        session = self._sessions.get((load.remote_host, int(load.remote_port)))
        if session is not None and not session.closed:
            try:
                await session.send(msg)
            except KVTransferError:
                pass

    async def heartbeat(self, host: str, port: int, lease_ids: list[str]) -> None:
        try:
            session = await self._session(host, port)
            await session.send(Heartbeat(lease_ids))
        except KVTransferError as e:
            logger.debug("kvtransfer: heartbeat to %s:%s failed: %s", host, port, e)

    async def release(self, host: str, port: int, lease_id: str) -> None:
        try:
            session = await self._session(host, port)
            await session.send(Release(lease_id))
        except KVTransferError as e:
            logger.warning("kvtransfer: release to %s:%s failed: %s", host, port, e)

    async def close(self) -> None:
        for session in self._sessions.values():
            session.flush_done()
            session.writer.close()
            if session.memory is not None:
                session.memory.close()
        self._copier.close()


def _phases(marks: dict[str, float]) -> dict[str, float]:
    """ms per phase, each mark ending the phase it names: session (plan, connect +
    handshake the first time), copy (shm: from the peer's mapped memory), request
    (written), reply (round trip until the reply was seen), receive (UCX messages
    after the reply). A direct pull has session and copy only."""
    names, times = list(marks), list(marks.values())
    return {name: round((t - prev) * 1e3, 3)
            for name, prev, t in zip(names[1:], times, times[1:])}
