"""A vLLM general plugin (entry point `vllm.general_plugins`, loaded by vLLM in every
engine process: EngineCore and workers) for what vLLM exposes no setting for.

`PDSERVE_ENGINE_SPIN_S`: how long a reader of vLLM's shared-memory message queues (a
worker waiting for the scheduler's next step, the EngineCore waiting for a worker's
reply) keeps busy-waiting after its last message before it sleeps on the queue's
socket. vLLM's own value is 1 s: after every request, each engine process keeps a core
busy for a second. On a CPU box whose engines share cores with each other and with the
serving processes, that second is taken from whoever needs the core next: a prefill
engine that just handed its KV over to decode spins on while decode streams its first
tokens. A running engine is not slowed by a short value: its steps follow each other
well within it, so its readers never sleep; the first step after an idle spell waits
for a socket wake-up (about 0.1 ms). Unset: vLLM's behaviour.

The wake-up is a ZeroMQ PUB/SUB ping that vLLM sends best-effort (the writer's
high-water mark is 1, so a ping is dropped while an earlier one counts as unread), and a
reader whose ping was dropped sleeps until vLLM's recheck, 5 s later. A reader that
busy-waits reads without taking the pings, so the closer the cap comes to the gap
between an engine's steps, the more often a reader sleeps right after it and misses
the next ping: at 0.5-1 ms caps here, engines stalled for seconds within a few requests.
Hence a floor, `MIN_SPIN_S`, well above the gap between steps, and, with the cap set,
a sleeping reader rechecks its queue every `IDLE_RECHECK_MS` (vLLM: 5 s), so a dropped
ping costs at most that (an idle engine wakes 20 times a second for it).
"""

from __future__ import annotations

import os

SPIN_ENV = "PDSERVE_ENGINE_SPIN_S"
MIN_SPIN_S = 0.01
IDLE_RECHECK_MS = 50


def cap_engine_spin() -> None:
    value = os.environ.get(SPIN_ENV)
    if not value:
        return
    seconds = float(value)
    if seconds < MIN_SPIN_S:
        raise ValueError(f"{SPIN_ENV} must be at least {MIN_SPIN_S} s, got {value!r}: "
                         "below it engines miss wake-ups (see serving/vllm_plugin.py)")
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    original = SpinCondition.wait
    if getattr(original, "pdserve_spin_s", None) is not None:
        return  # vLLM may load plugins more than once in one process

    def wait(self, timeout_ms: int | None = None) -> None:
        if self.busy_loop_s > seconds:  # readers only: a writer's is 0
            self.busy_loop_s = seconds
        # The caller loops: it checks its queue again and waits again until its deadline.
        timeout_ms = IDLE_RECHECK_MS if timeout_ms is None else min(timeout_ms,
                                                                    IDLE_RECHECK_MS)
        return original(self, timeout_ms)

    wait.pdserve_spin_s = seconds  # type: ignore[attr-defined]
    SpinCondition.wait = wait
