"""File blobs on disk under the data folder; the `files` table holds their metadata.

Writes go to a temporary name first and are renamed into place, so a reader never sees half a file.
Each write has its own temporary name: two writers of one blob (a finalizer and the one that took
over from it) must not truncate each other's file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 1 << 20
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class OversizedLine:
    """A line longer than the reader's limit, skipped without being held in memory."""

    at_least: int  # its size in bytes, counted up to the limit or further


class BlobWriter:
    """One blob being written: `write` parts, then `commit` (renamed into place) or `discard`."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.partial = final.with_name(f"{final.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
        self.size = 0
        self._out = open(self.partial, "wb")  # noqa: SIM115 - closed by commit or discard

    def write(self, part: bytes) -> None:
        self._out.write(part)
        self.size += len(part)

    def commit(self) -> int:
        """Flush to disk and move into place; returns the size in bytes."""
        try:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            os.replace(self.partial, self.final)
        finally:
            self.discard()
        return self.size

    def discard(self) -> None:
        self._out.close()
        self.partial.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def writer(self, file_id: str) -> BlobWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        return BlobWriter(self.path(file_id))

    def write(self, file_id: str, parts: Iterable[bytes]) -> int:
        """Store the parts as one blob; returns its size in bytes."""
        blob = self.writer(file_id)
        try:
            for part in parts:
                blob.write(part)
        except BaseException:
            blob.discard()  # a writer that failed leaves no partial file behind
            raise
        return blob.commit()

    def read_chunks(self, file_id: str) -> Iterator[bytes]:
        with open(self.path(file_id), "rb") as src:
            while part := src.read(CHUNK_BYTES):
                yield part

    def lines(self, file_id: str, max_line_bytes: int | None = None) -> Iterator[bytes | OversizedLine]:
        """The file's lines without their line endings, streamed. A line over ``max_line_bytes`` is
        never held whole: it comes as an OversizedLine, read past in bounded pieces."""
        with open(self.path(file_id), "rb") as src:
            if max_line_bytes is None:
                for raw in src:
                    yield raw.rstrip(b"\r\n")
                return
            while raw := src.readline(max_line_bytes + 1):
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    yield OversizedLine(len(raw) + _skip_rest_of_line(src))
                else:
                    yield raw.rstrip(b"\r\n")

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)

    def partials_older_than(self, cutoff: float) -> list[Path]:
        """Temporary blobs last written before ``cutoff`` (epoch seconds): what a killed writer left."""
        if not self.root.is_dir():
            return []
        old = []
        for path in self.root.glob(f"*{PARTIAL_SUFFIX}"):
            try:
                if path.stat().st_mtime < cutoff:
                    old.append(path)
            except FileNotFoundError:  # its writer committed or discarded it meanwhile
                continue
        return old


def _skip_rest_of_line(src) -> int:
    skipped = 0
    while piece := src.readline(CHUNK_BYTES):
        skipped += len(piece)
        if piece.endswith(b"\n"):
            break
    return skipped
