"""Same-host data path: the prefill's KV memory mapped into the decode process.

The host-memory analogue of UCX's cuda_ipc. On one host UCX moves data with CMA (the
kernel pins and copies page by page, about half a memcpy here); instead the decode
side maps the prefill's KV memory once and copies blocks out of it with numpy.

- Prefill (`SharedKV.export`, at `register_kv_caches`, before any forward pass): each
  distinct host allocation behind the KV regions is moved in place into one memfd: its
  page-aligned interior is copied into the file (all-zero stretches skipped: they cost
  no memory until written), then the file is mapped over exactly
  that range with MAP_FIXED, which replaces the anonymous pages at the same address.
  vLLM's tensors keep their identity, address and contents. The file is sealed against
  shrinking and growing, so a peer's mapping can never fault (SIGBUS). Blocks that
  straddle the allocation's partial first or last page lie outside the `Window` of
  their region; `split_by_windows` cuts a pull into the pieces the peer copies and the
  pieces (at most those two blocks) the prefill sends over UCX in the same pull.
  The file ends with the lease board (board.py): one uint64 per block, which the
  prefill writes through its own read-write mapping of that part.
- Handshake (handshake.py): shm is offered only after the peer authenticated, and only
  to a peer on the same host (`host_identity`); the offer names an abstract Unix socket
  and a one-time token. `FdServer` passes the memfd with SCM_RIGHTS to a same-uid peer
  that presents the token, once.
- Decode (`PeerMemory.attach`): receives the fd, checks its size and seals, maps it
  read-only (pages fault in on their first pull; populating up front would allocate
  the peer's never-written pages), keeps it for the session; `board` reads the
  peer's lease board.
  `ParallelCopier` copies a pull's (local view, peer view) pairs, splitting large
  copies over a few threads (numpy releases the GIL while it copies).

Whoever holds the mapping can read the whole KV cache, not only leased blocks, as with
cuda_ipc; that is why the fd goes only to authenticated, same-uid peers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import fcntl
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .board import BoardView, LeaseBoard
from .memory import KVRegion, Run

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # Linux; the mmap module does not export it
_MADV_POPULATE_READ = 22  # Linux 5.14+; neither does it export this
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_SPLIT_MIN_BYTES = 2 << 20  # below this one thread copies (a thread hop costs more)
_CHUNK_BYTES = 4 << 20  # about the size of a part the copy threads take in turn
_TOKEN_TTL_S = 30.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)


def host_identity() -> str:
    """Equal for two processes on the same booted host (and hostname); '' if unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return ""
    return f"{boot}/{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class Window:
    """Blocks [first, first + count) of one region lie in the shared file at `offset`."""

    offset: int
    first: int
    count: int

    @property
    def stop(self) -> int:
        return self.first + self.count

    def split(self, run: Run) -> tuple[Run | None, list[Run]]:
        """(the part of `run` inside the window, the parts outside it), by source id."""
        end = run.src + run.length
        lo, hi = max(run.src, self.first), min(end, self.stop)
        if hi <= lo:
            return None, [run]
        outside = []
        if lo > run.src:
            outside.append(Run(run.src, run.dst, lo - run.src))
        if hi < end:
            outside.append(Run(hi, run.dst + hi - run.src, end - hi))
        return Run(lo, run.dst + lo - run.src, hi - lo), outside


def split_by_windows(windows: Sequence[Window], runs: Sequence[Run],
                     ) -> tuple[list[tuple[int, Run]], list[tuple[int, Run]]]:
    """(region index, run) pieces inside the shared windows and outside them, in region
    then run order. Both sides compute it, so the outside pieces' order numbers the
    UCX messages."""
    inside, outside = [], []
    for index, window in enumerate(windows):
        for run in runs:
            part, rest = window.split(run)
            if part is not None:
                inside.append((index, part))
            outside.extend((index, r) for r in rest)
    return inside, outside


# ---- prefill side ----------------------------------------------------------------------

