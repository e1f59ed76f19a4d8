"""Prefill side of a transfer: the control listener that serves pulls from leased blocks.

One `KVSender` per worker process. For each decode peer that connects it runs the
handshake, opens a transport link back to the peer, then answers that peer's messages
until the connection closes. A pull is served only from blocks of a held lease (which
also bounds-checks them against registered memory) and pins the lease while it reads.
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
from .memory import KVRegion, check_block_ids
from .protocol import (
    Heartbeat, PullAbort, PullDone, PullReply, PullRequest, Release, read_message,
    write_message,
)
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
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_peer, self._config.host, self._config.port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def notify_granted(self, lease_id: str) -> None:
        """Called on the I/O loop after the engine thread granted a lease."""
        event = self._grant_waiters.pop(lease_id, None)
        if event is not None:
            event.set()

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername")
        try:
            info = await asyncio.wait_for(
                server_handshake(reader, writer, self._spec, self._transport.address(),
                                 self._config.shared_secret),
                self._config.handshake_timeout_s,
            )
            link = await self._transport.connect(info.address)
            while True:
                msg = await read_message(reader)
                await self._dispatch(msg, link, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # peer went away (or we are shutting down); its leases expire or end
        except KVTransferError as e:
            logger.warning("kvtransfer: refused peer %s: %s", peer, e)
        except Exception:
            logger.exception("kvtransfer: control connection from %s failed", peer)
        finally:
            writer.close()

    async def _dispatch(self, msg, link: PeerLink, writer: asyncio.StreamWriter) -> None:
        lease_s = self._config.lease_s
        if isinstance(msg, PullRequest):
            await self._serve_pull(msg, link, writer)
        elif isinstance(msg, PullDone):
            self._leases.release(msg.lease_id, "done" if msg.ok else "peer_gave_up")
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

    def _check_pull(self, msg: PullRequest) -> list[int]:
        src = [b for start, length in msg.runs for b in range(start, start + length)]
        if any(length <= 0 for _, length in msg.runs):
            raise KVTransferError("empty run in pull request")
        check_block_ids(src, self._regions[0].num_blocks, "requested")
        return src

    async def _serve_pull(self, msg: PullRequest, link: PeerLink, writer) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            src = self._check_pull(msg)
            await self._wait_for_grant(msg.lease_id)
            self._leases.begin_read(msg.lease_id, src)
        except KVTransferError as e:
            await write_message(writer, PullReply(msg.xfer_id, False, e.reason, str(e), 0))
            self._on_record(SendRecord(0, 0, 0.0, e.reason))
            return
        views = [
            region.view(s, n) for region in self._regions for s, n in msg.runs
        ]
        await write_message(writer, PullReply(msg.xfer_id, True, "", "", len(views)))
        try:
            # Bounded: a peer that gave up cancelled its receives, and these sends
            # would otherwise pin the lease forever.
            await asyncio.wait_for(asyncio.gather(*(
                link.send(view, msg.tag_base + i) for i, view in enumerate(views)
            )), self._config.transfer_timeout_s)
            nbytes = sum(len(src) * r.block_bytes for r in self._regions)
            self._on_record(SendRecord(nbytes, len(src), loop.time() - start))
        except Exception as e:  # the transport failed: nobody will read these blocks
            logger.warning("kvtransfer: send for lease %s failed: %r", msg.lease_id, e)
            self._leases.release(msg.lease_id, "send_failed")
            self._on_record(SendRecord(0, 0, 0.0, "transfer_failed"))
            try:
                await write_message(writer, PullAbort(msg.xfer_id, "transfer_failed", repr(e)))
            except ConnectionError:
                pass
        finally:
            self._leases.end_read(msg.lease_id)


__all__ = ["KVSender", "SendRecord", "LeaseUnavailable"]
