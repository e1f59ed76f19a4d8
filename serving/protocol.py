"""Request schemas: vLLM's own OpenAI protocol models, plus the checks pdserve adds."""

from __future__ import annotations

from typing import Any

from serving.errors import BadRequestError

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def validate_request(endpoint: str, body: dict) -> Any:
    """Parse `body` as the endpoint's request model.

    Raises pydantic.ValidationError or vLLM's VLLMValidationError (both map to 400)
    or BadRequestError for limits vLLM leaves to the engine.
    """
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    model = CompletionRequest if endpoint == "completions" else ChatCompletionRequest
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):  # pydantic would take "yes"
        raise BadRequestError(f"stream must be true or false, got {stream!r}", param="stream")
    request = model.model_validate(body)
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise BadRequestError(f"{field} must be a positive integer, got {value!r}",
                                  param=field)
    return request
