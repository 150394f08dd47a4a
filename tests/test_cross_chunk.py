"""A run fed from several chunks (worker/feed.py): the engine's batch stays full across chunk boundaries,
and every result is still written once, to its own batch, whatever stops the run."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from sqlalchemy import select, update

from common.ids import now
from common.queue import queue_depth
from common.settings import CONTROL_QUEUE, Settings
from db import repo
from db.models import Chunk, Request, RequestStatus
from tests.harness import Service, completion_line, fresh_postgres_database, require_servers
from worker import finalize, pipeline, validation
from worker.engine.engine import Engine
from worker.engine.loader import load_model
from worker.engine.params import GenerationRequest, SamplingParams
from worker.heartbeat import Heartbeat


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def svc(request, tmp_path, tiny_model):
    """Chunks of 2 rows, a batch of 2: without feeding, every chunk is a run of its own."""
    options = dict(chunk_size=2, max_batch_size=2, feed_ahead_chunks=2)
    if request.param == "sqlite":
        yield _purged(Service.embedded(tmp_path, tiny_model, **options))
        return
    require_servers()
    with fresh_postgres_database() as url:
        yield _purged(Service(Settings(data_dir=tmp_path / "data", model=str(tiny_model), database_url=url,
                                       broker_url="memory://", **options)))


def _purged(service: Service) -> Service:
    with service.celery.connection_for_write() as conn:  # the in-memory broker is shared by the process
        for queue in (CONTROL_QUEUE, service.runtime.model_queue):
            conn.default_channel.queue_purge(queue)
    return service


def _batch(svc: Service, name: str, n: int) -> tuple[str, list[int]]:
    lines = [completion_line(f"{name}{i}", seed=i, max_tokens=8 + 40 * (i % 3)) for i in range(n)]
    batch_id = svc.submit(lines)["id"]
    validation.validate_batch(svc.runtime, batch_id)
    with svc.runtime.session() as session:
        return batch_id, [c.id for c in repo.chunks_of(session, batch_id=batch_id)]


def _finished(svc: Service, batch_id: str) -> dict:
    finalize.maybe_finalize(svc.runtime, batch_id)
    batch = svc.client.get(f"/v1/batches/{batch_id}").json()
    return {"status": batch["status"], "counts": batch["request_counts"],
            "output": [line["custom_id"] for line in svc.lines_of(batch["output_file_id"])],
            "errors": [line["custom_id"] for line in svc.lines_of(batch["error_file_id"])]}


def _chunks(svc: Service, ids: list[int]) -> list[Chunk]:
    with svc.runtime.session() as session:
        return [repo.get_chunk(session, chunk_id=i) for i in ids]


def _count_scheduler_runs(svc: Service, monkeypatch) -> list[int]:
    runs: list[int] = []
    scheduler = svc.runtime.engine.scheduler
    real_run = scheduler.run

    def counted(requests, more=None):
        runs.append(len(requests))
        return real_run(requests, more)

    monkeypatch.setattr(scheduler, "run", counted)
    return runs


def _wrap_stream(svc: Service, monkeypatch, *, after_feed) -> list[int]:
    """The real engine, with ``after_feed(n)`` called once a feed has handed the run a further chunk's
    ``n`` requests; returns how many requests each feed handed over."""
    engine, fed = svc.runtime.engine, []
    real_stream = engine.stream

    def stream(requests, more=None):
        def feed(free):
            got = more(free)
            if got:
                fed.append(len(got))
                after_feed(len(fed))
            return got
        yield from real_stream(requests, None if more is None else feed)

    monkeypatch.setattr(engine, "stream", stream)
    return fed


@pytest.mark.parametrize(("ahead", "runs"), [(2, 1), (0, 3)])
def test_one_engine_run_serves_every_chunk_of_a_batch(svc, monkeypatch, ahead, runs):
    svc.runtime.settings.feed_ahead_chunks = ahead
    started = _count_scheduler_runs(svc, monkeypatch)
    batch_id, chunk_ids = _batch(svc, "r", 6)
    written = [pipeline.run_chunk(svc.runtime, chunk_id) for chunk_id in chunk_ids]
    assert sum(written) == 6 and len(started) == runs
    assert all(chunk.worker is None and chunk.failures == 0 for chunk in _chunks(svc, chunk_ids))
    done = _finished(svc, batch_id)
    assert done["status"] == "completed" and done["counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert sorted(done["output"]) == [f"r{i}" for i in range(6)]  # each once


def test_fed_rows_get_the_tokens_they_get_alone(tiny_model):
    """Fed requests join the running batch as waiting rows do: a row's tokens stay its own, and a request
    of another block length waits for a run of its own."""
    engine = Engine(load_model(str(tiny_model)), max_batch_size=2)

    def request(prompt, max_tokens, seed, block_length=32):
        return GenerationRequest(engine.encode_completion(prompt), SamplingParams(
            max_tokens=max_tokens, temperature=0.9, seed=seed, block_length=block_length))

    first = [request("a", 8, 1), request("def f(x):", 40, 2)]
    later = [[request("b", 64, 3), request("another prompt", 8, 4, block_length=16)], [request("c", 12, 5)]]
    asked: list[int] = []

    def more(free):
        asked.append(free)
        return later.pop(0) if later else []

    runs = []
    real_run = engine.scheduler.run
    engine.scheduler.run = lambda requests, more=None: runs.append(len(requests)) or real_run(requests, more)
    streamed = dict(engine.stream(first, more))
    assert sorted(streamed) == [0, 1, 2, 3, 4] and runs == [2, 1]  # the block-16 request ran after
    assert all(free > 0 for free in asked)
    engine.scheduler.run = real_run
    alone = [request("a", 8, 1), request("def f(x):", 40, 2), request("b", 64, 3),
             request("another prompt", 8, 4, block_length=16), request("c", 12, 5)]
    for index, single in enumerate(alone):
        assert streamed[index].token_ids == engine.generate([single])[0].token_ids


def test_a_run_feeds_only_chunks_of_its_own_queue(svc):
    ours, our_chunks = _batch(svc, "a", 4)
    theirs, their_chunks = _batch(svc, "b", 4)
    with svc.runtime.session() as session, session.begin():  # another model's queue
        session.execute(update(Chunk).where(Chunk.id.in_(their_chunks)).values(queue="diffbatch.other"))
    assert pipeline.run_chunk(svc.runtime, our_chunks[0]) == 4
    with svc.runtime.session() as session:
        untouched = session.scalars(select(Request.status).where(Request.batch_id == theirs)).all()
    assert set(untouched) == {RequestStatus.pending}
    assert sorted(_finished(svc, ours)["output"]) == ["a0", "a1", "a2", "a3"]


def test_a_cancel_mid_run_stops_its_rows_and_hands_the_other_batch_back(svc, monkeypatch):
    cancelled, [its_chunk] = _batch(svc, "x", 2)
    kept, kept_chunks = _batch(svc, "y", 4)
    fed = _wrap_stream(svc, monkeypatch, after_feed=lambda n: n == 1 and svc.client.post(
        f"/v1/batches/{cancelled}/cancel"))
    pipeline.run_chunk(svc.runtime, its_chunk)
    assert fed  # the other batch's chunk was running beside the cancelled one
    assert all(chunk.worker is None and chunk.failures == 0 for chunk in _chunks(svc, [its_chunk, *kept_chunks]))
    stopped = _finished(svc, cancelled)
    assert stopped["status"] == "cancelled" and sorted(stopped["output"] + stopped["errors"]) == ["x0", "x1"]
    assert queue_depth(svc.celery, svc.runtime.model_queue) >= 1  # the handed-back chunk's doorbell, again
    monkeypatch.undo()
    for chunk_id in kept_chunks:
        pipeline.run_chunk(svc.runtime, chunk_id)
    done = _finished(svc, kept)
    assert done["status"] == "completed" and done["counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert Counter(done["output"]) == Counter(["y0", "y1", "y2", "y3"])  # each exactly once


def test_an_engine_error_with_two_chunks_held_records_a_failed_run_of_each(svc, monkeypatch):
    batch_id, chunk_ids = _batch(svc, "r", 4)

    def fail_once_fed(n):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    _wrap_stream(svc, monkeypatch, after_feed=fail_once_fed)
    with pytest.raises(RuntimeError):
        pipeline.run_chunk(svc.runtime, chunk_ids[0])
    assert [(c.worker, c.failures) for c in _chunks(svc, chunk_ids)] == [(None, 1), (None, 1)]
    monkeypatch.undo()
    started = _count_scheduler_runs(svc, monkeypatch)
    for chunk_id in chunk_ids:
        pipeline.run_chunk(svc.runtime, chunk_id)
    assert len(started) == 2  # a chunk that failed runs alone, so a poison request is still split off
    done = _finished(svc, batch_id)
    assert done["status"] == "completed" and sorted(done["output"]) == ["r0", "r1", "r2", "r3"]


def test_a_stopping_worker_hands_back_every_chunk_it_holds(svc, monkeypatch):
    batch_id, chunk_ids = _batch(svc, "r", 4)

    def stop(_n):
        raise KeyboardInterrupt

    _wrap_stream(svc, monkeypatch, after_feed=stop)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_chunk(svc.runtime, chunk_ids[0])
    assert [(c.worker, c.failures) for c in _chunks(svc, chunk_ids)] == [(None, 0), (None, 0)]
    with svc.runtime.session() as session:
        statuses = set(session.scalars(select(Request.status).where(Request.batch_id == batch_id)))
    assert RequestStatus.running not in statuses
    assert queue_depth(svc.celery, svc.runtime.model_queue) >= 1  # rung again: a fed chunk's doorbell may be gone


def test_the_heartbeat_renews_every_held_chunk_and_notices_any_lost(svc):
    _, chunk_ids = _batch(svc, "r", 4)
    with svc.runtime.session() as session, session.begin():
        repo.upsert_worker(session, name=svc.runtime.name, model="tiny", queue=svc.runtime.model_queue,
                           max_positions=64, now=now())
        session.execute(update(Chunk).where(Chunk.id.in_(chunk_ids))
                        .values(worker=svc.runtime.name, leased_at=now() - 20))
    svc.runtime.settings.heartbeat_s = 0
    with Heartbeat(svc.runtime, chunk_ids[0]) as beat:
        beat.hold(chunk_ids[1])
        deadline = time.monotonic() + 30
        while not all(c.leased_at >= now() - 1 for c in _chunks(svc, chunk_ids)):
            assert time.monotonic() < deadline, "the heartbeat never renewed both leases"
            time.sleep(0.05)
        assert not beat.lost.is_set()
        with svc.runtime.session() as session, session.begin():  # the reconciler took the fed chunk
            session.execute(update(Chunk).where(Chunk.id == chunk_ids[1]).values(worker="gpu-5:2"))
        assert beat.lost.wait(timeout=30)
