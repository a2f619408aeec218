"""Errors are types; this module maps each to an HTTP status and the one error body, in one place.

Every 4xx/5xx answer, Litestar's own included (404, 405, 413, 415, validation), carries
`{"error": {"code", "message"}}`; 429 and 503 also carry `Retry-After`. No torch here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from similarity_service.batching import Draining, Overloaded
from similarity_service.engine_api import EngineOutOfMemory

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 500  # messages may quote a client's key or value: keep answers small


class ServiceError(Exception):
    """An error the service answers on purpose: its status, a stable code and a message for the client."""

    status_code = 500

    def __init__(self, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class BadRequest(ServiceError):
    """Malformed, empty or ill-typed input (400)."""

    status_code = 400


class TooLarge(ServiceError):
    """Input over a configured limit: body, pairs, targets or characters (413)."""

    status_code = 413


class UnsupportedMediaType(ServiceError):
    """A body that is not declared as JSON (415)."""

    status_code = 415


class NotReady(ServiceError):
    """The model is still loading or failed to load (503)."""

    status_code = 503


# Litestar's own HTTP exceptions by status; anything else becomes `http_<status>`.
_LITESTAR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}
DRAINING_RETRY_AFTER_S = 1.0  # another pod will answer by then
# Out of GPU memory: the engine freed its cache; a retry lands in another batch or on another pod.
OUT_OF_MEMORY_RETRY_AFTER_S = 1.0


class ErrorDetail(msgspec.Struct, frozen=True):
    code: Annotated[str, msgspec.Meta(description="Stable reason, e.g. `invalid_json`, `too_large`, `overloaded`.")]
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


def _clean(message: str) -> str:
    """Printable, valid UTF-8 and short, whatever a client sent."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    retry_after_s: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response[ErrorBody]:
    """The error answer: `{"error": {"code", "message"}}`, `Retry-After` in whole seconds when given."""
    all_headers = dict(headers or {})
    if retry_after_s is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return Response(ErrorBody(ErrorDetail(code, _clean(message))), status_code=status, headers=all_headers)


def _litestar_message(exc: HTTPException) -> str:
    if exc.status_code == 413:
        return "the request body is larger than the service's max_body_bytes"
    if not (isinstance(exc, ValidationException) and isinstance(exc.extra, list)):
        return exc.detail
    details = []
    for item in exc.extra:
        if not isinstance(item, dict):
            continue
        if item.get("source") == "body":  # bodies are decoded by schemas.decode_body: Litestar only sees none
            details.append("the request body is empty; send a JSON object")
        else:
            details.append(f"{item.get('source', '')} {item.get('key', '')}: {item.get('message', '')}")
    return "; ".join(details) or exc.detail


def classify(exc: Exception) -> tuple[int, str, str, float | None]:
    """(status, code, message, retry_after_s) for any exception the app can raise."""
    if isinstance(exc, ServiceError):
        return exc.status_code, exc.code, exc.message, exc.retry_after_s
    if isinstance(exc, Overloaded):
        return 429, "overloaded", str(exc), exc.retry_after_s
    if isinstance(exc, Draining):
        return 503, "draining", str(exc), DRAINING_RETRY_AFTER_S
    if isinstance(exc, EngineOutOfMemory):
        return 503, "out_of_memory", str(exc), OUT_OF_MEMORY_RETRY_AFTER_S
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        status = exc.status_code
        return status, _LITESTAR_CODES.get(status, f"http_{status}"), _litestar_message(exc), None
    return 500, "internal_error", "internal error; the server log has the details", None


def exception_handlers(on_error: Callable[[int, str], None]) -> ExceptionHandlersMap:
    """Litestar's handler map: every exception through `classify`; `on_error(status, code)` counts it."""

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
        status, code, message, retry_after_s = classify(exc)
        if status >= 500 and code == "internal_error":
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        on_error(status, code)
        headers = exc.headers if isinstance(exc, HTTPException) and exc.headers else None
        return error_response(status, code, message, retry_after_s=retry_after_s, headers=headers)

    return {Exception: handle}
