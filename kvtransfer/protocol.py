"""Wire messages of the control channel (handshake, pulls, lease notices).

Each message is a frozen dataclass; a frame is a 4-byte big-endian length followed by
the JSON object `{"kind": ..., **fields}`. Bulk KV data never goes through here: it
moves over the transport (UCX tags), straight between registered memories.

Conversation (decode side D dials prefill side P's listener):

    P -> D  ServerHello(nonce)
    D -> P  Hello(spec, address, host_id, nonce, mac)   D proves the secret, P checks spec
    P -> D  HelloAck(ok, reason, spec, address, host_id, shm, mac)
                                 P proves the secret, D checks spec; `shm` is P's offer
                                 of its KV memory (same host only, see shm.py) or {}
    then, any number of times, in any order:
    D -> P  PullRequest(xfer_id, lease_id, runs, tag_base, mode)
    P -> D  PullReply(xfer_id, ok, reason, num_messages)
            mode "ucx": then the data over UCX; mode "shm": D copies from the mapped
            memory (it may start before the reply; the reply says whether it counts)
    P -> D  PullAbort(xfer_id, reason)   sending failed part way: give up at once
    D -> P  PullDone(lease_id, ok, num_copied)
                                 blocks received (or given up): free them (and, for
                                 shm, end the read pin the reply took); `num_copied`:
                                 blocks a direct pull copied without a PullRequest
                                 (D saw the lease on P's lease board, board.py), else 0
    D -> P  Heartbeat(lease_ids)         the decode request still waits: keep them
    D -> P  Release(lease_id)            the decode request went away: free them
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

# The version of this conversation and of the shm lease board (board.py). Both sides
# send it in their KV spec (compat.py), so a peer that speaks another version is refused
# at the handshake, by name, and its requests recompute. Raise it with any change to a
# message, to what a field means, or to the board's cells.
PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 << 20
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame that is not a known, well-formed message."""


@dataclass(frozen=True, slots=True)
class ServerHello:
    kind: ClassVar[str] = "server_hello"
    nonce: str


@dataclass(frozen=True, slots=True)
class Hello:
    kind: ClassVar[str] = "hello"
    spec: dict[str, Any]
    address: str
    host_id: str
    nonce: str
    mac: str


@dataclass(frozen=True, slots=True)
class HelloAck:
    kind: ClassVar[str] = "hello_ack"
    ok: bool
    reason: str
    message: str
    spec: dict[str, Any]
    address: str
    host_id: str
    shm: dict[str, Any]
    mac: str


@dataclass(frozen=True, slots=True)
class PullRequest:
    kind: ClassVar[str] = "pull"
    xfer_id: int
    lease_id: str
    runs: list[list[int]]  # [src_start, length] in the order tags are numbered
    tag_base: int
    mode: str = "ucx"  # "ucx": P sends the data; "shm": D reads P's mapped memory


@dataclass(frozen=True, slots=True)
class PullReply:
    kind: ClassVar[str] = "pull_reply"
    xfer_id: int
    ok: bool
    reason: str
    message: str
    num_messages: int


@dataclass(frozen=True, slots=True)
class PullAbort:
    kind: ClassVar[str] = "pull_abort"
    xfer_id: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class PullDone:
    kind: ClassVar[str] = "pull_done"
    lease_id: str
    ok: bool
    num_copied: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    kind: ClassVar[str] = "heartbeat"
    lease_ids: list[str]


@dataclass(frozen=True, slots=True)
class Release:
    kind: ClassVar[str] = "release"
    lease_id: str


Message = (
    ServerHello | Hello | HelloAck | PullRequest | PullReply | PullAbort | PullDone | Heartbeat
    | Release
)
_KINDS = {
    cls.kind: cls
    for cls in (ServerHello, Hello, HelloAck, PullRequest, PullReply, PullAbort, PullDone,
                Heartbeat, Release)
}


def encode(msg: Message) -> bytes:
    body = json.dumps({"kind": msg.kind, **asdict(msg)}, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> Message:
    try:
        data = json.loads(body)
        cls = _KINDS[data.pop("kind")]
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ProtocolError(f"{cls.kind}: fields {sorted(data)} != {sorted(names)}")
        return cls(**data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ProtocolError(f"malformed frame: {e}") from e


async def read_message(reader: asyncio.StreamReader) -> Message:
    """Read one frame; raises asyncio.IncompleteReadError when the peer closed."""
    (length,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return decode(await reader.readexactly(length))


async def write_message(writer: asyncio.StreamWriter, msg: Message) -> None:
    writer.write(encode(msg))
    await writer.drain()
