"""serving.vllm_plugin: vLLM loads it in its engine processes; it caps how long a
message-queue reader busy-waits."""

from __future__ import annotations

import time
from importlib.metadata import entry_points

import pytest
import zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

from serving.vllm_plugin import SPIN_ENV, cap_engine_spin


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
    reader.wait(timeout_ms=200)  # nothing is written: it sleeps until the timeout
    assert time.monotonic() - started >= 0.15


def test_unset_leaves_vllm_as_it_is(monkeypatch, reader):
    monkeypatch.delenv(SPIN_ENV, raising=False)
    original = SpinCondition.wait
    cap_engine_spin()
    assert SpinCondition.wait is original
    reader.wait(timeout_ms=0)
    assert reader.busy_loop_s == 1
