"""Request-scoped dependencies: one database session per request, the settings, the blob store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session, sessionmaker

from api.queue import Queue
from common.settings import Settings
from common.storage import BlobStore


def get_session(request: Request) -> Iterator[Session]:
    session_factory: sessionmaker[Session] = request.app.state.session_factory
    with session_factory() as session:
        yield session


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_blobs(request: Request) -> BlobStore:
    blobs: BlobStore = request.app.state.blobs
    return blobs


def get_queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
QueueDep = Annotated[Queue, Depends(get_queue)]
# A retried POST sends the same key (README); the column holds 255 characters, so a longer key is a
# 400 naming the header, not a database error.
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
