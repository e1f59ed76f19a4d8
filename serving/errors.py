"""Errors a client can see, and the one function that turns any exception into an
OpenAI-style error body and HTTP status.

    ServingError                 base; carries status, type, param
    ├── BadRequestError          400  malformed JSON, wrong field, bad value
    ├── AuthenticationError      401  missing or wrong API key
    ├── NotFoundError            404  unknown model or endpoint
    ├── RequestTooLargeError     413  body over the configured limit
    ├── OverloadedError          503  no healthy replica, queue full
    └── UpstreamTimeoutError     504  the request ran past its deadline

Anything else is an internal error: the client gets 500, a request id, and no
internals; the traceback goes to the log under that request id.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import pydantic

logger = logging.getLogger("pdserve")


class ServingError(Exception):
    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequestError(ServingError):
    status, type = HTTPStatus.BAD_REQUEST, "BadRequestError"


class AuthenticationError(ServingError):
    status, type = HTTPStatus.UNAUTHORIZED, "AuthenticationError"


class NotFoundError(ServingError):
    status, type = HTTPStatus.NOT_FOUND, "NotFoundError"


class RequestTooLargeError(ServingError):
    status, type = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "RequestTooLargeError"


class OverloadedError(ServingError):
    status, type = HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError"


class UpstreamTimeoutError(ServingError):
    status, type = HTTPStatus.GATEWAY_TIMEOUT, "TimeoutError"


def error_body(message: str, err_type: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def _validation_message(exc: pydantic.ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{loc}: {first['msg']}" if loc else first["msg"]
    return message, (loc or None)


def error_for(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any]]:
    """Map any exception to (HTTP status, OpenAI error JSON). Never leaks internals."""
    if isinstance(exc, ServingError):
        return exc.status, error_body(exc.message, exc.type, exc.status, exc.param)
    if isinstance(exc, pydantic.ValidationError):
        message, param = _validation_message(exc)
        return 400, error_body(message, "BadRequestError", 400, param)
    if _is_vllm_validation_error(exc):
        message = exc.args[0] if exc.args else str(exc)
        return 400, error_body(message, "BadRequestError", 400, exc.parameter)
    logger.error("request %s failed", request_id, exc_info=exc)
    return 500, error_body(f"internal error (request id {request_id})",
                           "InternalServerError", 500)


def _is_vllm_validation_error(exc: BaseException) -> bool:
    from vllm.exceptions import VLLMValidationError

    return isinstance(exc, VLLMValidationError)
