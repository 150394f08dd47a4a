"""A JSON body's size is bounded before it is read: past the limit the request is a 413, and what came of
it is dropped. Multipart uploads count their own bytes as they stream (api/uploads.py)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

SLACK = 1 << 20  # the create body's other fields around inline requests as large as a file


class LimitBodySize:
    """ASGI middleware: a non-multipart body over ``limit`` + 1 MiB (Content-Length, or counted) is a 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit + SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        if scope["type"] != "http" or headers.get(b"content-type", b"").startswith(b"multipart/"):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        received, over = 0, False

        async def counted() -> Message:
            # Past the limit the body ends early; the app's answer (a 400 on the cut JSON) becomes the 413.
            nonlocal received, over
            if over:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                over = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        refused = False

        async def sending(message: Message) -> None:
            nonlocal refused
            if not over:
                await send(message)
            elif not refused:
                refused = True
                await self._refuse(scope, receive, send)

        await self.app(scope, counted, sending)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"The request body is larger than {self.limit:,} bytes "
                                  "(DIFFBATCH_MAX_UPLOAD_BYTES plus 1 MiB).", param="body", code="body_too_large",
                                  path=scope["path"])
        await response(scope, receive, send)
