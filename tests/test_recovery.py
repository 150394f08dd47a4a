"""Recovery from facts in the database: chunk leases, dead workers, lost doorbells, poison requests.

Deterministic: the reconciler is called, not scheduled; a dead worker is a `workers` row whose heartbeat
is old; a lost message is one the broker no longer holds. Each runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update

from common.ids import now
from common.queue import queue_depth
from common.settings import CONTROL_QUEUE, Settings
from db import repo
from db.models import Chunk, Request, RequestStatus, Worker
from tests.harness import Service, completion_line, fresh_postgres_database, require_servers
from worker import finalize, leases, pipeline, reconcile, validation
from worker.heartbeat import Heartbeat

POISON_SEED = 666  # the stand-in engine fails on the request with this seed


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def svc(request, tmp_path, tiny_model):
    options = dict(chunk_size=8, max_batch_size=2)
    if request.param == "sqlite":
        service = Service.embedded(tmp_path, tiny_model, **options)
        _empty_the_broker(service)  # the in-memory broker is shared by every test in this process
        yield service
        return
    require_servers()
    with fresh_postgres_database() as url:
        service = Service(Settings(data_dir=tmp_path / "data", model=str(tiny_model), database_url=url,
                                   broker_url="memory://", **options))
        _empty_the_broker(service)
        yield service


def _empty_the_broker(svc: Service) -> None:
    with svc.celery.connection_for_write() as conn:
        for queue in (CONTROL_QUEUE, svc.runtime.model_queue):
            conn.default_channel.queue_purge(queue)


def _validated(svc: Service, n: int, poison: int | None = None) -> tuple[str, list[int]]:
    lines = [completion_line(f"r{i}", seed=POISON_SEED if i == poison else i) for i in range(n)]
    batch_id = svc.submit(lines)["id"]
    validation.validate_batch(svc.runtime, batch_id)
    with svc.runtime.session() as session:
        return batch_id, [c.id for c in repo.chunks_of(session, batch_id=batch_id)]


def _held_by(svc: Service, chunk_id: int, name: str, *, beat_at: int) -> None:
    """Worker `name` took the chunk's lease and claimed its requests; its row last beat at `beat_at`."""
    with svc.runtime.session() as session, session.begin():
        repo.upsert_worker(session, name=name, model="tiny", queue=svc.runtime.model_queue, max_positions=64,
                           now=beat_at)
        assert repo.lease_chunk(session, chunk_id=chunk_id, worker=name, now=beat_at)
        assert repo.claim_requests(session, chunk_id=chunk_id, worker=name, now=beat_at)


def _dead_since(svc: Service) -> int:
    return now() - svc.settings.worker_dead_after_s - 5


def _age_chunks(svc: Service, seconds: int) -> None:
    with svc.runtime.session() as session, session.begin():
        session.execute(update(Chunk).values(enqueued_at=now() - seconds))


def _chunk(svc: Service, chunk_id: int) -> Chunk:
    with svc.runtime.session() as session:
        return repo.get_chunk(session, chunk_id=chunk_id)


def _model_queue_depth(svc: Service) -> int:
    return queue_depth(svc.celery, svc.runtime.model_queue)


def _finished(svc: Service, batch_id: str) -> dict:
    """Finalize as the control process does, then the batch with its result and error lines."""
    finalize.maybe_finalize(svc.runtime, batch_id)
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    return {"status": batch["status"], "counts": batch["request_counts"],
            "output": [line["custom_id"] for line in svc.lines_of(batch["output_file_id"])],
            "errors": svc.lines_of(batch["error_file_id"])}


def test_a_dead_workers_chunk_is_reclaimed_and_sent_again_by_one_reconcile(svc):
    batch_id, [chunk_id] = _validated(svc, 4)
    _held_by(svc, chunk_id, "gpu-1:7", beat_at=_dead_since(svc))
    _empty_the_broker(svc)  # its delivery died with the worker (unacknowledged, outside the queue)
    report = reconcile.reconcile(svc.runtime)
    assert (report["reclaimed"], _model_queue_depth(svc)) == (1, 1)  # re-sent now, not after a timer
    chunk = _chunk(svc, chunk_id)
    assert (chunk.worker, chunk.failures) == (None, 1)
    with svc:
        batch = svc.wait(batch_id)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert [line["custom_id"] for line in svc.lines_of(batch["output_file_id"])] == ["r0", "r1", "r2", "r3"]


