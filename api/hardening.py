"""Text PostgreSQL cannot store (NUL, lone surrogates) never reaches a handler from a path, query or header.

PostgreSQL's text types refuse NUL, and a lone surrogate cannot be encoded to UTF-8: either in a query
parameter would be a 500 at the database. This middleware answers first: a 404 for a path (no object
has such an id) and a 400 naming the query parameter or header. JSON bodies are checked by their
models (api/schemas.py).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> bool:
    """False if PostgreSQL's text cannot hold ``text`` (a NUL, or a surrogate that UTF-8 cannot encode)."""
    return _UNSTORABLE.search(text) is None


class RefuseUnstorableText:
    """ASGI middleware: refuses requests whose path, query or headers carry unstorable text."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)


def _refusal(scope: Scope) -> JSONResponse | None:
    if not storable(scope["path"]):
        return error_response(404, "No such object: the path holds a NUL or an unpaired surrogate, which no "
                              "id does.", code="not_found", path=scope["path"])
    # Decoded as Starlette decodes them for the handlers.
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        if not storable(name) or not storable(value):
            return error_response(400, f"{name}: must not hold NUL or unpaired surrogates.", param=name,
                                  code="invalid_value", path=scope["path"])
    for raw_name, raw_value in scope["headers"]:
        if b"\x00" in raw_value:  # headers decode as Latin-1, where only NUL is unstorable
            name = raw_name.decode("latin-1")
            return error_response(400, f"Header {name}: must not hold NUL.", param=name, code="invalid_value",
                                  path=scope["path"])
    return None
