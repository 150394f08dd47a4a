"""The CLI a person uses against a running server (submit, status, results, cancel, models, workers), and
progress that moves with tokens: engine counter -> heartbeat -> Chunk.tokens_done -> the batch's `progress`."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from sqlalchemy import select, update

from cli import progress
from cli.client import api_base
from cli.logs import RotatingLog
from cli.main import _not_a_poll, main
from db.models import Chunk
from tests.harness import completion_line
from tests.live_server import live_server

REPO = Path(__file__).resolve().parents[1]
HANG = 120  # guards a hang only


def _batch(status: str = "in_progress", done: int = 0, total: int = 4, finished_tokens: int = 0,
           tokens: int = 0) -> dict:
    return {"id": "batch_x", "status": status, "created_at": 0,
            "request_counts": {"total": total, "completed": done, "failed": 0},
            "usage": {"input_tokens": 0, "output_tokens": finished_tokens, "total_tokens": finished_tokens},
            "progress": {"requests_done": done, "requests_total": total, "tokens_done": tokens}}


@pytest.mark.parametrize("typed", ["http://127.0.0.1:8123", "http://127.0.0.1:8123/", "http://127.0.0.1:8123/v1",
                                   "http://127.0.0.1:8123/v1/"])
def test_url_is_accepted_with_or_without_v1(typed):
    assert api_base(typed) == "http://127.0.0.1:8123"


def test_without_a_terminal_each_change_is_one_line_with_rate_and_eta(monkeypatch):
    clock = iter([0.0, 2.0, 4.0, 4.5, 30.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    sink = io.StringIO()
    with progress.BatchView(Console(file=sink, force_terminal=False, width=200), tokens_per_request_hint=100) as view:
        view.update(_batch("validating", total=0))
        view.update(_batch(tokens=0))
        view.update(_batch(tokens=40))  # first pass: the running rows committed 40 tokens, no request done
        view.update(_batch(tokens=40))  # nothing changed: no line
        view.update(_batch(done=1, finished_tokens=100, tokens=140))
    lines = sink.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("batch_x validating: 0/? requests")
    # 40 tokens in 2 s: 20 tok/s; 4 requests of ~100 tokens less the 40 done: 360 tokens, 18 s.
    assert "0/4 requests, 40 tokens, 20.0 tok/s, ETA 0:00:18" in lines[2]
    assert "1/4 requests, 140 tokens" in lines[3] and "ETA -:--:--" not in lines[3]


def test_the_bar_counts_running_tokens_as_part_of_a_request():
    snap = progress.snapshot(_batch(done=1, finished_tokens=50, tokens=75))
    assert progress.per_request(snap, hint=None) == 50
    assert progress.done_equivalent(snap, 50) == pytest.approx(1.5)
    assert progress.eta_s(snap, rate=25.0, tokens_per_request=50) == pytest.approx((3 * 50 - 25) / 25)
    assert progress.eta_s(snap, rate=None, tokens_per_request=50) is None


def test_the_engine_counts_tokens_of_running_rows(tiny_model):
    from worker.engine.engine import Engine
    from worker.engine.loader import load_model
    from worker.engine.params import GenerationRequest, SamplingParams

    engine = Engine(load_model(str(tiny_model)), max_batch_size=2)
    requests = [GenerationRequest(engine.encode_completion("steps"), SamplingParams(max_tokens=96, steps=4)),
                GenerationRequest(engine.encode_completion("short"), SamplingParams(max_tokens=5))]
    before = engine.tokens_committed
    stream = engine.stream(requests)
    first_index, first = next(stream)
    assert first_index == 1  # the 5-token row leaves first, the 96-token one still runs
    assert 0 < engine.tokens_in_flight < 96
    results = dict([(first_index, first), *stream])
    assert engine.tokens_in_flight == 0
    assert results[0].completion_tokens == 96
    assert 96 + results[1].completion_tokens <= engine.tokens_committed - before <= 96 + 5


def test_heartbeat_reports_the_running_tokens_into_the_batch_progress(service, monkeypatch):
    from worker import heartbeat

    batch = service.wait(service.submit([completion_line("a"), completion_line("b")])["id"])
    with service.runtime.session() as session:
        chunk_id = session.scalars(select(Chunk.id).where(Chunk.batch_id == batch["id"])).first()
    with service.runtime.session() as session, session.begin():
        session.execute(update(Chunk).where(Chunk.id == chunk_id).values(worker="w1"))
    runtime = SimpleNamespace(settings=SimpleNamespace(heartbeat_s=1), session=service.runtime.session, name="w1",
                              engine=SimpleNamespace(tokens_in_flight=37))
    monkeypatch.setattr(heartbeat, "PROGRESS_S", 0.05)
    with heartbeat.Heartbeat(runtime, chunk_id):
        deadline = time.monotonic() + HANG
        while (got := service.client.get(f"/v1/batches/{batch['id']}").json())["progress"]["tokens_done"] \
                == batch["usage"]["output_tokens"]:
            assert time.monotonic() < deadline, "the heartbeat never reported"
            time.sleep(0.05)
    assert got["progress"] == {"requests_done": 2, "requests_total": 2,
                               "tokens_done": batch["usage"]["output_tokens"] + 37}
    after = service.client.get(f"/v1/batches/{batch['id']}").json()  # the run ended: its rows count as finished
    assert after["progress"]["tokens_done"] == batch["usage"]["output_tokens"]


def test_person_commands_against_a_server_at_the_url_serve_prints(service, tmp_path, capsys):
    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps(completion_line(c)) + "\n" for c in ("a", "b", "c")))
    with live_server(service.client.app) as url:
        printed = f"{url}/v1"  # what `serve` prints
        assert main(["submit", str(lines), "--wait", "--url", printed]) == 0
        batch_id = capsys.readouterr().out.strip()
        assert batch_id.startswith("batch_")

        assert main(["status", batch_id, "--json", "--url", url]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["status"] == "completed" and shown["progress"]["requests_done"] == 3

        assert main(["status", "--url", printed]) == 0
        assert batch_id in capsys.readouterr().out

        out = tmp_path / "out.jsonl"
        assert main(["results", batch_id, "-o", str(out), "--url", printed]) == 0
        assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == ["a", "b", "c"]
        assert main(["results", batch_id, "--follow", "--url", printed]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 3

        assert main(["models", "--url", printed]) == 0
        assert capsys.readouterr().out.split() == ["tiny"]
        assert main(["workers", "--json", "--url", printed]) == 0
        workers = json.loads(capsys.readouterr().out)["data"]
        assert [(w["model"], w["live"]) for w in workers] == [("tiny", True)]
        assert workers[0]["heartbeat_age_s"] >= 0

        assert main(["cancel", batch_id, "--url", printed]) == 1  # a finished batch: the server's 409
        assert "409" in capsys.readouterr().err
        assert main(["status", "batch_nope", "--url", printed]) == 1
        assert "No such Batch object: batch_nope" in capsys.readouterr().err


def test_a_server_that_is_not_there_is_one_line(capsys):
    from cli.stack import free_port

    assert main(["models", "--url", f"http://127.0.0.1:{free_port()}/v1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffbatch models: cannot reach http://127.0.0.1:") and "Traceback" not in err


def test_workers_endpoint_is_behind_the_keys_like_the_rest(service):
    listed = service.client.get("/v1/workers").json()["data"]
    assert [w["name"] for w in listed] == [service.runtime.name]
    assert set(listed[0]) >= {"name", "model", "queue", "heartbeat_age_s", "live"}


def test_status_polls_stay_out_of_the_access_log():
    def record(method: str, status: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:1", method, "/v1/batches/b", "1.1", status), None)

    assert not _not_a_poll(record("GET", 200))
    assert _not_a_poll(record("GET", 404)) and _not_a_poll(record("POST", 200))


def test_log_files_rotate(tmp_path):
    log = RotatingLog(tmp_path / "api.log", max_bytes=100, backups=2)
    for n in range(40):
        log.write(f"line {n:04d}\n".encode())
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.log", "api.log.1", "api.log.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    assert (tmp_path / "api.log").read_text().splitlines()[-1] == "line 0039"


@pytest.mark.slow
def test_version_and_help_speak_to_a_user():
    version = subprocess.run([sys.executable, "-m", "cli.main", "--version"], cwd=REPO, capture_output=True,
                             text=True, timeout=HANG)
    assert version.returncode == 0 and version.stdout.startswith("diffbatch ")
    helped = subprocess.run([sys.executable, "-m", "cli.main", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=HANG)
    assert helped.returncode == 0
    assert helped.stdout.splitlines()[2].startswith("Batch generation with diffusion language models")
    assert "Exit codes:" in helped.stdout and "compose.yaml" not in helped.stdout
