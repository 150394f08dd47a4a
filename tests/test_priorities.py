"""Batch priorities (diffbatch extension): a worker leases the best chunk of its queue, highest batch priority
first, so a later high-priority batch overtakes the queued chunks of a low one, and every chunk still runs once."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from common.ids import now
from common.settings import Settings
from db import repo
from db.models import Chunk
from tests.harness import Service, completion_line, services_settings
from worker import finalize, pipeline, validation
from worker.schedules import fire_due


@contextlib.contextmanager
def _settings(kind: str, tmp_path: Path, model: Path) -> Iterator[Settings]:
    if kind == "embedded":  # the SQLite database and kombu's SQLite broker, which ignores message priorities
        yield Settings(data_dir=tmp_path / "data", model=str(model), chunk_size=2, max_batch_size=2)
        return
    with services_settings(tmp_path, model) as settings:  # Redis and PostgreSQL; chunks of 3
        yield settings


def _create(svc: Service, prefix: str, n: int, **extensions) -> dict:
    lines = [completion_line(f"{prefix}{i}", seed=i) for i in range(n)]
    response = svc.client.post("/v1/batches", json={"requests": lines, "endpoint": "/v1/completions", **extensions})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("kind", ["embedded", pytest.param("redis+postgres", marks=pytest.mark.services)])
def test_a_later_high_priority_batch_finishes_before_a_low_one(kind, tmp_path, tiny_model, monkeypatch):
    with _settings(kind, tmp_path, tiny_model) as settings:
        svc = Service(settings)
        low = _create(svc, "low", 4 * settings.chunk_size)  # priority 0 (the default), 4 chunks
        high = _create(svc, "high", settings.chunk_size, priority=10)
        assert (low["priority"], high["priority"]) == (0, 10)
        # Both validated before the one worker starts: the low batch's doorbells wait ahead of the high one's.
        for batch in (low, high):
            validation.validate_batch(svc.runtime, batch["id"])

        writes: list[tuple[str, int]] = []  # (batch, results written), in the order the worker wrote them
        lock, finish_requests = threading.Lock(), repo.finish_requests

        def recording(session, *, batch_id, outcomes):
            written = finish_requests(session, batch_id=batch_id, outcomes=outcomes)
            with lock:
                writes.append((batch_id, written))
            return written

        monkeypatch.setattr(repo, "finish_requests", recording)
        with svc:
            done = {b["id"]: svc.wait(b["id"]) for b in (low, high)}
        for batch, prefix in ((low, "low"), (high, "high")):
            finished = done[batch["id"]]
            assert finished["status"] == "completed" and finished["request_counts"]["failed"] == 0
            ids = [line["custom_id"] for line in svc.lines_of(finished["output_file_id"])]
            assert sorted(ids) == sorted(f"{prefix}{i}" for i in range(finished["request_counts"]["total"]))

    order = [batch_id for batch_id, written in writes if written]
    assert order.index(low["id"]) > max(i for i, b in enumerate(order) if b == high["id"]), order
    written: Counter[str] = Counter()
    for batch_id, count in writes:
        written[batch_id] += count
    assert written == {low["id"]: 4 * settings.chunk_size, high["id"]: settings.chunk_size}  # each request once


@pytest.fixture
def svc(tmp_path, tiny_model):
    """The API with no worker thread: the tests ring the doorbells themselves."""
    return Service.embedded(tmp_path, tiny_model, chunk_size=2, max_batch_size=2)


def _chunks(svc: Service, batch: dict) -> list[int]:
    validation.validate_batch(svc.runtime, batch["id"])
    with svc.runtime.session() as session:
        return [c.id for c in repo.chunks_of(session, batch_id=batch["id"])]


def _lease(svc: Service, worker: str, prefer: int | None = None) -> int | None:
    with svc.runtime.session() as session, session.begin():
        chunk = repo.lease_best_chunk(session, queue=svc.runtime.model_queue, worker=worker, now=now(), prefer=prefer)
        return None if chunk is None else chunk.id


def test_chunks_are_leased_by_priority_then_named_then_oldest(svc):
    low = _chunks(svc, _create(svc, "low", 4, priority=-3))
    normal = _chunks(svc, _create(svc, "normal", 4))
    high = _chunks(svc, _create(svc, "high", 2, priority=5))
    assert _lease(svc, "w1", prefer=low[1]) == high[0]  # a higher priority wins over the named chunk
    assert _lease(svc, "w2", prefer=normal[1]) == normal[1]  # among equals, the chunk the doorbell names
    assert _lease(svc, "w3", prefer=high[0]) == normal[0]  # the named one is held: the oldest of the best
    assert _lease(svc, "w4") == low[0]
    assert _lease(svc, "w5") == low[1]
    assert _lease(svc, "w6") is None  # held chunks are never taken twice


def test_cancelled_and_expired_batches_are_skipped(svc):
    cancelled = _create(svc, "c", 2, priority=9)
    expired = _create(svc, "e", 2, priority=8)
    open_chunks = _chunks(svc, _create(svc, "open", 2))
    _chunks(svc, cancelled)
    _chunks(svc, expired)
    assert svc.client.post(f"/v1/batches/{cancelled['id']}/cancel").status_code == 200
    with svc.runtime.session() as session, session.begin():
        repo.get_batch(session, batch_id=expired["id"]).expires_at = now() - 1
    assert _lease(svc, "w1") == open_chunks[0]


def test_a_doorbell_whose_chunk_another_worker_holds_runs_the_next_best(svc):
    """A worker may lease a chunk on another chunk's doorbell; that chunk's own doorbell then runs the one
    left over, so the number of doorbells still covers every chunk that needs a run."""
    first, second = _chunks(svc, _create(svc, "a", 4))
    with svc.runtime.session() as session, session.begin():
        repo.upsert_worker(session, name="other", model=svc.runtime.model_name, queue=svc.runtime.model_queue,
                           max_positions=2048, now=now())
        assert repo.lease_chunk(session, chunk_id=first, worker="other", now=now())
    assert pipeline.run_chunk(svc.runtime, first) == 2  # `other` holds it: this doorbell ran the second chunk
    with svc.runtime.session() as session:
        assert repo.get_chunk(session, chunk_id=first).worker == "other"
        assert repo.get_chunk(session, chunk_id=second).worker is None
    assert pipeline.run_chunk(svc.runtime, second) == 0  # nothing is left that nobody holds


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_batch_run_by_hand_doorbells_completes_every_request_once(svc, ahead):
    svc.settings.feed_ahead_chunks = ahead  # 2: the first doorbell's run is fed the other chunks
    low, high = _create(svc, "low", 6), _create(svc, "high", 2, priority=1)
    doorbells = _chunks(svc, low) + _chunks(svc, high)
    written = [pipeline.run_chunk(svc.runtime, chunk) for chunk in doorbells]
    assert written == ([2, 2, 2, 2] if ahead == 0 else [8, 0, 0, 0])
    for batch in (low, high):
        finalize.maybe_finalize(svc.runtime, batch["id"])
        done = svc.client.get(f"/v1/batches/{batch['id']}").json()
        assert done["status"] == "completed" and done["request_counts"]["completed"] == done["request_counts"]["total"]


@pytest.mark.parametrize(("value", "problem"), [
    ("5", "valid integer"), (2.5, "valid integer"), (True, "valid integer"), (101, "less than or equal to 100"),
    (-101, "greater than or equal to -100"),
])
def test_a_bad_priority_is_a_400_naming_the_field(svc, value, problem):
    response = svc.client.post("/v1/batches", json={"requests": [completion_line("a")], "endpoint": "/v1/completions",
                                                    "priority": value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "priority" and error["message"].startswith("priority: ") and problem in error["message"]


def test_retries_and_scheduled_runs_keep_their_priority(svc):
    first = _create(svc, "r", 2, priority=-7)
    _chunks(svc, first)
    svc.client.post(f"/v1/batches/{first['id']}/cancel")
    finalize.maybe_finalize(svc.runtime, first["id"])
    retry = svc.client.post(f"/v1/batches/{first['id']}/retry")
    assert retry.status_code == 200 and retry.json()["priority"] == -7

    uploaded = svc.upload(b"".join(f'{{"custom_id": "s{i}", "method": "POST", "url": "/v1/completions", '
                                   f'"body": {{"model": "tiny", "prompt": "x"}}}}\n'.encode() for i in range(2)))
    schedule = svc.client.post("/v1/schedules", json={"cron": "* * * * *", "template": {
        "input_file_id": uploaded["id"], "endpoint": "/v1/completions", "priority": 42}}).json()
    assert schedule["template"]["priority"] == 42
    fired = fire_due(svc.runtime, now=schedule["next_run_at"]).fired[schedule["id"]]
    assert svc.client.get(f"/v1/batches/{fired}").json()["priority"] == 42
    bad = svc.client.post("/v1/schedules", json={"cron": "* * * * *", "template": {
        "input_file_id": uploaded["id"], "endpoint": "/v1/completions", "priority": 1000}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "template.priority"


def test_a_chunk_held_by_a_live_worker_is_not_taken_even_when_best(svc):
    high = _chunks(svc, _create(svc, "high", 2, priority=3))
    low = _chunks(svc, _create(svc, "low", 2))
    with svc.runtime.session() as session, session.begin():
        session.execute(update(Chunk).where(Chunk.id == high[0]).values(worker="busy", leased_at=now()))
    assert _lease(svc, "w1", prefer=high[0]) == low[0]


def test_a_chunk_whose_run_just_failed_waits_out_its_pause_unless_named(svc):
    """An engine error (an out-of-memory, say) pauses a chunk's retry; another chunk's doorbell must not
    take it early because its batch ranks higher."""
    high = _chunks(svc, _create(svc, "high", 2, priority=3))
    low = _chunks(svc, _create(svc, "low", 2))
    assert _lease(svc, "w1", prefer=high[0]) == high[0]
    with svc.runtime.session() as session, session.begin():
        assert repo.chunk_failed(session, chunk_id=high[0], holder="w1", now=now(), max_attempts=3,
                                 retry_after=60)[0].id == high[0]
    assert _lease(svc, "w2", prefer=low[0]) == low[0]  # the higher priority waits
    assert _lease(svc, "w3") is None
    assert _lease(svc, "w4", prefer=high[0]) == high[0]  # its own doorbell (sent after the pause) runs it
