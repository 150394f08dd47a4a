"""The training corpus: the Python standard library of the running interpreter.

It is public code nobody on this project wrote, it is on every machine that runs diffbatch, and it
is what a newcomer's first prompt (Python code) looks like. Tests and vendored packages are left
out; about 5% of the files are held out for evaluation, chosen by a stable hash of their path so the
split does not depend on the file system's listing order.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_PERCENT = 5
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class SourceFile:
    name: str  # path relative to the library root, with "/" separators
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(name: str) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def list_sources(root: Path | None = None) -> list[SourceFile]:
    """Every readable ``.py`` file under ``root`` (default: the stdlib), sorted by name."""
    root = root or stdlib_root()
    sources = []
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        parts = name.split("/")
        if _EXCLUDED_PARTS.intersection(parts[:-1]) or parts[-1].startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of files carry other encodings on purpose
        if text.strip():
            sources.append(SourceFile(name, text))
    return sources


def split(sources: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(training files, held-out files)."""
    train = [s for s in sources if not is_held_out(s.name)]
    held_out = [s for s in sources if is_held_out(s.name)]
    return train, held_out
