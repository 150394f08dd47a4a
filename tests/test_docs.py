"""The docs a user reads: README stays a short guide, its links and every file a comment cites exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CITED_FILE = re.compile(r"\b((?:[\w.-]+/)*[\w.-]+\.md)\b")


def _tracked(pattern: str) -> list[Path]:
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard", pattern]
    names = subprocess.run(listing, cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / name for name in names]


def test_readme_is_a_short_guide():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


def test_every_link_in_the_docs_resolves():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in MARKDOWN_LINK.findall(page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


def test_code_cites_only_files_of_the_repository():
    pages = {path.relative_to(REPO).as_posix() for path in _tracked("*.md")}
    missing = []
    for source in _tracked("*.py"):
        for cited in CITED_FILE.findall(source.read_text()):
            if not any(page == cited or page.endswith("/" + cited) for page in pages):
                missing.append(f"{source.relative_to(REPO)} cites {cited}")
    assert missing == []
