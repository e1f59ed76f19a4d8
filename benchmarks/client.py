"""One streaming request to an OpenAI-compatible server, timed token by token.

`send_request` never raises for a failed request: the failure is the result. Reasons
(the text before the first ':' of `RequestOutput.error` names the kind):

- "connect error: ..."  the server could not be reached
- "timeout: ..."        no answer (or no further chunk) within the request timeout
- "http NNN: ..."       a non-200 status, with the server's error message
- "stream error: ..."   the server sent an error event inside the stream
- "stream cut: ..."     the connection ended before `data: [DONE]`
- "bad response: ..."   a chunk that is not the JSON an OpenAI server sends
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.records import RequestOutput, SampleRequest

MAX_ERROR_CHARS = 300


@dataclass(slots=True)
class EndpointSpec:
    """Where and how to send requests; the same for every request of a run."""

    api_url: str
    model: str
    chat: bool = False
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class _RequestFailed(Exception):
    """Internal: ends one request with a reason; caught in `send_request`."""


def build_payload(spec: EndpointSpec, req: SampleRequest) -> dict[str, Any]:
    """The JSON body: streaming with usage, exact output length where supported."""
    payload: dict[str, Any] = {"model": spec.model, "stream": True,
                               "stream_options": {"include_usage": True}}
    if spec.chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.expected_output_len
    else:
        payload["prompt"] = req.prompt
    # Servers that only know one of the two names ignore or accept the other.
    payload["max_tokens"] = req.expected_output_len
    if spec.ignore_eos:
        # vLLM extensions: generate exactly max_tokens even past an EOS token.
        payload["ignore_eos"] = True
        payload["min_tokens"] = req.expected_output_len
    payload.update(spec.extra_body)
    return payload


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return _short(body.decode(errors="replace")) or "(empty body)"
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return _short(str(err.get("message") or err))
    return _short(str(err))


def _is_token_chunk(choice: dict[str, Any], chat: bool) -> bool:
    """Whether a chunk carries output; chat's opening role-only chunk does not."""
    if not chat:
        return True
    delta = choice.get("delta") or {}
    if "role" in delta and not delta.get("content") and not delta.get("tool_calls"):
        return False
    return True


def _chunk_text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or delta.get("reasoning_content")
            or delta.get("reasoning") or "")


async def _read_stream(response: httpx.Response, out: RequestOutput, chat: bool) -> None:
    """Consume the SSE stream into `out`; raise `_RequestFailed` on a bad ending."""
    num_chunks, saw_data = 0, False
    last = out.start_time
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event names
        saw_data = True
        data = line[5:].strip()
        if data == "[DONE]":
            if num_chunks == 0:
                raise _RequestFailed("bad response: stream ended without any token")
            out.latency = last - out.start_time
            out.success = True
            return
        try:
            chunk = json.loads(data)
        except ValueError as err:
            raise _RequestFailed(f"bad response: not JSON: {_short(data)}") from err
        if not isinstance(chunk, dict):
            raise _RequestFailed(f"bad response: {_short(data)}")
        if "error" in chunk:
            raise _RequestFailed(f"stream error: {_error_message(data.encode())}")
        choices = chunk.get("choices")
        if choices and _is_token_chunk(choices[0], chat):
            now = time.perf_counter()
            if num_chunks == 0:
                out.ttft = now - out.start_time
            else:
                out.itl.append(now - last)
            last = now
            num_chunks += 1
            out.generated_text += _chunk_text(choices[0], chat)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            out.output_tokens = int(usage.get("completion_tokens") or 0)
            out.prompt_len = int(usage.get("prompt_tokens") or out.prompt_len)
    if not saw_data:
        kind = response.headers.get("content-type", "no content-type")
        raise _RequestFailed(f"bad response: not an event stream ({kind})")
    raise _RequestFailed(f"stream cut: connection ended after {num_chunks} token "
                         "chunks without [DONE]")


async def send_request(client: httpx.AsyncClient, spec: EndpointSpec,
                       req: SampleRequest) -> RequestOutput:
    """Send one streaming request and time it; failures come back as results."""
    out = RequestOutput(request_id=req.request_id, kind=req.kind, prompt_len=req.prompt_len)
    headers = {"x-request-id": req.request_id, **spec.headers}
    out.start_time = time.perf_counter()
    try:
        async with client.stream("POST", spec.api_url, json=build_payload(spec, req),
                                 headers=headers) as response:
            if response.status_code != 200:
                body = await response.aread()
                raise _RequestFailed(f"http {response.status_code}: {_error_message(body)}")
            await _read_stream(response, out, spec.chat)
    except _RequestFailed as err:
        out.error = str(err)
    except httpx.TimeoutException as err:
        out.error = f"timeout: {type(err).__name__} {_short(str(err))}"
    except httpx.ConnectError as err:
        out.error = f"connect error: {_short(str(err)) or type(err).__name__}"
    except (httpx.RemoteProtocolError, httpx.ReadError) as err:
        out.error = f"stream cut: {type(err).__name__} {_short(str(err))}"
    except httpx.HTTPError as err:
        out.error = f"http error: {type(err).__name__} {_short(str(err))}"
    except Exception as err:  # noqa: BLE001 - one request's failure must not end the run
        out.error = f"client error: {type(err).__name__} {_short(str(err))}"
    return out
