"""Prefill side of a transfer: the control listener that serves pulls from leased blocks.

One `KVSender` per worker process. For each decode peer that connects it runs the
handshake, opens a transport link back to the peer, then answers that peer's messages
until the connection closes. A pull is served only from blocks of a held lease (which
also bounds-checks them against registered memory) and pins the lease while it reads.

With `shm` on, the KV memory is also shared (shm.py) with decode peers on this host:
for their "shm" pulls the sender only checks and pins the lease; the peer copies, and
its PullDone (or its connection closing) ends the pin. A peer that saw its lease on
the lease board (board.py) copies without asking at all and only sends PullDone,
which says how many blocks it copied (for the send stats).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from .compat import KVSpec
from .config import PDConnectorConfig
from .errors import KVTransferError, LeaseUnavailable
from .handshake import server_handshake
from .leases import LeaseTable
from .memory import KVRegion, Run, check_block_ids
from .protocol import (
    Heartbeat, PullAbort, PullDone, PullReply, PullRequest, Release, read_message,
    write_message,
)
from .shm import FdServer, SharedKV, host_identity, split_by_windows
from .transport import PeerLink, Transport

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SendRecord:
    """What one served pull moved (reported to stats by the worker)."""

    num_bytes: int
    num_blocks: int
    seconds: float
    error: str | None = None


class KVSender:
    def __init__(
        self, config: PDConnectorConfig, spec: KVSpec, regions: list[KVRegion],
        transport: Transport, leases: LeaseTable, on_record: Callable[[SendRecord], None],
    ):
        self._config = config
        self._spec = spec
        self._regions = regions
        self._transport = transport
        self._leases = leases
        self._on_record = on_record
        self._server: asyncio.Server | None = None
        self._grant_waiters: dict[str, asyncio.Event] = {}
        self._host_id = host_identity()
        self.shared: SharedKV | None = None
        self._fd_server: FdServer | None = None
        self.port = 0

    async def start(self) -> None:
        if self._config.shm == "auto":
            self._share_memory()
        self._server = await asyncio.start_server(
            self._serve_peer, self._config.host, self._config.port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.shared is not None:
            try:
                self._fd_server = FdServer(self.shared.fd)
                await self._fd_server.start()
            except OSError as e:
                logger.warning("kvtransfer: no fd server, same-host pulls use UCX: %s", e)
                self._fd_server = None

    def _share_memory(self) -> None:
        """Runs while the engine thread waits in register_kv_caches (no forward pass)."""
        try:
            self.shared = SharedKV.export(self._regions)
        except OSError as e:
            logger.warning("kvtransfer: KV memory not shareable, same-host pulls use UCX: %s", e)
        if self.shared is not None:
            self._leases.board = self.shared.board

    def _offer_shm(self, peer_host_id: str) -> dict:
        if self._fd_server is None or not self._host_id or peer_host_id != self._host_id:
            return {}
        return self.shared.offer(self._fd_server.name, self._fd_server.issue_token())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._fd_server is not None:
            await self._fd_server.close()
        if self.shared is not None:
            self.shared.close()

    def notify_granted(self, lease_id: str) -> None:
        """Called on the I/O loop after the engine thread granted a lease."""
        event = self._grant_waiters.pop(lease_id, None)
        if event is not None:
            event.set()

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername")
        pins: dict[str, _ShmRead] = {}  # this peer's shm pulls waiting for PullDone
        try:
            info = await asyncio.wait_for(
                server_handshake(reader, writer, self._spec, self._transport.address(),
                                 self._config.shared_secret, self._host_id, self._offer_shm),
                self._config.handshake_timeout_s,
            )
            link = await self._transport.connect(info.address)
            while True:
                msg = await read_message(reader)
                await self._dispatch(msg, link, writer, pins)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # peer went away (or we are shutting down); its leases expire or end
        except KVTransferError as e:
            logger.warning("kvtransfer: refused peer %s: %s", peer, e)
        except Exception:
            logger.exception("kvtransfer: control connection from %s failed", peer)
        finally:
            for lease_id in pins:  # the peer went away mid-copy: its leases expire
                self._leases.end_read(lease_id)
            writer.close()

    async def _dispatch(self, msg, link: PeerLink, writer: asyncio.StreamWriter,
                        pins: dict[str, "_ShmRead"]) -> None:
        lease_s = self._config.lease_s
        if isinstance(msg, PullRequest):
            await self._serve_pull(msg, link, writer, pins)
        elif isinstance(msg, PullDone):
            self._leases.release(msg.lease_id, "done" if msg.ok else "peer_gave_up")
            read = pins.pop(msg.lease_id, None)
            if read is not None:  # a shm pull: its reader is done with our memory
                self._leases.end_read(msg.lease_id)
                elapsed = asyncio.get_running_loop().time() - read.start
                self._on_record(SendRecord(read.num_bytes, read.num_blocks, elapsed)
                                if msg.ok else SendRecord(0, 0, 0.0, "peer_gave_up"))
            elif msg.ok and msg.num_copied > 0:  # a direct pull, never announced
                nbytes = msg.num_copied * sum(r.block_bytes for r in self._regions)
                self._on_record(SendRecord(nbytes, msg.num_copied, 0.0))
        elif isinstance(msg, Release):
            self._leases.release(msg.lease_id, "released")
        elif isinstance(msg, Heartbeat):
            for lease_id in msg.lease_ids:
                self._leases.extend(lease_id, lease_s)
        else:
            raise KVTransferError(f"unexpected message {msg.kind}")

    async def _wait_for_grant(self, lease_id: str) -> None:
        """A pull may race ahead of the engine step that grants its lease."""
        if self._leases.is_known(lease_id):
            return
        event = self._grant_waiters.setdefault(lease_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), self._config.grant_wait_s)
        except asyncio.TimeoutError:
            self._grant_waiters.pop(lease_id, None)

    def _check_pull(self, msg: PullRequest, pins: dict) -> tuple[list[int], list]:
        """Bounds-check the request; returns its blocks and the (region, run) pieces we
        send (all of them for "ucx"; for "shm" those outside the shared windows)."""
        src = [b for start, length in msg.runs for b in range(start, start + length)]
        if any(length <= 0 for _, length in msg.runs):
            raise KVTransferError("empty run in pull request")
        check_block_ids(src, self._regions[0].num_blocks, "requested")
        runs = [Run(start, start, length) for start, length in msg.runs]
        if msg.mode == "ucx":
            return src, [(i, r) for i in range(len(self._regions)) for r in runs]
        if msg.mode != "shm" or self._fd_server is None:
            raise KVTransferError(f"pull mode {msg.mode!r} not offered")
        if msg.lease_id in pins:
            raise KVTransferError(f"lease {msg.lease_id} is already being read")
        return src, split_by_windows(self.shared.windows, runs)[1]

    async def _serve_pull(self, msg: PullRequest, link: PeerLink, writer,
                          pins: dict[str, "_ShmRead"]) -> None:
        """Pin the lease, reply, send our pieces. A "ucx" pull unpins when its sends are
        done; a "shm" pull's reader copies the rest itself and unpins with PullDone."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            src, pieces = self._check_pull(msg, pins)
            await self._wait_for_grant(msg.lease_id)
            self._leases.begin_read(msg.lease_id, src)
        except KVTransferError as e:
            await write_message(writer, PullReply(msg.xfer_id, False, e.reason, str(e), 0))
            self._on_record(SendRecord(0, 0, 0.0, e.reason))
            return
        nbytes = sum(len(src) * r.block_bytes for r in self._regions)
        if msg.mode == "shm":
            pins[msg.lease_id] = _ShmRead(nbytes, len(src), start)
        views = [self._regions[i].view(r.src, r.length) for i, r in pieces]
        try:
            await write_message(writer, PullReply(msg.xfer_id, True, "", "", len(views)))
            if views:  # bounded: a peer that gave up cancelled its receives, and these
                # sends would otherwise pin the lease forever
                await asyncio.wait_for(asyncio.gather(*(
                    link.send(view, msg.tag_base + i) for i, view in enumerate(views)
                )), self._config.transfer_timeout_s)
            if msg.mode == "ucx":
                self._on_record(SendRecord(nbytes, len(src), loop.time() - start))
        except Exception as e:  # the transport failed: nobody will read these blocks
            logger.warning("kvtransfer: send for lease %s failed: %r", msg.lease_id, e)
            self._leases.release(msg.lease_id, "send_failed")
            if pins.pop(msg.lease_id, None) is not None:
                self._leases.end_read(msg.lease_id)
            self._on_record(SendRecord(0, 0, 0.0, "transfer_failed"))
            try:
                await write_message(writer, PullAbort(msg.xfer_id, "transfer_failed", repr(e)))
            except ConnectionError:
                pass
        finally:
            if msg.mode == "ucx":
                self._leases.end_read(msg.lease_id)


@dataclass(slots=True)
class _ShmRead:
    num_bytes: int
    num_blocks: int
    start: float


__all__ = ["KVSender", "SendRecord", "LeaseUnavailable"]
