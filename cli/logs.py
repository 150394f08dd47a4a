"""The embedded stack's log files, capped: each child's output goes through a pipe into a rotating file.

A child writes to a pipe, not to the file itself, so Celery and uvicorn keep their own logging setup and
a long `serve` never fills the disk: ROLE.log is rolled to ROLE.log.1 .. ROLE.log.N at MAX_BYTES.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

MAX_BYTES = 20 * 1024 * 1024
BACKUPS = 3


class RotatingLog:
    """Appends bytes to ``path``; once it holds ``max_bytes``, it becomes path.1 (path.1 becomes path.2, ...)."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._file = open(path, "ab")  # noqa: SIM115 - held open until close()

    def write(self, data: bytes) -> None:
        if self._file.tell() + len(data) > self.max_bytes and self._file.tell() > 0:
            self._rotate()
        self._file.write(data)
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        self._file.close()


def pump(source: IO[bytes], log: RotatingLog) -> threading.Thread:
    """Copy ``source`` (a child's stdout) line by line into ``log`` in a daemon thread, until it closes."""

    def copy() -> None:
        try:
            for line in iter(source.readline, b""):
                log.write(line)
        finally:
            source.close()
            log.close()

    thread = threading.Thread(target=copy, name=f"log-{log.path.name}", daemon=True)
    thread.start()
    return thread
