"""A diffbatch deployment as real processes on loopback, each a named child a fault test can kill and restart.

The processes are the real entry points (`python -m cli.main api|control|beat`, and workers either as
`cli.main worker` or through tests.faults.patched_worker); each logs to LOG_DIR/NAME.log (appended across
restarts) and dies with the process that started it.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.stack import _dies_with, free_port
from common.queue import declare_queues, make_celery
from common.settings import CONTROL_QUEUE, Settings, queue_for_model
from db.migrate import upgrade

REPO = Path(__file__).resolve().parents[2]
PATCHED_WORKER = "tests.faults.patched_worker"


@functools.cache
def has_control_command() -> bool:
    """Whether this checkout's CLI has `control` (the process for validation, finalizing and reconciling)."""
    probe = subprocess.run([sys.executable, "-m", "cli.main", "control", "--help"], cwd=REPO,
                           capture_output=True, timeout=120)
    return probe.returncode == 0


class FaultStack:
    """Named processes sharing one database, broker and data folder. ``database_url`` is what this test
    process reads; ``process_database_url`` (default: the same) is what the processes connect to."""

    def __init__(self, *, model: Path, database_url: str, broker_url: str, data_dir: Path,
                 env: dict[str, str] | None = None, patched_workers: bool = True) -> None:
        self.model, self.database_url, self.broker_url = model, database_url, broker_url
        self.process_database_url = database_url
        self.data_dir, self.log_dir = data_dir, data_dir / "logs"
        self.env, self.patched_workers = dict(env or {}), patched_workers
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self._db = None

    # -- processes -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Migrate and declare the queues once, before several processes race to do it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.database_url)
        settings = Settings(data_dir=self.data_dir, model=str(self.model), broker_url=self.broker_url)
        declare_queues(make_celery(settings), [CONTROL_QUEUE, queue_for_model(settings.served_model_name)])

    def start_all(self, *, workers: int = 2, beats: int = 1) -> None:
        """API, the control process (where the CLI has one), beats and workers; returns once a worker consumes."""
        self.prepare()
        self.start_api()
        if has_control_command():
            self.start("control", ["control"])
        for index in range(1, beats + 1):
            # Each beat its own data folder: its schedule file is its own, as on separate hosts.
            self.start(f"beat-{index}", ["beat", "--data-dir", str(self.data_dir / f"beat-{index}")])
        for index in range(1, workers + 1):
            self.start_worker(f"worker-{index}")
        self.wait_ready()

    def start_api(self) -> None:
        self.start("api", ["api", "--host", "127.0.0.1", "--port", str(self.api_port)])

    def start_worker(self, name: str) -> None:
        if self.patched_workers:
            self.start(name, [], module=PATCHED_WORKER)
        else:
            self.start(name, ["worker"])

    def start(self, name: str, args: list[str], *, module: str = "cli.main") -> subprocess.Popen:
        if name in self.processes and self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        env = {**os.environ, **self.env, "DIFFBATCH_DATA_DIR": str(self.data_dir), "DIFFBATCH_MODEL": str(self.model),
               "DIFFBATCH_DATABASE_URL": self.process_database_url, "DIFFBATCH_BROKER_URL": self.broker_url}
        with open(self.log_dir / f"{name}.log", "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} starting {name}\n".encode())
            log.flush()
            process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=_dies_with(os.getpid()))
        self.processes[name] = process
        return process

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal the process and wait for it to end; returns its exit status."""
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, sig)
        return process.wait()

    def is_alive(self, name: str) -> bool:
        return self.processes[name].poll() is None

    def worker_id(self, name: str) -> str:
        """The name the process goes by in the database (worker.runtime.Runtime.name)."""
        return f"{socket.gethostname()}:{self.processes[name].pid}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Wait until the API answers and lists the model, which a worker does once Celery consumes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} while starting")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).json()["data"]:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the stack was not ready after {timeout:.0f} s")

    def stop(self) -> None:
        """Kill every process outright: how they end is no part of what a fault test checks."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._db is not None:
            self._db.dispose()

    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"---- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- what the database says ------------------------------------------------------------------
    def chunk_progress_of(self, worker_id: str) -> tuple[list[str], int]:
        """custom_ids of the requests the worker is running now, and how many requests of their chunks
        are already finished."""
        from sqlalchemy import func, select

        from db.models import OPEN_REQUEST_STATUSES, Request, RequestStatus

        with self.db.connect() as conn:
            running = conn.execute(select(Request.custom_id, Request.chunk_id).where(
                Request.worker == worker_id, Request.status == RequestStatus.running)).all()
            finished = conn.scalar(select(func.count()).select_from(Request).where(
                Request.chunk_id.in_({chunk for _, chunk in running}),
                Request.status.not_in(list(OPEN_REQUEST_STATUSES)))) if running else 0
        return [custom_id for custom_id, _ in running], finished

    @property
    def db(self):
        if self._db is None:
            from db.session import make_engine

            self._db = make_engine(self.database_url)
        return self._db
