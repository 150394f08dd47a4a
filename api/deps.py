"""Request-scoped dependencies: one database session per request, the settings, the blob store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from api.queue import Queue
from common.settings import Settings
from common.storage import BlobStore


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
QueueDep = Annotated[Queue, Depends(get_queue)]
# A retried POST sends the same key (README); the column holds 255 characters, so a longer key is a
# 400 naming the header, not a database error.
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
