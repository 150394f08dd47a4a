"""Result lines, as written to output and error files and served by the partial-results endpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # common/ does not import db/ at run time
    from db.models import Request


def output_line(request: Request) -> dict[str, Any]:
    """One line of the output file (a succeeded request) or of the error file (any other end)."""
    if request.status == "succeeded":
        return {"id": request.public_id, "custom_id": request.custom_id,
                "response": {"status_code": 200, "request_id": request.public_id, "body": request.response},
                "error": None}
    return {"id": request.public_id, "custom_id": request.custom_id, "response": None,
            "error": {"code": request.error_code, "message": request.error_message}}
