"""The scheduler half on its own: what it plans for prefill and decode requests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from vllm.v1.request import RequestStatus

from kvtransfer.config import PDConnectorConfig
from kvtransfer.metadata import PDHandshakeMetadata, TransferParams
from kvtransfer.scheduler import PDScheduler


@dataclass
class FakeRequest:
    request_id: str
    kv_transfer_params: dict | None
    num_prompt_tokens: int = 100
    num_computed_tokens: int = 100
    status: RequestStatus = RequestStatus.FINISHED_LENGTH_CAPPED


@dataclass
class FakeBlocks:
    unhashed: list[int] = field(default_factory=list)

    def get_unhashed_block_ids_all_groups(self):
        return [self.unhashed]


def prefill_scheduler(**config) -> PDScheduler:
    sched = PDScheduler(PDConnectorConfig(**config), engine_id="P")
    sched.set_handshake_metadata({(0, 0): PDHandshakeMetadata("127.0.0.1", 4242)})
    return sched


def remote_params(**overrides) -> dict:
    params = TransferParams("P", "req-p", [7, 8, 9, 10], "127.0.0.1", 4242, 100, 30.0).to_dict()
    return {**params, **overrides}


def test_finished_prefill_holds_blocks_under_lease():
    sched = prefill_scheduler(lease_s=12)
    req = FakeRequest("r1", {"do_remote_decode": True})
    hold, params = sched.request_finished(req, [3, 4, 5, 6])
    assert hold is True
    assert params["do_remote_prefill"] and params["remote_block_ids"] == [3, 4, 5, 6]
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", 4242)
    assert params["remote_request_id"] == "r1" and params["remote_lease_s"] == 12
    meta = sched.build_connector_meta()
    assert [(g.request_id, g.block_ids, g.lease_s) for g in meta.grants] == [
        ("r1", (3, 4, 5, 6), 12)]
    assert sched.build_connector_meta().is_empty()


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])
def test_aborted_prefill_frees_at_once(status):
    sched = prefill_scheduler()
    req = FakeRequest("r1", {"do_remote_decode": True}, status=status)
    assert sched.request_finished(req, [3]) == (False, None)
    assert sched.build_connector_meta().is_empty()


def test_plain_request_is_left_alone():
    sched = prefill_scheduler()
    req = FakeRequest("r1", None)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert sched.request_finished(req, [3]) == (False, None)


def test_decode_loads_prompt_asynchronously_into_allocated_blocks():
    sched = prefill_scheduler()
    req = FakeRequest("d1", remote_params(), num_computed_tokens=0)
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (100, True)
    assert sched.get_num_new_matched_tokens(req, 0) == (100, True)  # side-effect free
    sched.update_state_after_alloc(req, FakeBlocks([20, 21, 22, 23]), 100)
    (load,) = sched.build_connector_meta().loads
    assert load.local_block_ids == (20, 21, 22, 23)
    assert load.remote_block_ids == (7, 8, 9, 10) and load.remote_request_id == "req-p"
    # planned once: a later allocation (after the load) plans nothing new
    assert sched.get_num_new_matched_tokens(req, 100) == (0, False)
    sched.update_state_after_alloc(req, FakeBlocks([24]), 0)
    assert sched.build_connector_meta().is_empty()


def test_full_local_hit_releases_remote_lease():
    sched = prefill_scheduler()
    req = FakeRequest("d1", remote_params())
    sched.update_state_after_alloc(req, FakeBlocks([]), 0)
    (note,) = sched.build_connector_meta().releases
    assert note.lease_ids == ("req-p",)


def test_decode_aborted_before_alloc_releases_remote_lease():
    sched = prefill_scheduler()
    req = FakeRequest("d1", remote_params(), status=RequestStatus.FINISHED_ABORTED)
    sched.on_new_request(req)
    assert sched.request_finished(req, []) == (False, None)
    meta = sched.build_connector_meta()
    assert [n.lease_ids for n in meta.releases] == [("req-p",)] and not meta.heartbeats


def test_waiting_decode_request_heartbeats_its_lease():
    sched = prefill_scheduler(heartbeat_s=0.05)
    req = FakeRequest("d1", remote_params(), num_computed_tokens=0)
    sched.on_new_request(req)
    time.sleep(0.06)
    (beat,) = sched.build_connector_meta().heartbeats
    assert (beat.remote_port, beat.lease_ids) == (4242, ("req-p",))
    assert not sched.build_connector_meta().heartbeats  # throttled
    sched.update_state_after_alloc(req, FakeBlocks([1, 2, 3, 4]), 100)
    time.sleep(0.06)
    assert not sched.build_connector_meta().heartbeats  # the load started: stop
