"""The once-per-peer handshake: authenticate, exchange transport addresses, check specs.

With a shared secret, each side proves it knows the secret by an HMAC over both nonces
and its own payload; without one, the macs are empty and not checked (bind the
listener to a trusted interface then).

Each side also says which host it runs on. The prefill side offers its KV memory
(shm.py) only after the decode side's proof and spec passed, and only to a peer on
its own host; the offer is part of the prefill's authenticated payload.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from .compat import KVSpec, check_compatible
from .errors import AuthenticationFailed, HandshakeRefused, KVTransferError, error_from_reason
from .protocol import Hello, HelloAck, ServerHello, read_message, write_message


@dataclass(frozen=True, slots=True)
class PeerInfo:
    spec: KVSpec
    address: bytes
    host_id: str = ""
    shm_offer: dict[str, Any] = field(default_factory=dict)  # empty: no same-host path


def _mac(secret: str | None, role: str, nonces: tuple[str, str], spec: dict, address: str,
         host_id: str, shm: dict | None = None) -> str:
    if not secret:
        return ""
    payload = json.dumps([role, nonces, spec, address, host_id, shm or {}],
                         sort_keys=True).encode()
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def _verify(secret: str | None, mac: str, expected: str) -> None:
    if secret and not hmac.compare_digest(mac, expected):
        raise AuthenticationFailed("handshake secret mismatch")


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    spec: KVSpec, address: bytes, secret: str | None, host_id: str = "",
) -> PeerInfo:
    """Decode side. Returns the peer's spec, transport address, host and shm offer
    (verified with the secret when there is one), or raises."""
    server = await read_message(reader)
    if not isinstance(server, ServerHello):
        raise HandshakeRefused(f"expected server_hello, got {server.kind}")
    nonce = secrets.token_hex(16)
    addr = base64.b64encode(address).decode()
    nonces = (server.nonce, nonce)
    await write_message(writer, Hello(
        spec.to_dict(), addr, host_id, nonce,
        _mac(secret, "decode", nonces, spec.to_dict(), addr, host_id)))
    ack = await read_message(reader)
    if not isinstance(ack, HelloAck):
        raise HandshakeRefused(f"expected hello_ack, got {ack.kind}")
    if not ack.ok:
        raise error_from_reason(ack.reason, f"peer refused handshake: {ack.message}")
    _verify(secret, ack.mac,
            _mac(secret, "prefill", nonces, ack.spec, ack.address, ack.host_id, ack.shm))
    peer = KVSpec.from_dict(ack.spec)
    check_compatible(spec, peer)
    return PeerInfo(peer, base64.b64decode(ack.address), ack.host_id, ack.shm)


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    spec: KVSpec, address: bytes, secret: str | None, host_id: str = "",
    offer_shm: Callable[[str], dict[str, Any]] | None = None,
) -> PeerInfo:
    """Prefill side. Answers with a refusal (and raises) on a bad secret or spec.

    `offer_shm(peer_host_id)` is called only once the peer proved the secret; what it
    returns (or {}) is sent as the shm offer.
    """
    nonce = secrets.token_hex(16)
    await write_message(writer, ServerHello(nonce))
    hello = await read_message(reader)
    if not isinstance(hello, Hello):
        raise HandshakeRefused(f"expected hello, got {hello.kind}")
    nonces = (nonce, hello.nonce)
    addr = base64.b64encode(address).decode()
    try:
        _verify(secret, hello.mac, _mac(secret, "decode", nonces, hello.spec, hello.address,
                                        hello.host_id))
        peer = KVSpec.from_dict(hello.spec)
        check_compatible(spec, peer)
    except KVTransferError as e:
        await write_message(writer, HelloAck(False, e.reason, str(e), {}, "", "", {}, ""))
        raise
    shm = offer_shm(hello.host_id) if offer_shm is not None else {}
    mac = _mac(secret, "prefill", nonces, spec.to_dict(), addr, host_id, shm)
    await write_message(writer, HelloAck(True, "", "", spec.to_dict(), addr, host_id, shm, mac))
    return PeerInfo(peer, base64.b64decode(hello.address), hello.host_id)
