"""Fast tests of kvtransfer's pure parts and of two workers over the loopback transport."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kvtransfer.board import BoardView, LeaseBoard
from kvtransfer.compat import KVSpec, check_compatible
from kvtransfer.config import PDConnectorConfig
from kvtransfer.errors import BlockRangeError, IncompatiblePeer, LeaseUnavailable
from kvtransfer.leases import LeaseTable
from kvtransfer.memory import (
    Run, check_block_ids, coalesce, regions_from_kv_caches, split_runs,
)
from kvtransfer.metadata import LoadSpec, PDConnectorMetadata, TransferParams
from kvtransfer.protocol import (PROTOCOL_VERSION, ProtocolError, PullRequest, decode,
                                 encode)
from kvtransfer.shm import PAGE, FdServer, ParallelCopier, PeerMemory, SharedKV, _parts
from kvtransfer.worker import ModelIdentity, PDWorker
from tests.kvtransfer_helpers.remote import IDENTITY, RemotePrefill, expected_block
from tests.kvtransfer_helpers.workers import (
    NUM_BLOCKS, SHAPE, grant, load, make_worker, wait_finished,
)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# ---- leases ---------------------------------------------------------------------------

def test_lease_expires_and_frees_once():
    clock = FakeClock()
    leases = LeaseTable(clock)
    leases.grant("r1", [1, 2], 30)
    clock.now += 29
    assert leases.expire() == []
    clock.now += 2
    assert leases.expire() == ["r1"]
    assert leases.take_finished() == {"r1"}
    assert leases.take_finished() == set()
    with pytest.raises(LeaseUnavailable, match="expired"):
        leases.begin_read("r1", [1])


def test_heartbeat_extends_lease():
    clock = FakeClock()
    leases = LeaseTable(clock)
    leases.grant("r1", [1], 30)
    clock.now += 25
    assert leases.extend("r1", 30)
    clock.now += 25
    assert leases.expire() == []
    assert not leases.extend("unknown", 30)


def test_lease_is_not_freed_under_a_reader():
    clock = FakeClock()
    leases = LeaseTable(clock)
    leases.grant("r1", [1, 2], 30)
    leases.begin_read("r1", [2])
    clock.now += 60
    assert leases.expire() == []  # being read: not expired under the transfer
    assert leases.release("r1", "done")
    assert leases.take_finished() == set()  # deferred until the read ends
    leases.end_read("r1")
    assert leases.take_finished() == {"r1"}
    assert leases.num_outstanding == 0


def test_lease_board_shows_only_held_leases():
    leases = LeaseTable()
    leases.board = LeaseBoard(np.zeros(8, np.uint64))
    view = BoardView(leases.board.cells, leases.board.key)
    leases.grant("r1", [1, 2, 3], 30)
    leases.grant("r2", [3, 4], 30)  # block 3 shared (a prefix): the later grant shows
    assert view.holds("r1", [1, 2]) and view.holds("r2", [3, 4])
    assert not view.holds("r1", [2, 3]) and not view.holds("r3", [1])
    assert not view.holds("r1", [1, 99]) and not view.holds("r1", [-1]) and not view.holds("r1", [])
    assert not BoardView(leases.board.cells, b"other key").holds("r1", [1])
    leases.begin_read("r1", [1])
    leases.release("r1", "done")  # deferred under a reader: still held, still shown
    assert view.holds("r1", [1, 2])
    leases.end_read("r1")
    assert not view.holds("r1", [1]) and view.holds("r2", [3, 4])
    leases.grant("r2", [5], 30)  # a re-grant replaces the blocks
    assert not view.holds("r2", [3]) and view.holds("r2", [5])
    leases.grant("r1", [1], 30)  # leases never come back in vLLM; if they did, the
    assert view.holds("r1", [1])  # board follows the table
    leases.release("r2", "released")
    assert leases.board.cells[[3, 4, 5]].tolist() == [0, 0, 0]


def test_read_outside_lease_is_refused():
    leases = LeaseTable()
    leases.grant("r1", [1, 2], 30)
    with pytest.raises(BlockRangeError):
        leases.begin_read("r1", [1, 3])


# ---- compatibility, memory, wire ------------------------------------------------------

def _spec(**kw) -> KVSpec:
    base = dict(model="m", dtype="float32", block_size=32, num_layers=4, num_kv_heads=2,
                head_size=64, layout="blocks_first[2, 32, 128]", region_block_bytes=(32768,) * 4)
    return KVSpec(**{**base, **kw})


def test_compat_names_every_mismatch():
    check_compatible(_spec(), _spec(num_blocks=7))  # block counts may differ
    with pytest.raises(IncompatiblePeer, match="block_size.*dtype|dtype.*block_size"):
        check_compatible(_spec(), _spec(block_size=16, dtype="bfloat16"))
    assert KVSpec.from_dict(_spec().to_dict()) == _spec()


def test_compat_refuses_another_protocol_version():
    with pytest.raises(IncompatiblePeer, match=f"protocol: local={PROTOCOL_VERSION} peer=9"):
        check_compatible(_spec(), _spec(protocol=9))
    older = {k: v for k, v in _spec().to_dict().items() if k != "protocol"}
    with pytest.raises(IncompatiblePeer, match="protocol: local=.* peer=0"):
        check_compatible(_spec(), KVSpec.from_dict(older))


def test_block_ids_are_bounds_checked():
    check_block_ids([0, 15], 16, "local")
    for bad in ([16], [-1], ["3"], [True]):
        with pytest.raises(BlockRangeError):
            check_block_ids(bad, 16, "local")


def test_coalesce_merges_runs_in_either_order():
    assert coalesce([4, 5, 6], [10, 11, 12]) == [Run(4, 10, 3)]
    assert coalesce([6, 5, 4], [12, 11, 10]) == [Run(4, 10, 3)]
    assert coalesce([1, 2, 9], [5, 7, 8]) == [Run(1, 5, 1), Run(2, 7, 1), Run(9, 8, 1)]
    with pytest.raises(BlockRangeError):
        coalesce([1, 2], [3])
    assert split_runs([Run(4, 10, 5)], 2) == [Run(4, 10, 2), Run(6, 12, 2), Run(8, 14, 1)]


def test_regions_follow_cpu_and_cuda_layouts():
    regions, layout = regions_from_kv_caches({"a": torch.zeros(8, 2, 32, 16)}, 8)
    assert len(regions) == 1 and regions[0].block_bytes == 2 * 32 * 16 * 4
    regions, layout = regions_from_kv_caches({"a": torch.zeros(2, 8, 32, 2, 8)}, 8)
    assert [r.name for r in regions] == ["a.k", "a.v"] and layout.startswith("kv_first")
    with pytest.raises(ValueError, match="unsupported KV layout"):
        regions_from_kv_caches({"a": torch.zeros(3, 5)}, 8)


def test_wire_messages_round_trip_and_reject_garbage():
    msg = PullRequest(3, "req", [[1, 2]], 3 << 32)
    assert decode(encode(msg)[4:]) == msg
    with pytest.raises(ProtocolError):
        decode(b'{"kind": "pull", "xfer_id": 1}')
    with pytest.raises(ProtocolError):
        decode(b"\xff")


def test_transfer_params_follow_vllm_convention():
    params = TransferParams("e", "r", [3, 4], "127.0.0.1", 5000, 64, 30.0).to_dict()
    assert params["do_remote_prefill"] and not params["do_remote_decode"]
    assert TransferParams.from_dict(params).remote_block_ids == [3, 4]
    nixl_shaped = {**params, "remote_block_ids": [[3, 4]]}
    assert TransferParams.from_dict(nixl_shaped).remote_block_ids == [3, 4]
    assert TransferParams.from_dict({"do_remote_decode": True}) is None


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError):
        PDConnectorConfig.from_extra_config({"lease": 3})
    assert PDConnectorConfig().heartbeat_period_s == 5.0


# ---- two workers over loopback --------------------------------------------------------

@pytest.fixture(params=["off", "auto"], ids=["loopback", "shm"])
def pair(request):
    """The same tests over the loopback transport and over the same-host shm path."""
    prefill, p_caches = make_worker(producer=True, shm=request.param)
    decode_, d_caches = make_worker(producer=False, shm=request.param)
    yield prefill, p_caches, decode_, d_caches
    prefill.shutdown()
    decode_.shutdown()


@pytest.fixture
def shm_pair():
    """Two workers on the same-host shm path (the default), for its own tests."""
    prefill, _ = make_worker(producer=True)
    decode_, _ = make_worker(producer=False)
    yield prefill, decode_
    prefill.shutdown()
    decode_.shutdown()


def test_pull_moves_blocks_and_releases_lease(pair):
    prefill, p_caches, decode_, d_caches = pair
    grant(prefill, "r1", [3, 4, 9])
    load(decode_, prefill, "d1", "r1", local=[5, 6, 7], remote=[3, 4, 9])
    sending, recving, errors = wait_finished(decode_)
    assert recving == {"d1"} and not errors
    for p, d in zip(p_caches.values(), d_caches.values()):
        assert torch.equal(d[[5, 6, 7]], p[[3, 4, 9]])
        assert not d[[0, 1, 2, 8]].any()
    assert wait_finished(prefill)[0] == {"r1"}  # decode's done notice freed the lease
    assert prefill.leases.num_outstanding == 0
    stats = decode_.get_stats().reduce()
    assert stats["blocks_received"] == 3 and stats["num_pull_failures"] == 0
    shm = decode_.config.shm == "auto"
    assert stats["num_pulls_shm"] == stats["num_pulls_direct"] == shm  # no round trip
    assert prefill.get_stats().data["blocks_sent"] == 3


def test_pull_of_tail_after_local_prefix_hit(pair):
    prefill, p_caches, decode_, d_caches = pair
    grant(prefill, "r1", [1, 2, 3])
    load(decode_, prefill, "d1", "r1", local=[8, 9], remote=[1, 2, 3])
    assert wait_finished(decode_)[1] == {"d1"}
    layer0 = next(iter(d_caches.values()))
    assert torch.equal(layer0[[8, 9]], next(iter(p_caches.values()))[[2, 3]])


def test_unknown_lease_fails_into_recompute(pair):
    prefill, _, decode_, _ = pair
    load(decode_, prefill, "d1", "never-granted", local=[5], remote=[3])
    _, recving, errors = wait_finished(decode_)
    assert recving == {"d1"} and errors == {5}
    assert decode_.get_stats().data["failures"] == {"lease_unavailable": 1}


def test_blocks_outside_lease_or_memory_are_refused(pair):
    prefill, _, decode_, _ = pair
    grant(prefill, "r1", [3])
    load(decode_, prefill, "d1", "r1", local=[5], remote=[4])  # not leased
    assert wait_finished(decode_)[2] == {5}
    load(decode_, prefill, "d2", "r1", local=[99], remote=[3])  # outside local memory
    assert wait_finished(decode_)[2] == {99}
    reasons = decode_.get_stats().data["failures"]
    assert reasons == {"block_range": 2}


def _pull_and_stats(decode_, prefill, req: str, lease_id: str, local, remote) -> tuple[set, dict]:
    load(decode_, prefill, req, lease_id, local, remote)
    errors = wait_finished(decode_)[2]
    return errors, decode_.get_stats().data


def test_replayed_params_never_read_freed_blocks(pair):
    """The same kv_transfer_params used twice (a client replay, a proxy retry after an
    abort): the second pull must not take the lease board's word for a lease that ended."""
    prefill, _, decode_, _ = pair
    grant(prefill, "r1", [3, 4])
    errors, stats = _pull_and_stats(decode_, prefill, "d1", "r1", [5, 6], [3, 4])
    assert not errors and stats["num_pulls_direct"] == (decode_.config.shm == "auto")
    assert wait_finished(prefill)[0] == {"r1"}
    grant(prefill, "other", [3, 4])  # vLLM reused the freed blocks for another request
    errors, stats = _pull_and_stats(decode_, prefill, "d2", "r1", [7, 8], [3, 4])
    assert errors == {7, 8} and stats["failures"] == {"lease_unavailable": 1}
    assert stats["num_pulls_direct"] == 0


