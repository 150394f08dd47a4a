"""The per-process state of a worker: settings, database, blob store, Celery client and the engine.

The engine (model weights) loads lazily, once per process, on first use: not in worker_process_init,
which Celery limits to 4 seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING

from common.queue import make_celery
from common.settings import BUILTIN_MODEL, Settings, queue_for_model
from common.storage import open_blob_store
from db.session import make_engine, make_session_factory

if TYPE_CHECKING:
    from worker.engine.interface import GenerationEngine

log = logging.getLogger("diffbatch.worker")


class Runtime:
    """``weights=False`` (the control process): the engine tokenizes and checks requests but holds no
    weights, so validation runs on a CPU host in little memory; it never generates."""

    def __init__(self, settings: Settings, celery=None, *, weights: bool = True) -> None:
        self.settings, self.weights = settings, weights
        self.session = make_session_factory(make_engine(settings.resolved_database_url))
        self.blobs = open_blob_store(settings)
        self.celery = celery or make_celery(settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.model_name = settings.served_model_name
        self.model_queue = queue_for_model(self.model_name)
        self._lock = threading.Lock()
        # One thread writes results, so the engine never waits for the database between batches.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffbatch-writer")

    @cached_property
    def engine(self) -> GenerationEngine:
        with self._lock:
            return self._load_engine()

    def _load_engine(self) -> GenerationEngine:
        from worker.engine.factory import make_engine
        from worker.engine.loader import load_model

        path = ensure_model(self.settings)
        device = self.settings.device if self.weights else "cpu"
        log.info("loading model %s from %s on %s%s", self.model_name, path, device,
                 "" if self.weights else " (no weights: for checking requests)")
        loaded = load_model(str(path), device=device, dtype=self.settings.dtype,
                            trust_remote_code=self.settings.trust_remote_code, weights=self.weights)
        return make_engine(loaded, max_batch_size=self.settings.max_batch_size, cache=self.settings.cache,
                           cuda_graphs=self.settings.cuda_graphs)


def ensure_model(settings: Settings):
    """The checkpoint folder, or a ValueError that says what is missing."""
    path = settings.model_path
    if not (path / "config.json").is_file():
        hint = (" (the built-in checkpoint is missing from this install: reinstall diffbatch, or train it "
                "with `diffbatch train-builtin`)" if settings.model == BUILTIN_MODEL else "")
        raise ValueError(f"no model checkpoint at {path}{hint}")
    return path


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(Settings())
    return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Tests and the CLI install a runtime built from their own settings."""
    global _runtime
    _runtime = runtime
