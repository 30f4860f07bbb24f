"""How a bad request becomes an answer (KServe-style): each domain exception maps to one HTTP
status, and every error body has one shape, ``{"error": "<message>"}``.

Route handlers raise these; only the handlers installed by :func:`install` format responses.
FastAPI's own 422 ``{"detail": ...}`` and Starlette's 404/405 ``{"detail": ...}`` are replaced
too, so a client never has to parse two error shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_LOGGER = logging.getLogger(__name__)


class ServingError(Exception):
    """A request the server refuses; ``status`` is the one HTTP status of each subclass."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    status = 400


class ModelNotServed(ServingError):
    status = 404


class PayloadTooLarge(ServingError):
    status = 413


class UnsupportedMediaType(ServingError):
    status = 415


class UnprocessableInput(ServingError):
    """Valid input of a kind this model does not read: single texts sent to a sentence-pair
    model, or pairs sent to a single-text model."""

    status = 422


class ModelNotReady(ServingError):
    status = 503


class DeadlineExceeded(ServingError):
    """The request was not answered within the server's per-request deadline (queued behind
    others, or too large to answer in time); the rest of its texts are not sent to the engine."""

    status = 504


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def describe(errors: list[dict]) -> str:
    """One line for a list of pydantic errors: ``field: reason; field: reason``."""
    return "; ".join(_describe_one(error) for error in errors)


def _describe_one(error: dict) -> str:
    field = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
    kind = error.get("type", "")
    if kind == "missing":
        return f"missing field '{field}'"
    if kind == "extra_forbidden":
        return f"unknown field '{field}'"
    if kind == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}"
    if kind == "value_error":  # our own validators: their message is already a full sentence
        return str(error.get("ctx", {}).get("error", error.get("msg")))
    return f"{field}: {error.get('msg')}"


async def _serving_error(request: Request, error: ServingError) -> JSONResponse:
    return error_response(error.status, error.message)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # A request model FastAPI validated itself (422 by default) is a malformed request: 400.
    # Our own 422 (UnprocessableInput) is kept for well-formed input this model cannot read.
    return error_response(InvalidInput.status, describe(error.errors()))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Routing misses (404 unknown path, 405 wrong method) keep their status, in our shape; a
    # miss under /v2/models/<name>/ for a name not served is the domain's ModelNotServed.
    parts = request.url.path.strip("/").split("/")
    served = getattr(request.app.state, "served_models", [])
    if error.status_code == 404 and parts[:2] == ["v2", "models"] and len(parts) > 2 \
            and parts[2] not in served:
        listed = ", ".join(f"/v2/models/{name}/infer" for name in served) or "none"
        return await _serving_error(request, ModelNotServed(
            f"no model named '{parts[2]}' is served here; served: {listed}"))
    return error_response(error.status_code, f"{error.detail}: {request.method} {request.url.path}")


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    # A bug, not a bad request: log the traceback, answer without leaking internals.
    _LOGGER.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error ({type(error).__name__}); see the server log")


def install(app: FastAPI, served: Iterable[str] = ()) -> None:
    """Register the handlers that give every error the ``{"error": ...}`` shape; ``served``
    names the models, so a request for another name gets ModelNotServed."""
    app.state.served_models = list(served)
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
