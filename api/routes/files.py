"""/v1/files: upload, list, read, download and delete files. Handlers are sync: uploads touch disk."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError

from api.deps import BlobsDep, IdempotencyKey, SessionDep
from api.errors import ApiError
from api.schemas import file_object, page
from common.ids import new_id, now
from db import repo

router = APIRouter(prefix="/v1/files")
PURPOSES = ("batch", "batch_output")


MAX_FILENAME = 512  # the column's size


@router.post("")
def upload_file(session: SessionDep, blobs: BlobsDep, file: UploadFile,
                purpose: Annotated[str, Form()], idempotency_key: IdempotencyKey = None):
    if purpose != "batch":
        raise ApiError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")
    filename = file.filename or "upload.jsonl"
    if len(filename) > MAX_FILENAME or "\x00" in filename:
        raise ApiError(400, f"The file's name must be at most {MAX_FILENAME} characters, without NUL.",
                       param="file", code="invalid_filename")
    if idempotency_key and (existing := repo.find_file_by_idempotency_key(session, key=idempotency_key)):
        return file_object(existing)
    file_id = new_id("file-")
    size = blobs.write(file_id, iter(lambda: file.file.read(1 << 20), b""))
    if size == 0:
        blobs.delete(file_id)
        raise ApiError(400, "The uploaded file is empty (0 bytes).", param="file", code="empty_file")
    try:
        row = repo.add_file(session, file_id=file_id, filename=filename, purpose=purpose, size=size,
                            storage_path=str(blobs.path(file_id)), now=now(), idempotency_key=idempotency_key)
        session.commit()
    except IntegrityError:  # a concurrent retry with the same key stored its file first: answer with it
        session.rollback()
        blobs.delete(file_id)
        return file_object(repo.find_file_by_idempotency_key(session, key=idempotency_key))
    return file_object(row)


@router.get("")
def list_files(session: SessionDep, purpose: str | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000, order: str = "desc"):
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be 'asc' or 'desc'", param="order")
    if after and repo.get_file(session, file_id=after) is None:  # else the listing would start over
        raise ApiError(400, f"after: no file {after!r} (deleted?); list again without it", param="after")
    rows = repo.list_files(session, purpose=purpose, after=after, limit=limit + 1,
                           newest_first=order == "desc")
    return page([file_object(r) for r in rows[:limit]], has_more=len(rows) > limit)


def _get(session, file_id: str):
    row = repo.get_file(session, file_id=file_id)
    if row is None:
        raise ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return row


@router.get("/{file_id}")
def get_file(session: SessionDep, file_id: str):
    return file_object(_get(session, file_id))


@router.get("/{file_id}/content")
def file_content(session: SessionDep, blobs: BlobsDep, file_id: str):
    row = _get(session, file_id)
    return StreamingResponse(blobs.read_chunks(row.id), media_type="application/octet-stream",
                             headers={"Content-Length": str(row.bytes)})


@router.delete("/{file_id}")
def delete_file(session: SessionDep, blobs: BlobsDep, file_id: str):
    _get(session, file_id)
    repo.delete_file(session, file_id=file_id)
    session.commit()
    blobs.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
