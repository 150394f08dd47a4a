"""File blobs: the `BlobStore` interface, and its embedded kind on disk under the data folder (the
`files` table holds their metadata). `open_blob_store` picks it, or S3 when DIFFBATCH_FILES_URL is set.

On disk, writes go to a temporary name first and are renamed into place, so a reader never sees half a
file. Each write has its own temporary name: two writers of one blob (a finalizer and the one that took
over from it) must not truncate each other's file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from common.settings import Settings

CHUNK_BYTES = 1 << 20
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class OversizedLine:
    """A line longer than the reader's limit, skipped without being held in memory."""

    at_least: int  # its size in bytes, counted up to the limit or further


class BlobWriter(Protocol):
    """One blob being written: `write` parts, then `commit` (it appears whole) or `discard` (nothing
    stays; a no-op after commit)."""

    def write(self, part: bytes) -> None: ...

    def commit(self) -> int:
        """Returns the blob's size in bytes."""
        ...

    def discard(self) -> None: ...


class BlobStore(Protocol):
    """Where file blobs live, by file id. Reads and writes stream: no blob is ever held whole."""

    def writer(self, file_id: str) -> BlobWriter: ...

    def write(self, file_id: str, parts: Iterable[bytes]) -> int:
        """Store the parts as one blob (whole, or nothing on an error); returns its size in bytes."""
        ...

    def read_chunks(self, file_id: str) -> Iterator[bytes]: ...

    def lines(self, file_id: str, max_line_bytes: int | None = None) -> Iterator[bytes | OversizedLine]:
        """The blob's lines without their line endings; one whose bytes before its newline exceed
        ``max_line_bytes`` comes as an OversizedLine counting the whole line, never held in memory."""
        ...

    def exists(self, file_id: str) -> bool: ...

    def delete(self, file_id: str) -> None:
        """Removes the blob; one already gone is no error."""
        ...

    def location(self, file_id: str) -> str:
        """Where the blob lives, for files.storage_path (a path, or an s3:// URL)."""
        ...

    def purge_partials(self, cutoff: float) -> int:
        """Removes what writers left unfinished, last written before ``cutoff`` (epoch seconds);
        returns how many."""
        ...


def open_blob_store(settings: Settings) -> BlobStore:
    """S3 when DIFFBATCH_FILES_URL is set, else the data folder's files/."""
    if settings.files_url:
        from common.s3_storage import S3BlobStore  # boto3 is imported only where it is used

        return S3BlobStore.from_url(settings.files_url)
    return LocalBlobStore(settings.files_dir)


class LocalBlobWriter:
    """One blob being written to disk: `write` parts, then `commit` (renamed into place) or `discard`."""

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


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def writer(self, file_id: str) -> LocalBlobWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        return LocalBlobWriter(self.path(file_id))

    def write(self, file_id: str, parts: Iterable[bytes]) -> int:
        """Store the parts as one blob; returns its size in bytes."""
        return write_all(self.writer(file_id), parts)

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

    def exists(self, file_id: str) -> bool:
        return self.path(file_id).exists()

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)

    def location(self, file_id: str) -> str:
        return str(self.path(file_id))

    def purge_partials(self, cutoff: float) -> int:
        old = self.partials_older_than(cutoff)
        for path in old:
            path.unlink(missing_ok=True)
        return len(old)

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


def _skip_rest_of_line(src: IO[bytes]) -> int:
    skipped = 0
    while piece := src.readline(CHUNK_BYTES):
        skipped += len(piece)
        if piece.endswith(b"\n"):
            break
    return skipped


def write_all(blob: BlobWriter, parts: Iterable[bytes]) -> int:
    """Write ``parts`` to ``blob`` and commit it; a write that fails discards it (nothing half-stored)."""
    try:
        for part in parts:
            blob.write(part)
    except BaseException:
        blob.discard()
        raise
    return blob.commit()
