"""The OpenAI-compatible HTTP front door (FastAPI on Ray Serve).

It checks what it can without an engine (auth, size, JSON, schema, model name), then
hands the request to an engine replica and relays the reply: a JSON body, or an SSE
stream passed through event by event. Every failure leaves as OpenAI error JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import AppConfig, Role
from serving.direct import DirectClients, ReplicaGone
from serving.dispatch import Dispatch, Dispatcher
from serving.errors import (AuthenticationError, BadRequestError, NotFoundError,
                            OverloadedError, RequestTooLargeError, ServingError,
                            UpstreamTimeoutError, error_body, error_for)
from serving.head import head_event, merge_response, relay_event
from serving.metrics import RequestTimer, ServingMetrics
from serving.placement import place_serving
from serving.router import RouterClient
from serving.protocol import validate_request

logger = logging.getLogger("pdserve.ingress")
app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED = 499  # a request the client left before its end (nginx's, and Serve's, code)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = (f"no route {request.method} {request.url.path}" if exc.status_code == 404
               else str(exc.detail))
    err_type = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
    return JSONResponse(error_body(message, err_type, exc.status_code), exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(str(exc), "BadRequestError", 400), 400)


class OpenAIIngress:
    """Serves /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

    def __init__(self, config: dict, router: Any, aggregated: Any = None, prefill: Any = None,
                 decode: Any = None):
        from vllm.utils.gc_utils import freeze_gc_heap

        self.config = AppConfig.model_validate(config)
        place_serving(self.config.serving_cpus)
        direct = (DirectClients() if self.config.is_disaggregated
                  and self.config.router.direct_calls else None)
        self.router = RouterClient(router, direct)
        engines = {Role.AGGREGATED: aggregated, Role.PREFILL: prefill, Role.DECODE: decode}
        self.metrics = ServingMetrics()
        self.dispatcher = Dispatcher(self.config, self.router,
                                     {k: v for k, v in engines.items() if v is not None},
                                     direct, self._count_engine_call)
        self.api_key = self.config.resolved_api_key()
        self._models: dict | None = None
        validate_request("completions", {"prompt": "warm-up"})  # load vLLM's schemas now
        freeze_gc_heap()  # start-up objects out of later collections (see EngineServer)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve("completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        request_id = _request_id(request)
        try:
            self._authorize(request)
            if self._models is None:
                self._models = await self.dispatcher.models()
            return JSONResponse(self._models)
        except Exception as exc:
            return _error_response(exc, request_id)

    @app.get("/health")
    async def health(self) -> Response:
        loads = await self.router.call("snapshot")
        live = {load["role"] for load in loads}
        missing = [role.value for role in self.config.pools() if role.value not in live]
        if missing:
            return JSONResponse({"status": "unavailable", "pools_down": missing}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        self.metrics.set_replica_loads(await self.router.call("snapshot"))
        return Response(self.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _serve(self, endpoint: str, request: Request) -> Response:
        received = time.perf_counter()
        request_id = _request_id(request)
        timer = RequestTimer(endpoint)
        dispatch = None
        try:
            self._authorize(request)
            body = await self._read_body(request)
            stream, client_wants_usage = self._validate(endpoint, body)
            deadline = time.monotonic() + self.config.request_timeout_s
            dispatch = await self.dispatcher.start(
                endpoint, body, request.headers.get(self.config.router.session_header),
                received)
            timer.path = dispatch.path
            self.metrics.decisions.labels(dispatch.path, dispatch.reason).inc()
            self._observe_route(dispatch)
            if dispatch.prefill_s:
                self.metrics.prefill_seconds.labels("call").observe(dispatch.prefill_s)
            if dispatch.prefill_engine_s:
                self.metrics.prefill_seconds.labels("engine").observe(dispatch.prefill_engine_s)
            if dispatch.head is not None and stream:
                first = head_event(dispatch.head)  # the decode replica continues it
            else:
                first = await _next_before(dispatch.reply, deadline)
        except asyncio.CancelledError:  # the client left before the reply or first token
            if dispatch is not None:
                dispatch.reply.cancel()  # else the engine runs the request to its end
            timer.finish(self.metrics, CLIENT_CLOSED, None)
            raise
        except Exception as exc:
            if dispatch is not None:
                await self.dispatcher.on_failure(dispatch, exc)
            response = _error_response(exc, request_id)
            timer.finish(self.metrics, response.status_code, None)
            return response
        headers = {"x-request-id": request_id, "server-timing": dispatch.server_timing()}
        if isinstance(first, dict):
            if dispatch.head is not None:
                first = merge_response(first, dispatch.head)
            status = int(first["error"]["code"]) if "error" in first else 200
            timer.finish(self.metrics, status, first.get("usage"))
            return JSONResponse(first, status, headers=headers)
        events = self._relay(first, dispatch, deadline, timer, client_wants_usage, request_id)
        return EventStream(events, media_type="text/event-stream", headers=headers)

    async def _relay(self, first: str, dispatch: Dispatch, deadline: float,
                     timer: RequestTimer, client_wants_usage: bool,
                     request_id: str) -> AsyncIterator[str]:
        """Pass SSE events through, timing token events; errors end the stream cleanly.
        After a first token from the prefill (`first` is then its event), the decode
        replica's events are shifted by it (head.py)."""
        usage, status, event, reply = None, 200, first, dispatch.reply
        try:
            while True:
                if isinstance(event, dict):  # the decode replica refused the continuation
                    status = int(event.get("error", {}).get("code", 500))
                    yield f"data: {json.dumps(event)}\n\n"
                    yield SSE_DONE
                    break
                payload = _event_payload(event)
                if dispatch.head is not None and event is not first:
                    event = relay_event(event, payload)
                if payload is not None:
                    if payload.get("choices") and _has_token(payload["choices"]):
                        timer.token_event()
                    if payload.get("usage"):
                        usage = payload["usage"]
                    if not payload.get("choices") and "usage" in payload \
                            and not client_wants_usage:
                        event = None  # the usage chunk we asked for on our own account
                if event is not None:
                    yield event
                try:
                    event = await _next_before(reply, deadline)
                except StopAsyncIteration:
                    break
        except Exception as exc:
            await self.dispatcher.on_failure(dispatch, exc)
            status, err = error_for(_unwrap(exc), request_id)
            yield f"data: {json.dumps(err)}\n\n"
            yield SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            status = CLIENT_CLOSED  # Serve cancelled the request: the client went away
            raise
        finally:
            reply.cancel()
            timer.finish(self.metrics, status, usage)

    def _count_engine_call(self, pool: str, channel: str) -> None:
        self.metrics.engine_calls.labels(pool, channel).inc()

    def _observe_route(self, dispatch: Dispatch) -> None:
        if dispatch.path == "aggregated":
            return
        self.metrics.route_seconds.labels("assign").observe(dispatch.route_s)
        self.metrics.route_seconds.labels("policy").observe(dispatch.policy_s)
        if dispatch.matched_tokens is not None:
            decision = "local" if dispatch.reason.startswith("local") else "remote"
            self.metrics.matched_prefix_tokens.labels(decision).observe(
                dispatch.matched_tokens)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise AuthenticationError("missing or invalid API key "
                                      "(expected 'Authorization: Bearer <key>')")

    async def _read_body(self, request: Request) -> dict:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLargeError(f"request body over {limit} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestTooLargeError(f"request body over {limit} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequestError("request body must be a JSON object")
        return body

    def _validate(self, endpoint: str, body: dict) -> tuple[bool, bool]:
        """Reject what no engine would accept; returns (stream, client wants usage)."""
        request = validate_request(endpoint, body)
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            raise NotFoundError(f"model {model!r} does not exist; served: "
                                f"{self.config.model_name!r}", param="model")
        if not request.stream:
            return False, False
        options = body.get("stream_options") or {}
        wants_usage = bool(options.get("include_usage"))
        body["stream_options"] = {**options, "include_usage": True}
        return True, wants_usage


async def _next_before(reply: Any, deadline: float) -> Any:
    """The reply's next item, or UpstreamTimeoutError past `deadline` (time.monotonic).

    asyncio.timeout, not asyncio.wait_for: Python 3.11's wait_for returns the item, and
    drops the cancellation, when the caller is cancelled just as the item arrives (a
    client leaving mid-stream, a token every few ms): the relay then streamed on to a
    closed connection and the decode ran its request to the end.
    """
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
            return await reply.__anext__()
    except TimeoutError as exc:
        raise UpstreamTimeoutError("request timed out") from exc


def _event_payload(event: str) -> dict | None:
    if not event.startswith("data: ") or event.startswith(SSE_DONE):
        return None
    try:
        payload = json.loads(event[6:])
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _has_token(choices: list[dict]) -> bool:
    for choice in choices:
        delta = choice.get("delta")
        if choice.get("text") or (delta and (delta.get("content") or delta.get("tool_calls")
                                             or delta.get("reasoning_content"))):
            return True
    return False


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception; the client should see the original."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    if isinstance(exc, (ActorDiedError, ActorUnavailableError, ReplicaGone)):
        return OverloadedError("the engine replica serving this request went away")
    return exc


def _error_response(exc: BaseException, request_id: str) -> JSONResponse:
    status, body = error_for(_unwrap(exc), request_id)
    headers = {"x-request-id": request_id}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(body, status, headers=headers)


class EventStream(StreamingResponse):
    """An SSE response whose first event leaves right behind the headers.

    Starlette's StreamingResponse sends the headers, then asks the generator for the
    first event: a client reads the headers, and waits again, a wake-up more, for the
    first token it came for. Here the first event is made first, and both go out in
    one turn of the loop. Nor does it watch the client itself (Starlette, under ASGI
    2.3, in a task group per response): Serve already does, and cancels the request
    when the client goes away, which closes the relay and the replicas' streams.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        chunks = aiter(self.body_iterator)
        try:
            first = await anext(chunks, None)
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            if first is not None:
                await send(_body(first, self.charset))
                async for chunk in chunks:
                    await send(_body(chunk, self.charset))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if hasattr(chunks, "aclose"):
                await chunks.aclose()  # cancelled while sending: the relay still closes


def _body(chunk: str | bytes, charset: str) -> dict:
    data = chunk.encode(charset) if isinstance(chunk, str) else chunk
    return {"type": "http.response.body", "body": data, "more_body": True}


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def ingress_deployment() -> serve.Deployment:
    deployment = serve.deployment(serve.ingress(app)(OpenAIIngress))
    # The request handlers run on the replica's own event loop, where Serve's HTTP
    # server receives the request, not on a second loop in a second thread: no thread
    # hop per ASGI message (about 1 ms less per request here). Nothing here blocks for
    # long; the engines, whose replicas do, keep Serve's default.
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    return deployment.options(name="OpenAIIngress", num_replicas=1,
                              max_ongoing_requests=1000,
                              ray_actor_options={"num_cpus": 0,
                                                 "runtime_env": {"env_vars": env}})


__all__ = ["OpenAIIngress", "ServingError", "ingress_deployment"]
