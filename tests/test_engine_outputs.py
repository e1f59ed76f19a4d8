"""serving.engine: how a replica's vLLM engine hands its outputs to the requests'
readers (no engine started)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serving.engine import _record_stats_after_readers, _yield_between_outputs


async def test_readers_take_one_engine_step_before_the_next_is_handed_out():
    """vLLM's output handler awaits the engine's next outputs and puts them in each
    request's collector, which merges them into outputs not yet taken: with two steps
    queued, it took the second before any reader ran (two tokens in one SSE event)."""
    order = []

    class Client:  # vLLM's engine client: its queue already holds the next step
        async def get_output_async(self):
            order.append("take")
            return "step"

    engine = SimpleNamespace(engine_core=Client())
    _yield_between_outputs(engine)

    async def reader():
        order.append("read")

    task = asyncio.get_running_loop().create_task(reader())  # woken by the last put
    assert await engine.engine_core.get_output_async() == "step"
    await task
    assert order == ["read", "take"]


async def test_a_steps_stats_are_recorded_after_the_readers_its_outputs_woke():
    """vLLM's output handler records a step's stats right after putting its outputs in
    the collectors (each sets an asyncio.Event its reader waits on): unwrapped, every
    token waited for the record."""
    order = []

    class Manager:  # vLLM's StatLoggerManager
        def record(self, scheduler_stats, iteration_stats, engine_idx=0):
            order.append(("record", scheduler_stats))

    engine = SimpleNamespace(logger_manager=Manager())
    _record_stats_after_readers(engine)
    output_ready = asyncio.Event()  # a request's output collector

    async def reader():
        await output_ready.wait()
        order.append("read")

    task = asyncio.get_running_loop().create_task(reader())
    await asyncio.sleep(0)  # the reader waits for its next output
    output_ready.set()  # the handler puts the step's output...
    engine.logger_manager.record(scheduler_stats="step 1", iteration_stats=None)  # ...records
    await task
    assert order == ["read", ("record", "step 1")]


def test_an_engine_without_stats_is_left_alone():
    engine = SimpleNamespace(logger_manager=None)  # vLLM with stats disabled
    _record_stats_after_readers(engine)
    assert engine.logger_manager is None
