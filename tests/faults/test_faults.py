"""Faults a deployment meets, with real processes on loopback: whatever breaks mid-batch, every request ends
exactly once across the output and error files, and none fails because of it."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import make_url

from tests.faults.client import assert_all_succeeded, assert_each_custom_id_once
from tests.faults.patched_worker import POISON_MARK
from tests.faults.servers import TcpProxy
from tests.harness import completion_line

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REQUESTS = 40  # five chunks of 8 (tests/faults/conftest.py), for two workers
POSTGRES_DOWN_S = 5  # longer than DIFFBATCH_WORKER_DEAD_AFTER_S: every worker looks dead when it comes back


def batch_lines(model: str, count: int = REQUESTS) -> list[dict]:
    return [completion_line(f"req-{i}", prompt=f"def f{i}(x):\n", model=model, seed=i) for i in range(count)]


def custom_ids(lines: list[dict]) -> list[str]:
    return [line["custom_id"] for line in lines]


def wait_holding_mid_chunk(stack, worker: str, timeout: float = 240.0) -> list[str]:
    """Wait until the worker runs requests of a chunk it has already written results of; returns the
    custom_ids it runs."""
    worker_id = stack.worker_id(worker)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert stack.is_alive(worker), f"{worker} died on its own"
        running, finished = stack.chunk_progress_of(worker_id)
        if running and finished:
            return running
        time.sleep(0.05)
    raise AssertionError(f"{worker} ({worker_id}) never held a chunk half done in {timeout:.0f} s")


def test_worker_killed_mid_chunk(stack, client, tiny_model):
    """kill -9 of a worker with a half-done chunk: the other worker finishes it, nothing lost or repeated."""
    stack.start_all(workers=2)
    lines = batch_lines(tiny_model.name)
    batch = client.submit(lines)
    held = wait_holding_mid_chunk(stack, "worker-1")
    assert stack.kill("worker-1") == -signal.SIGKILL
    batch = client.wait_terminal(batch["id"])
    output, errors = client.results(batch)
    assert_all_succeeded(custom_ids(lines), batch, output, errors)
    assert set(held) <= {line["custom_id"] for line in output}


def test_two_beats_reconcile_a_dead_workers_chunk_once(stack, client, tiny_model):
    """Two schedulers (one too many) fire the reconciler twice as often, racing over a dead worker's chunk."""
    stack.start_all(workers=2, beats=2)
    lines = batch_lines(tiny_model.name)
    batch = client.submit(lines)
    wait_holding_mid_chunk(stack, "worker-2")
    stack.kill("worker-2")
    batch = client.wait_terminal(batch["id"])
    assert_all_succeeded(custom_ids(lines), batch, *client.results(batch))


def test_redis_restarted_empty_mid_batch(stack, client, tiny_model, redis_server):
    """The broker comes back with no messages: the database knows which chunks still have work."""
    stack.start_all(workers=2)
    lines = batch_lines(tiny_model.name)
    batch = client.submit(lines)
    client.wait_mid_batch(batch["id"], done_at_least=8)
    redis_server.restart_empty()
    batch = client.wait_terminal(batch["id"])
    assert_all_succeeded(custom_ids(lines), batch, *client.results(batch))


def test_api_restarted_mid_batch(stack, client, tiny_model):
    stack.start_all(workers=2)
    lines = batch_lines(tiny_model.name)
    batch = client.submit(lines)
    client.wait_mid_batch(batch["id"], done_at_least=8)
    assert stack.kill("api") == -signal.SIGKILL
    stack.start_api()
    batch = client.wait_terminal(batch["id"])
    assert_all_succeeded(custom_ids(lines), batch, *client.results(batch))


def test_postgres_unreachable_for_seconds(stack, client, tiny_model):
    """Every process reaches PostgreSQL through a proxy that refuses and breaks connections for a while."""
    proxy = TcpProxy(("127.0.0.1", make_url(stack.database_url).port or 5432))
    proxy.restore()
    try:
        stack.process_database_url = make_url(stack.database_url).set(port=proxy.port).render_as_string(False)
        stack.start_all(workers=2)
        lines = batch_lines(tiny_model.name)
        batch = client.submit(lines)
        client.wait_mid_batch(batch["id"], done_at_least=8)
        proxy.cut()
        time.sleep(POSTGRES_DOWN_S)
        proxy.restore()
        batch = client.wait_terminal(batch["id"])
        assert_all_succeeded(custom_ids(lines), batch, *client.results(batch))
    finally:
        proxy.cut()


def test_poison_request_fails_alone(stack, client, tiny_model):
    """A request that kills its worker every time ends as the one max_attempts_exceeded line; its
    chunk-mates succeed. Dead workers are restarted, as a container's restart policy would."""
    stack.start_all(workers=2)
    lines = batch_lines(tiny_model.name, count=24)
    poison = lines[10]["custom_id"]  # the middle chunk of three
    lines[10]["body"]["prompt"] = f"# {POISON_MARK}\ndef f(x):\n"
    deaths: list[int] = []

    def restart_dead_workers() -> None:
        for name in ("worker-1", "worker-2"):
            if not stack.is_alive(name):
                deaths.append(stack.processes[name].returncode)
                stack.start_worker(name)

    batch = client.submit(lines)
    batch = client.wait_terminal(batch["id"], timeout=900, on_poll=restart_dead_workers)
    output, errors = client.results(batch)
    assert_each_custom_id_once(custom_ids(lines), output, errors)
    assert [(line["custom_id"], line["error"]["code"]) for line in errors] == [(poison, "max_attempts_exceeded")]
    assert [line["response"]["status_code"] for line in output] == [200] * (len(lines) - 1)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": len(lines), "completed": len(lines) - 1, "failed": 1}
    assert deaths and set(deaths) == {-signal.SIGKILL}  # the poison did kill, and nothing else did