def test_a_restarted_worker_does_not_keep_what_its_predecessor_held(svc):
    """A container restarts its worker under the same host name and pid: the new process beats the same
    `workers` row, but the lease was taken before it started, so the chunk is reclaimed."""
    batch_id, [chunk_id] = _validated(svc, 2)
    _held_by(svc, chunk_id, "gpu-1:1", beat_at=now() - 20)
    with svc.runtime.session() as session, session.begin():  # the restart registers the worker again
        repo.upsert_worker(session, name="gpu-1:1", model="tiny", queue=svc.runtime.model_queue,
                           max_positions=64, now=now())
    assert reconcile.reconcile(svc.runtime)["reclaimed"] == 1
    assert pipeline.run_chunk(svc.runtime, chunk_id) == 2
    assert _finished(svc, batch_id)["output"] == ["r0", "r1"]


def test_a_lease_its_live_worker_stopped_renewing_is_reclaimed(svc):
    """The worker lives on, but the run that held the chunk ended without releasing it (the database
    was unreachable just then): nothing renews the lease, so it lapses like a dead worker's."""
    batch_id, [chunk_id] = _validated(svc, 2)
    _held_by(svc, chunk_id, "gpu-4:2", beat_at=_dead_since(svc))
    with svc.runtime.session() as session, session.begin():
        repo.beat_worker(session, name="gpu-4:2", now=now())
    assert reconcile.reconcile(svc.runtime)["reclaimed"] == 1
    assert pipeline.run_chunk(svc.runtime, chunk_id) == 2
    assert _finished(svc, batch_id)["output"] == ["r0", "r1"]


def test_a_live_holder_keeps_its_lease(svc, monkeypatch):
    batch_id, [chunk_id] = _validated(svc, 2)
    _held_by(svc, chunk_id, "gpu-2:9", beat_at=now())

    def must_not_run(_requests, more=None):
        raise AssertionError("a second worker ran a chunk another worker holds")

    monkeypatch.setattr(svc.runtime.engine, "stream", must_not_run)
    assert pipeline.run_chunk(svc.runtime, chunk_id) == 0  # a duplicate doorbell: returns at once
    _age_chunks(svc, 3600)
    _empty_the_broker(svc)
    report = reconcile.reconcile(svc.runtime)
    assert (report["reclaimed"], report["resent"], report["orphaned"]) == (0, 0, 0)
    with svc.runtime.session() as session:
        rows = repo.requests_of(session, batch_id=batch_id, statuses=list(RequestStatus))
        assert {(r.status, r.worker) for r in rows} == {(RequestStatus.running, "gpu-2:9")}
        assert repo.get_chunk(session, chunk_id=chunk_id).worker == "gpu-2:9"


def test_a_dead_holders_run_is_counted_once_by_whoever_sees_it_first(svc):
    batch_id, [chunk_id] = _validated(svc, 2)
    _held_by(svc, chunk_id, "gpu-3:4", beat_at=_dead_since(svc))
    with svc.runtime.session() as session, session.begin():
        first = repo.chunk_failed(session, chunk_id=chunk_id, holder="gpu-3:4", now=now(), max_attempts=3)
        again = repo.chunk_failed(session, chunk_id=chunk_id, holder="gpu-3:4", now=now(), max_attempts=3)
    assert ([c.id for c in first], again) == ([chunk_id], [])
    assert reconcile.reconcile(svc.runtime)["reclaimed"] == 0
    assert _chunk(svc, chunk_id).failures == 1


def test_requests_a_dead_worker_left_running_without_a_lease_run_again(svc):
    """What an earlier diffbatch (no chunk leases) left behind when its worker died."""
    batch_id, [chunk_id] = _validated(svc, 2)
    with svc.runtime.session() as session, session.begin():
        repo.upsert_worker(session, name="old:3", model="tiny", queue=svc.runtime.model_queue, max_positions=64,
                           now=_dead_since(svc))
        assert repo.claim_requests(session, chunk_id=chunk_id, worker="old:3", now=_dead_since(svc))
    _empty_the_broker(svc)
    _age_chunks(svc, svc.settings.lost_message_grace_s + 1)
    report = reconcile.reconcile(svc.runtime)
    assert (report["orphaned"], report["resent"], report["reclaimed"]) == (2, 1, 0)
    with svc:
        batch = svc.wait(batch_id)
    assert [line["custom_id"] for line in svc.lines_of(batch["output_file_id"])] == ["r0", "r1"]


def test_a_running_chunk_beats_its_worker_row_and_learns_when_its_lease_is_gone(svc):
    batch_id, [chunk_id] = _validated(svc, 2)
    _held_by(svc, chunk_id, svc.runtime.name, beat_at=now() - 20)
    svc.runtime.settings.heartbeat_s = 0
    with Heartbeat(svc.runtime, chunk_id) as beat:
        _wait_for(lambda: _worker_row(svc).heartbeat_at >= now() - 1 and _chunk(svc, chunk_id).leased_at >= now() - 1)
        with svc.runtime.session() as session, session.begin():  # the reconciler took it for dead
            session.execute(update(Chunk).where(Chunk.id == chunk_id).values(worker="gpu-5:2"))
        assert beat.lost.wait(timeout=30)


