"""Per fault test: a fresh PostgreSQL database, a private redis-server, a data folder and a FaultStack
(not yet started) with shortened recovery timings. A failing test's report ends with its processes' logs."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.faults.client import BatchClient
from tests.faults.patched_worker import ROW_DELAY_ENV
from tests.faults.servers import REDIS_BINARY, RedisServer
from tests.faults.stack import FaultStack
from tests.harness import fresh_postgres_database, require_servers

# Recovery in seconds rather than tens of them. DIFFBATCH_REQUEUE_AFTER_S keeps its default, so a passing
# test shows the heartbeat/lease mechanism recovered the work, not the last-resort timer.
SHORT_TIMINGS = {
    "DIFFBATCH_HEARTBEAT_S": "1",
    "DIFFBATCH_WORKER_DEAD_AFTER_S": "3",
    "DIFFBATCH_LOST_MESSAGE_GRACE_S": "2",
    "DIFFBATCH_RECONCILE_EVERY_S": "1",
}
# Small chunks, each slowed per row, so a fault lands while chunks are held and others wait.
SMALL_CHUNKS = {"DIFFBATCH_CHUNK_SIZE": "8", "DIFFBATCH_MAX_BATCH_SIZE": "4", ROW_DELAY_ENV: "0.2"}
# Two cores run up to seven processes: one torch thread each.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_STACK = pytest.StashKey[FaultStack]()


def require_fault_servers() -> None:
    """The machine's PostgreSQL and the redis-server binary: skipped without them, a failure when CI=true."""
    require_servers()
    if shutil.which(REDIS_BINARY) is None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"CI=true but {REDIS_BINARY} is not on PATH")
        pytest.skip(f"{REDIS_BINARY} is not on PATH")


@pytest.fixture
def redis_server(tmp_path):
    require_fault_servers()
    log_dir = tmp_path / "data" / "logs"  # the stack's: a failing test's report shows this log too
    log_dir.mkdir(parents=True)
    server = RedisServer(log_dir / "redis.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stack(request, tmp_path, tiny_model, redis_server):
    with fresh_postgres_database() as database_url:
        fault_stack = FaultStack(model=tiny_model, database_url=database_url, broker_url=redis_server.url,
                                 data_dir=tmp_path / "data", env={**SHORT_TIMINGS, **SMALL_CHUNKS, **ONE_THREAD})
        request.node.stash[_STACK] = fault_stack
        try:
            yield fault_stack
        finally:
            fault_stack.stop()


@pytest.fixture
def client(stack):
    batch_client = BatchClient(stack.url)
    yield batch_client
    batch_client.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    fault_stack = item.stash.get(_STACK, None)
    if report.failed and fault_stack is not None and fault_stack.log_dir.is_dir():
        report.sections.append(("fault stack logs", fault_stack.log_tails()))