def test_pull_that_races_its_grant_asks_the_peer(pair):
    prefill, p_caches, decode_, d_caches = pair
    load(decode_, prefill, "d1", "r1", local=[5], remote=[3])
    time.sleep(0.3)  # the pull is waiting for the grant (grant_wait_s)
    grant(prefill, "r1", [3])
    assert wait_finished(decode_) == (set(), {"d1"}, set())
    assert torch.equal(d_caches["layers.1"][5], p_caches["layers.1"][3])
    stats = decode_.get_stats().data
    assert stats["num_pulls_shm"] == (decode_.config.shm == "auto")
    assert stats["num_pulls_direct"] == 0


def test_block_shown_under_a_later_lease_is_asked_for(shm_pair):
    prefill, decode_ = shm_pair
    grant(prefill, "r1", [3, 4])
    grant(prefill, "r2", [4, 5])  # block 4 in both (a shared prefix)
    errors, stats = _pull_and_stats(decode_, prefill, "d1", "r1", [6, 7], [3, 4])
    assert not errors and stats["num_pulls_shm"] == 1 and stats["num_pulls_direct"] == 0
    errors, stats = _pull_and_stats(decode_, prefill, "d2", "r2", [8, 9], [4, 5])
    assert not errors and stats["num_pulls_direct"] == 1


