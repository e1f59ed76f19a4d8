"""The one place that knows how KV memory is laid out and what kind of memory it is.

vLLM hands the worker one tensor per attention layer. A *region* is a view of such a
tensor with the block index first, so that block `b` is the contiguous byte range
`[b * block_bytes, (b + 1) * block_bytes)`. Layouts seen so far:

- CPU (vLLM 0.32):   [num_blocks, num_kv_heads, block_size, 2 * head_size] -> 1 region
- CUDA flash-attn:   [2, num_blocks, block_size, num_kv_heads, head_size]  -> 2 regions (K, V)

Host and CUDA memory differ only in what object the transport is given: a numpy view
(buffer protocol) for host memory, the torch tensor itself (__cuda_array_interface__)
for device memory. UCX picks its transports (shm/cma, cuda_ipc, rdma) from that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .errors import BlockRangeError


class MemoryType(enum.Enum):
    HOST = "host"
    CUDA = "cuda"


@dataclass(slots=True)
class KVRegion:
    """`blocks` is a [num_blocks, block_bytes] uint8 view of one layer's K/V memory."""

    name: str
    blocks: torch.Tensor
    memory_type: MemoryType
    host_array: Any = None  # numpy view of `blocks` for host memory (cheap slicing)
    host_bytes: Any = None  # the same, flat, if contiguous (one slice per byte range)

    def __post_init__(self) -> None:
        if self.memory_type is MemoryType.HOST:
            self.host_array = self.blocks.numpy()
            if self.host_array.flags.c_contiguous:
                self.host_bytes = self.host_array.reshape(-1)

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_bytes(self) -> int:
        return self.blocks.shape[1]

    def host_storage_span(self) -> tuple[int, int] | None:
        """(address, bytes) of the host allocation behind this region, or None for
        device memory (which UCX shares by itself, cuda_ipc, rather than by mapping)."""
        if self.memory_type is not MemoryType.HOST:
            return None
        storage = self.blocks.untyped_storage()
        return storage.data_ptr(), storage.nbytes()

    def view(self, start: int, count: int) -> Any:
        """A buffer over blocks [start, start + count) the transport can read or write."""
        if self.host_array is not None:
            return self.host_array[start:start + count]
        return self.blocks[start:start + count]

    def host_view(self, start: int, count: int) -> Any:
        """Blocks [start, start + count) of host memory as a numpy array: flat bytes
        where the memory is contiguous (what the copy threads cut into parts)."""
        if self.host_bytes is None:
            return self.host_array[start:start + count]
        size = self.host_array.shape[1]
        return self.host_bytes[start * size:(start + count) * size]


@dataclass(frozen=True, slots=True)
class Run:
    """`length` consecutive blocks from peer block `src` into local block `dst`."""

    src: int
    dst: int
    length: int


def memory_type_of(tensor: torch.Tensor) -> MemoryType:
    return MemoryType.CUDA if tensor.device.type == "cuda" else MemoryType.HOST


def _as_block_rows(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError(f"KV tensor of shape {tuple(tensor.shape)} is not contiguous")
    return tensor.reshape(tensor.shape[0], -1).view(torch.uint8)


def regions_from_kv_caches(
    kv_caches: dict[str, torch.Tensor], num_blocks: int
) -> tuple[list[KVRegion], str]:
    """Split the engine's per-layer tensors into block-major regions.

    Returns the regions in layer order and a layout string for compatibility checks.
    """
    regions: list[KVRegion] = []
    layouts: set[str] = set()
    for name, tensor in kv_caches.items():
        mtype = memory_type_of(tensor)
        shape = tuple(tensor.shape)
        if shape[0] == num_blocks:
            regions.append(KVRegion(name, _as_block_rows(tensor), mtype))
            layouts.add(f"blocks_first{list(shape[1:])}")
        elif len(shape) > 1 and shape[0] == 2 and shape[1] == num_blocks:
            for i, part in enumerate(("k", "v")):
                regions.append(KVRegion(f"{name}.{part}", _as_block_rows(tensor[i]), mtype))
            layouts.add(f"kv_first{list(shape[2:])}")
        else:
            raise ValueError(
                f"unsupported KV layout {shape} for layer {name} (num_blocks={num_blocks})"
            )
    if len(layouts) != 1:
        raise ValueError(f"layers disagree on KV layout: {sorted(layouts)}")
    return regions, layouts.pop()


def check_block_ids(block_ids: Iterable[int], num_blocks: int, what: str) -> None:
    """Reject ids that do not name a registered block (peer input is untrusted)."""
    ids = list(block_ids)
    if not ids or (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < num_blocks):
        return  # every id good: checked in C, once per pull
    for b in ids:
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < num_blocks:
            raise BlockRangeError(f"{what} block id {b!r} outside [0, {num_blocks})")


def coalesce(src: Sequence[int], dst: Sequence[int]) -> list[Run]:
    """Pair peer blocks with local blocks and merge neighbours into runs.

    Pairs are sorted by source id so that blocks freed (and reallocated) in reverse
    order still form runs when both sides are consecutive.
    """
    if len(src) != len(dst):
        raise BlockRangeError(f"{len(src)} source blocks for {len(dst)} destination blocks")
    if src and _is_range(src) and _is_range(dst):  # a fresh engine's usual allocation
        return [Run(src[0], dst[0], len(src))]
    runs: list[Run] = []
    for s, d in sorted(zip(src, dst)):
        last = runs[-1] if runs else None
        if last and s == last.src + last.length and d == last.dst + last.length:
            runs[-1] = Run(last.src, last.dst, last.length + 1)
        else:
            runs.append(Run(s, d, 1))
    return runs


def _is_range(ids: Sequence[int]) -> bool:
    """`ids` are first, first + 1, ... (peer input: the first must be an int)."""
    first = ids[0]
    return type(first) is int and list(ids) == list(range(first, first + len(ids)))


def split_runs(runs: Sequence[Run], max_blocks: int) -> list[Run]:
    """Cut runs longer than `max_blocks` so no message exceeds the size cap."""
    return [
        Run(r.src + i, r.dst + i, min(max_blocks, r.length - i))
        for r in runs
        for i in range(0, r.length, max_blocks)
    ]
