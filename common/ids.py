"""Identifiers and time, in the shapes OpenAI clients expect."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    """Unix seconds: every timestamp on the wire and in the database."""
    return int(time.time())