def test_lease_ending_during_a_direct_copy_discards_it(shm_pair):
    prefill, decode_ = shm_pair
    copier = decode_.receiver._copier
    real_start = copier.start

    def start_then_expire(pairs):  # the lease ends (as by expiry) while we copy
        job = real_start(pairs)
        prefill.leases.release("r1", "expired")
        return job

    grant(prefill, "r1", [3, 4])
    copier.start = start_then_expire
    errors, stats = _pull_and_stats(decode_, prefill, "d1", "r1", [6, 7], [3, 4])
    assert errors == {6, 7} and stats["failures"] == {"lease_unavailable": 1}
    assert stats["num_pulls_direct"] == 0


def test_direct_pull_on_an_open_session_is_done_in_the_step():
    """With the session open, a direct pull is copied on the thread that starts it (the
    engine's, in start_load_kv), so that step's get_finished reports it; its PullDone
    still ends the lease. A lease that ends during such a copy still discards it."""
    prefill, p_caches = make_worker(producer=True)
    decode_, d_caches = make_worker(producer=False)
    try:
        grant(prefill, "r1", [3])
        assert not _pull_and_stats(decode_, prefill, "d1", "r1", [5], [3])[0]  # handshake
        assert wait_finished(prefill)[0] == {"r1"}
        grant(prefill, "r2", [4, 9])
        load(decode_, prefill, "d2", "r2", local=[6, 7], remote=[4, 9])
        assert decode_.get_finished()[1] == {"d2"}  # no waiting: done within the call
        assert not decode_.get_block_ids_with_load_errors()
        for p, d in zip(p_caches.values(), d_caches.values()):
            assert torch.equal(d[[6, 7]], p[[4, 9]])
        assert decode_.get_stats().data["num_pulls_direct"] == 1
        assert wait_finished(prefill)[0] == {"r2"}

        copier = decode_.receiver._copier
        real_start = copier.start

        def start_then_expire(pairs):
            job = real_start(pairs)
            prefill.leases.release("r3", "expired")
            return job

        grant(prefill, "r3", [10])
        copier.start = start_then_expire
        errors, stats = _pull_and_stats(decode_, prefill, "d3", "r3", [11], [10])
        assert errors == {11} and stats["failures"] == {"lease_unavailable": 1}
    finally:
        prefill.shutdown()
        decode_.shutdown()


