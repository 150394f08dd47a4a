"""The control process (`diffbatch control`) validates and finalizes on its own: no GPU worker is needed
for a broken file to fail, and a worker busy with a chunk never holds that up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.stack import free_port
from tests.harness import completion_line

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _start(role: str, data_dir: Path, model: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFBATCH_")}
    env.update(DIFFBATCH_DATA_DIR=str(data_dir), DIFFBATCH_MODEL=str(model), DIFFBATCH_MODEL_NAME="tiny")
    log = open(data_dir / f"{role}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "cli.main", role, *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def control_only(tmp_path, tiny_model):
    """API + control process, and no worker at all."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run([sys.executable, "-m", "cli.main", "db", "upgrade", "--data-dir", str(data)], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    processes = [_start("control", data, tiny_model), _start("api", data, tiny_model, "--port", str(port))]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url, data, tiny_model, processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _submit(url: str, content: bytes) -> dict:
    uploaded = httpx.post(f"{url}/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                          timeout=10).json()
    return httpx.post(f"{url}/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions",
                                                 "completion_window": "24h"}, timeout=10).json()


def _wait(url: str, batch: dict, until: set[str]) -> dict:
    deadline = time.monotonic() + 120  # a guard against a hang, not a speed check
    while batch["status"] not in until and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            batch = httpx.get(f"{url}/v1/batches/{batch['id']}", timeout=10).json()
        except httpx.TransportError:  # a server still starting
            continue
    return batch


def test_validation_needs_no_worker_and_a_worker_takes_the_chunks_later(control_only):
    url, data, model, processes = control_only
    broken = _wait(url, _submit(url, b'{"custom_id": "a"}\n'), {"failed"})
    assert broken["status"] == "failed"
    assert broken["errors"]["data"][0]["message"].startswith("Line 1: method: Field required")

    lines = [completion_line(f"r{i}", max_tokens=4) for i in range(5)]
    good = _wait(url, _submit(url, b"".join(json.dumps(x).encode() + b"\n" for x in lines)), {"in_progress"})
    assert good["status"] == "in_progress" and good["request_counts"]["total"] == 5

    processes.append(_start("worker", data, model))  # GPU work arrives; finalizing stays with control
    done = _wait(url, good, {"completed", "failed", "expired", "cancelled"})
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 5
    output = httpx.get(f"{url}/v1/files/{done['output_file_id']}/content", timeout=10).text.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == [f"r{i}" for i in range(5)]


def test_serve_says_what_it_resumes_and_finishes_it(control_only):
    url, data, model, processes = control_only
    lines = [completion_line(f"r{i}", max_tokens=4) for i in range(3)]
    left = _wait(url, _submit(url, b"".join(json.dumps(x).encode() + b"\n" for x in lines)), {"in_progress"})
    for process in processes:  # the previous run ends with the batch accepted and nothing generated
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFBATCH_")}
    serve = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--data-dir", str(data)],
                             cwd=REPO, env={**env, "DIFFBATCH_MODEL": str(model), "DIFFBATCH_MODEL_NAME": "tiny"},
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert serve.stdout.readline().strip() == "resuming 1 batch (3 open requests) left by the previous run"
        done = _wait(f"http://127.0.0.1:{port}", left, {"completed", "failed", "expired", "cancelled"})
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(60)
