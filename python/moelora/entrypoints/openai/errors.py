"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every message a client sees passes through `client_safe`: absolute server paths are cut to
their last component, so an adapter's file is named ("adapter_model.safetensors") but never
where the server keeps it.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import ValidationError

import moelora
from moelora.engine.async_engine import (
    AdapterUnavailableError,
    EngineDeadError,
    RequestCutError,
)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error to send to the client with an HTTP status and, where known, the parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": client_safe(message), "type": kind, "param": param,
                      "code": status}}


# An absolute path: a '/' that does not continue a word, a URL or another path, followed by
# path characters. Quotes, whitespace, ':' and brackets end it (messages put them around paths).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\])/[^\s'\"`:,;()\[\]{}<>|]+")


def client_safe(message: str) -> str:
    """`message` with every absolute path replaced by its last component."""
    return _ABSOLUTE_PATH.sub(_last_component, message)


def _last_component(match: re.Match) -> str:
    return match.group(0).rstrip("/").rsplit("/", 1)[-1] or "/"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, param)


def overloaded(message: str) -> APIError:
    return APIError(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def from_engine_error(exc: BaseException, param: str | None = None) -> APIError:
    """The client-facing error for an exception the engine raised on a request or a load."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterUnavailableError):
        return APIError(404, str(exc), "model")
    if isinstance(exc, RequestCutError):
        return overloaded(str(exc))
    if isinstance(exc, RecursionError):
        return APIError(400, "the input nests too deeply to be read", param)
    if isinstance(exc, (FileNotFoundError, moelora.NotFound)):
        return APIError(404, str(exc), param)
    if isinstance(exc, (ValueError, TypeError, KeyError, UnicodeError, moelora.AdapterError,
                        moelora.InvalidArgument, moelora.IoError, OSError)):
        return APIError(400, str(exc), param)
    if isinstance(exc, moelora.PoolExhausted):
        return overloaded(f"out of memory for this request now: {exc}")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not running: {exc}")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def from_failed_output(output) -> APIError:
    """The client-facing error for an engine output that ended with finish_reason "error".
    The engine says whose fault it was (`error_type`): a bad adapter or a request the engine
    cannot serve are the client's (400); anything else is the server's (500)."""
    kind = getattr(output, "error_type", None)
    message = output.error or "unknown error"
    if kind == "adapter_error":
        return APIError(400, message, "model")
    if kind == "invalid_request":
        return APIError(400, message)
    return APIError(500, f"the request failed in the engine: {message}")


def from_validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first offending parameter, e.g. 'messages.0.role'."""
    first = exc.errors()[0]
    location = []
    for part in first.get("loc", ()):
        if _is_union_tag(part):
            break  # past here the path names a union member pydantic tried, not the request
        location.append(str(part))
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    return APIError(400, message, param)


def _is_union_tag(part) -> bool:
    # pydantic puts the union member it tried in the location ('str', 'list[int]', ...)
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or
                                      part.startswith(("list[", "dict[", "function-")))
