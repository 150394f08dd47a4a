"""The commands a user types: `diffbatch run` (README's first command) and `diffbatch serve` + the openai SDK."""

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

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# Subprocess limits guard only against a hang: the 50-request demo alone took ~300 s on a loaded 2-core host.
HANG = 1800


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFBATCH_")}
    return {**env, **extra}


def _custom_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


def test_readme_first_command_writes_one_line_per_request(tmp_path):
    output = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", "examples/batch.jsonl", "-o", str(output),
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _custom_ids(output) == _custom_ids(REPO / "examples/batch.jsonl")
    assert "completed" in result.stderr
    first = json.loads(output.read_text().splitlines()[0])
    assert first["response"]["body"]["model"] == "diffbatch-py-mini"  # the shipped trained model answered


def test_run_reports_a_failed_batch_and_exits_non_zero(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", str(bad), "-o", str(tmp_path / "out.jsonl"),
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=_env(DIFFBATCH_MODEL=str(tiny_model)), capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 1
    assert "failed" in result.stderr and "Line 1: method: Field required" in result.stderr


@pytest.mark.parametrize("variable,value,said", [
    ("DIFFBATCH_DIFFUSION", '{"sampler": "threshold", "threshold": 1.5}',
     "DIFFBATCH_DIFFUSION: threshold: Input should be"),
    ("DIFFBATCH_MAX_BATCH_SIZE", "abc", "DIFFBATCH_MAX_BATCH_SIZE: Input should be a valid integer"),
    ("DIFFBATCH_CHUNK_SIZE", "1", "DIFFBATCH_CHUNK_SIZE (1) must be at least DIFFBATCH_MAX_BATCH_SIZE (32)"),
])
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path, variable, value, said):
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", "examples/batch.jsonl", "-o", str(tmp_path / "out.jsonl"),
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=_env(**{variable: value}), capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2
    assert result.stderr.startswith(f"diffbatch: {said}") and "Traceback" not in result.stderr, result.stderr


def test_an_output_folder_that_does_not_exist_is_said_before_the_batch_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", "examples/batch.jsonl", "-o", str(tmp_path / "nodir" / "out.jsonl"),
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == f"diffbatch run: cannot write {tmp_path / 'nodir' / 'out.jsonl'}: " \
                                    f"no such folder {tmp_path / 'nodir'}"
    assert not (tmp_path / "data").exists()  # nothing was started


def test_a_server_that_cannot_be_reached_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", "examples/batch.jsonl", "-o", str(tmp_path / "out.jsonl"),
         "--url", f"http://127.0.0.1:{free_port()}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("diffbatch run: cannot reach http://127.0.0.1:")


def test_a_run_replaces_the_files_of_an_earlier_one_and_reads_the_endpoint_past_a_broken_line(served, tmp_path):
    url, _ = served
    run = lambda source: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "cli.main", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--url", url],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=HANG)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "tiny", "prompt": "x", "max_tokens": 2}}) + "\n")
    assert run(good).returncode == 0 and (tmp_path / "out.jsonl").exists()
    chat = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    broken_first = tmp_path / "broken_first.jsonl"
    broken_first.write_text("{not json\n" + "".join(json.dumps({**chat, "custom_id": f"c{i}"}) + "\n"
                                                     for i in range(3)))
    failed = run(broken_first)
    assert failed.returncode == 1
    assert not (tmp_path / "out.jsonl").exists()  # not the first run's results, read as this one's
    # Only line 1 is wrong: the batch's endpoint came from line 2, not a guess that fails lines 2-4.
    assert "Line 1: not valid JSON" in failed.stderr and "mismatched_endpoint" not in failed.stderr, failed.stderr


@pytest.fixture
def served(tmp_path, tiny_model):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=_env(DIFFBATCH_MODEL=str(tiny_model)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).json()["data"]:
                break
        except (httpx.HTTPError, ValueError, KeyError):
            time.sleep(0.3)
    yield url, process
    if process.poll() is None:  # stopped as Ctrl-C stops it; killed only if that hangs
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"  # a zombie: exited
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_serve_killed_outright_takes_its_processes_with_it(served):
    """kill -9 (or the OOM killer) on `diffbatch serve` leaves no API, worker, control process or beat running."""
    _, process = served
    children = _children(process.pid)
    assert len(children) == 4
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(_gone(pid) for pid in children):
        time.sleep(0.2)
    assert all(_gone(pid) for pid in children)


def test_openai_sdk_against_diffbatch_serve_and_clean_stop(served, tmp_path):
    from openai import OpenAI

    url, process = served
    assert process.poll() is None, process.stdout.read()
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    lines = [{"custom_id": f"sdk-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 8}}
             for i in range(3)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = client.files.create(file=source.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "sdk-test"})
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 3 and batch.metadata == {"job": "sdk-test"}
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in output) == ["sdk-0", "sdk-1", "sdk-2"]
    assert all(line["response"]["body"]["object"] == "chat.completion" for line in output)
    assert batch.id in [b.id for b in client.batches.list(limit=5).data]
    assert [m.id for m in client.models.list().data] == ["tiny"]

    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C stops API, worker and scheduler
    assert process.wait(timeout=60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=1)



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads children from /proc")
def test_sigterm_to_run_stops_its_whole_stack(tmp_path, tiny_model):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                          "body": {"model": "tiny", "prompt": "x", "max_tokens": 512}}) + "\n"
                              for i in range(64)))
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", str(source), "-o", str(tmp_path / "out.jsonl"),
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=_env(DIFFBATCH_MODEL=str(tiny_model), DIFFBATCH_MODEL_NAME="tiny"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_children(process.pid)) < 4:
        time.sleep(0.2)
    children = _children(process.pid)
    assert len(children) == 4
    process.terminate()
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert code == 130, stderr
    assert "interrupted; the batch stays in" in stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(_gone(pid) for pid in children):
        time.sleep(0.2)
    assert all(_gone(pid) for pid in children)


def test_a_kill_python_drops_inside_a_finalizer_still_stops_the_next_poll(monkeypatch):
    """Python prints and drops an exception a signal handler raises while a __del__ runs; the run's
    poll must raise the interrupt again rather than follow the batch to its end."""
    from cli import main

    monkeypatch.setattr(main, "_interrupted", main.threading.Event())
    previous = signal.signal(signal.SIGTERM, main._interrupt)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    class KilledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at one of these bytecodes, inside __del__
                pass

    try:
        KilledWhileCollected()  # collected at once: the KeyboardInterrupt is dropped
        assert [type(hook.exc_value) for hook in unraisable] == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt):
            main._raise_if_interrupted()
    finally:
        signal.signal(signal.SIGTERM, previous)
