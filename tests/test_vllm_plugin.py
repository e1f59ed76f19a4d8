"""serving.vllm_plugin: vLLM loads it in its engine processes; it caps how long a
message-queue reader busy-waits."""

from __future__ import annotations

import time
from importlib.metadata import entry_points

import pytest
import zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

from serving.vllm_plugin import IDLE_RECHECK_MS, MIN_SPIN_S, SPIN_ENV, cap_engine_spin


def test_vllm_finds_the_plugin():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("pdserve_engine_spin") == "serving.vllm_plugin:cap_engine_spin"


@pytest.fixture
def reader(monkeypatch, tmp_path):
    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)  # restored afterwards
    context = zmq.Context()
    cond = SpinCondition(True, context, f"ipc://{tmp_path}/notify")
    yield cond
    context.destroy(linger=0)


def test_a_reader_sleeps_after_the_set_spin(monkeypatch, reader):
    monkeypatch.setenv(SPIN_ENV, "0.05")
    cap_engine_spin()
    cap_engine_spin()  # vLLM may load plugins twice: one cap, not a wrapper's wrapper
    assert reader.busy_loop_s == 1  # vLLM's default, until the reader waits
    reader.record_read()
    reader.wait(timeout_ms=0)
    assert reader.busy_loop_s == 0.05
    reader.last_read = time.monotonic() - 0.1  # past the cap: waits on the socket
    started = time.monotonic()
    reader.wait(timeout_ms=30)  # nothing is written: it sleeps until the timeout
    assert time.monotonic() - started >= 0.025


def test_a_sleeping_reader_rechecks_its_queue(monkeypatch, reader):
    """vLLM's wake-up pings are best-effort: one dropped would leave a reader asleep
    until vLLM's own 5 s recheck; with the cap set, it looks again within 50 ms."""
    monkeypatch.setenv(SPIN_ENV, "0.05")
    cap_engine_spin()
    reader.last_read = time.monotonic() - 0.1
    for timeout_ms in (5000, None):
        started = time.monotonic()
        reader.wait(timeout_ms=timeout_ms)  # no ping comes
        assert IDLE_RECHECK_MS / 2e3 <= time.monotonic() - started < 1


def test_a_cap_below_the_floor_is_refused(monkeypatch, reader):
    monkeypatch.setenv(SPIN_ENV, str(MIN_SPIN_S / 10))
    with pytest.raises(ValueError, match="at least"):
        cap_engine_spin()


def test_unset_leaves_vllm_as_it_is(monkeypatch, reader):
    monkeypatch.delenv(SPIN_ENV, raising=False)
    original = SpinCondition.wait
    cap_engine_spin()
    assert SpinCondition.wait is original
    reader.wait(timeout_ms=0)
    assert reader.busy_loop_s == 1