@pytest.mark.parametrize("inline", [True, False])
def test_which_thread_copies_a_direct_pull(inline):
    prefill, _ = make_worker(producer=True)
    decode_, _ = make_worker(producer=False, shm_inline=inline)
    copier = decode_.receiver._copier
    real_start, threads = copier.start, []

    def start(pairs):
        threads.append(threading.current_thread().name)
        return real_start(pairs)

    copier.start = start
    try:
        port = prefill.handshake_metadata().port
        for i in (1, 2):  # the second on an open session
            grant(prefill, f"r{i}", [3 + i])
            spec = LoadSpec(f"d{i}", (6 + i,), f"r{i}", (3 + i,), "127.0.0.1", port)
            result = decode_.pull(spec).result(timeout=30)
            assert result.ok and result.mode == "shm-direct"
        me = threading.current_thread().name
        assert threads == ["kvtransfer-io", me if inline else "kvtransfer-io"]
    finally:
        prefill.shutdown()
        decode_.shutdown()


def test_direct_pulls_can_be_turned_off():
    prefill, _ = make_worker(producer=True)
    decode_, _ = make_worker(producer=False, shm_direct=False)
    try:
        grant(prefill, "r1", [3])
        errors, stats = _pull_and_stats(decode_, prefill, "d1", "r1", [6], [3])
        assert not errors and stats["num_pulls_shm"] == 1 and stats["num_pulls_direct"] == 0
    finally:
        prefill.shutdown()
        decode_.shutdown()


