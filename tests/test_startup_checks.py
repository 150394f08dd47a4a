"""Startup checks: a cause a process would die of later is one line naming it and the fix, exit 2, before
anything is started or submitted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main

REPO = Path(__file__).resolve().parents[1]
HANG = 300  # guards a hang only


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DIFFBATCH_"):
            monkeypatch.delenv(name)


def _run(tmp_path: Path, *extra: str) -> list[str]:
    return ["run", str(REPO / "examples/batch.jsonl"), "-o", str(tmp_path / "out.jsonl"),
            "--data-dir", str(tmp_path / "data"), *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def _nothing_submitted(tmp_path: Path) -> None:
    assert not (tmp_path / "data" / "diffbatch.sqlite").exists() and not (tmp_path / "data" / "logs").exists()


def test_a_missing_model_folder_stops_run_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFBATCH_MODEL", str(tmp_path / "nonexistent"))
    assert main(_run(tmp_path)) == 2
    assert _one_line(capsys) == (f"diffbatch run: no model folder at {tmp_path / 'nonexistent'}: set DIFFBATCH_MODEL "
                                 "(or `run --model`) to a checkpoint folder")
    _nothing_submitted(tmp_path)


def test_run_model_names_the_folder_to_check(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_run(tmp_path, "--model", str(empty))) == 2
    assert _one_line(capsys).startswith(f"diffbatch run: no config.json in the model folder {empty}: ")
    _nothing_submitted(tmp_path)


def test_an_unreadable_model_folder_is_said(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "config.json").write_text("{}")
    locked.chmod(0)
    # Root reads any folder whatever its mode; the check asks os.access, so answer for this folder as
    # its permissions would for anyone else.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path).is_relative_to(locked)
                        else real_access(path, mode, **kw))
    try:
        assert main(_run(tmp_path, "--model", str(locked))) == 2
    finally:
        locked.chmod(0o755)
    assert _one_line(capsys).startswith(f"diffbatch run: cannot read the model folder {locked} (permissions)")


def test_an_unwritable_data_folder_is_said(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", str(REPO / "examples/batch.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                 "--data-dir", str(blocker / "data")]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"diffbatch run: cannot write the data folder {blocker / 'data'} (")
    assert line.endswith("choose another with --data-dir (DIFFBATCH_DATA_DIR)")


@pytest.mark.parametrize("command", ["serve", "api"])
def test_a_taken_port_is_said_before_the_stack_starts(tmp_path, capsys, command):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main([command, "--port", str(port), "--data-dir", str(tmp_path / "data")]) == 2
    assert _one_line(capsys) == (f"diffbatch {command}: port {port} on 127.0.0.1 is in use (another diffbatch "
                                 "serve?): stop what holds it, or choose another with --port (DIFFBATCH_API_PORT)")
    assert not (tmp_path / "data" / "logs").exists()


@pytest.mark.parametrize("command", ["serve", "worker", "control", "beat"])
def test_an_unreachable_database_is_said(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("DIFFBATCH_DATABASE_URL", "postgresql+psycopg://diffbatch:secret@127.0.0.1:1/diffbatch")
    assert main([command, "--data-dir", str(tmp_path / "data")]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"diffbatch {command}: cannot reach the database at "
                           "postgresql+psycopg://diffbatch:***@127.0.0.1:1/diffbatch (")
    assert line.endswith("): start it, or fix DIFFBATCH_DATABASE_URL") and "secret" not in line


@pytest.mark.parametrize("command", ["serve", "worker", "control"])
def test_an_unreachable_broker_is_said(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("DIFFBATCH_BROKER_URL", "redis://:secret@127.0.0.1:1/0")
    assert main([command, "--data-dir", str(tmp_path / "data")]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"diffbatch {command}: cannot reach the broker at redis://:***@127.0.0.1:1/0 (")
    assert line.endswith("): start it, or fix DIFFBATCH_BROKER_URL") and "secret" not in line


def test_serve_off_loopback_without_a_key_is_said_before_starting(tmp_path, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data")]) == 2
    assert _one_line(capsys).startswith("diffbatch serve: refusing to serve on 0.0.0.0 without an API key; ")


@pytest.mark.slow
def test_the_command_a_user_types_exits_2_with_the_model_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFBATCH_")}
    result = subprocess.run([sys.executable, "-m", "cli.main", *_run(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=HANG, env={**env, "DIFFBATCH_MODEL": "/nonexistent"})
    assert result.returncode == 2
    assert result.stderr.strip() == ("diffbatch run: no model folder at /nonexistent: set DIFFBATCH_MODEL "
                                     "(or `run --model`) to a checkpoint folder")
    _nothing_submitted(tmp_path)
