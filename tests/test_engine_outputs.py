"""serving.engine: how a replica's vLLM engine hands its outputs to the requests'
readers (no engine started)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serving.engine import _yield_between_outputs


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
