"""File blobs on disk under the data folder; the `files` table holds their metadata.

Writes go to a temporary name first and are renamed into place, so a reader never sees half a file.
Each write has its own temporary name: two writers of one blob (a finalizer and the one that took
over from it) must not truncate each other's file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

CHUNK_BYTES = 1 << 20


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def write(self, file_id: str, parts: Iterable[bytes]) -> int:
        """Store the parts as one blob; returns its size in bytes."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(file_id)
        partial = final.with_name(f"{final.name}.{secrets.token_hex(6)}.partial")
        size = 0
        try:
            with open(partial, "wb") as out:
                for part in parts:
                    out.write(part)
                    size += len(part)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)  # a writer that failed leaves no partial file behind
        return size

    def read_chunks(self, file_id: str) -> Iterator[bytes]:
        with open(self.path(file_id), "rb") as src:
            while part := src.read(CHUNK_BYTES):
                yield part

    def lines(self, file_id: str) -> Iterator[bytes]:
        """The file's lines without their line endings, streamed."""
        with open(self.path(file_id), "rb") as src:
            for raw in src:
                yield raw.rstrip(b"\r\n")

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)
