"""Nothing accepted is lost or returned twice: cancel, expiry, lost messages, dead workers, poison requests.

These drive the pipeline functions directly (no worker thread), so every interleaving is deterministic.
Each runs on SQLite and on PostgreSQL (its row locks and SKIP LOCKED are the production path).
"""

from __future__ import annotations

import pytest
from sqlalchemy import update

from common.ids import now
from common.settings import CONTROL_QUEUE
from db import repo
from db.models import Batch, Chunk, RequestStatus
from tests.harness import (
    DATABASES,
    Service,
    completion_line,
    service_on,
)
from worker import finalize, pipeline, reconcile, validation


@pytest.fixture(params=DATABASES)
def svc(request, tmp_path, tiny_model):
    timings = dict(chunk_size=2, max_batch_size=2, requeue_after_s=60, stale_after_s=60)
    with service_on(request.param, tmp_path, tiny_model, **timings) as service:
        yield service


def _validated(svc: Service, n: int) -> tuple[str, list[int]]:
    batch_id = svc.submit([completion_line(f"r{i}", seed=i) for i in range(n)])["id"]
    validation.validate_batch(svc.runtime, batch_id)
    with svc.runtime.session() as session:
        return batch_id, [c.id for c in repo.chunks_of(session, batch_id=batch_id)]


def _custom_ids(svc: Service, file_id: str | None) -> list[str]:
    return [line["custom_id"] for line in svc.lines_of(file_id)]


def _run_and_finalize(svc: Service, batch_id: str, chunk_id: int) -> int:
    """Run a chunk as a GPU worker does, then what the FINALIZE_BATCH message it sends to the control
    queue does once the batch has nothing open."""
    written = pipeline.run_chunk(svc.runtime, chunk_id)
    finalize.maybe_finalize(svc.runtime, batch_id)
    return written


def _empty_the_broker(svc: Service) -> None:
    """The broker lost every message (a Redis restart, say)."""
    with svc.celery.connection_for_write() as conn:
        for queue in (CONTROL_QUEUE, svc.runtime.model_queue):
            conn.default_channel.queue_purge(queue)


