"""The NVMe tier's on-disk form: one file per block, named by its key, in a directory
per KV geometry (`namespace`). No torch here: the scheduler half scans the directory.

File = header + payload. The header carries a magic, the key, the payload length and
a CRC-32 of the payload; a file whose header, length or checksum disagrees is a miss
(`BlockFileError`), never KV. Files are written to a temporary name and renamed into
place, so a reader sees a whole file or none; a crash leaves at most a `*.tmp` file,
which the next scan removes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import KVTransferError

_MAGIC = b"PDKV0001"
_HEADER = struct.Struct("<8s32sQI")  # magic, key (padded), payload bytes, crc32
SUFFIX = ".kv"
_TMP = ".tmp"


class BlockFileError(KVTransferError):
    """A block file is missing, truncated, corrupt or names another key."""

    reason = "tier_file"


def namespace(*parts: object) -> str:
    """A directory name that differs whenever the KV geometry or hashing differs."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
    return f"kv-{digest}"


def block_path(root: Path, key: bytes) -> Path:
    name = key.hex()
    return root / name[:2] / f"{name}{SUFFIX}"


def write_block(root: Path, key: bytes, chunks: Iterable[memoryview]) -> int:
    """Write one block atomically; returns the payload bytes written."""
    chunks = list(chunks)
    size = sum(c.nbytes for c in chunks)
    crc = 0
    for c in chunks:
        crc = zlib.crc32(c, crc)
    path = block_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{_TMP}")
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(_MAGIC, key, size, crc))
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
    return size


def read_block(root: Path, key: bytes, out: memoryview) -> int:
    """Read one block's payload into `out` (exactly its size); raises BlockFileError."""
    path = block_path(root, key)
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER.size)
            if len(header) != _HEADER.size:
                raise BlockFileError(f"{path.name}: truncated header")
            magic, stored_key, size, crc = _HEADER.unpack(header)
            if magic != _MAGIC or stored_key.rstrip(b"\0") != key.rstrip(b"\0"):
                raise BlockFileError(f"{path.name}: not a block file for this key")
            if size != out.nbytes:
                raise BlockFileError(f"{path.name}: {size} bytes, expected {out.nbytes}")
            got = f.readinto(out)
            if got != size or f.read(1):
                raise BlockFileError(f"{path.name}: payload length mismatch")
    except OSError as exc:
        raise BlockFileError(f"{path.name}: {exc}") from exc
    if zlib.crc32(out) != crc:
        raise BlockFileError(f"{path.name}: checksum mismatch")
    return size


def delete_block(root: Path, key: bytes) -> None:
    try:
        block_path(root, key).unlink()
    except FileNotFoundError:
        pass


def scan(root: Path) -> Iterator[tuple[bytes, int]]:
    """(key, file bytes) of the block files under `root`, oldest first (mtime);
    leftover temporary files are removed. Contents are checked on read, not here."""
    if not root.is_dir():
        return iter(())
    found: list[tuple[float, bytes, int]] = []
    for path in root.glob("*/*"):
        if path.name.endswith(_TMP):
            path.unlink(missing_ok=True)
            continue
        if not path.name.endswith(SUFFIX):
            continue
        try:
            key = bytes.fromhex(path.name[: -len(SUFFIX)])
            st = path.stat()
        except (ValueError, OSError):
            continue
        found.append((st.st_mtime, key, st.st_size))
    found.sort()
    return ((key, size) for _, key, size in found)
