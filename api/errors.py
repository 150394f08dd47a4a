"""OpenAI's error body for every failure: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("diffbatch.api")

TYPE_FOR_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                   409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                   503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = TYPE_FOR_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # its loc is the character offset, not a field
            return error_response(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error')}.",
                                  "body", "invalid_json")
        where = first.get("loc", ())
        loc = [str(part) for part in where if part not in ("body", "query", "path", "header")]
        param = ".".join(loc) or (str(where[0]) if where else None)  # a missing body is named "body"
        return error_response(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")),
                              param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "The server had an error while processing your request.")