def test_cancel_keeps_finished_results_and_closes_the_rest(svc):
    svc.runtime.settings.feed_ahead_chunks = 0  # one chunk a run: the batch is left part done
    batch_id, chunks = _validated(svc, 5)
    pipeline.run_chunk(svc.runtime, chunks[0])
    cancelled = svc.client.post(f"/v1/batches/{batch_id}/cancel").json()
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"]
    assert pipeline.run_chunk(svc.runtime, chunks[1]) == 0  # a cancelling batch starts no new work
    finalize.maybe_finalize(svc.runtime, batch_id)  # what the cancel's message does (idempotent)
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "cancelled" and batch["cancelled_at"]
    assert _custom_ids(svc, batch["output_file_id"]) == ["r0", "r1"]
    errors = svc.lines_of(batch["error_file_id"])
    assert [e["custom_id"] for e in errors] == ["r2", "r3", "r4"]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert batch["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
    assert svc.client.post(f"/v1/batches/{batch_id}/cancel").json()["status"] == "cancelled"


def test_completed_batch_cannot_be_cancelled(svc):
    batch_id, chunks = _validated(svc, 1)
    _run_and_finalize(svc, batch_id, chunks[0])
    response = svc.client.post(f"/v1/batches/{batch_id}/cancel")
    assert response.status_code == 409 and "completed" in response.json()["error"]["message"]


def test_cancel_while_validating_stores_nothing(svc):
    batch_id = svc.submit([completion_line("a")])["id"]
    svc.client.post(f"/v1/batches/{batch_id}/cancel")
    validation.validate_batch(svc.runtime, batch_id)
    finalize.maybe_finalize(svc.runtime, batch_id)
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "cancelled" and batch["request_counts"]["total"] == 0


def test_expired_batch_keeps_results_and_reports_the_rest(svc):
    svc.runtime.settings.feed_ahead_chunks = 0  # one chunk a run: the batch is left part done
    batch_id, chunks = _validated(svc, 3)
    pipeline.run_chunk(svc.runtime, chunks[0])
    with svc.runtime.session() as session, session.begin():
        session.execute(update(Batch).where(Batch.id == batch_id).values(expires_at=now() - 1))
    reconcile.reconcile(svc.runtime)
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "expired" and batch["expired_at"]
    assert _custom_ids(svc, batch["output_file_id"]) == ["r0", "r1"]
    assert [e["error"]["code"] for e in svc.lines_of(batch["error_file_id"])] == ["batch_expired"]


def test_lost_messages_are_sent_again_and_nothing_is_lost(svc):
    batch_id, chunks = _validated(svc, 4)
    _empty_the_broker(svc)
    with svc.runtime.session() as session, session.begin():
        session.execute(update(Chunk).values(enqueued_at=now() - svc.settings.lost_message_grace_s - 1))
    assert reconcile.reconcile(svc.runtime)["resent"] == 2  # nobody holds them and their queue is empty
    with svc:  # a worker starts and works through the re-sent messages
        batch = svc.wait(batch_id)
    assert batch["status"] == "completed"
    assert _custom_ids(svc, batch["output_file_id"]) == ["r0", "r1", "r2", "r3"]


def test_a_chunk_waiting_behind_a_backlog_is_not_re_sent_every_period(svc):
    """Its queue holds messages, so the chunk is not taken for lost; the last-resort timer re-sends it
    after REQUEUE_AFTER_S (60 here), then after twice as long each time: a day's backlog costs a few
    doorbells per chunk, not one every period."""
    batch_id, chunks = _validated(svc, 2)  # one chunk
    requeued, resent = [], []
    for waited in (61, 61, 121, 121, 241):
        with svc.runtime.session() as session, session.begin():
            session.execute(update(Chunk).values(enqueued_at=now() - waited))
        report = reconcile.reconcile(svc.runtime)
        requeued.append(report["requeued"])
        resent.append(report["resent"])
    assert requeued == [1, 0, 1, 0, 1] and resent == [0] * 5


def test_two_validations_of_one_batch_at_once_lose_nothing(svc, monkeypatch):
    """The reconciler re-sends a validation it has not heard from, which may still be running: the
    second attempt takes over, and the first stops without deleting what the second stored."""
    batch_id = svc.submit([completion_line(f"r{i}") for i in range(5)])["id"]
    real_lines, pulled = validation._lines, []

    def lines_then_a_second_attempt(rt, file_id):
        for n, item in enumerate(real_lines(rt, file_id)):
            pulled.append(n)
            if len(pulled) == 5 + 3:  # the first attempt's store pass, one chunk stored (size 2)
                validation.validate_batch(svc.runtime, batch_id)  # the second runs to the end
            yield item

    monkeypatch.setattr(validation, "_lines", lines_then_a_second_attempt)
    validation.validate_batch(svc.runtime, batch_id)
    with svc:
        batch = svc.wait(batch_id)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert _custom_ids(svc, batch["output_file_id"]) == [f"r{i}" for i in range(5)]


def test_a_finalizer_writing_shows_it_is_alive(svc, monkeypatch):
    """Each page of result lines touches the batch, so the reconciler does not start a second
    finalizer beside a slow one."""
    batch_id, chunks = _validated(svc, 3)
    for chunk in chunks:
        pipeline.run_chunk(svc.runtime, chunk)  # the batch is left for the control process to finalize
    monkeypatch.setattr(finalize, "PAGE", 1)
    with svc.runtime.session() as session, session.begin():
        session.execute(update(Batch).where(Batch.id == batch_id).values(touched_at=0))
    lines = list(finalize._result_lines(svc.runtime, batch_id, (RequestStatus.succeeded,)))
    assert len(lines) == 3
    with svc.runtime.session() as session:
        assert repo.get_batch(session, batch_id=batch_id).touched_at >= now() - 5


def _held_by_a_dead_worker(svc: Service, chunk_id: int, name: str = "dead:1") -> None:
    """A worker took the chunk's lease and claimed its requests, then died (its row stopped beating)."""
    long_ago = now() - svc.settings.worker_dead_after_s - 60
    with svc.runtime.session() as session, session.begin():
        repo.upsert_worker(session, name=name, model="tiny", queue=svc.runtime.model_queue, max_positions=64,
                           now=long_ago)
        assert repo.lease_chunk(session, chunk_id=chunk_id, worker=name, now=long_ago)
        assert repo.claim_requests(session, chunk_id=chunk_id, worker=name, now=long_ago)


def test_dead_workers_requests_are_reclaimed_and_written_once(svc):
    batch_id, chunks = _validated(svc, 2)
    _held_by_a_dead_worker(svc, chunks[0])
    # Its message delivered again: the holder is dead, so this records the failed run and re-sends the
    # chunk instead of running it; the reconciler then finds nothing left to reclaim.
    assert pipeline.run_chunk(svc.runtime, chunks[0]) == 0
    assert reconcile.reconcile(svc.runtime)["reclaimed"] == 0
    assert _run_and_finalize(svc, batch_id, chunks[0]) == 2
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 2
    with svc.runtime.session() as session, session.begin():
        rows = repo.requests_of(session, batch_id=batch_id, statuses=[RequestStatus.succeeded])
        assert [r.attempts for r in rows] == [0, 0]  # a failed run of two is blamed on neither
        # The dead worker wakes up and tries to write its result: refused, counts unchanged.
        late = repo.outcome(rows[0].id, RequestStatus.failed, now(), error_code="late", error_message="late")
        assert repo.finish_requests(session, batch_id=batch_id, outcomes=[late]) == 0
    assert svc.client.get(f"/v1/batches/{batch_id}").json()["request_counts"] == {
        "total": 2, "completed": 2, "failed": 0}


def test_poison_request_ends_as_an_error_line_not_a_loop(svc):
    svc.runtime.settings.max_attempts = 2
    batch_id, chunks = _validated(svc, 1)
    for death in range(2):  # two workers died while running it, alone in its chunk
        _held_by_a_dead_worker(svc, chunks[0], name=f"dead:{death}")
        assert reconcile.reconcile(svc.runtime)["reclaimed"] == 1
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "completed" and batch["output_file_id"] is None
    [error] = svc.lines_of(batch["error_file_id"])
    assert error["custom_id"] == "r0" and error["error"]["code"] == "max_attempts_exceeded"
    assert "Gave up after 2 failed attempts" in error["error"]["message"]


def test_engine_failure_hands_requests_back(svc, monkeypatch):
    batch_id, chunks = _validated(svc, 2)

    def broken(_requests, more=None):
        raise RuntimeError("CUDA out of memory")
        yield  # a generator, like Engine.stream: the error comes at the first result

    monkeypatch.setattr(svc.runtime.engine, "stream", broken)
    with pytest.raises(RuntimeError):
        pipeline.run_chunk(svc.runtime, chunks[0])
    with svc.runtime.session() as session:
        rows = repo.requests_of(session, batch_id=batch_id, statuses=[RequestStatus.pending])
        chunk = repo.get_chunk(session, chunk_id=chunks[0])
    assert [r.custom_id for r in rows] == ["r0", "r1"]  # back to pending, to be retried
    assert (chunk.worker, chunk.failures) == (None, 1)  # the lease is free; one failed run of the group
    monkeypatch.undo()
    assert pipeline.run_chunk(svc.runtime, chunks[0]) == 2


def test_interrupted_validation_is_retried_from_scratch(svc):
    batch_id = svc.submit([completion_line(f"r{i}") for i in range(3)])["id"]
    with svc.runtime.session() as session, session.begin():  # a validator died after storing one chunk
        chunk_id = repo.add_chunk(session, batch_id=batch_id, queue="q", size=1, now=now())
        repo.add_requests(session, rows=[{"public_id": "batch_req_x", "batch_id": batch_id, "chunk_id": chunk_id,
                                          "custom_id": "r0", "line": 1, "url": "/v1/completions", "body": {},
                                          "status": RequestStatus.pending, "attempts": 0}])
        session.execute(update(Batch).where(Batch.id == batch_id).values(touched_at=now() - 3600))
    assert reconcile.reconcile(svc.runtime)["revalidated"] == 1
    with svc:
        batch = svc.wait(batch_id)
    assert batch["status"] == "completed" and batch["request_counts"]["total"] == 3
    assert _custom_ids(svc, batch["output_file_id"]) == ["r0", "r1", "r2"]


def test_a_validation_that_never_finishes_expires_with_its_window(svc):
    batch_id = svc.submit([completion_line("r0")])["id"]  # its message lost, or its validation crashing
    with svc.runtime.session() as session, session.begin():
        session.execute(update(Batch).where(Batch.id == batch_id).values(touched_at=now() - 3600,
                                                                          expires_at=now() - 1))
    report = reconcile.reconcile(svc.runtime)
    assert (report["expired_validating"], report["revalidated"]) == (1, 0)
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert reconcile.reconcile(svc.runtime)["expired_validating"] == 0


def test_partial_results_while_the_batch_runs(svc):
    svc.runtime.settings.feed_ahead_chunks = 0  # one chunk a run: the batch is left part done
    batch_id, chunks = _validated(svc, 5)
    assert svc.client.get(f"/v1/batches/{batch_id}/results").json()["data"] == []
    pipeline.run_chunk(svc.runtime, chunks[0])
    first = svc.client.get(f"/v1/batches/{batch_id}/results?limit=1").json()
    assert [line["custom_id"] for line in first["data"]] == ["r0"] and first["has_more"] is True
    rest = svc.client.get(f"/v1/batches/{batch_id}/results?after={first['last_id']}").json()
    assert [line["custom_id"] for line in rest["data"]] == ["r1"] and rest["has_more"] is False
    assert rest["data"][0]["response"]["status_code"] == 200
    bad = svc.client.get(f"/v1/batches/{batch_id}/results?after=batch_req_nope")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