def _worker_row(svc: Service) -> Worker:
    with svc.runtime.session() as session:
        return session.get(Worker, svc.runtime.name)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_lost_doorbell_is_sent_again_after_the_grace_and_only_from_an_empty_queue(svc):
    svc.runtime.settings.chunk_size = 2
    batch_id, chunks = _validated(svc, 4)
    grace = svc.settings.lost_message_grace_s
    _age_chunks(svc, grace + 1)
    assert reconcile.reconcile(svc.runtime)["resent"] == 0  # the queue holds them: a backlog, not a loss
    _empty_the_broker(svc)
    _age_chunks(svc, grace - 5)
    assert reconcile.reconcile(svc.runtime)["resent"] == 0  # sent too recently: perhaps on its way
    _age_chunks(svc, grace + 1)
    assert reconcile.reconcile(svc.runtime)["resent"] == 2
    assert _model_queue_depth(svc) == 2
    assert reconcile.reconcile(svc.runtime)["resent"] == 0  # just sent: no flood of duplicates
    with svc:
        batch = svc.wait(batch_id)
    assert batch["status"] == "completed"
    assert [line["custom_id"] for line in svc.lines_of(batch["output_file_id"])] == ["r0", "r1", "r2", "r3"]


def test_two_reconcilers_at_once_send_a_lost_chunk_once(svc, monkeypatch):
    batch_id, [chunk_id] = _validated(svc, 2)
    _empty_the_broker(svc)
    _age_chunks(svc, svc.settings.lost_message_grace_s + 1)
    real_depth, reports, second = reconcile.queue_depth, [], []

    def depth_while_another_reconciles(app, name):
        depth = real_depth(app, name)
        if not second:  # the second reconciler runs whole between the first's look and its send
            second.append("running")
            reports.append(reconcile.reconcile(svc.runtime))
        return depth

    monkeypatch.setattr(reconcile, "queue_depth", depth_while_another_reconciles)
    reports.append(reconcile.reconcile(svc.runtime))
    assert [r["resent"] for r in reports] == [1, 0]
    assert _model_queue_depth(svc) == 1


def _poisoned_stream(real_stream, raised: list):
    def stream(requests, more=None):
        def raise_on_poison(given):
            if any(r.params.seed == POISON_SEED for r in given):
                raised.append(len(given))
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return given

        raise_on_poison(requests)
        yield from real_stream(requests, None if more is None else lambda free: raise_on_poison(more(free)))
    return stream


def _open_chunks(svc: Service, batch_id: str) -> list[int]:
    with svc.runtime.session() as session:
        return list(session.scalars(select(Request.chunk_id).distinct().where(
            Request.batch_id == batch_id, Request.status == RequestStatus.pending).order_by(Request.chunk_id)))


def _assert_only_the_poison_failed(svc: Service, batch_id: str, n: int, poison: int) -> None:
    done = _finished(svc, batch_id)
    assert done["status"] == "completed"
    assert done["counts"] == {"total": n, "completed": n - 1, "failed": 1}
    assert done["output"] == [f"r{i}" for i in range(n) if i != poison]
    [error] = done["errors"]
    assert error["custom_id"] == f"r{poison}" and error["error"]["code"] == "max_attempts_exceeded"
    assert f"Gave up after {svc.settings.max_attempts} failed attempts" in error["error"]["message"]


def test_a_poison_request_the_engine_raises_on_fails_alone(svc, monkeypatch):
    batch_id, _ = _validated(svc, 8, poison=5)
    raised: list[int] = []
    monkeypatch.setattr(svc.runtime.engine, "stream", _poisoned_stream(svc.runtime.engine.stream, raised))
    for _ in range(50):  # the chunks the failures send, run as a worker would (a guard, not a timing)
        if not (chunk_ids := _open_chunks(svc, batch_id)):
            break
        for chunk_id in chunk_ids:
            with pytest.raises(RuntimeError) if _holds_poison(svc, chunk_id) else nullcontext():
                pipeline.run_chunk(svc.runtime, chunk_id)
    # Twice as a group of 8, once at 4 and at 2 (each split in halves), then max_attempts times alone.
    assert raised == [8, 8, 4, 2] + [1] * svc.settings.max_attempts
    _assert_only_the_poison_failed(svc, batch_id, 8, poison=5)