def test_expired_lease_frees_blocks_and_refuses_pull(pair):
    prefill, _, decode_, _ = pair
    grant(prefill, "r1", [3], lease_s=0.3)
    assert wait_finished(prefill, timeout=5)[0] == {"r1"}
    assert prefill.get_stats().data["leases_expired"] == 1
    load(decode_, prefill, "d1", "r1", local=[5], remote=[3])
    assert wait_finished(decode_)[2] == {5}


def test_failed_transfer_reports_blocks_and_frees_lease():
    prefill, _ = make_worker(producer=True, shm="off")
    decode_, _ = make_worker(producer=False, shm="off")
    prefill.transport.fail_sends_after = 1  # the second message of the pull fails
    grant(prefill, "r1", [3, 5])
    load(decode_, prefill, "d1", "r1", local=[6, 9], remote=[3, 5])
    _, recving, errors = wait_finished(decode_)
    assert recving == {"d1"} and errors == {6, 9}
    assert wait_finished(prefill)[0] == {"r1"}
    prefill.shutdown()
    decode_.shutdown()


def test_handshake_checks_secret_and_compatibility():
    prefill, _ = make_worker(producer=True, shared_secret="s3cret")
    wrong, _ = make_worker(producer=False, shared_secret="guess")
    right, right_caches = make_worker(producer=False, shared_secret="s3cret")
    other_model, _ = make_worker(producer=False, shared_secret="s3cret",
                                 identity=ModelIdentity("other", 32, 2, 8))
    older, _ = make_worker(producer=False, shared_secret="s3cret")
    older.receiver._spec = dataclasses.replace(older.spec, protocol=PROTOCOL_VERSION - 1)
    try:
        grant(prefill, "r1", [3])
        cases = [(wrong, "auth_failed"), (other_model, "incompatible_peer"),
                 (older, "incompatible_peer")]
        for worker, reason in cases:
            load(worker, prefill, "d1", "r1", local=[5], remote=[3])
            assert wait_finished(worker)[2] == {5}
            assert worker.get_stats().data["failures"] == {reason: 1}
        load(right, prefill, "d1", "r1", local=[5], remote=[3])
        assert wait_finished(right) == (set(), {"d1"}, set())
    finally:
        for w in (prefill, wrong, right, other_model, older):
            w.shutdown()


def test_dead_peer_fails_fast():
    prefill, _ = make_worker(producer=True)
    decode_, _ = make_worker(producer=False)
    port_holder = prefill
    grant(prefill, "r1", [3])
    prefill.shutdown()
    t0 = time.monotonic()
    load(decode_, port_holder, "d1", "r1", local=[5], remote=[3])
    assert wait_finished(decode_)[2] == {5}
    assert time.monotonic() - t0 < 3
    decode_.shutdown()


def test_heartbeats_keep_a_lease_alive(pair):
    from kvtransfer.metadata import PDConnectorMetadata, PeerNotice

    prefill, _, decode_, _ = pair
    grant(prefill, "r1", [3], lease_s=0.6)
    port = prefill.handshake_metadata().port
    beat = PDConnectorMetadata(heartbeats=[PeerNotice("127.0.0.1", port, ("r1",))])
    for _ in range(6):
        decode_.start_load_kv(beat)
        time.sleep(0.2)
        assert prefill.get_finished()[0] == set()
    load(decode_, prefill, "d1", "r1", local=[5], remote=[3])
    assert wait_finished(decode_) == (set(), {"d1"}, set())


def test_release_frees_a_lease_at_once(pair):
    from kvtransfer.metadata import PDConnectorMetadata, PeerNotice

    prefill, _, decode_, _ = pair
    grant(prefill, "r1", [3])
    port = prefill.handshake_metadata().port
    decode_.start_load_kv(PDConnectorMetadata(releases=[PeerNotice("127.0.0.1", port, ("r1",))]))
    assert wait_finished(prefill)[0] == {"r1"}


