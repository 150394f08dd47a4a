"""The Prometheus metrics that worker and control processes record, and how a process exposes them.

With PROMETHEUS_MULTIPROC_DIR set (the embedded stack sets it under its data folder) every process writes its
samples there and the API's /metrics adds them up; with DIFFBATCH_METRICS_PORT set a process also serves its own
on that port (workers on other hosts). The gauges read from the database are the API's (api/metrics.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import mark_process_dead

from common.settings import Settings

log = logging.getLogger("diffbatch.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

TOKENS = Counter("diffbatch_tokens_generated", "Completion tokens of the requests the engine finished.",
                 ["model", "worker"])
PROMPT_TOKENS = Counter("diffbatch_prompt_tokens", "Prompt tokens of the requests the engine finished.",
                        ["model", "worker"])
# Each row counts the denoising passes it took part in: tokens / passes is the sampler's parallelism.
PASSES = Counter("diffbatch_forward_passes", "Forward passes of the requests the engine finished, per request.",
                 ["model", "worker"])
TOKENS_PER_SECOND = Gauge("diffbatch_worker_tokens_per_second",
                          "Completion tokens a second of the chunk this worker runs now (0 between chunks).",
                          ["model", "worker"], multiprocess_mode="livesum")
CHUNK_SECONDS = Histogram("diffbatch_chunk_seconds", "Wall time of one chunk run, lease to last result stored.",
                          ["model"], buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600))
VALIDATION_SECONDS = Histogram("diffbatch_validation_seconds",
                               "Wall time of one validation attempt of a batch's input file, by how it ended.",
                               ["outcome"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
RECONCILER_ACTIONS = Counter("diffbatch_reconciler_actions", "What the reconciler did, by kind.", ["kind"])
WEBHOOK_DELIVERIES = Counter("diffbatch_webhook_deliveries", "Webhook delivery attempts, by outcome.",
                             ["outcome"])


class ChunkMeter:
    """Meters one chunk run (a context manager): tokens and passes as results arrive, this worker's
    tokens/s gauge while it runs, and the run's latency when it ends without raising."""

    def __init__(self, model: str | None, worker: str) -> None:
        self.model, self.worker = model or "unknown", worker
        self.tokens = 0
        self.started = time.monotonic()

    def __enter__(self) -> ChunkMeter:
        self.started = time.monotonic()
        return self

    def add(self, completion_tokens: int, prompt_tokens: int, passes: int) -> None:
        """One finished request's counts."""
        TOKENS.labels(self.model, self.worker).inc(completion_tokens)
        PROMPT_TOKENS.labels(self.model, self.worker).inc(prompt_tokens)
        PASSES.labels(self.model, self.worker).inc(passes)
        self.tokens += completion_tokens
        elapsed = max(time.monotonic() - self.started, 1e-3)
        TOKENS_PER_SECOND.labels(self.model, self.worker).set(self.tokens / elapsed)

    def __exit__(self, exc_type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        TOKENS_PER_SECOND.labels(self.model, self.worker).set(0)
        if exc_type is None:  # a run the engine raised in is recorded as a failed run instead
            CHUNK_SECONDS.labels(self.model).observe(time.monotonic() - self.started)


def validation_done(outcome: str, seconds: float) -> None:
    """One validation attempt ended: accepted, rejected, taken_over (another attempt owns it) or error."""
    VALIDATION_SECONDS.labels(outcome).observe(seconds)


def reconciler_actions(report: Mapping[str, int]) -> None:
    """Add one reconcile pass's report ({kind: how many}); kinds with 0 still get a series."""
    for kind, count in report.items():
        RECONCILER_ACTIONS.labels(kind).inc(count)


def webhook_delivery(outcome: str) -> None:
    """One attempt to deliver a webhook event ended with ``outcome`` (e.g. delivered, retrying, failed)."""
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def fresh_multiproc_dir(path: Path) -> Path:
    """Create ``path`` for PROMETHEUS_MULTIPROC_DIR, deleting what processes of an earlier start left there."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path


def serve_port(settings: Settings) -> WSGIServer | None:
    """Serve this process's metrics on DIFFBATCH_METRICS_PORT in a daemon thread if it is set (None: unset).
    A port that cannot be bound is logged, not raised: metrics never stop a worker."""
    if settings.metrics_port is None:
        return None
    try:
        server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%s (DIFFBATCH_METRICS_PORT): %s", settings.metrics_host,
                  settings.metrics_port, exc)
        return None
    log.info("serving metrics at http://%s:%s/metrics", settings.metrics_host, settings.metrics_port)
    return server


if os.environ.get(MULTIPROC_ENV):
    # The live gauges (tokens/s) of a process that has stopped no longer count; its counters still do.
    atexit.register(mark_process_dead, os.getpid())
