"""From a validated request to a reply stream from an engine replica.

Aggregated: the request goes to the pool as it is. P/D (see ../shared DESIGN "Request
flow"): the router assigns a decode replica and maybe a prefill replica; the prefill
replica computes the prompt's KV (`max_tokens=1`, `do_remote_decode`) and returns
`kv_transfer_params`, which ride verbatim on the decode request so its connector pulls
the blocks. A prefill that fails, dies or times out costs nothing but time: the decode
replica prefills locally. Most completions take the prefill's first token as theirs
(head.py): the decode request continues after it, and is sent only once that token is
on its way to the client (`DeferredReply`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ray.exceptions import RayActorError

from serving.config import AppConfig, Role
from serving.direct import DirectClient, DirectClients, DirectUnavailable, ReplicaGone
from serving.engine import ENGINE_SECONDS_KEY
from serving.head import (Head, decode_body, head_from_prefill, is_token_ids,
                          may_answer_head, prefill_fields)
from serving.prefix import HashSpec, PromptHasher
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
    ingress_s: float = 0.0  # the ingress's own work before the router call
    route_s: float = 0.0  # the router's assign() as the ingress saw it
    policy_s: float = 0.0  # ... and its policy's decision inside the router
    matched_tokens: int | None = None  # prompt tokens the prefilling replica held
    prefill_s: float = 0.0  # the remote prefill as the ingress saw it
    prefill_engine_s: float = 0.0  # ... and inside the prefill replica
    head: Head | None = None  # the first token, from the prefill's reply (head.py)

    def server_timing(self) -> str:
        """A Server-Timing header value (milliseconds), for clients and benchmarks."""
        parts = [("ingress", self.ingress_s), ("route", self.route_s)]
        if self.policy_s:
            parts.append(("route-policy", self.policy_s))
        if self.prefill_s:
            parts += [("prefill", self.prefill_s), ("prefill-engine", self.prefill_engine_s)]
        timing = ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in parts)
        if self.head is not None:
            timing += ', first-token;desc="prefill"'
        return timing


def is_replica_death(exc: BaseException) -> bool:
    """The replica's actor died or is unreachable (ActorDiedError and
    ActorUnavailableError are both RayActorErrors), or its direct socket closed."""
    return isinstance(exc, (RayActorError, ReplicaGone))


class DeferredReply:
    """A decode reply stream whose call is made at its first read. After a first token
    from the prefill, the ingress sends that token before it reads on, so the decode
    replica and its engine wake up (and take the CPU) after the token left, not while
    it is being sent. Same interface as a Serve streaming response: async iteration and
    `cancel()`."""

    def __init__(self, start: Callable[[], Awaitable[Any]]):
        self._start: Callable[[], Awaitable[Any]] | None = start
        self._reply: Any = None

    def __aiter__(self) -> "DeferredReply":
        return self

    async def __anext__(self) -> Any:
        if self._reply is None:
            if self._start is None:  # cancelled before the call was made
                raise StopAsyncIteration
            start, self._start = self._start, None
            self._reply = await start()
        return await self._reply.__anext__()

    def cancel(self) -> None:
        self._start = None
        if self._reply is not None:
            self._reply.cancel()


class Dispatcher:
    def __init__(self, config: AppConfig, router: RouterClient, engines: dict[Role, Any],
                 direct: DirectClients | None = None,
                 count_call: Callable[[str, str], None] | None = None):
        """`direct`: clients for same-node engine replicas (serving.direct), or None to
        call every replica through its Serve handle. `count_call(pool, channel)` is told
        of each call to a prefill or decode replica (channel: direct | serve)."""
        self.config = config
        self.count_call = count_call or (lambda pool, channel: None)
        self.router = router
        self.engines = engines
        self.tokenizer = None
        self.hasher: PromptHasher | None = None
        self.wants_hashes = config.is_disaggregated and config.router.policy == "prefix_aware"
        self.max_token_bytes: int | None = None
        if config.is_disaggregated and config.router.policy in ("conditional", "prefix_aware"):
            self.tokenizer = _load_tokenizer(config.model)
            self.max_token_bytes = max(len(token.encode())
                                       for token in self.tokenizer.get_vocab())
        self.direct = direct

    async def start(self, endpoint: str, body: dict, session: str | None,
                    received: float | None = None) -> Dispatch:
        """`received`: when the ingress got the request (perf_counter), for timing."""
        if not self.config.is_disaggregated:
            reply = self.engines[Role.AGGREGATED].options(stream=True).generate.remote(
                endpoint, body)
            return Dispatch(reply, "aggregated", "aggregated")
        may_disaggregate = _may_disaggregate(body)
        token_ids = self._prompt_token_ids(endpoint, body)
        num_tokens, hashes = await self._prompt_blocks(body, token_ids)
        if token_ids is not None and may_disaggregate and _may_send_token_ids(endpoint, body):
            # Tokenized here already: the prefill and decode replicas skip it.
            body = {**body, "prompt": token_ids}
        answer_head = may_disaggregate and may_answer_head(endpoint, body)
        if answer_head:  # one response id from both replicas
            body = {**body, "request_id": body.get("request_id") or uuid.uuid4().hex}
        block_size = self.hasher.spec.block_size if self.hasher is not None else 32
        started = time.perf_counter()
        route = await self.router.call("assign", num_tokens, session, may_disaggregate,
                                       hashes, block_size)  # OverloadedError: no decode
        dispatch = Dispatch(None, "local", route["reason"], route["decode"],
                            ingress_s=started - received if received else 0.0,
                            route_s=time.perf_counter() - started,
                            policy_s=route.get("policy_s", 0.0),
                            matched_tokens=(route.get("matched_tokens", 0)
                                            if self.wants_hashes else None))
        direct = route.get("direct") or {}
        if route["prefill"] is not None:
            started = time.perf_counter()
            prefilled = await self._prefill(endpoint, body, route["prefill"], answer_head,
                                            direct.get("prefill"))
            dispatch.prefill_s = time.perf_counter() - started
            if prefilled is not None:
                params = prefilled["kv_transfer_params"]
                body = _with_prompt_ids(endpoint, body, prefilled)
                dispatch.head = head_from_prefill(body, prefilled) if answer_head else None
                body = (decode_body(body, dispatch.head, params) if dispatch.head
                        else {**body, "kv_transfer_params": params})
                dispatch.path = "remote"
                dispatch.prefill_engine_s = prefilled.get(ENGINE_SECONDS_KEY, 0.0)
            else:
                dispatch.path = "fallback"
        start_decode = functools.partial(self._decode, endpoint, body, route["decode"],
                                         direct.get("decode"))
        dispatch.reply = (DeferredReply(start_decode) if dispatch.head is not None
                          else await start_decode())
        return dispatch

    async def on_failure(self, dispatch: Dispatch, exc: BaseException) -> None:
        if dispatch.decode_replica is not None and is_replica_death(exc):
            await self.router.call("mark_failed", dispatch.decode_replica)

    async def models(self) -> dict:
        pool = Role.DECODE if self.config.is_disaggregated else Role.AGGREGATED
        return await self.engines[pool].models.remote()

    def _direct_client(self, endpoint: dict | None) -> DirectClient | None:
        return self.direct.get(endpoint) if self.direct is not None else None

    async def _decode(self, endpoint: str, body: dict, replica_id: str,
                      direct: dict | None) -> Any:
        """The decode replica's reply stream: over its direct socket when it is on this
        node, else through its Serve handle."""
        client = self._direct_client(direct)
        if client is not None:
            try:
                reply = await client.stream("generate", endpoint, body)
                self.count_call("decode", "direct")
                return reply
            except DirectUnavailable:
                pass  # not sent
        self.count_call("decode", "serve")
        return self.engines[Role.DECODE].options(stream=True).generate.remote(
            endpoint, body, replica_id=replica_id)

    async def _prefill(self, endpoint: str, body: dict, replica_id: str,
                       answer_head: bool, direct: dict | None) -> dict | None:
        """The remote prefill's reply (with kv_transfer_params), or None to prefill
        locally."""
        request = {k: v for k, v in body.items() if k not in PREFILL_DROPPED_FIELDS}
        request.update(stream=False, max_tokens=1,
                       kv_transfer_params={"do_remote_decode": True})
        if answer_head:
            request.update(prefill_fields(body))
        elif endpoint == "completions" and not is_token_ids(body.get("prompt")):
            request["return_token_ids"] = True  # the ids it makes, for the decode request
        try:
            result = await self._call_prefill(endpoint, request, replica_id, direct)
        except Exception as exc:
            logger.warning("prefill on %s failed (%r); prefilling locally", replica_id, exc)
            if is_replica_death(exc) or isinstance(exc, asyncio.TimeoutError):
                await self.router.call("mark_failed", replica_id)
            return None
        if "error" in result or not result.get("kv_transfer_params"):
            return None  # the decode replica will answer the same request (or error)
        return result

    async def _call_prefill(self, endpoint: str, request: dict, replica_id: str,
                            direct: dict | None) -> dict:
        limits = self.config.router
        client = self._direct_client(direct)
        if client is not None:
            try:
                async with asyncio.timeout(limits.prefill_timeout_s):
                    result = await client.call("prefill", endpoint, request)
            except DirectUnavailable:
                pass  # not sent: through Serve below
            except BaseException:
                self.count_call("prefill", "direct")
                raise
            else:
                self.count_call("prefill", "direct")
                return result
        self.count_call("prefill", "serve")
        reply = self.engines[Role.PREFILL].prefill.remote(endpoint, request,
                                                          replica_id=replica_id)
        started = time.monotonic()
        try:
            # Two waits: for a replica to take the call (Serve queues it while the pool
            # has no live replica: the chosen one died and its replacement is starting),
            # then for its reply. asyncio.timeout: Python 3.11's wait_for can drop a
            # cancellation (the client left) that meets the reply (serving/ingress.py).
            async with asyncio.timeout(min(limits.prefill_assign_timeout_s,
                                           limits.prefill_timeout_s)):
                assigned = await reply._to_object_ref()
            async with asyncio.timeout(limits.prefill_timeout_s
                                       - (time.monotonic() - started)):
                return await assigned
        except BaseException:
            reply.cancel()
            raise

    async def _prompt_blocks(self, body: dict, token_ids: list[int] | None
                             ) -> tuple[int, tuple[bytes, ...]]:
        """Prompt length for the policy (exact with a tokenizer, else estimated) and,
        for prefix_aware, the prompt's block hashes as the engines compute them."""
        if token_ids is None:
            text = str(body.get("prompt") or body.get("messages") or "")
            return max(len(text) // 4, self._fewest_tokens(text)), ()
        if not self.wants_hashes:
            return len(token_ids), ()
        if self.hasher is None:
            spec = await self.router.call("hash_spec")
            if spec is None:  # no engine has reported yet (or its hashes are private)
                return len(token_ids), ()
            self.hasher = PromptHasher(HashSpec(**spec))
        return len(token_ids), self.hasher.block_hashes(token_ids, body.get("cache_salt"))

    def _prompt_token_ids(self, endpoint: str, body: dict) -> list[int] | None:
        """The prompt's token ids as vLLM's OpenAI layer makes them (chat: the model's
        chat template, no special tokens added; completions: the tokenizer's BOS), when
        the policy needs them: prefix_aware hashes them; conditional needs the exact
        length only of a prompt that may be short enough to prefill locally. Otherwise
        the prefill replica tokenizes (in its engine time, as an aggregated engine
        does) and returns the ids for the decode request."""
        if self.tokenizer is None:
            return None
        try:
            if endpoint == "chat":
                text = self.tokenizer.apply_chat_template(
                    body["messages"], tokenize=False,
                    add_generation_prompt=body.get("add_generation_prompt", True))
                special = False
            else:
                prompt = body["prompt"]
                if is_token_ids(prompt):
                    return prompt
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
                special = True
            if (not self.wants_hashes and self._fewest_tokens(text)
                    > self.config.router.local_prefill_max_tokens):
                return None  # surely remote: the length need not be exact
            return self.tokenizer(text, add_special_tokens=special)["input_ids"]
        except Exception:  # an odd but valid prompt shape: estimate
            return None

    def _fewest_tokens(self, text: str) -> int:
        """A lower bound of the text's token count: no token covers more UTF-8 bytes
        than the longest entry of the vocabulary has."""
        if self.max_token_bytes is None:
            return 0
        return len(text.encode()) // self.max_token_bytes


def _may_disaggregate(body: dict) -> bool:
    """P/D serves one sequence per prompt computed once; the rest prefill locally."""
    return ((body.get("n") or 1) == 1 and not body.get("echo")
            and not body.get("prompt_logprobs") and "kv_transfer_params" not in body
            and not (isinstance(body.get("prompt"), list) and len(body["prompt"]) > 1
                     and not isinstance(body["prompt"][0], int)))


def _may_send_token_ids(endpoint: str, body: dict) -> bool:
    """A completion whose text prompt the ingress tokenized exactly as the engine would
    (the caller checks `_may_disaggregate`, which rules out echoing the prompt's text)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return (endpoint == "completions" and isinstance(prompt, str)
            and body.get("add_special_tokens", True) is True
            and body.get("truncate_prompt_tokens") is None)


def _with_prompt_ids(endpoint: str, body: dict, prefilled: dict) -> dict:
    """The request with its text prompt replaced by the token ids the prefill replica
    made of it (`return_token_ids`), so the decode replica does not tokenize again.
    They are what the client's prompt and options (special tokens, truncation) give,
    so the decode request computes the same."""
    if endpoint != "completions" or is_token_ids(body.get("prompt")):
        return body
    try:
        (choice,) = prefilled["choices"]
        ids = choice["prompt_token_ids"]
    except (KeyError, TypeError, ValueError):
        return body
    return {**body, "prompt": list(ids)} if is_token_ids(ids) else body


def _load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    from serving.model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))
