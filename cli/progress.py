"""A running batch as a person sees it: a live bar on a terminal, one line per change without one.

Progress moves with tokens: the batch object's `progress.tokens_done` counts the finished requests' output
tokens and what running rows have committed so far, so the rate and the ETA show within seconds.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

RATE_WINDOW_S = 60.0  # the rate is measured over this much recent time: it follows a change in load
QUIET_LINE_S = 10.0  # without a terminal, a change in tokens alone is printed at most this often


@dataclass(frozen=True)
class Snapshot:
    status: str
    requests_done: int
    requests_total: int
    tokens_done: int  # finished requests' output tokens plus the running rows' committed tokens
    tokens_finished: int  # the finished requests' output tokens alone


def snapshot(batch: dict[str, Any]) -> Snapshot:
    """What a batch object says about its progress (a server without the `progress` extension: requests only)."""
    counts, finished = batch["request_counts"], int(batch["usage"]["output_tokens"])
    progress = batch.get("progress") or {}
    return Snapshot(status=batch["status"], requests_done=int(counts["completed"]) + int(counts["failed"]),
                    requests_total=int(counts["total"]), tokens_done=int(progress.get("tokens_done", finished)),
                    tokens_finished=finished)


class Rate:
    """Tokens per second over the last RATE_WINDOW_S of observations; None until two differ in time."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, int]] = deque()

    def add(self, at: float, tokens: int) -> float | None:
        self._seen.append((at, tokens))
        while len(self._seen) > 2 and at - self._seen[1][0] >= RATE_WINDOW_S:
            self._seen.popleft()
        (t0, n0), (t1, n1) = self._seen[0], self._seen[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def per_request(snap: Snapshot, hint: float | None) -> float | None:
    """Output tokens a request takes: the finished ones' mean, else ``hint`` (the input's mean max_tokens)."""
    return snap.tokens_finished / snap.requests_done if snap.requests_done else hint


def done_equivalent(snap: Snapshot, tokens_per_request: float | None) -> float:
    """Requests done, plus the running rows' tokens counted as fractions of a request (for the bar)."""
    if not tokens_per_request:
        return float(snap.requests_done)
    running = max(0, snap.tokens_done - snap.tokens_finished) / tokens_per_request
    return snap.requests_done + min(running, max(0, snap.requests_total - snap.requests_done) * 0.99)


def eta_s(snap: Snapshot, rate: float | None, tokens_per_request: float | None) -> float | None:
    """Seconds left at ``rate``, None when the rate or the size of a request is not known yet."""
    if not rate or rate <= 0 or not tokens_per_request or not snap.requests_total:
        return None
    left = (snap.requests_total - snap.requests_done) * tokens_per_request - (snap.tokens_done - snap.tokens_finished)
    return max(0.0, left) / rate


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class BatchView:
    """Shows one batch's progress on ``console``: call ``update`` with each batch object polled."""

    def __init__(self, console: Console, *, tokens_per_request_hint: float | None = None) -> None:
        self.console, self.hint = console, tokens_per_request_hint
        self.rate = Rate()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._printed: Snapshot | None = None  # the last one written as a line
        self._status: str | None = None
        self._last_line_at = 0.0

    def __enter__(self) -> BatchView:
        if self.console.is_terminal:
            self._progress = Progress(TextColumn("{task.description:<11}"), BarColumn(),
                                      TextColumn("{task.fields[requests]}"), TextColumn("{task.fields[tokens]}"),
                                      TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
                                      console=self.console, transient=False)
            self._progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, batch: dict[str, Any]) -> None:
        now = time.monotonic()
        snap = snapshot(batch)
        if self._status != snap.status:  # the rate is the generation's: validating time does not count
            self.rate, self._status = Rate(), snap.status
        rate = self.rate.add(now, snap.tokens_done)
        size = per_request(snap, self.hint)
        fields: dict[str, Any] = {"requests": f"{snap.requests_done}/{snap.requests_total or '?'} requests",
                                  "tokens": f"{snap.tokens_done:,} tokens", "rate": f"{rate or 0.0:8.1f} tok/s",
                                  "eta": clock(eta_s(snap, rate, size))}
        if self._progress is not None:
            if self._task is None:
                self._task = self._progress.add_task(snap.status, total=None, **fields)
            self._progress.update(self._task, description=snap.status, total=snap.requests_total or None,
                                  completed=done_equivalent(snap, size), **fields)
        elif self._changed(snap, now):
            self.console.print(f"{batch['id']} {snap.status}: {fields['requests']}, {fields['tokens']}, "
                               f"{fields['rate'].strip()}, ETA {fields['eta']}", highlight=False)
            self._printed, self._last_line_at = snap, now

    def _changed(self, snap: Snapshot, now: float) -> bool:
        last = self._printed
        if last is None or (snap.status, snap.requests_done, snap.requests_total) != (
                last.status, last.requests_done, last.requests_total):
            return True
        # The first tokens are news (the run started); later ones alone, once in a while.
        quiet = now - self._last_line_at >= QUIET_LINE_S
        return snap.tokens_done != last.tokens_done and (not last.tokens_done or quiet)
