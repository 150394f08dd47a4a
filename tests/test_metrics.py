"""GET /metrics: Prometheus text that parses, counters that move when a batch runs, who may read it, and the
two ways a process's samples reach a scraper (the multiprocess folder, a port of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cli.stack import free_port
from common import metrics
from common.ids import now
from common.settings import Settings
from db import keys
from tests.harness import Service, completion_line
from worker.reconcile import reconcile

REPO = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, labels); text_string_to_metric_families raises on anything malformed."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(svc: Service, **headers: str) -> Samples:
    response = svc.client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_move_when_a_batch_runs(service):
    model, worker = service.runtime.model_name, service.runtime.name
    before = scrape(service)
    batch = service.wait(service.submit([completion_line(f"r{i}", seed=i) for i in range(3)])["id"])
    assert batch["status"] == "completed"
    reconcile(service.runtime)
    after = scrape(service)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in
                 service.lines_of(batch["output_file_id"]))
    assert tokens > 0
    assert moved("diffbatch_tokens_generated_total", model=model, worker=worker) == tokens
    assert moved("diffbatch_forward_passes_total", model=model, worker=worker) >= 3  # a pass at least per request
    assert moved("diffbatch_chunk_seconds_count", model=model) >= 1
    assert moved("diffbatch_validation_seconds_count", outcome="accepted") == 1
    assert ("diffbatch_reconciler_actions_total", frozenset({("kind", "finalized")})) in after
    assert value(after, "diffbatch_worker_tokens_per_second", model=model, worker=worker) == 0  # idle now
    # Read from the database (this test's own): the batch and its requests by status, the worker's heartbeat.
    assert value(after, "diffbatch_database_up") == 1
    assert value(after, "diffbatch_batches", status="completed") == 1
    assert value(after, "diffbatch_batches", status="in_progress") == 0
    assert value(after, "diffbatch_requests", status="succeeded") == 3
    assert value(after, "diffbatch_requests", status="pending") == 0
    assert value(after, "diffbatch_workers_live", model=model) == 1
    assert ("diffbatch_webhook_deliveries_pending", frozenset()) in after
    assert 0 <= value(after, "diffbatch_worker_heartbeat_age_seconds", worker=worker, model=model) < 3600


def test_queue_depth_counts_the_requests_waiting_for_a_model(tmp_path, tiny_model):
    svc = Service.embedded(tmp_path, tiny_model)  # no worker: what is submitted stays queued
    batch = svc.submit([completion_line(f"r{i}") for i in range(4)])
    from worker.validation import validate_batch

    validate_batch(svc.runtime, batch["id"])
    samples = scrape(svc)
    assert value(samples, "diffbatch_queue_depth", model=svc.runtime.model_name) == 4
    assert value(samples, "diffbatch_requests", status="pending") == 4
    assert value(samples, "diffbatch_batches", status="in_progress") == 1


def test_once_keys_exist_metrics_needs_an_admin_key(tmp_path, tiny_model):
    svc = Service.embedded(tmp_path, tiny_model)
    with svc.runtime.session() as session, session.begin():
        plain = keys.create_key(session, tenant_id="alice", now=now())[1]
        admin = keys.create_key(session, tenant_id="ops", now=now(), admin=True)[1]
    assert svc.client.get("/metrics").status_code == 401
    refused = svc.client.get("/metrics", headers={"Authorization": f"Bearer {plain}"})
    assert refused.status_code == 403 and "admin key" in refused.json()["error"]["message"]
    assert value(scrape(svc, Authorization=f"Bearer {admin}"), "diffbatch_database_up") == 1


def test_the_api_adds_up_the_processes_of_the_multiprocess_folder(tmp_path, tiny_model, monkeypatch):
    folder = metrics.fresh_multiproc_dir(tmp_path / "metrics")
    worker_process = ("from common import metrics\n"
                      "with metrics.ChunkMeter('m', 'host:1') as meter:\n"
                      "    meter.add(5, 2, 3)\n"
                      "metrics.webhook_delivery('delivered')\n")
    for _ in range(2):  # two processes, one after the other: their counters add up
        subprocess.run([sys.executable, "-c", worker_process], cwd=REPO, check=True, timeout=120,
                       env={**os.environ, metrics.MULTIPROC_ENV: str(folder)})
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(folder))
    samples = scrape(Service.embedded(tmp_path, tiny_model))
    assert value(samples, "diffbatch_tokens_generated_total", model="m", worker="host:1") == 10
    assert value(samples, "diffbatch_forward_passes_total", model="m", worker="host:1") == 6
    assert value(samples, "diffbatch_chunk_seconds_count", model="m") == 2
    assert value(samples, "diffbatch_webhook_deliveries_total", outcome="delivered") == 2
    # The live tokens/s gauge of a process that exited is gone; the database's gauges are still there.
    assert not [key for key in samples if key[0] == "diffbatch_worker_tokens_per_second"]
    assert value(samples, "diffbatch_database_up") == 1


def test_a_process_serves_its_own_metrics_on_the_metrics_port():
    port = free_port()
    server = metrics.serve_port(Settings(metrics_port=port, metrics_host="127.0.0.1"))
    assert server is not None
    try:
        metrics.reconciler_actions({"resent": 2})
        samples = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
        assert value(samples, "diffbatch_reconciler_actions_total", kind="resent") >= 2
        # The same port taken: logged, and the process goes on without it.
        assert metrics.serve_port(Settings(metrics_port=port, metrics_host="127.0.0.1")) is None
    finally:
        server.shutdown()
        server.server_close()