def test_stats_aggregate_reduce_and_reach_prometheus():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from kvtransfer import PDConnector
    from kvtransfer.stats import PDConnectorStats, PDPromMetrics

    a, b = PDConnectorStats(), PDConnectorStats()
    a.record_pull(True, 1000, 2, 0.002, None)
    b.record_pull(False, 0, 0, 0.0, "timeout")
    b.record_send(500, 1, None)
    merged = PDConnector.build_kv_connector_stats(a.data).aggregate(b)
    reduced = merged.reduce()
    assert reduced["num_pulls"] == 2 and reduced["bytes_received"] == 1000
    assert reduced["failures_timeout"] == 1 and reduced["pull_ms_avg"] == 2.0

    registry = CollectorRegistry()
    types = {cls: (lambda c: lambda *a, **k: c(*a, registry=registry, **k))(cls)
             for cls in (Counter, Gauge, Histogram)}
    prom = PDPromMetrics(type("C", (), {"kv_transfer_config": None})(), types,
                         ["engine"], {0: ["0"]})
    prom.observe(merged.data, 0)
    assert registry.get_sample_value("vllm:pd_kv_bytes_received_total", {"engine": "0"}) == 1000
    assert registry.get_sample_value(
        "vllm:pd_kv_failures_total", {"engine": "0", "reason": "timeout"}) == 1


# ---- same-host shared memory ----------------------------------------------------------

def _numbered_caches(layers: int = 2) -> dict[str, torch.Tensor]:
    return {f"layers.{i}": torch.arange(np.prod(SHAPE), dtype=torch.float32).reshape(SHAPE)
            + 1e6 * i for i in range(layers)}


def _mid_page_caches(layers: int = 2, offset: int = 100) -> dict[str, torch.Tensor]:
    """KV tensors whose allocation starts mid-page (as malloc'd memory often does)."""
    nbytes = int(np.prod(SHAPE)) * 4
    caches = {}
    for i in range(layers):
        raw = np.zeros(nbytes + 3 * PAGE, np.uint8)
        start = PAGE - raw.ctypes.data % PAGE + offset
        t = torch.from_numpy(raw[start:start + nbytes]).view(torch.float32).reshape(SHAPE)
        t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(SHAPE) + 1e6 * i)
        caches[f"layers.{i}"] = t
    return caches


async def _attach(shared: SharedKV, block_bytes: list[int]) -> PeerMemory:
    server = FdServer(shared.fd)
    await server.start()
    try:
        offer = shared.offer(server.name, server.issue_token())
        peer = await asyncio.to_thread(PeerMemory.attach, offer, block_bytes, 5.0)
        with pytest.raises(OSError):  # a token opens the memory once
            await asyncio.to_thread(PeerMemory.attach, offer, block_bytes, 5.0)
        return peer
    finally:
        await server.close()


def test_shared_kv_keeps_tensors_and_peer_sees_owner_writes():
    caches = _numbered_caches()
    before = {name: (t, t.data_ptr(), t.clone()) for name, t in caches.items()}
    regions, _ = regions_from_kv_caches(caches, NUM_BLOCKS)
    shared = SharedKV.export(regions)
    try:
        for name, t in caches.items():  # same tensor, same address, same contents
            tensor, ptr, contents = before[name]
            assert t is tensor and t.data_ptr() == ptr and torch.equal(t, contents)
        peer = asyncio.run(_attach(shared, [r.block_bytes for r in regions]))
        # Blocks inside every region's window (which blocks straddle a partial page
        # depends on where the allocator put the memory).
        first = max(w.first for w in shared.windows)
        stop = min(w.stop for w in shared.windows)
        caches["layers.1"][first] = 7.0  # written by the owner after the peer mapped
        local = {name: torch.zeros_like(t) for name, t in caches.items()}
        local_regions, _ = regions_from_kv_caches(local, NUM_BLOCKS)
        pairs, outside = peer.plan([Run(first, 0, stop - first)], local_regions)
        assert not outside
        ParallelCopier(2).copy(pairs)
        assert torch.equal(local["layers.1"][:stop - first], caches["layers.1"][first:stop])
        assert (local["layers.1"][0] == 7.0).all()
        with pytest.raises(ValueError, match="read-only"):
            pairs[0][1][0] = 1  # the peer's mapping cannot write the owner's KV
        peer.close()
    finally:
        shared.close()


