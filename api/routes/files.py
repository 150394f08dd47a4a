"""/v1/files: upload, list, read, download and delete files. Handlers are sync: uploads touch disk."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError

from api.auth import ScopeDep, authenticate
from api.deps import BlobsDep, IdempotencyKey, SessionDep, SettingsDep
from api.errors import ApiError, error_responses
from api.schemas import file_object, page
from api.uploads import UPLOAD_OPENAPI, UploadDep
from common.ids import now
from db import repo
from db.models import File
from db.scoped import TenantScope

router = APIRouter(prefix="/v1/files", dependencies=[Depends(authenticate)])
PURPOSES = ("batch", "batch_output")


MAX_FILENAME = 512  # the column's size


@router.post("", response_model=None, openapi_extra=UPLOAD_OPENAPI, responses=error_responses(400, 401, 413))
def upload_file(session: SessionDep, scope: ScopeDep, settings: SettingsDep, blobs: BlobsDep, upload: UploadDep,
                idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    purpose = upload.purpose()
    filename = upload.filename or "upload.jsonl"
    if len(filename) > MAX_FILENAME or "\x00" in filename:
        raise ApiError(400, f"The file's name must be at most {MAX_FILENAME} characters, without NUL.",
                       param="file", code="invalid_filename")
    created = now()
    expires_at = upload.expires_at(created, settings.retention_days)
    if upload.size == 0:
        raise ApiError(400, "The uploaded file is empty (0 bytes).", param="file", code="empty_file")
    if idempotency_key and (existing := scope.find_file_by_idempotency_key(idempotency_key)):
        return file_object(existing)  # the retry's own copy is discarded
    upload.commit()
    file_id = upload.file_id
    try:
        row = repo.add_file(session, file_id=file_id, tenant_id=scope.tenant_id, filename=filename, purpose=purpose,
                            size=upload.size, storage_path=blobs.location(file_id), now=created,
                            idempotency_key=idempotency_key, line_count=upload.line_count, expires_at=expires_at)
        session.commit()
    except IntegrityError:  # a concurrent retry with the same key stored its file first: answer with it
        session.rollback()
        blobs.delete(file_id)
        winner = None if idempotency_key is None else scope.find_file_by_idempotency_key(idempotency_key)
        if winner is None:
            raise
        return file_object(winner)
    return file_object(row)


@router.get("", response_model=None, responses=error_responses(400, 401))
def list_files(scope: ScopeDep, purpose: Literal["batch", "batch_output"] | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    if after and scope.get_file(after) is None:  # else the listing would start over
        raise ApiError(400, f"after: no file {after!r} (deleted?); list again without it", param="after")
    rows = scope.list_files(purpose=purpose, after=after, limit=limit + 1, newest_first=order == "desc")
    return page([file_object(r) for r in rows[:limit]], has_more=len(rows) > limit)


def _get(scope: TenantScope, file_id: str) -> File:
    row = scope.get_file(file_id)
    if row is None:
        raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return row


@router.get("/{file_id}", response_model=None, responses=error_responses(400, 401, 404))
def get_file(scope: ScopeDep, file_id: str) -> dict[str, Any]:
    return file_object(_get(scope, file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse, responses={
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "The file's bytes"}, **error_responses(400, 401, 404)})
def file_content(scope: ScopeDep, blobs: BlobsDep, file_id: str) -> StreamingResponse:
    row = _get(scope, file_id)
    return StreamingResponse(blobs.read_chunks(row.id), media_type="application/octet-stream",
                             headers={"Content-Length": str(row.bytes)})


@router.delete("/{file_id}", response_model=None, responses=error_responses(400, 401, 404))
def delete_file(scope: ScopeDep, blobs: BlobsDep, file_id: str) -> dict[str, Any]:
    _get(scope, file_id)
    scope.delete_file(file_id)
    scope.session.commit()
    blobs.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
