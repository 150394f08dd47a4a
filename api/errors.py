"""The error body of every failure: OpenAI's {"error": {"message", "type", "param", "code"}}, and on the
Anthropic routes (/v1/messages...) Anthropic's {"type": "error", "error": {"type", "message"}}."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("diffbatch.api")

TYPE_FOR_STATUS = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                   409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                   503: "service_unavailable"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body, the answer of every status other than 2xx."""

    error: ErrorDetail


WHEN = {400: "Invalid request: the message names the parameter (`param`).",
        401: "Missing, unknown or revoked API key.", 404: "No such object.",
        405: "Method not allowed; the `Allow` header lists those that are.",
        409: "Conflicts with the object's state or an earlier request.",
        413: "The upload is larger than the server's limit (DIFFBATCH_MAX_UPLOAD_BYTES).",
        429: "Over the tenant's quota.", 503: "A dependency is down: the message names it."}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route for these error statuses, each with OpenAI's error body."""
    return {status: {"model": ErrorBody, "description": WHEN[status]} for status in statuses}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ANTHROPIC_PATHS = "/v1/messages"
# Anthropic's error types (docs: "Errors"), by status.
ANTHROPIC_TYPE_FOR_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                             413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PATHS or path.startswith(ANTHROPIC_PATHS + "/")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None, *, path: str = "") -> JSONResponse:
    """The error body for a request to ``path``: Anthropic's on its routes, else OpenAI's."""
    if anthropic_path(path):
        kind = ANTHROPIC_TYPE_FOR_STATUS.get(status, "invalid_request_error" if status < 500 else "api_error")
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status,
                            headers=headers)
    kind = TYPE_FOR_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def without_422(app: FastAPI) -> None:
    """Drop FastAPI's generated 422 answers from the OpenAPI schema: invalid input is a 400 here."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to change the schema


def _allowed(request: Request) -> str:
    """Every method the API serves at this path, from its OpenAPI paths (Starlette's own 405 names the
    methods of the first route that matched the path only)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {method.upper() for method in operations}
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # its loc is the character offset, not a field
            return error_response(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error')}.",
                                  "body", "invalid_json", path=path)
        where = first.get("loc", ())
        loc = [str(part) for part in where if part not in ("body", "query", "path", "header")]
        param = ".".join(loc) or (str(where[0]) if where else None)  # a missing body is named "body"
        return error_response(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")),
                              param, "invalid_request", path=path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = {"Allow": _allowed(request)} if exc.status_code == 405 else exc.headers
        return error_response(exc.status_code, str(exc.detail), headers=headers, path=request.url.path)

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        # The database restarting or out of reach: say so (the SDK retries a 503), not "server error".
        log.warning("database unavailable: %s", exc)
        return error_response(503, "The database is unavailable; retry shortly.", code="database_unavailable",
                              headers={"Retry-After": "5"}, path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "The server had an error while processing your request.", path=request.url.path)