def test_parallel_copy_cuts_equal_parts_across_pairs(monkeypatch):
    rng = np.random.default_rng(0)
    srcs = [rng.integers(0, 255, (rows, 1000), dtype=np.uint8) for rows in (3, 1, 7, 2)]
    srcs.append(np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::2])  # not contiguous
    dsts = [np.zeros_like(s) for s in srcs]
    parts = _parts(list(zip(dsts, srcs)), 4)
    sizes = [sum(d.nbytes for d, _ in part) for part in parts[:-1]]
    assert len(sizes) == 3 and len(set(sizes)) == 1  # equal, spanning pairs
    assert any(len(part) > 1 for part in parts)
    monkeypatch.setattr("kvtransfer.shm._SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr("kvtransfer.shm._CHUNK_BYTES", 1000)  # several parts a thread
    copier = ParallelCopier(2)
    copier.copy(list(zip(dsts, srcs)))
    copier.close()
    assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs))


class _CountingMap:
    """A mapping that records its MADV_POPULATE_READ ranges (and does them)."""

    def __init__(self, mapping):
        self._map = mapping
        self.populated: list[tuple[int, int]] = []

    def madvise(self, option: int, start: int, length: int) -> None:
        self.populated.append((start, length))
        self._map.madvise(option, start, length)

    def close(self) -> None:
        self._map.close()


def test_peer_blocks_are_populated_once_per_session():
    caches = _numbered_caches()
    regions, _ = regions_from_kv_caches(caches, NUM_BLOCKS)
    shared = SharedKV.export(regions)
    try:
        peer = asyncio.run(_attach(shared, [r.block_bytes for r in regions]))
        counting = peer._map = _CountingMap(peer._map)
        first = max(w.first for w in shared.windows)
        local = {name: torch.zeros_like(t) for name, t in caches.items()}
        local_regions, _ = regions_from_kv_caches(local, NUM_BLOCKS)
        peer.plan([Run(first, 0, 2)], local_regions)
        assert len(counting.populated) == len(regions)
        peer.plan([Run(first, 3, 2)], local_regions)  # same peer blocks, other local ones
        assert len(counting.populated) == len(regions)
        counting.populated.clear()
        pairs, _ = peer.plan([Run(first, 0, 4)], local_regions)  # two of them new
        expected = []
        for w, r in zip(shared.windows, regions):
            offset = w.offset + (first + 2 - w.first) * r.block_bytes
            page = offset // PAGE * PAGE
            expected.append((page, offset + 2 * r.block_bytes - page))
        assert counting.populated == expected
        ParallelCopier(1).copy(pairs)
        for name, t in caches.items():
            assert torch.equal(local[name][:4], t[first:first + 4])
        peer.close()
    finally:
        shared.close()


def test_blocks_straddling_a_partial_page_are_not_shared():
    caches = _mid_page_caches()
    regions, _ = regions_from_kv_caches(caches, NUM_BLOCKS)
    shared = SharedKV.export(regions)
    try:
        last = NUM_BLOCKS - 1
        assert all(w.first == 1 and w.stop == last for w in shared.windows)
        peer = asyncio.run(_attach(shared, [r.block_bytes for r in regions]))
        local_regions, _ = regions_from_kv_caches(_numbered_caches(), NUM_BLOCKS)
        pairs, outside = peer.plan([Run(0, 0, NUM_BLOCKS)], local_regions)
        assert outside == [(0, Run(0, 0, 1)), (0, Run(last, last, 1)),
                           (1, Run(0, 0, 1)), (1, Run(last, last, 1))]
        assert [p[0].nbytes for p in pairs] == [(NUM_BLOCKS - 2) * r.block_bytes
                                                for r in local_regions]
        assert peer.plan([Run(1, 0, NUM_BLOCKS - 2)], local_regions)[1] == []
        peer.close()
    finally:
        shared.close()


