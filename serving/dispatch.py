"""From a validated request to a reply stream from an engine replica.

Aggregated: the request goes to the pool as it is. P/D (see ../shared DESIGN "Request
flow"): the router assigns a decode replica and maybe a prefill replica; the prefill
replica computes the prompt's KV (`max_tokens=1`, `do_remote_decode`) and returns
`kv_transfer_params`, which ride verbatim on the decode request so its connector pulls
the blocks. A prefill that fails, dies or times out costs nothing but time: the decode
replica prefills locally.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from serving.config import AppConfig, Role
from serving.engine import ENGINE_SECONDS_KEY
from serving.errors import OverloadedError
from serving.router import RouterClient

logger = logging.getLogger("pdserve.dispatch")
PREFILL_DROPPED_FIELDS = ("stream_options", "logprobs", "top_logprobs", "min_tokens",
                          "max_completion_tokens", "n", "best_of")


@dataclass(slots=True)
class Dispatch:
    """Where one request went: the reply stream and what the metrics need."""

    reply: Any
    path: str  # aggregated | remote | local | fallback
    reason: str
    decode_replica: str | None = None
    route_s: float = 0.0  # the router's assign() as the ingress saw it
    prefill_s: float = 0.0  # the remote prefill as the ingress saw it
    prefill_engine_s: float = 0.0  # ... and inside the prefill replica
    started: float = field(default_factory=time.perf_counter)

    def server_timing(self) -> str:
        """A Server-Timing header value (milliseconds), for clients and benchmarks."""
        parts = [("route", self.route_s)]
        if self.prefill_s:
            parts += [("prefill", self.prefill_s), ("prefill-engine", self.prefill_engine_s)]
        return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in parts)


def is_replica_death(exc: BaseException) -> bool:
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


class Dispatcher:
    def __init__(self, config: AppConfig, router: RouterClient, engines: dict[Role, Any]):
        self.config = config
        self.router = router
        self.engines = engines
        self.tokenizer = None
        if config.is_disaggregated and config.router.policy == "conditional":
            self.tokenizer = _load_tokenizer(config.model)

    async def start(self, endpoint: str, body: dict, session: str | None) -> Dispatch:
        if not self.config.is_disaggregated:
            reply = self.engines[Role.AGGREGATED].options(stream=True).generate.remote(
                endpoint, body)
            return Dispatch(reply, "aggregated", "aggregated")
        started = time.perf_counter()
        try:
            route = await self.router.call("assign", self._num_prompt_tokens(endpoint, body),
                                           session, _may_disaggregate(body))
        except LookupError as exc:
            raise OverloadedError("no decode replica is available") from exc
        dispatch = Dispatch(None, "local", route["reason"], route["decode"],
                            route_s=time.perf_counter() - started)
        if route["prefill"] is not None:
            started = time.perf_counter()
            prefilled = await self._prefill(endpoint, body, route["prefill"])
            dispatch.prefill_s = time.perf_counter() - started
            if prefilled is not None:
                body = {**body, "kv_transfer_params": prefilled["kv_transfer_params"]}
                dispatch.path = "remote"
                dispatch.prefill_engine_s = prefilled.get(ENGINE_SECONDS_KEY, 0.0)
            else:
                dispatch.path = "fallback"
        dispatch.reply = self.engines[Role.DECODE].options(stream=True).generate.remote(
            endpoint, body, replica_id=route["decode"])
        return dispatch

    async def on_failure(self, dispatch: Dispatch, exc: BaseException) -> None:
        if dispatch.decode_replica is not None and is_replica_death(exc):
            await self.router.call("mark_failed", dispatch.decode_replica)

    async def models(self) -> dict:
        pool = Role.DECODE if self.config.is_disaggregated else Role.AGGREGATED
        return await self.engines[pool].models.remote()

    async def _prefill(self, endpoint: str, body: dict, replica_id: str) -> dict | None:
        """The remote prefill's reply (with kv_transfer_params), or None to prefill
        locally."""
        request = {k: v for k, v in body.items() if k not in PREFILL_DROPPED_FIELDS}
        request.update(stream=False, max_tokens=1,
                       kv_transfer_params={"do_remote_decode": True})
        reply = self.engines[Role.PREFILL].prefill.remote(endpoint, request,
                                                          replica_id=replica_id)
        try:
            result = await asyncio.wait_for(reply, self.config.router.prefill_timeout_s)
        except Exception as exc:
            reply.cancel()
            logger.warning("prefill on %s failed (%r); prefilling locally", replica_id, exc)
            if is_replica_death(exc) or isinstance(exc, asyncio.TimeoutError):
                await self.router.call("mark_failed", replica_id)
            return None
        if "error" in result or not result.get("kv_transfer_params"):
            return None  # the decode replica will answer the same request (or error)
        return result

    def _num_prompt_tokens(self, endpoint: str, body: dict) -> int:
        """Prompt length for the policy; exact with a tokenizer, else estimated."""
        if self.tokenizer is None:
            return len(str(body.get("prompt") or body.get("messages") or "")) // 4
        try:
            if endpoint == "chat":
                return len(self.tokenizer.apply_chat_template(
                    body["messages"], tokenize=True, add_generation_prompt=True))
            prompt = body["prompt"]
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                return len(prompt)
            text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
            return len(self.tokenizer(text)["input_ids"])
        except Exception:  # an odd but valid prompt shape: estimate
            return len(str(body.get("prompt") or body.get("messages"))) // 4


def _may_disaggregate(body: dict) -> bool:
    """P/D serves one sequence per prompt computed once; the rest prefill locally."""
    return ((body.get("n") or 1) == 1 and not body.get("echo")
            and not body.get("prompt_logprobs") and "kv_transfer_params" not in body
            and not (isinstance(body.get("prompt"), list) and len(body["prompt"]) > 1
                     and not isinstance(body["prompt"][0], int)))


def _load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    from serving.model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))
