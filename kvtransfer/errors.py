"""Typed errors of the KV transfer path.

Hierarchy::

    KVTransferError                 any failure moving KV blocks; carries `reason`
    ├── PeerUnreachable             no connection to the peer, or it went away
    ├── HandshakeRefused            the peer (or we) refused the handshake
    │   ├── IncompatiblePeer        model / dtype / block size / layout differ
    │   └── AuthenticationFailed    shared secret missing or wrong
    ├── LeaseUnavailable            the prefill side no longer holds the blocks
    ├── BlockRangeError             block ids outside registered memory or lease
    ├── TransferTimeout             the pull did not finish in time
    └── TransferFailed              the transport reported a failed or short transfer

Every error maps to a short `reason` string; stats count failures by reason and the
decode side turns any of them into "recompute these blocks", never into tokens.
"""

from __future__ import annotations


class KVTransferError(Exception):
    reason = "error"


class PeerUnreachable(KVTransferError):
    reason = "peer_unreachable"


class HandshakeRefused(KVTransferError):
    reason = "handshake_refused"


class IncompatiblePeer(HandshakeRefused):
    reason = "incompatible_peer"


class AuthenticationFailed(HandshakeRefused):
    reason = "auth_failed"


class LeaseUnavailable(KVTransferError):
    reason = "lease_unavailable"


class BlockRangeError(KVTransferError):
    reason = "block_range"


class TransferTimeout(KVTransferError):
    reason = "timeout"


class TransferFailed(KVTransferError):
    reason = "transfer_failed"


_BY_REASON = {
    cls.reason: cls
    for cls in (
        KVTransferError, PeerUnreachable, HandshakeRefused, IncompatiblePeer,
        AuthenticationFailed, LeaseUnavailable, BlockRangeError, TransferTimeout,
        TransferFailed,
    )
}


def error_from_reason(reason: str, message: str) -> KVTransferError:
    """Rebuild the typed error a peer reported by its reason string."""
    return _BY_REASON.get(reason, KVTransferError)(message)