def _map_over(addr: int, length: int, fd: int, offset: int) -> None:
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    got = _libc.mmap(addr, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    if got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap over KV memory failed: {os.strerror(err)}")


_ZERO_SCAN_BYTES = 16 << 20


def _write_all(fd: int, addr: int, length: int, offset: int) -> None:
    """Copy memory into the file, skipping all-zero stretches: the file reads as zeros
    there already, and unwritten file pages take no memory until the owner writes them
    (vLLM's KV cache is all zeros at registration, most of it for a long while)."""
    view = memoryview((ctypes.c_char * length).from_address(addr)).cast("B")
    for start in range(0, length, _ZERO_SCAN_BYTES):
        chunk = view[start:start + _ZERO_SCAN_BYTES]
        if not np.frombuffer(chunk, dtype=np.uint8).any():
            continue
        done = 0
        while done < len(chunk):
            done += os.pwrite(fd, chunk[done:], offset + start + done)


def _window(region: KVRegion, pieces: list[tuple[int, int, int]]) -> Window:
    base, size, n = region.blocks.data_ptr(), region.block_bytes, region.num_blocks
    for addr, length, offset in pieces:
        if addr + length <= base or base + n * size <= addr:
            continue
        first = max(0, -(-(addr - base) // size))
        end = min(n, (addr + length - base) // size)
        if end > first:
            return Window(offset + base + first * size - addr, first, end - first)
    return Window(0, 0, 0)


class SharedKV:
    """Prefill side: the KV regions' host memory, moved in place into one sealed memfd."""

    def __init__(self, fd: int, size: int, windows: list[Window], board_offset: int,
                 num_blocks: int):
        self.fd = fd
        self.size = size
        self.windows = windows
        self.board_offset = board_offset
        self._board_map = mmap.mmap(fd, size - board_offset, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE, offset=board_offset)
        self.board = LeaseBoard(np.frombuffer(self._board_map, np.uint64, num_blocks))

    @classmethod
    def export(cls, regions: Sequence[KVRegion]) -> "SharedKV | None":
        """Share the regions' memory; None when it is not host memory. Must run before
        anything else touches the KV tensors (no forward pass concurrently)."""
        spans: dict[int, int] = {}
        for region in regions:
            span = region.host_storage_span()
            if span is None:
                return None
            spans.setdefault(*span)
        pieces, size = [], 0  # (address, length, file offset): page-aligned interiors
        for addr, nbytes in sorted(spans.items()):
            lo, hi = -(-addr // PAGE) * PAGE, (addr + nbytes) // PAGE * PAGE
            if hi > lo:
                pieces.append((lo, hi - lo, size))
                size += hi - lo
        if not pieces:
            return None
        num_blocks = regions[0].num_blocks
        board_offset, size = size, size + -(-8 * num_blocks // PAGE) * PAGE
        fd = os.memfd_create("pdserve-kv", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            for addr, length, offset in pieces:
                _write_all(fd, addr, length, offset)
                _map_over(addr, length, fd, offset)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return cls(fd, size, [_window(r, pieces) for r in regions], board_offset,
                       num_blocks)
        except BaseException:
            os.close(fd)
            raise

    def offer(self, socket_name: str, token: str) -> dict[str, Any]:
        """What the handshake tells an eligible peer (covered by the handshake's MAC)."""
        return {"socket": socket_name, "token": token, "size": self.size,
                "windows": [[w.offset, w.first, w.count] for w in self.windows],
                "board": [self.board_offset, len(self.board.cells), self.board.key.hex()]}

    def close(self) -> None:
        """Drop our fd; the mapping under vLLM's tensors (and the board's) stays valid."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FdServer:
    """Passes the memfd over an abstract Unix socket to a same-uid peer holding a token.

    Tokens are issued by the handshake after authentication, are single-use, and expire.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._tokens: dict[str, float] = {}
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self.name = f"pdserve-kv-{os.getpid()}-{secrets.token_hex(8)}"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind("\0" + self.name)  # abstract namespace: no file, local by nature
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self._spawn(self._accept_loop())

    def issue_token(self) -> str:
        now = time.monotonic()
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        token = secrets.token_hex(16)
        self._tokens[token] = now + _TOKEN_TTL_S
        return token

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            try:
                token = await asyncio.wait_for(loop.sock_recv(conn, 64), 5.0)
            except (asyncio.TimeoutError, OSError):
                return
            expiry = self._tokens.pop(token.decode(errors="replace"), 0.0)
            _, uid, _ = struct.unpack(
                "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if expiry < time.monotonic() or uid != os.getuid():
                return
            socket.send_fds(conn, [b"kv"], [self._fd])

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---- decode side -----------------------------------------------------------------------

def _receive_fd(name: str, token: str, timeout: float) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect("\0" + name)
        s.sendall(token.encode())
        _, fds, _, _ = socket.recv_fds(s, 16, 4)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError("peer did not pass its KV memory")
    return fds[0]


class PeerMemory:
    """Decode side: a peer's KV memory, mapped read-only for the session."""

    def __init__(self, mapping: mmap.mmap, windows: list[Window], block_bytes: Sequence[int],
                 board: BoardView):
        self._map = mapping
        self.windows = windows
        self.board = board
        self._block_bytes = list(block_bytes)
        self._can_populate = True
        self._populated = [bytearray(w.count) for w in windows]  # 1: pages mapped
        self._bytes = [np.frombuffer(mapping, np.uint8, w.count * size, w.offset)
                       for w, size in zip(windows, block_bytes)]

    @classmethod
    def attach(cls, offer: dict[str, Any], block_bytes: Sequence[int],
               timeout: float) -> "PeerMemory":
        """Fetch and map the peer's memory (blocking: run it off the event loop)."""
        size = int(offer["size"])
        windows = [Window(*map(int, w)) for w in offer["windows"]]
        if len(windows) != len(block_bytes):
            raise OSError(f"peer shares {len(windows)} regions, we have {len(block_bytes)}")
        for w, b in zip(windows, block_bytes):
            if min(w.offset, w.first, w.count) < 0 or w.offset + w.count * b > size:
                raise OSError(f"peer window {w} outside its {size}-byte file")
        board_offset, num_cells, key = offer["board"]
        board_offset, num_cells = int(board_offset), int(num_cells)
        if (min(board_offset, num_cells) < 0 or board_offset % 8
                or board_offset + 8 * num_cells > size):
            raise OSError(f"peer lease board outside its {size}-byte file")
        fd = _receive_fd(str(offer["socket"]), str(offer["token"]), timeout)
        try:
            if os.fstat(fd).st_size != size:
                raise OSError("peer KV file size differs from its offer")
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & fcntl.F_SEAL_SHRINK == 0:
                raise OSError("peer KV file may shrink under us (not sealed)")
            # Not MAP_POPULATE: populating would allocate every page of the peer's
            # file that it never wrote (1 GiB+ of zeros per peer); pages fault in on
            # their first pull (~1 ms per 4 MiB, once) and stay mapped.
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        board = BoardView(np.frombuffer(mapping, np.uint64, num_cells, board_offset),
                          bytes.fromhex(key))
        return cls(mapping, windows, block_bytes, board)

    def plan(self, runs: Sequence[Run], regions: Sequence[KVRegion],
             ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[int, Run]]]:
        """(local view, peer view) pairs to copy, and the (region, run) pieces outside the
        shared windows that the peer must send. The local regions must be host memory
        (a receiver with device memory does not map its peers; it pulls over UCX)."""
        inside, outside = split_by_windows(self.windows, runs)
        pairs = []
        for index, r in inside:
            start = r.src - self.windows[index].first
            self._populate(index, start, r.length)
            size = self._block_bytes[index]
            pairs.append((regions[index].host_view(r.dst, r.length),
                          self._bytes[index][start * size:(start + r.length) * size]))
        return pairs, outside

    def _populate(self, index: int, start: int, count: int) -> None:
        """Map the pages of window `index`'s blocks [start, start + count) in one call
        (MADV_POPULATE_READ, Linux 5.14+) instead of one page fault per 4 KiB during the
        copy. Each block once per session: mapped pages stay mapped until munmap, but
        the call still walks them (0.6 ms per 16 MiB here, a third of a pull). Only
        speed rests on this: a page unmapped behind our back (migration) faults in the
        copy."""
        populated = self._populated[index]
        lo = populated.find(0, start, start + count)
        if lo < 0 or not self._can_populate:
            return
        hi = populated.rfind(0, start, start + count) + 1
        size = self._block_bytes[index]
        offset = self.windows[index].offset + lo * size
        page = offset // PAGE * PAGE
        try:
            self._map.madvise(_MADV_POPULATE_READ, page, offset + (hi - lo) * size - page)
        except OSError:  # an older kernel: the copy faults the pages in instead
            self._can_populate = False
            return
        populated[lo:hi] = b"\x01" * (hi - lo)

    def close(self) -> None:
        self._bytes = []
        self.board = BoardView(np.zeros(0, np.uint64), b"")
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still referenced; the mapping goes with it


class ParallelCopier:
    """Copies (dst, src) pairs. A large copy is cut into parts of equal size (a part
    may span pairs) that up to `num_threads` threads take in turn, the calling thread
    among them: a one-core process never hops threads, and a helper that starts late
    (a busy host) just takes fewer parts. Few, large parts: every part costs each
    thread a pass through the GIL, which two copying threads contend for."""

    def __init__(self, num_threads: int | None = None):
        self.num_threads = num_threads or min(4, len(os.sched_getaffinity(0)))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # copies start on the engine and the I/O thread

    def start(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> "CopyJob":
        """Let the helper threads start on the parts; `finish()` joins in and waits."""
        total = sum(dst.nbytes for dst, _ in pairs)
        if self.num_threads == 1 or total < _SPLIT_MIN_BYTES:
            return CopyJob(iter([pairs]), [])
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.num_threads - 1, thread_name_prefix="kvtransfer-copy")
        rounds = -(-total // (self.num_threads * _CHUNK_BYTES))
        parts = iter(_parts(pairs, self.num_threads * rounds))  # next() is atomic (GIL)
        helpers = [self._pool.submit(_copy_all, parts) for _ in range(self.num_threads - 1)]
        return CopyJob(parts, helpers)

    def copy(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self.start(pairs).finish()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


Part = list[tuple[np.ndarray, np.ndarray]]


class CopyJob:
    def __init__(self, parts: Iterator[Part], futures: list[concurrent.futures.Future]):
        self._parts = parts
        self._futures = futures

    def finish(self) -> None:
        """Copy parts until none is left, wait for the helpers. Returns only when no
        thread writes any more (also when one raised, which is then re-raised)."""
        try:
            _copy_all(self._parts)
        finally:
            concurrent.futures.wait(self._futures)
        for fut in self._futures:
            fut.result()


def _copy_all(parts: Iterable[Part]) -> None:
    for part in parts:
        for dst, src in part:
            np.copyto(dst, src)


def _parts(pairs: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> list[Part]:
    """The pairs' bytes, in order, cut into `n` parts of (nearly) equal size, each a
    list of (dst, src) flat byte views (a pair that is not contiguous stays whole)."""
    size = -(-sum(dst.nbytes for dst, _ in pairs) // n)
    parts: list[Part] = []
    part: Part = []
    room = size
    for pair in pairs:
        dst, src = _flat_bytes(pair[0]), _flat_bytes(pair[1])
        whole = dst is None or src is None
        if whole:
            dst, src = pair
        at = 0
        while at < dst.nbytes:
            take = dst.nbytes if whole else min(room, dst.nbytes - at)
            part.append((dst, src) if whole else (dst[at:at + take], src[at:at + take]))
            at, room = at + take, room - min(room, take)
            if not room:
                parts.append(part)
                part, room = [], size
    if part:
        parts.append(part)
    return parts


def _flat_bytes(a: np.ndarray) -> np.ndarray | None:
    """`a` as a 1-D byte array (the same memory), or None if it is not contiguous."""
    if a.ndim == 1 and a.itemsize == 1:
        return a  # a byte slice of it is a byte range, strided or not
    return a.reshape(-1).view(np.uint8) if a.flags.c_contiguous else None
