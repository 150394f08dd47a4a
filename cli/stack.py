"""The embedded stack: API, worker, control process and scheduler as child processes sharing one data folder."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from cli.client import auth_headers
from cli.logs import RotatingLog, pump
from common.metrics import MULTIPROC_ENV, fresh_multiproc_dir
from common.queue import declare_queues, make_celery
from common.settings import CONTROL_QUEUE, Settings, queue_for_model

# glibc's malloc returns and re-faults the engine's large temporary tensors on every step; keeping
# them in the heap cut one 1,000-request CPU run from ~1-3.7 M page faults to ~78 K and raised engine
# tokens/s 25-57% (bench/service.py, 2 cores). A user's own GLIBC_TUNABLES wins (env is applied last).
CPU_ALLOCATOR = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"}


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with(parent: int) -> Callable[[], None] | None:
    """A child's setup (Linux): SIGTERM when ``parent`` dies, so a `diffbatch run`/`serve` killed
    outright (kill -9, the OOM killer) leaves no worker holding the data folder. Elsewhere: None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def setup() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the prctl: nothing would tell us
            os._exit(1)
    return setup


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class EmbeddedStack:
    """Starts `diffbatch api`, `worker`, `control` and `beat`; stops them all on exit."""

    def __init__(self, settings: Settings, *, port: int, log_dir: Path | None = None) -> None:
        self.settings, self.port = settings, port
        self.url = f"http://{settings.api_host}:{port}"
        self.log_dir = log_dir or settings.data_dir / "logs"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}  # by role

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        from db.migrate import upgrade

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Once, before three processes race to do it.
        upgrade(self.settings.resolved_database_url)
        declare_queues(make_celery(self.settings),
                       [CONTROL_QUEUE, queue_for_model(self.settings.served_model_name)])
        env = {**os.environ, "DIFFBATCH_DATA_DIR": str(self.settings.data_dir.resolve()),
               "DIFFBATCH_MODEL": self.settings.model}  # `run --model` chose it, not the environment
        # Every child writes its metrics there and the API's /metrics adds them up; emptied at each start.
        env[MULTIPROC_ENV] = str(fresh_multiproc_dir(self.settings.data_dir.resolve() / "metrics"))
        for role, args in (("worker", []), ("control", []), ("beat", []),
                           ("api", ["--host", self.settings.api_host, "--port", str(self.port)])):
            role_env = {**CPU_ALLOCATOR, **env} if role == "worker" and self.settings.device == "cpu" else env
            process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", role, *args], env=role_env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_dies_with(os.getpid()))
            assert process.stdout is not None
            pump(process.stdout, RotatingLog(self.log_dir / f"{role}.log"))  # capped: see cli/logs.py
            self.processes[role] = process

    def unfinished_work(self) -> str | None:
        """What a previous run left open in this data folder, in words (None: nothing); the control
        process's first reconcile picks it up at once."""
        from db import repo
        from db.models import OPEN_REQUEST_STATUSES, BatchStatus
        from db.session import make_engine, make_session_factory

        engine = make_engine(self.settings.resolved_database_url)
        try:
            with make_session_factory(engine)() as session:
                batches = repo.batches_in(session, statuses=[BatchStatus.validating, BatchStatus.in_progress,
                                                             BatchStatus.cancelling, BatchStatus.finalizing])
                requests = sum(repo.count_requests(session, batch_id=b.id, statuses=OPEN_REQUEST_STATUSES)
                               for b in batches)
        finally:
            engine.dispose()
        if not batches:
            return None
        return (f"{len(batches)} {'batch' if len(batches) == 1 else 'batches'} "
                f"({requests} open {'request' if requests == 1 else 'requests'})")

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait until the API answers and a worker consumes (it registers its model once Celery is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                answer = httpx.get(f"{self.url}/v1/models", headers=auth_headers(), timeout=2)
                if answer.status_code == 401:
                    raise RuntimeError("this data folder has API keys: set DIFFBATCH_API_KEY to one of them")
                models = answer.json()["data"]
                if models:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the embedded stack was not ready after {timeout:.0f} s; see {self.log_dir}")

    def check_alive(self) -> None:
        """Raise if any of the stack's processes has exited."""
        for role, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"`{role}` exited with {process.returncode}; "
                                   f"see {self.log_dir}")

    def stop(self, grace: float = 15.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