def test_blocks_outside_the_shared_range_come_over_the_transport():
    def worker_with(caches, producer):
        worker = PDWorker(PDConnectorConfig(transport="loopback"), IDENTITY,
                          is_producer=producer, is_consumer=not producer)
        worker.register_kv_caches(caches, NUM_BLOCKS)
        return worker

    p_caches, d_caches = _mid_page_caches(), _numbered_caches()
    for t in d_caches.values():
        t.zero_()
    prefill, decode_ = worker_with(p_caches, True), worker_with(d_caches, False)
    try:
        grant(prefill, "r1", [0, 1])
        load(decode_, prefill, "d1", "r1", local=[4, 5], remote=[0, 1])  # 0: partial page
        grant(prefill, "r2", [6, 7])
        load(decode_, prefill, "d2", "r2", local=[8, 9], remote=[6, 7])
        done = set()
        while len(done) < 2:
            _, recving, errors = wait_finished(decode_)
            assert not errors
            done |= recving
        for p, d in zip(p_caches.values(), d_caches.values()):
            assert torch.equal(d[[4, 5, 8, 9]], p[[0, 1, 6, 7]])
        stats = decode_.get_stats().data
        assert stats["num_pulls"] == 2 and stats["num_pulls_shm"] == 2  # block 0: mixed
    finally:
        prefill.shutdown()
        decode_.shutdown()


def test_failed_shm_copy_reports_blocks_and_frees_lease(shm_pair):
    prefill, decode_ = shm_pair

    class BrokenCopy:  # injected fault: the copy dies half way
        def __init__(self, pairs):
            self.pairs = pairs

        def finish(self):
            np.copyto(*self.pairs[0])
            raise MemoryError("injected copy failure")

    grant(prefill, "r1", [3, 4])
    load(decode_, prefill, "warm", "none", local=[1], remote=[1])  # maps the peer
    wait_finished(decode_)
    decode_.receiver._copier.start = BrokenCopy
    load(decode_, prefill, "d1", "r1", local=[6, 7], remote=[3, 4])
    _, recving, errors = wait_finished(decode_)
    assert recving == {"d1"} and errors == {6, 7}
    assert wait_finished(prefill)[0] == {"r1"}  # unpinned and freed
    assert prefill.leases.num_outstanding == 0


@pytest.mark.parametrize("shm", ["auto", "off"])
def test_pull_between_two_processes(shm):
    """The prefill worker in another process, over ucxx; shm 'auto' maps its memory."""
    prefill = RemotePrefill(shm=shm)
    decode_ = PDWorker(PDConnectorConfig(transport="ucx", shm=shm), IDENTITY,
                       is_producer=False, is_consumer=True)
    caches = {f"layers.{i}": torch.zeros(SHAPE) for i in range(2)}
    decode_.register_kv_caches(caches, NUM_BLOCKS)

    def pull(req: str, local: list[int], remote: list[int]) -> None:
        prefill.call("grant", (req, remote))
        spec = LoadSpec(req, tuple(local), req, tuple(remote), "127.0.0.1", prefill.port)
        decode_.start_load_kv(PDConnectorMetadata(loads=[spec]))
        assert wait_finished(decode_) == (set(), {req}, set())

    try:
        pull("r1", [5, 6, 7], [2, 3, 4])
        prefill.call("write", (9, -1.0))  # after the decode side mapped the memory
        pull("r2", [8], [9])
        for i, t in enumerate(caches.values()):
            for local, remote in ((5, 2), (6, 3), (7, 4)):
                assert torch.equal(t[local], expected_block(i, remote))
            assert (t[8] == -1.0).all() and not t[[0, 1, 2, 3, 4, 9]].any()
        stats = decode_.get_stats().data
        assert stats["num_pulls"] == 2
        assert stats["num_pulls_shm"] == stats["num_pulls_direct"] == (2 if shm == "auto" else 0)
        assert wait_until_sent(prefill, 2)
        assert prefill.call("leases") == 0  # both released
    finally:
        decode_.shutdown()
        prefill.stop()


def wait_until_sent(prefill: RemotePrefill, num_sends: int, timeout: float = 10) -> bool:
    deadline, sent = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        data = prefill.call("stats")  # counts since the last call
        sent += data.get("num_sends", 0) - data.get("num_send_failures", 0)
        if sent >= num_sends:
            return True
        time.sleep(0.05)
    return False
