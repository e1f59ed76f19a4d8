"""KV tiers without an engine: the index's LRU and eviction, the NVMe file format,
and the worker-side store copying between fake KV regions and its tiers."""

from __future__ import annotations

import time

import pytest
import torch

from kvtransfer.config import PDConnectorConfig, TierConfig
from kvtransfer.memory import KVRegion, MemoryType
from kvtransfer.tiers import files
from kvtransfer.tiers.index import TierIndex
from kvtransfer.tiers.plan import NVME, TierLoad, TierMetadata, TierSave, TierSpec
from kvtransfer.tiers.store import TierStore

BLOCK_BYTES = 64


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def stored(index: TierIndex, keys: list[bytes]):
    plan = index.prepare_store(keys)
    index.complete_store(plan.plan_id)
    return plan


# ---- index ---------------------------------------------------------------------------

def test_lookup_returns_the_longest_stored_prefix():
    index = TierIndex(num_slots=4, block_bytes=BLOCK_BYTES)
    stored(index, [key(1), key(2), key(4)])
    places = index.lookup([key(1), key(2), key(3), key(4)])
    assert [p.key for p in places] == [key(1), key(2)]
    assert all(p.tier == "dram" for p in places)


def test_keys_are_loadable_only_after_complete_store():
    index = TierIndex(num_slots=4, block_bytes=BLOCK_BYTES)
    plan = index.prepare_store([key(1)])
    assert index.lookup([key(1)]) == []
    assert index.prepare_store([key(1)]).keys == []  # pending keys are not stored twice
    index.complete_store(plan.plan_id)
    assert len(index.lookup([key(1)])) == 1


def test_failed_store_frees_its_slots():
    index = TierIndex(num_slots=1, block_bytes=BLOCK_BYTES)
    plan = index.prepare_store([key(1)])
    index.complete_store(plan.plan_id, ok=False)
    assert index.lookup([key(1)]) == []
    assert stored(index, [key(2)]).keys == [key(2)]


def test_dram_evicts_lru_into_nvme(tmp_path):
    index = TierIndex(num_slots=2, block_bytes=BLOCK_BYTES, nvme_root=tmp_path)
    stored(index, [key(1), key(2)])
    index.touch([key(1)])  # key 2 is now least recently used
    plan = stored(index, [key(3)])
    assert [p.key for p in plan.spills] == [key(2)]
    assert plan.targets[0].slot == plan.spills[0].slot  # the freed slot is reused
    assert plan.num_dram_evicted == 1
    assert [p.tier for p in index.lookup([key(2)])] == ["nvme"]
    assert [p.tier for p in index.lookup([key(1)])] == ["dram"]


def test_without_nvme_evicted_blocks_are_dropped():
    index = TierIndex(num_slots=1, block_bytes=BLOCK_BYTES)
    stored(index, [key(1)])
    plan = stored(index, [key(2)])
    assert plan.spills == [] and plan.num_dram_evicted == 1
    assert index.lookup([key(1)]) == []


def test_pinned_blocks_are_not_evicted(tmp_path):
    index = TierIndex(num_slots=1, block_bytes=BLOCK_BYTES, nvme_root=tmp_path)
    stored(index, [key(1)])
    index.prepare_load(index.lookup([key(1)]))
    plan = stored(index, [key(2)])
    assert plan.spills == [] and [p.slot for p in plan.targets] == [NVME]
    index.complete_load([key(1)])
    assert [p.key for p in stored(index, [key(3)]).spills] == [key(1)]


def test_nvme_budget_deletes_lru_files(tmp_path):
    index = TierIndex(num_slots=0, block_bytes=BLOCK_BYTES, nvme_root=tmp_path,
                      nvme_bytes=2 * BLOCK_BYTES)
    stored(index, [key(1), key(2)])
    plan = stored(index, [key(3)])
    assert plan.deletes == [key(1)]
    assert index.lookup([key(1)]) == [] and len(index.lookup([key(2), key(3)])) == 2


def test_forget_drops_bad_keys():
    index = TierIndex(num_slots=2, block_bytes=BLOCK_BYTES)
    stored(index, [key(1)])
    index.forget([key(1)])
    assert index.lookup([key(1)]) == []


def test_nvme_index_is_rebuilt_from_the_directory(tmp_path):
    for i in (1, 2):
        files.write_block(tmp_path, key(i), [memoryview(bytes(BLOCK_BYTES))])
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "junk.kv.123.tmp").write_bytes(b"partial")
    index = TierIndex(num_slots=0, block_bytes=BLOCK_BYTES, nvme_root=tmp_path)
    assert [p.tier for p in index.lookup([key(1), key(2)])] == ["nvme", "nvme"]
    assert not (tmp_path / "ab" / "junk.kv.123.tmp").exists()


# ---- files ---------------------------------------------------------------------------

def test_block_file_round_trip(tmp_path):
    data = bytes(range(256)) * 2
    files.write_block(tmp_path, key(7), [memoryview(data[:100]), memoryview(data[100:])])
    out = bytearray(len(data))
    files.read_block(tmp_path, key(7), memoryview(out))
    assert bytes(out) == data


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "missing"])
def test_damaged_block_file_is_an_error(tmp_path, damage):
    data = bytes(range(256))
    files.write_block(tmp_path, key(7), [memoryview(data)])
    path = files.block_path(tmp_path, key(7))
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[:-1]
    elif damage == "extend":
        raw += b"x"
    path.write_bytes(raw)
    if damage == "missing":
        path.unlink()
    with pytest.raises(files.BlockFileError):
        files.read_block(tmp_path, key(7), memoryview(bytearray(len(data))))


