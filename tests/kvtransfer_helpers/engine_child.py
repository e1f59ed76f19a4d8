"""The engine side of EngineProcess (runs in the spawned process)."""

from __future__ import annotations

import asyncio
import traceback
import uuid
from typing import Any

import psutil
from vllm import AsyncEngineArgs, SamplingParams
from vllm.config import KVTransferConfig
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase


class _Recorder(StatLoggerBase):
    """Keeps the last KV usage and sums the connector stats the engine reports."""

    latest: "_Recorder | None" = None

    def __init__(self, vllm_config, engine_index: int = 0):
        self.kv_cache_usage = 0.0
        self.connector: dict[str, Any] = {}
        _Recorder.latest = self

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is None:
            return
        self.kv_cache_usage = scheduler_stats.kv_cache_usage
        ext = scheduler_stats.connector_prefix_cache_stats
        if ext is not None:  # tokens the connector supplied instead of compute
            self.connector["external_hits"] = self.connector.get("external_hits", 0) + ext.hits
        for key, value in (scheduler_stats.kv_connector_stats or {}).items():
            if isinstance(value, (int, float)) and key != "leases_outstanding":
                self.connector[key] = self.connector.get(key, 0) + value
            elif isinstance(value, dict) and all(
                    isinstance(v, (int, float)) for v in value.values()):
                bucket = self.connector.setdefault(key, {})
                for k, v in value.items():
                    bucket[k] = bucket.get(k, 0) + v
            elif isinstance(value, list):
                self.connector.setdefault(key, []).extend(value)
            else:
                self.connector[key] = value

    def log_engine_initialized(self):
        pass


async def _generate(engine: AsyncLLM, prompt: list[int], max_tokens: int, params):
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              extra_args={"kv_transfer_params": params} if params else None)
    final = None
    async for out in engine.generate({"prompt_token_ids": prompt}, sampling,
                                     request_id=uuid.uuid4().hex):
        final = out
    return {
        "token_ids": list(final.outputs[0].token_ids),
        "kv_transfer_params": final.kv_transfer_params,
        "num_cached_tokens": final.num_cached_tokens or 0,
    }


async def serve(conn, kwargs: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    try:
        if "kv_transfer_config" in kwargs:
            kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=[_Recorder])
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    me = psutil.Process()
    conn.send(("ready", {"pids": [me.pid] + [c.pid for c in me.children(recursive=True)]}))
    while True:
        cmd, arg = await loop.run_in_executor(None, conn.recv)
        try:
            if cmd == "generate":
                prompts, max_tokens, params = arg
                outs = await asyncio.gather(*(
                    _generate(engine, p, max_tokens, kv) for p, kv in zip(prompts, params)))
                conn.send(("ok", outs))
            elif cmd == "stats":
                rec = _Recorder.latest
                conn.send(("ok", {"kv_cache_usage": rec.kv_cache_usage,
                                  "connector": rec.connector}))
            elif cmd == "stop":
                engine.shutdown()
                conn.send(("ok", None))
                return
        except Exception:
            conn.send(("error", traceback.format_exc()))
