"""Real vLLM engines in their own processes, driven over a pipe, for end-to-end tests.

`EngineProcess.start(...)` spawns a process that runs an AsyncLLM (whose EngineCore is
its child process) and answers three commands: generate (a batch, run concurrently),
stats (what a stat logger saw: KV usage, connector stats), and stop. `kill()` SIGKILLs
the process and its engine core, as a crashed prefill node would vanish.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}


def engine_kwargs(model: str, kv_role: str | None = None, extra: dict | None = None,
                  **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=model, dtype="float32", enforce_eager=True, block_size=32,
        max_model_len=4096, max_num_seqs=16, enable_prefix_caching=False,
        max_num_batched_tokens=4096, disable_log_stats=False,
    )
    if kv_role is not None:
        kwargs["kv_transfer_config"] = dict(
            kv_connector="PDConnector", kv_connector_module_path="kvtransfer",
            kv_role=kv_role, kv_load_failure_policy="recompute",
            kv_connector_extra_config=extra or {},
        )
    kwargs.update(overrides)
    return kwargs


@dataclass
class Completion:
    token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None
    num_cached_tokens: int


@dataclass
class EngineStats:
    kv_cache_usage: float
    connector: dict[str, Any] = field(default_factory=dict)  # summed over the run


class EngineProcess:
    def __init__(self, kwargs: dict[str, Any], env: dict[str, str] | None = None):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main, args=(child, kwargs, {**CPU_ENV, **(env or {})}), daemon=False
        )
        self._proc.start()
        self.pids: list[int] = [self._proc.pid]

    def wait_ready(self, timeout: float = 300) -> "EngineProcess":
        kind, payload = self._recv(timeout)
        if kind != "ready":
            raise RuntimeError(f"engine failed to start: {payload}")
        self.pids = payload["pids"]
        return self

    def _recv(self, timeout: float):
        if not self._conn.poll(timeout):
            raise TimeoutError(f"engine did not answer in {timeout}s")
        return self._conn.recv()

    def _call(self, cmd: str, arg: Any = None, timeout: float = 300) -> Any:
        self._conn.send((cmd, arg))
        kind, payload = self._recv(timeout)
        if kind == "error":
            raise RuntimeError(payload)
        return payload

    def generate(self, prompts: list[list[int]], max_tokens: int,
                 kv_transfer_params: list[dict | None] | None = None) -> list[Completion]:
        params = kv_transfer_params or [None] * len(prompts)
        out = self._call("generate", (prompts, max_tokens, params))
        return [Completion(**c) for c in out]

    def stats(self) -> EngineStats:
        return EngineStats(**self._call("stats"))

    def kill(self) -> None:
        """SIGKILL every process, and return once they are gone (their sockets closed,
        as a vanished node's are), not while the engine core is still tearing down."""
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._proc.join(10)
        wait_until(lambda: not any(map(_alive, self.pids)), 10, 0.05)

    def stop(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("stop", timeout=60)
            except Exception:
                pass
            self._proc.join(30)
        if self._proc.is_alive():
            self.kill()


def _child_main(conn, kwargs: dict[str, Any], env: dict[str, str]) -> None:
    os.environ.update(env)
    import asyncio

    from tests.kvtransfer_helpers.engine_child import serve

    asyncio.run(serve(conn, kwargs))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