def test_block_file_of_another_key_is_an_error(tmp_path):
    files.write_block(tmp_path, key(1), [memoryview(bytes(16))])
    files.block_path(tmp_path, key(1)).rename(files.block_path(tmp_path, key(2)))
    with pytest.raises(files.BlockFileError):
        files.read_block(tmp_path, key(2), memoryview(bytearray(16)))


# ---- config --------------------------------------------------------------------------

def test_tier_config_rejects_unknown_keys():
    cfg = PDConnectorConfig.from_extra_config({"tiers": {"dram_bytes": 1 << 20}})
    assert cfg.tiers == TierConfig(dram_bytes=1 << 20)
    with pytest.raises(ValueError):
        PDConnectorConfig.from_extra_config({"tiers": {"dram_byte": 1}})


# ---- worker-side store ---------------------------------------------------------------

NUM_BLOCKS = 8
LAYER_BYTES = (24, 40)  # two layers, block bytes each


def make_regions() -> list[KVRegion]:
    return [KVRegion(f"layer{i}", torch.zeros((NUM_BLOCKS, n), dtype=torch.uint8),
                     MemoryType.HOST) for i, n in enumerate(LAYER_BYTES)]


def fill(regions, block_id: int, value: int) -> None:
    for r in regions:
        r.blocks[block_id].fill_(value)


def wait_finished(store: TierStore, released=()):
    sending, loaded, errors = set(), set(), set()
    deadline = time.monotonic() + 5
    first = True
    while time.monotonic() < deadline:
        s, l, e = store.take_finished(released if first else ())
        first = False
        sending |= s
        loaded |= l
        errors |= e
        if sending or loaded:
            return sending, loaded, errors
        time.sleep(0.01)
    raise TimeoutError


@pytest.fixture
def tiers(tmp_path):
    regions = make_regions()
    spec = TierSpec(nvme_root=tmp_path, nvme_bytes=None, num_slots=2,
                    block_bytes=sum(LAYER_BYTES))
    index = TierIndex(spec.num_slots, spec.block_bytes, tmp_path)
    store = TierStore(spec, regions)
    yield index, store, regions
    store.close()


def save(index, store, request_id, keys, block_ids):
    plan = index.prepare_store(keys)
    store.submit(TierMetadata(saves=[TierSave(
        request_id, plan.plan_id, tuple(block_ids), tuple(plan.targets),
        tuple(plan.spills), tuple(plan.deletes))]))
    assert wait_finished(store)[0] == {request_id}
    meta = store.take_worker_meta()
    assert meta.saved_plans == [plan.plan_id]
    index.complete_store(plan.plan_id)
    return plan


def load(index, store, request_id, keys, block_ids):
    places = index.lookup(keys)
    store.submit(TierMetadata(loads=[TierLoad(request_id, tuple(block_ids), tuple(places))]))
    _, loaded, errors = wait_finished(store)
    assert loaded == {request_id}
    return places, errors


def test_store_saves_spills_and_loads_back(tiers):
    index, store, regions = tiers
    for b, v in ((0, 11), (1, 22), (2, 33)):
        fill(regions, b, v)
    save(index, store, "r1", [key(1), key(2)], [0, 1])
    plan = save(index, store, "r2", [key(3)], [2])  # DRAM full: key 1 spills to NVMe
    assert [p.key for p in plan.spills] == [key(1)]
    for b in range(3):
        fill(regions, b, 0)
    places, errors = load(index, store, "r3", [key(1), key(2), key(3)], [5, 6, 7])
    assert [p.tier for p in places] == ["nvme", "dram", "dram"] and not errors
    for b, v in ((5, 11), (6, 22), (7, 33)):
        assert all(int(r.blocks[b].min()) == v == int(r.blocks[b].max()) for r in regions)
    stats = store.take_stats()
    assert stats["nvme_hits"] == 1 and stats["dram_hits"] == 2
    assert stats["nvme_bytes_loaded"] == sum(LAYER_BYTES)


def test_corrupt_file_is_a_load_error_and_forgotten(tiers, tmp_path):
    index, store, regions = tiers
    fill(regions, 0, 5)
    index_nvme = TierIndex(0, sum(LAYER_BYTES), tmp_path)
    save(index_nvme, store, "r1", [key(9)], [0])  # no DRAM slots in this index: a file
    path = files.block_path(tmp_path, key(9))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    _, errors = load(index_nvme, store, "r2", [key(9)], [4])
    assert errors == {4}
    assert store.take_worker_meta().bad_keys == [key(9)]
    assert store.take_stats()["tier_load_failures"] == 1
    assert not path.exists()


def test_request_is_freed_when_every_hold_ends(tiers):
    index, store, regions = tiers
    store.hold("r1")  # a P/D lease also holds r1
    plan = index.prepare_store([key(1)])
    store.submit(TierMetadata(saves=[TierSave("r1", plan.plan_id, (0,), tuple(plan.targets))]))
    deadline = time.monotonic() + 5
    while store.take_worker_meta() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.take_finished(())[0] == set()  # save done, lease still held
    assert store.take_finished({"r1"})[0] == {"r1"}
    assert store.take_finished({"other"})[0] == {"other"}  # never held: passes through
