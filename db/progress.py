"""A batch's progress in tokens: what running chunks report with each heartbeat, summed per batch."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import Chunk


def report_chunk_tokens(session: Session, *, chunk_id: int, worker: str, tokens: int) -> None:
    """Record the tokens a chunk's running rows have committed, while ``worker`` holds its lease."""
    session.execute(update(Chunk).where(Chunk.id == chunk_id, Chunk.worker == worker).values(tokens_done=tokens))


def running_tokens(session: Session, batch_ids: list[str]) -> dict[str, int]:
    """Tokens of the rows running now, per batch (leased chunks only: a released chunk's count is stale)."""
    if not batch_ids:
        return {}
    query = (select(Chunk.batch_id, func.sum(Chunk.tokens_done))
             .where(Chunk.batch_id.in_(batch_ids), Chunk.worker.is_not(None)).group_by(Chunk.batch_id))
    return {batch_id: int(total or 0) for batch_id, total in session.execute(query)}