def test_a_poison_request_that_kills_its_worker_fails_alone(svc):
    batch_id, _ = _validated(svc, 8, poison=2)
    deaths = []
    for _ in range(50):
        if not (chunk_ids := _open_chunks(svc, batch_id)):
            break
        for chunk_id in chunk_ids:
            if _holds_poison(svc, chunk_id):  # the worker running it dies; the reconciler notices
                _held_by(svc, chunk_id, f"gpu:{len(deaths)}", beat_at=_dead_since(svc))
                deaths.append(_chunk(svc, chunk_id).size)
            else:
                pipeline.run_chunk(svc.runtime, chunk_id)
        reconcile.reconcile(svc.runtime)
    assert deaths == [8, 8, 4, 2] + [1] * svc.settings.max_attempts
    _assert_only_the_poison_failed(svc, batch_id, 8, poison=2)
    with svc.runtime.session() as session:  # batch-mates were never blamed for its deaths
        rows = repo.requests_of(session, batch_id=batch_id, statuses=[RequestStatus.succeeded])
        assert {r.attempts for r in rows} == {0}


def _holds_poison(svc: Service, chunk_id: int) -> bool:
    with svc.runtime.session() as session:
        bodies = session.scalars(select(Request.body).where(Request.chunk_id == chunk_id,
                                                            Request.status == RequestStatus.pending))
        return any(body.get("seed") == POISON_SEED for body in bodies)


def test_a_cancel_during_a_run_is_not_a_failure(svc, monkeypatch):
    batch_id, [chunk_id] = _validated(svc, 4)
    real_stream = svc.runtime.engine.stream

    def cancelled_after_the_first_result(requests, more=None):
        for n, item in enumerate(real_stream(requests, more)):
            if n == 1:
                svc.client.post(f"/v1/batches/{batch_id}/cancel")
            yield item

    monkeypatch.setattr(svc.runtime.engine, "stream", cancelled_after_the_first_result)
    assert pipeline.run_chunk(svc.runtime, chunk_id) == 2  # the first group of max_batch_size
    chunk = _chunk(svc, chunk_id)
    assert (chunk.worker, chunk.failures) == (None, 0)
    done = _finished(svc, batch_id)
    assert done["status"] == "cancelled" and done["output"] == ["r0", "r1"]
    assert [(e["custom_id"], e["error"]["code"]) for e in done["errors"]] == [
        ("r2", "batch_cancelled"), ("r3", "batch_cancelled")]


def test_the_worker_asks_the_control_queue_to_finalize_instead_of_writing_files(svc):
    svc.runtime.settings.chunk_size = 2
    svc.runtime.settings.feed_ahead_chunks = 0  # one chunk a run: the first leaves requests open
    batch_id, chunks = _validated(svc, 4)
    _empty_the_broker(svc)
    pipeline.run_chunk(svc.runtime, chunks[0])
    assert queue_depth(svc.celery, CONTROL_QUEUE) == 0  # requests are still open
    pipeline.run_chunk(svc.runtime, chunks[1])
    assert queue_depth(svc.celery, CONTROL_QUEUE) == 1  # FINALIZE_BATCH
    assert svc.client.get(f"/v1/batches/{batch_id}").json()["status"] == "in_progress"
    assert _finished(svc, batch_id)["output"] == ["r0", "r1", "r2", "r3"]


def test_a_retiring_worker_hands_its_chunks_back_at_once(svc):
    batch_id, [chunk_id] = _validated(svc, 3)
    with svc.runtime.session() as session, session.begin():
        repo.upsert_worker(session, name=svc.runtime.name, model="tiny", queue=svc.runtime.model_queue,
                           max_positions=64, now=now())
        assert repo.lease_chunk(session, chunk_id=chunk_id, worker=svc.runtime.name, now=now())
        assert repo.claim_requests(session, chunk_id=chunk_id, worker=svc.runtime.name, now=now())
        assert repo.open_work(session) == (1, 3)
    _empty_the_broker(svc)
    assert leases.retire_worker(svc.runtime) == 1
    assert _model_queue_depth(svc) == 1
    chunk = _chunk(svc, chunk_id)
    assert (chunk.worker, chunk.failures) == (None, 0)
    with svc.runtime.session() as session:
        assert session.get(Worker, svc.runtime.name) is None
        statuses = {r.status for r in repo.requests_of(session, batch_id=batch_id, statuses=list(RequestStatus))}
        assert statuses == {RequestStatus.pending}
    assert pipeline.run_chunk(svc.runtime, chunk_id) == 3
    assert _finished(svc, batch_id)["output"] == ["r0", "r1", "r2"]
    with svc.runtime.session() as session:
        assert repo.open_work(session) == (0, 0)


def test_a_worker_must_beat_before_it_is_taken_for_dead(monkeypatch):
    monkeypatch.setenv("DIFFBATCH_HEARTBEAT_S", "30")
    with pytest.raises(ValidationError, match=r"DIFFBATCH_WORKER_DEAD_AFTER_S \(30\) must be more than "
                                              r"DIFFBATCH_HEARTBEAT_S \(30\)"):
        Settings()
